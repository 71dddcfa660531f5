r"""WSAM: sharpness as a weighted regulariser (Yue et al., KDD 2023).

WSAM minimises ``L(w) + gamma/(1 - gamma) * (max_e L(w + e) - L(w))``: the loss plus ``a`` times
SAM's sharpness, ``a = gamma / (1 - gamma)`` (``gamma = 0.5`` is SAM, ``0`` the base optimizer).
With ``g1`` the gradient at ``w`` and ``g2`` the one at ``w + e``:

* ``decouple=True`` (the paper's Algorithm 1, the default): the base optimizer steps with
  ``g1``, then the sharpness term is applied as plain gradient descent,
  ``w <- w - lr * a * (g2 - g1)``, so Adam's scaling does not touch it;
* ``decouple=False``: the base optimizer steps with ``g1 + a (g2 - g1)``.

``g1`` is kept in one buffer per parameter (allocated once). Coupled, the update's gradient
``a g2 + (1 - a) g1`` is read by a fused cl_optim base's restore+update pass (its COMBINE term,
bounded by the first ascent's norm ``||g1||``; written into ``.grad`` otherwise): beyond SAM's
bytes only keeping ``g1`` (8) and reading it (4). With a fused cl_optim base (fp32/fp64), decoupled is one pass too: the update reads ``g1``
(COMBINE) and applies the descent to the weights it has just written (the DESCENT term of
``cl_optim._terms``, skipped with the update): beyond SAM's bytes, keeping ``g1`` (8) and reading
it (4), as coupled. Otherwise (a torch.optim base, low precision, accumulation) the sharpness
direction is written into ``g1``'s buffer by one ``task_combine_`` pass, ``.grad`` becomes ``g1``
by another, and the descent is one more pass per group after the update: keep ``g1`` (8), the two
combinations (24), the descent with its finiteness guard (20), against pytorch_optimizer's three
buffers.
"""

from __future__ import annotations

import math

import torch

from ._sam_family import graded, keep_grads, refuse_dtensor
from .multitask.aggregators import weighted_sum_unchecked as weighted_sum  # aligned by construction
from .sam import SAM

__all__ = ["WSAM"]


class WSAM(SAM):
    r"""Weighted SAM around any ``torch.optim.Optimizer`` class; the ``SAM`` API (two-step and
    closure forms, AMP, ``ewc=``, ``fisher_ema=``, checkpoints).

    Args:
        gamma: weight of the sharpness, in ``[0, 1)``; the term's coefficient is ``gamma/(1-gamma)``
            (0.9 by default: 9).
        decouple: apply the sharpness term outside the base optimizer (see the module docstring).
        everything else: as :class:`cl_optim.SAM`.

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt = cl_optim.WSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9, lr=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> closure(); loss = opt.step(closure)  # doctest: +ELLIPSIS
        tensor(...)
    """

    def __init__(self, params, base_optimizer: type, rho: float = 0.05, gamma: float = 0.9, adaptive=False,
                 *, decouple: bool = True, **kwargs):  # fmt: skip
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"Invalid gamma: {gamma} (must be in [0, 1))")
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)
        self.gamma, self.decouple = float(gamma), bool(decouple)
        self._first_grads: dict = {}  # id(param) -> g1, then g2 - g1; allocated once, never saved

    @property
    def _LOCAL_ACCUMULATION(self) -> bool:  # the decoupled descent is made once per step
        return not self.decouple

    @property
    def sharpness_weight(self) -> float:
        """``a = gamma / (1 - gamma)``."""
        return self.gamma / (1.0 - self.gamma)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_first_grads"] = {}
        return state

    def _first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        self._run["first_pass"] = graded(self.param_groups)
        keep_grads(self._first_grads, self._run["first_pass"])
        super()._first_step(zero_grad, grad_scaler)

    def _second_step(self, zero_grad: bool = False) -> None:
        params = self._second_pass_params()
        if not params:
            return super()._second_step(zero_grad)
        refuse_dtensor(params, "WSAM")
        a = self.sharpness_weight
        kept = [self._first_grads[id(p)] for p in params]
        grads = [p.grad for p in params]
        home = grads[0].device
        if not self.decouple:  # a g2 + (1 - a) g1: read by a fused base's update (COMBINE), else written
            coefficients = self._constant((a, 1.0 - a), home)  # .grad (g2), g1
            self._combine_into_update(params, [kept], coefficients, self._ascent_norm(0))  # ||g1||
            return super()._second_step(zero_grad)
        bound = self._ascent_norm(0)  # ||g1||
        if self._fuses_combination(params, bound):
            # One pass: the update reads g1 (COMBINE row (0, 1)) and then applies the sharpness
            # descent w += lr (-a g2 + a g1) / S itself (DESCENT row), skipped with the update.
            coefficients = self._constant(((0.0, 1.0), (-a, a)), home)
            self._combine_into_update(params, [kept], coefficients, bound)
            return super()._second_step(zero_grad)
        # kept <- g2 - g1 (the sharpness direction); .grad <- g2 - (g2 - g1) = g1, the base's gradient.
        weighted_sum(
            [kept, grads],
            self._constant((-1.0, 1.0), home),
            out=kept,
            backend=self.backend,
        )
        weighted_sum(
            [kept],
            self._constant((-1.0,), home),
            out=grads,
            accumulate=True,
            backend=self.backend,
        )
        grad_scale = getattr(self, "grad_scale", None)  # read before the step: GradScaler's hand-over
        super()._second_step(zero_grad=False)
        # w <- w - lr a (g2 - g1) / S where the step was not skipped, a device-side factor per group.
        # A skipped step had an inf/NaN gradient, and 0 * NaN is NaN: the direction is made finite
        # first (a finite one is unchanged, so a step that was taken is not affected).
        for direction in kept:
            torch.nan_to_num_(direction, nan=0.0, posinf=0.0, neginf=0.0)
        taken = (~self._run["last_step_skipped"]).to(torch.float64)
        if grad_scale is not None:
            taken = taken / grad_scale.to(taken.device, torch.float64)
        ids = {id(p): i for i, p in enumerate(params)}
        for group in self.param_groups:
            members = [i for i, p in ((ids.get(id(q)), q) for q in group["params"]) if i is not None]
            if not members or _is_zero(group["lr"]):
                continue
            factor = (taken * (-a * group["lr"])).reshape(1)  # stays on the device: no host read
            weighted_sum([[kept[i] for i in members]], factor, out=[params[i] for i in members],
                         accumulate=True, backend=self.backend)  # fmt: skip
        if zero_grad:
            self.zero_grad()


def _is_zero(value) -> bool:
    return not isinstance(value, torch.Tensor) and math.isclose(float(value), 0.0, abs_tol=0.0)
