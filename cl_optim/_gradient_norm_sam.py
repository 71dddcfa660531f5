r"""The four passes that GAM and C-Flat share: SAM plus an ascent on the gradient norm.

With ``g0`` the gradient at ``w`` (the user's backward before ``step``):

1. ``g1`` at ``w + rho * g0/||g0||``                     (closure call 1; SAM's gradient)
2. ``h = g1 - g0`` (a finite-difference gradient of ``||grad L||``), back at ``w``:
   ``w2 = w + grad_norm_rho * h/||h||``, ``g2`` at ``w2``     (closure call 2)
3. ``g3`` at ``w2 + rho * g2/||g2||``                     (closure call 3)
4. the variant combines ``g0..g3`` into ``.grad``, ``w`` is restored from its copy (exactly, not
   by subtracting the perturbations as the official codes do) and the base optimizer steps.

Every ascent uses the group's metric (``adaptive``, with the weights where the ascent starts).
Buffers: the restore copy, ``g1`` and ``g2``, plus ``g0`` while it is needed (GAM needs it at the
end; C-Flat lends its buffer to the third ascent's scratch copy): 4 for C-Flat, 5 for GAM,
against 5 and 6 in the official codes.

AMP: ``opt.first_step(zero_grad=True, grad_scaler=scaler)`` after the scaled backward, then
``opt.step(closure)`` (the closure scaling its loss) and ``scaler.update()``: the step checks the
final gradient for infs in the scaler as ``GradScaler.step`` would, so ``update()`` sees every
pass's overflow.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ._sam_family import ScalerHandOver, graded, grads_of, keep_grads, refuse_dtensor
from .multitask.aggregators import weighted_sum_unchecked as weighted_sum  # aligned by construction
from .sam import SAM

__all__ = []


class GradientNormSAM(SAM):
    """Base of :class:`cl_optim.GAM` and :class:`cl_optim.CFlat`; subclasses set
    ``_combine(params, g0, g1, g2, g3_grads)`` and ``_KEEPS_G0``."""

    _KEEPS_G0 = True  # g0 is read by the final combination (GAM); C-Flat frees it after h
    _LOCAL_ACCUMULATION = False

    def __init__(
        self, params, base_optimizer: type, rho: float, grad_norm_rho: float, adaptive=False, **kwargs
    ):
        if not 0.0 <= grad_norm_rho < math.inf:
            raise ValueError(f"Invalid grad_norm_rho: {grad_norm_rho} (must be finite and >= 0)")
        self.grad_norm_rho = float(grad_norm_rho)  # before SAM's: add_param_group reads it
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)
        for group in self.param_groups:
            group.setdefault("grad_norm_rho", self.grad_norm_rho)
        self._kept: dict = {"g0": {}, "g1": {}, "g2": {}, "scratch": {}}  # allocated once, never saved

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_kept"] = {key: {} for key in self._kept}
        state["_run"] = {**state["_run"], "gated": None}
        return state

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("grad_norm_rho", self.grad_norm_rho)
        super().add_param_group(param_group)

    def _first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        if self._run["pending"] is None and self.is_sam_step and not self._gate(grad_scaler):
            # A gated step (C-Flat++): nothing moves, .grad stays for the base update of step().
            self._run["gated"] = (grad_scaler,)
            return
        self._run["first_pass"] = graded(self.param_groups)
        keep_grads(self._kept["g0"], self._run["first_pass"])
        super()._first_step(zero_grad, grad_scaler)

    def second_step(self, zero_grad: bool = False, accumulate: bool = False) -> None:
        raise RuntimeError(
            f"{type(self).__name__} runs four passes: call step(closure) (after first_step(grad_scaler=...) "
            "under AMP); second_step() alone would make a plain SAM step"
        )

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """The four passes (the closure is called three times); returns the first closure's loss.
        After ``first_step(grad_scaler=...)`` it runs passes 2-4 and completes the step."""
        if self._run["pending"] is None and not self._run.get("gated"):
            if not self.is_sam_step:
                self._base_step()
                return None
            if closure is None:
                raise RuntimeError(
                    f"{type(self).__name__}.step() needs a closure (it runs three more passes)"
                )
            self.first_step(zero_grad=True)
        if self._run.get("gated"):  # the gate stayed shut: the base update with g0, no closure call
            (grad_scaler,) = self._run["gated"]
            self._run["gated"] = None
            with ScalerHandOver(self, grad_scaler):
                self._base_step()
            return None
        if closure is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs a closure (it runs three more passes)")
        try:
            loss = self._passes(closure)
        except BaseException:
            self._abort()
            raise
        with ScalerHandOver(self, self._run["grad_scaler"]):
            self._second_step()
        return loss

    def _passes(self, closure: Callable):
        params = self._run["first_pass"]
        refuse_dtensor(params, type(self).__name__)
        loss = self._closure(closure, zero_grad=False)
        g0 = [self._kept["g0"][id(p)] for p in params]
        g1 = keep_grads(self._kept["g1"], self._checked(params, "the second pass"))
        # Back at w (exactly), then ascend along h = g1 - g0, written into .grad.
        self._restore()
        grads = [p.grad for p in params]
        weighted_sum(
            [g0, g1],
            self._constant((-1.0, 1.0), grads[0].device),
            out=grads,
            backend=self.backend,
        )
        scaler = self._run["grad_scaler"]  # the batch-Fisher metric is of unscaled gradients
        _, finite_h = self._ascend(
            self._moved_plan(), self._saved, radius="grad_norm_rho", grad_scaler=scaler, update_fisher=False
        )
        self._closure(closure)
        g2 = keep_grads(self._kept["g2"], self._checked(params, "the third pass"))
        scratch = self._kept["scratch"] if self._KEEPS_G0 else self._kept["g0"]  # g0 is dead for C-Flat
        _, finite_2 = self._ascend(self._moved_plan(), scratch, grad_scaler=scaler, update_fisher=False)
        self._closure(closure)
        self._checked(params, "the fourth pass")
        self._combine(params, g0, g1, g2)
        flag = self._run["pass1_nonfinite"]
        self._run["pass1_nonfinite"] = flag | ~finite_h.to(flag.device) | ~finite_2.to(flag.device)
        return loss

    def _gate(self, grad_scaler) -> bool:
        """Whether this step runs the four passes (C-Flat++ decides from the gradient norm)."""
        return True

    def _moved_plan(self) -> list:
        """The plan of the later ascents: the parameters the first one moved, which the final
        restore puts back (a parameter that gets a gradient only in a later pass stays put)."""
        moved = {id(p) for p in self._run["pending"]}
        plan = [(group, device, dtype, [p for p in bucket if id(p) in moved], backend, layout)
                for group, device, dtype, bucket, backend, layout in self._ascent_plan()]  # fmt: skip
        return [entry for entry in plan if entry[3]]

    def _closure(self, closure: Callable, zero_grad: bool = True):
        if zero_grad:
            self.zero_grad()
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _checked(params: list[Tensor], what: str) -> list[Tensor]:
        grads_of(params, what)
        return params

    def _combine(self, params: list[Tensor], g0: list, g1: list, g2: list) -> None:  # pragma: no cover
        raise NotImplementedError
