"""A SAM variant's final combination of gradients, handed to a fused update (the COMBINE term:
never written into ``.grad``) or written, and the bound that replaces the check of the written
combination for infs."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._optimizer import FusedOptimizer, _check_param


class SAMCombination:
    """The combination's methods of :class:`cl_optim.SAM` (a mixin: the state is SAM's). They use
    SAM's ``_run`` (the step's passes and norms), ``base_optimizer`` and ``_gradient_sq_norm``."""

    # False: a variant's final combination is always written into .grad (bench/bench_sam_family.py
    # sets it on an instance to measure what the COMBINE term saves).
    _FUSE_COMBINATION = True

    def _second_pass_params(self) -> list:
        """The parameters a variant combines in ``second_step``: those kept at the first step
        (``_run["first_pass"]``) that have a second-pass gradient; none outside a SAM step."""
        first_pass = self._run.get("first_pass") or []
        return [p for p in first_pass if p.grad is not None] if self._run["pending"] is not None else []

    def _combine_into_update(self, params: list[Tensor], sources: list[list[Tensor]], coefficients: Tensor,
                             source_norms: Optional[Tensor] = None, grad_norm: Optional[Tensor] = None) -> None:  # fmt: skip
        """A variant's final combination ``.grad <- c_0 .grad + c_1 x_1 + ... + c_K x_K`` for
        ``params`` (``sources``: K lists aligned with them, ``coefficients``: K + 1 on the device).

        With a fused cl_optim base, fp32/fp64 parameters and ``source_norms`` (fp64 upper bounds
        of the norm of each source: a reduction the variant made anyway, or the ascent norms it
        had), the update reads the sources itself (the COMBINE term: the combination is never
        written, 8 bytes per parameter fewer). The check of the combined gradient that the written
        form has (``skip_nonfinite``) becomes a bound: the step is skipped unless
        ``sum_k |c_k| ||x_k||`` — a bound of every partial sum of every element — is at most half
        the dtype's largest value, so the combination cannot overflow. ``grad_norm`` is the norm of
        ``.grad`` where the variant has it; otherwise the update takes it in the pass that checks
        the last gradient for infs anyway (one more read only where a GradScaler made that check).
        Otherwise (a torch.optim base, low precision, no norms, accumulation) it is written into
        ``.grad`` now."""
        if not self._fuses_combination(params, source_norms):
            if coefficients.dim() != 1:
                raise ValueError(
                    "a DESCENT row (2-D coefficients) needs the fused update (_fuses_combination)"
                )
            from .multitask.aggregators import weighted_sum_unchecked

            grads = [p.grad for p in params]
            weighted_sum_unchecked([grads, *sources], coefficients, out=grads, backend=self.backend)
            return
        self._run["combine"] = (params, sources, coefficients, source_norms, grad_norm)

    def _fuses_combination(self, params: list[Tensor], source_norms: Optional[Tensor]) -> bool:
        """Whether :meth:`_combine_into_update` hands the combination to the update (COMBINE, and
        DESCENT with 2-D coefficients) rather than writing it into ``.grad``."""
        return (
            self._FUSE_COMBINATION
            and source_norms is not None
            and isinstance(self.base_optimizer, FusedOptimizer)
            and not self._run.get("accumulate")
            and not self._run.get("micro_summed")  # earlier micro-batches are added to .grad unscaled
            and {p.dtype for p in params} <= {torch.float32, torch.float64}
        )

    def _ascent_norm(self, index: int) -> Optional[Tensor]:
        """The fp64 norm of this step's ascent ``index`` (0: the first), where it is a plain norm
        (no ASAM or Fisher weights) and the first ascent moved every parameter of the first pass
        (not SAM-ON's subset; SSAM-F's mask is fine: its norm is the whole gradient's), so it
        bounds the norm of the direction over any parameters a variant combines; else None."""
        norms = self._run.get("ascent_norms") or []
        pending, first_pass = self._run.get("pending") or [], self._run.get("first_pass") or []
        if index >= len(norms) or norms[index] is None or len(pending) != len(first_pass):
            return None
        return norms[index]

    def _combination_bound(self, combine: tuple, check_last_pass: bool) -> tuple[Tensor, bool]:
        """``(unbounded, check_last_pass)``: the device flag "the combination may overflow" (NaN
        norms included), and whether the update must still check the last gradient for infs.
        Without the variant's norm of ``.grad`` the bound takes the norm of every gradient — the
        pass the check would make, and a bound over more parameters is still a bound — and the
        check is its finiteness; with it, the check is made where gradients outside the
        combination exist (a parameter that got its first gradient in the last pass)."""
        params, _, coefficients, source_norms, grad_norm = combine
        if coefficients.dim() == 2:
            # The bound is COMBINE's (what the update reads). The DESCENT row enters the kernel
            # times lr/S, and the written form (task_combine_ after the step) bounds none of it:
            # bounding the raw row skipped steps the written form takes (review of 5337db7).
            coefficients = coefficients[0]
        if grad_norm is None:
            try:
                grad_norm = self._gradient_sq_norm().sqrt()
            except (RuntimeError, NotImplementedError):
                for group in self.param_groups:  # the update's own message for a gradient it refuses
                    for p in group["params"]:
                        if p.grad is not None:
                            _check_param(p)
                raise
            check_last_pass = False
        elif check_last_pass:
            graded = sum(p.grad is not None for group in self.param_groups for p in group["params"])
            check_last_pass = graded != len(params)
        norms = torch.cat([grad_norm.reshape(1).to(source_norms), source_norms.reshape(-1)])
        largest = min(torch.finfo(dtype).max for dtype in {p.dtype for p in params})
        magnitudes = coefficients.abs().to(norms.dtype)
        bound = (magnitudes * norms).sum()
        # The kernel takes each coefficient in the parameters' opmath (fp32 for fp32): one past its
        # range would be inf there, and inf * 0 = NaN, which the bound alone does not see.
        in_range = (magnitudes <= largest).all()
        return ~((bound <= largest / 2) & in_range), check_last_pass
