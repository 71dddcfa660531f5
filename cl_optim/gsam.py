r"""GSAM: surrogate-gap guided sharpness-aware minimisation (Zhuang et al., ICLR 2022).

SAM's update follows ``g2``, the gradient at ``w + e``. GSAM also lowers the surrogate gap
``L(w + e) - L(w)`` without raising the perturbed loss: it subtracts ``alpha`` times the part of
the first-pass gradient ``g1`` orthogonal to ``g2`` (the official rule, with its ``eps``):

    cos   = <g1, g2> / (||g1|| ||g2|| + eps)
    g1_v  = g1 - cos * ||g1|| / (||g2|| + eps) * g2
    grad  = g2 - alpha * g1_v  =  (1 + alpha cos ||g1|| / (||g2|| + eps)) g2 - alpha g1

The three reductions ``<g1, g2>``, ``||g1||^2``, ``||g2||^2`` are one ``task_gram`` pass over the
pair (fp64, deterministic), with no host read. The combination is read by the restore+update
pass itself where the base is a cl_optim optimizer and the parameters fp32/fp64 (the COMBINE
term of the fused step, on every backend); otherwise it is one ``task_combine_`` pass written
into ``.grad``. ``g1`` is kept in one buffer
per parameter, allocated once. The paper schedules ``rho`` with the learning rate:
``rho_t = rho_min + (rho - rho_min) (lr_t - lr_min) / (lr_max - lr_min)`` per group (``rho_min=``;
``lr_max`` defaults to each group's learning rate when the optimizer is built).

Bytes per parameter beyond SAM's (fp32): the copy of ``g1`` (8), the Gram pass (8), ``g1`` read
by the update (4), less SAM's check of the second pass (4: the Gram's norm of ``g2`` bounds the
combination): 16 (28 with the combination written into ``.grad``), against the official
code's separate passes (the inner product, two norms and the in-place update read ``g1``/``g2``
five times).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._sam_family import graded, keep_grads, refuse_dtensor
from .multitask.aggregators import gram_unchecked as task_gram_of  # aligned by construction
from .sam import SAM

__all__ = ["GSAM"]


class GSAM(SAM):
    r"""GSAM around any ``torch.optim.Optimizer`` class; the ``SAM`` API (``first_step``,
    ``second_step``, ``step(closure)``, AMP, ``ewc=``, ``fisher_ema=``, checkpoints).

    Args:
        alpha: weight of the orthogonal component removed (``0``: SAM). 0.4 by default.
        rho_min: with it, ``rho`` follows the learning rate (see the module docstring); ``rho``
            is then the value at ``lr_max``.
        lr_max, lr_min: the learning-rate range of that schedule (``lr_max``: each group's
            learning rate at construction; ``lr_min``: 0).
        everything else: as :class:`cl_optim.SAM`.

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt = cl_optim.GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> closure(); loss = opt.step(closure)  # doctest: +ELLIPSIS
        tensor(...)
    """

    def __init__(
        self,
        params,
        base_optimizer: type,
        rho: float = 0.05,
        alpha: float = 0.4,
        adaptive=False,
        *,
        rho_min: Optional[float] = None,
        lr_max: Optional[float] = None,
        lr_min: float = 0.0,
        **kwargs,
    ):
        if not 0.0 <= alpha < math.inf:
            raise ValueError(f"Invalid alpha: {alpha} (must be finite and >= 0)")
        if rho_min is not None and not 0.0 <= rho_min <= rho:
            raise ValueError(f"Invalid rho_min: {rho_min} (must be in [0, rho = {rho}])")
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)
        self.alpha, self.rho_min, self.lr_min, self.lr_max = float(alpha), rho_min, float(lr_min), lr_max
        for group in self.param_groups:
            self._schedule_range(group)
        self._first_grads: dict[int, Tensor] = {}  # id(param) -> g1, allocated once, never saved

    def _schedule_range(self, group: dict) -> None:
        """The group's ends of the rho schedule (``rho_max``: its rho now; ``lr_max``: its lr now)."""
        group.setdefault("rho_max", group["rho"])
        group.setdefault("lr_max", float(group["lr"]) if self.lr_max is None else float(self.lr_max))
        if self.rho_min is not None and not group["lr_max"] > self.lr_min:
            raise ValueError(
                f"the rho schedule needs lr_max > lr_min, got {group['lr_max']} and {self.lr_min}"
            )

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "lr_min") and self.rho_min is not None:  # refused before the group joins
            lr_max = param_group.get("lr_max", param_group.get("lr", self.defaults.get("lr")))
            lr_max = lr_max if self.lr_max is None or "lr_max" in param_group else self.lr_max
            if not float(lr_max) > self.lr_min:
                raise ValueError(f"the rho schedule needs lr_max > lr_min, got {lr_max} and {self.lr_min}")
        super().add_param_group(param_group)
        if hasattr(self, "lr_min"):  # SAM's constructor adds the first groups before GSAM's settings
            self._schedule_range(self.param_groups[-1])

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_first_grads"] = {}
        return state

    def _first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        if self.rho_min is not None:
            for group in self.param_groups:
                fraction = (float(group["lr"]) - self.lr_min) / (group["lr_max"] - self.lr_min)
                group["rho"] = self.rho_min + (group["rho_max"] - self.rho_min) * fraction
        # g1, before SAM's checks (they name any bad gradient) and its zero_grad.
        self._run["first_pass"] = graded(self.param_groups)
        keep_grads(self._first_grads, self._run["first_pass"])
        super()._first_step(zero_grad, grad_scaler)

    def _second_step(self, zero_grad: bool = False) -> None:
        params = self._second_pass_params()
        if params and self.alpha != 0.0:
            self._remove_the_orthogonal_part(params)
        super()._second_step(zero_grad)

    def _remove_the_orthogonal_part(self, params: list) -> None:
        """``.grad <- g2 - alpha * (g1 - cos ||g1|| / (||g2|| + eps) g2)``, all on the device."""
        refuse_dtensor(params, "GSAM")
        pair = [[self._first_grads[id(p)] for p in params], [p.grad for p in params]]
        gram = task_gram_of(pair, backend=self.backend)  # one fused pass per (device, dtype)
        first_norm, second_norm = gram[0, 0].clamp_min(0).sqrt(), gram[1, 1].clamp_min(0).sqrt()
        eps = self.perturb_eps
        cosine = gram[0, 1] / (first_norm * second_norm + eps)
        coefficients = torch.stack([
            1 + self.alpha * cosine * first_norm / (second_norm + eps), torch.full_like(cosine, -self.alpha)
        ])  # fmt: skip
        # for .grad (g2) and g1; read by the update where the base is fused (COMBINE), else written
        self._combine_into_update(params, [pair[0]], coefficients, first_norm, grad_norm=second_norm)
