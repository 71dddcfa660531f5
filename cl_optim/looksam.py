r"""LookSAM: SAM every ``k`` steps, its direction reused in between (Liu et al., CVPR 2022).

Algorithm 2 of the paper. On steps ``0, k, 2k, ...`` (a SAM step), with ``g`` the gradient at
``w`` and ``g_s`` the one at ``w + e``, the part of ``g_s`` orthogonal to ``g`` is kept:

    g_v = g_s - <g, g_s> / (||g||^2 + eps) * g          (= g_s - ||g_s|| cos(g, g_s) g / ||g||)

and the update uses ``g_s``. On the other ``k - 1`` steps there is no second pass: the update
uses ``g + alpha * ||g|| / (||g_v|| + eps) * g_v``. The weights are restored only after a SAM
step (pytorch_optimizer 3.9's and rollovd's LookSAM restore a stale copy on every step; INFTY 0.1.2's
never builds ``g_v``: its correction is silently absent). Norms are global by default;
``layerwise=True`` takes every norm and inner product (the ascent's too) per tensor, as the
official implementations do.

``g_v`` is persistent (one tensor per parameter, in ``sam_state``, saved in ``state_dict``); ``g`` is kept on SAM steps only. The reductions are one fused ``task_gram``
pass over the pair and the combinations one ``task_combine_`` pass. Bytes per fp32 parameter:
SAM steps as SAM plus keep ``g`` (8), the Gram (8) and ``g_v`` (12); reuse steps the Gram (8)
and ``g_v`` read by the update (4; the COMBINE term of a fused cl_optim base with fp32/fp64
parameters and global norms, else the combination written into ``.grad`` first, 12).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._sam_family import graded, keep_grads, known_on_host, norm_of, refuse_dtensor
from .multitask.aggregators import gram_unchecked as gram  # aligned by construction
from .multitask.aggregators import weighted_sum_unchecked as weighted_sum
from .sam import SAM

__all__ = ["LookSAM"]

GV_KEY = "looksam_gv"


class LookSAM(SAM):
    r"""LookSAM around any ``torch.optim.Optimizer`` class.

    Args:
        k: a SAM step every ``k`` steps, starting with the first (5 by default).
        alpha: weight of the reused direction (0.7 by default).
        layerwise: per-tensor norms instead of global ones.
        everything else: as :class:`cl_optim.SAM` (``interval`` is ``k`` here).

    ``step(closure)`` calls the closure once on SAM steps and never on the others (it then returns
    None); ``is_sam_step`` tells which comes. The two-step form: ``first_step``/``second_step`` on
    SAM steps, ``step()`` on the others (``GradScaler.step(opt)`` does that under AMP).

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt = cl_optim.LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=0.7, lr=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> for _ in range(3):
        ...     closure(); _ = opt.step(closure)  # doctest: +ELLIPSIS
        tensor(...)
        tensor(...)
        tensor(...)
    """

    _LOCAL_ACCUMULATION = False  # its state moves once per step

    def __init__(self, params, base_optimizer: type, rho: float = 0.05, k: int = 5, alpha: float = 0.7,
                 adaptive=False, *, layerwise: bool = False, **kwargs):  # fmt: skip
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k!r} (an int >= 1)")
        if not 0.0 <= alpha < math.inf:
            raise ValueError(f"Invalid alpha: {alpha} (must be finite and >= 0)")
        for name in ("interval", "start_step"):
            if name in kwargs:
                raise TypeError(f"LookSAM takes k, not {name}")
        super().__init__(params, base_optimizer, rho, adaptive, interval=k, **kwargs)
        self.k, self.alpha, self.layerwise = k, float(alpha), bool(layerwise)
        self._first_grads: dict = {}  # id(param) -> g on SAM steps; allocated once, never saved

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_first_grads"] = {}
        return state

    # ------------------------------------------------------------------------------ SAM steps

    def _first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        if self.layerwise and self.is_sam_step:
            return self._first_step_per_tensor(zero_grad, grad_scaler)
        self._run["first_pass"] = graded(self.param_groups)
        keep_grads(self._first_grads, self._run["first_pass"])
        super()._first_step(zero_grad, grad_scaler)

    def _first_step_per_tensor(self, zero_grad: bool, grad_scaler) -> None:
        """The ascent with each tensor's own norm: ``e_i = rho T_i^2 g_i / (||T_i g_i|| + eps)``."""
        if self._run["pending"] is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(): the weights are still perturbed"
            )
        self._run["first_pass"] = graded(self.param_groups)
        keep_grads(self._first_grads, self._run["first_pass"])
        plan = self._ascent_plan()
        if self.mask is not None:
            self._refresh_masks(plan)
        perturbed, finite = [], None
        for group, device, dtype, bucket, backend, layout in plan:
            for p in bucket:
                moved, ok = self._ascend([(group, device, dtype, [p], backend, layout)], self._saved,
                                         grad_scaler=grad_scaler)  # fmt: skip
                perturbed.extend(moved)
                finite = ok if finite is None else finite & ok.to(finite.device)
        if finite is None:  # nothing to move (SAM-ON with no selected gradient)
            finite = torch.ones((), dtype=torch.bool)
        self._perturbed(perturbed, ~finite, grad_scaler, zero_grad)

    def _second_step(self, zero_grad: bool = False) -> None:
        params = self._second_pass_params()  # none on a reuse step's base update
        if params:
            self._keep_orthogonal_part(params)
        super()._second_step(zero_grad)

    def _keep_orthogonal_part(self, params: list[Tensor]) -> None:
        """``g_v <- g_s - <g, g_s> / (||g||^2 + eps) g`` into the persistent state."""
        refuse_dtensor(params, "LookSAM")
        first = [self._first_grads[id(p)] for p in params]
        second = [p.grad for p in params]
        g_v = [self._g_v(p) for p in params]
        for index in self._norm_scopes(params):
            pair = [[first[i] for i in index], [second[i] for i in index]]
            g = gram(pair, backend=self.backend)
            coefficients = torch.stack([-g[0, 1] / (g[0, 0] + self.perturb_eps), torch.ones_like(g[0, 1])])
            # A non-finite pass (the step is skipped) keeps the last g_v: a NaN one would make every
            # later reuse step non-finite too. The Gram is finite exactly when both gradients are.
            finite = torch.isfinite(g).all()
            on_host = known_on_host(finite)  # CPU: branch for free; else select on the device
            if on_host is not None:
                if on_host:
                    weighted_sum(pair, coefficients, out=[g_v[i] for i in index], backend=self.backend)
                continue
            weighted_sum(pair, coefficients, out=pair[0], backend=self.backend)  # into g's dead buffer
            for i in index:  # in place: no temporary per parameter
                torch.where(finite.to(g_v[i].device), first[i], g_v[i], out=g_v[i])

    def _g_v(self, p: Tensor) -> Tensor:
        state = self.sam_state[p]
        buf = state.get(GV_KEY)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = state[GV_KEY] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return buf

    # ---------------------------------------------------------------------------- reuse steps

    def _base_step(self, update_fisher: bool = True) -> None:
        with torch.no_grad():
            if update_fisher:  # from the batch gradient g, as on SAM steps, before g_v joins it
                self._running_fisher_from_grads()
            params = [p for p in graded(self.param_groups) if GV_KEY in self.sam_state.get(p, {})]
            if params and self.alpha != 0.0:
                self._add_reused_direction(params)
        super()._base_step(update_fisher=False)

    def _add_reused_direction(self, params: list[Tensor]) -> None:
        """``.grad <- g + alpha ||g|| / (||g_v|| + eps) g_v`` (a scaled gradient scales both norms
        alike, so AMP needs nothing here)."""
        refuse_dtensor(params, "LookSAM")
        grads = [p.grad for p in params]
        g_v = [self.sam_state[p][GV_KEY] for p in params]
        for index in self._norm_scopes(params):
            pair = [[grads[i] for i in index], [g_v[i] for i in index]]
            g = gram(pair, backend=self.backend)
            norms = torch.stack([norm_of(g, 0), norm_of(g, 1)])  # ||g||, ||g_v||
            weight = self.alpha * norms[0] / (norms[1] + self.perturb_eps)
            coefficients = torch.stack([torch.ones_like(weight), weight])
            if not self.layerwise:  # one combination: the update reads g_v (COMBINE) where it can
                return self._combine_into_update(
                    params, [pair[1]], coefficients, norms[1], grad_norm=norms[0]
                )
            weighted_sum(pair, coefficients, out=pair[0], backend=self.backend)

    def _norm_scopes(self, params: list[Tensor]) -> list[list[int]]:
        """The index sets whose norms are taken together: all (global) or one per tensor."""
        return [[i] for i in range(len(params))] if self.layerwise else [list(range(len(params)))]
