"""The optional terms of a fused step (DESIGN.md §3), shared by every base optimizer.

A step of ``cl_optim.SGD`` / ``cl_optim.AdamW`` runs, per element and in fp32 whatever the
parameter dtype, in this order:

0. COMBINE     ``g <- c_0*g + c_1*x_1 + ... + c_K*x_K``, rounded to the gradient's dtype (the SAM
               variants' final combination, read here instead of written into ``.grad`` first)
1. RESTORE     ``p <- save``                      (SAM: back to the unperturbed weights)
2. AMP         ``g <- g / grad_scale``; the update is skipped when ``found_inf`` is non-zero
3. FISHER_EMA  ``F <- beta*F + (1-beta)*g**2``    (the task gradient, before clipping and EWC)
4. CLIP        ``g <- clip_coef * g``
5. maximize    ``g <- -g``
6. EWC         ``g <- g + lam*A*(p - mu)``        (evaluated at the restored weights)
7. the base update (weight decay, momentum or Adam moments, parameter write)
8. DESCENT     ``p <- p + lr/grad_scale * (d_0*g + d_1*x_1 + ... + d_K*x_K)`` after the update,
               with the raw gradient and COMBINE's sources (WSAM's decoupled sharpness descent,
               applied here instead of in one more pass over the weights): exactly
               ``task_combine_(params, [grads, x_1, ...], c, accumulate=True)`` with
               ``c_j = d_j * lr * (1/grad_scale)`` formed in fp64 (``1/grad_scale`` rounded as
               in AMP), then taken in opmath. ``combine_coef`` is then ``(2, K + 1)``: row 0
               COMBINE's coefficients, row 1 the ``d_j``.

RESTORE happens even when the update is skipped, so a skipped SAM step never leaves perturbed
weights behind. Every term is off by default. The compiled backends implement this same list;
the two Python backends below are its reference.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Union

import torch
from torch import Tensor

LowPrecision = (torch.float16, torch.bfloat16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp32 for fp16/bf16 parameters, else the parameter's own."""
    return torch.float32 if dtype in LowPrecision else dtype


@dataclass
class StepTerms:
    """Optional inputs of one step over a list of parameters; each list is aligned with it."""

    restore_from: Optional[list[Tensor]] = None  # RESTORE: save buffers, same dtype as the params
    grad_scale: Optional[Tensor] = None  # AMP: device scalar, gradients are divided by it
    found_inf: Optional[Tensor] = None  # AMP: device scalar; non-zero skips the update
    fisher: Optional[list[Tensor]] = None  # FISHER_EMA: fp32 running Fisher, updated in place
    fisher_beta: float = 0.0
    clip_coef: Optional[Tensor] = None  # CLIP: device scalar multiplying the task gradient
    ewc_precision: Optional[list[Optional[Tensor]]] = None  # EWC: A, fp32; None = no term there
    ewc_anchor: Optional[list[Optional[Tensor]]] = None  # EWC: mu, fp32
    ewc_lam: Union[float, list[float]] = 0.0  # EWC: lambda, one value or one per tensor
    combine_from: Optional[list[list[Tensor]]] = None  # COMBINE: K source lists, each aligned
    combine_coef: Optional[Tensor] = None  # COMBINE: K + 1 coefficients (fp64), the first for .grad;
    # or (2, K + 1): COMBINE's row, then DESCENT's

    def combine_row(self) -> Optional[Tensor]:
        """COMBINE's K + 1 coefficients (row 0 of a 2-D ``combine_coef``)."""
        c = self.combine_coef
        return c if c is None or c.dim() == 1 else c[0]

    def descent_coefficients(self, lr) -> Optional[Tensor]:
        """DESCENT's coefficients as ``task_combine_`` takes them, ``d_j * lr * (1/grad_scale)``
        in fp64 (on the coefficients' device: no host read), or None when the term is off."""
        c = self.combine_coef
        if c is None or c.dim() == 1:
            return None
        lr = lr.to(c.device, torch.float64).reshape(()) if isinstance(lr, Tensor) else float(lr)
        out = c[1].to(torch.float64) * lr
        if self.grad_scale is not None:
            out = out * self.inv_scale().to(c.device, torch.float64)
        return out

    _LISTS = ("restore_from", "fisher", "ewc_precision", "ewc_anchor")

    def select(self, index: list[int]) -> StepTerms:
        """The terms of a sub-list of the parameters (a (device, dtype) bucket)."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self._LISTS:
            if picked[name] is not None:
                picked[name] = [picked[name][i] for i in index]
        if self.combine_from is not None:
            picked["combine_from"] = [[source[i] for i in index] for source in self.combine_from]
        if isinstance(self.ewc_lam, list):
            picked["ewc_lam"] = [self.ewc_lam[i] for i in index]
        return StepTerms(**picked)

    def local(self) -> StepTerms:
        """The terms with every tensor list replaced by its DTensors' local shards."""
        from ._distributed import local_list

        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self._LISTS:
            picked[name] = local_list(picked[name])
        if self.combine_from is not None:
            picked["combine_from"] = [local_list(source) for source in self.combine_from]
        return StepTerms(**picked)

    def to(self, device: torch.device) -> StepTerms:
        """Move the device scalars next to the parameters they act on."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("grad_scale", "found_inf", "clip_coef", "combine_coef"):
            if moved[name] is not None:
                # Non-blocking only towards an accelerator: a CPU kernel (or skip_update) reads the
                # value on the host right away, before a non-blocking copy from the GPU has landed.
                moved[name] = moved[name].to(device, non_blocking=device.type != "cpu")
        return StepTerms(**moved)

    def skip_update(self) -> bool:
        """AMP skip decision of the Python backends: one host read of ``found_inf``.

        On a CPU tensor this costs nothing; on a CUDA tensor it is one synchronisation, the same
        one GradScaler makes for torch's non-fused optimizers. The compiled backends read the
        flag on the device instead.
        """
        return self.found_inf is not None and bool(self.found_inf.item() != 0)

    def inv_scale(self) -> Tensor:
        # The same rounding as GradScaler.unscale_, so a fused unscale equals unscale_ + step.
        return self.grad_scale.double().reciprocal().float()

    def lam(self, i: int) -> float:
        return self.ewc_lam[i] if isinstance(self.ewc_lam, list) else self.ewc_lam

    def op_inputs(self) -> dict:
        """The terms by the names of the step ops' schemas (cl_optim/ops.py), for the input checks."""
        return dict(
            restore_from=self.restore_from,
            fisher=self.fisher,
            ewc_precision=self.ewc_precision,
            ewc_anchor=self.ewc_anchor,
            ewc_lam=self.ewc_lam,
            grad_scale=self.grad_scale,
            found_inf=self.found_inf,
            clip_coef=self.clip_coef,
            combine_from=self.combine_sources(),
            combine_coef=self.combine_coef,
        )

    def combine_sources(self) -> list[Tensor]:
        """COMBINE's sources as the ops take them: K lists of n tensors one after the other."""
        return [t for source in self.combine_from for t in source] if self.combine_from else []


def kernel_terms(terms: StepTerms, n: int) -> dict:
    """The terms as the compiled step kernels take them (see cl_optim/ops.py): empty lists switch
    a term off; the AMP and CLIP scalars stay tensors (None when off), read by the kernel where
    they live, and a set ``found_inf`` skips the update inside the kernel (no host read here)."""
    has_ewc = terms.ewc_precision is not None and any(a is not None for a in terms.ewc_precision)
    return dict(
        restore_from=list(terms.restore_from) if terms.restore_from is not None else [],
        fisher=list(terms.fisher) if terms.fisher is not None else [],
        ewc_precision=list(terms.ewc_precision) if has_ewc else [],
        ewc_anchor=list(terms.ewc_anchor) if has_ewc else [],
        ewc_lam=_lams(terms.ewc_lam, n) if has_ewc else [],
        grad_scale=terms.grad_scale,
        found_inf=terms.found_inf,
        clip_coef=_as_tensor(terms.clip_coef),
        fisher_beta=float(terms.fisher_beta),
        combine_from=terms.combine_sources(),
        combine_coef=terms.combine_coef,
    )


def _lams(lam, n: int) -> list[float]:
    """One float lambda per tensor, from one value or a list (no method call per tensor)."""
    return list(map(float, lam)) if isinstance(lam, list) else [float(lam)] * n


def _as_tensor(value) -> Optional[Tensor]:
    return value if value is None or isinstance(value, Tensor) else torch.tensor(float(value))


def restore_forloop_(params: list[Tensor], terms: StepTerms) -> None:
    if terms.restore_from is not None:
        for param, saved in zip(params, terms.restore_from):
            param.copy_(saved)


def restore_foreach_(params: list[Tensor], terms: StepTerms) -> None:
    if terms.restore_from is not None and params:
        torch._foreach_copy_(params, terms.restore_from)


def task_grad_forloop(i: int, param: Tensor, grad: Tensor, terms: StepTerms, maximize: bool) -> Tensor:
    """Steps 0 and 2-6 for tensor ``i``: the gradient the base update sees, in ``param``'s (opmath)
    dtype.

    ``param`` is the opmath view of the (restored) parameter. ``grad`` is never modified.
    """
    if terms.combine_coef is not None:
        c = terms.combine_row().to(param.dtype)
        combined = grad.to(param.dtype) * c[0]
        for k, source in enumerate(terms.combine_from or []):
            combined = combined + c[k + 1] * source[i].to(param.dtype)
        grad = combined.to(grad.dtype)  # as if written into .grad
    g = grad.to(param.dtype)
    if terms.grad_scale is not None:
        g = g * terms.inv_scale()
    if terms.fisher is not None:
        beta = terms.fisher_beta
        terms.fisher[i].mul_(beta).addcmul_(g, g, value=1 - beta)
    if terms.clip_coef is not None:
        g = g * terms.clip_coef
    if maximize:
        g = -g
    if terms.ewc_precision is not None and terms.ewc_precision[i] is not None:
        g = g.addcmul(terms.ewc_precision[i], param - terms.ewc_anchor[i], value=terms.lam(i))
    return g


def task_grads_foreach(
    params: list[Tensor], grads: list[Tensor], terms: StepTerms, maximize: bool
) -> list[Tensor]:
    """Steps 0 and 2-6 for a whole (device, dtype) bucket with ``torch._foreach_*``; same math as above."""
    dtype = params[0].dtype
    g = [grad.to(dtype) for grad in grads]
    if terms.combine_coef is not None:
        c = terms.combine_row().to(dtype)
        g = torch._foreach_mul(g, c[0])
        for k, source in enumerate(terms.combine_from or []):
            g = torch._foreach_add(g, torch._foreach_mul([x.to(dtype) for x in source], c[k + 1]))
        g = [x.to(grads[0].dtype).to(dtype) for x in g]  # as if written into .grad
    if terms.grad_scale is not None:
        g = torch._foreach_mul(g, terms.inv_scale())
    if terms.fisher is not None:
        beta = terms.fisher_beta
        torch._foreach_mul_(terms.fisher, beta)
        torch._foreach_addcmul_(terms.fisher, g, g, value=1 - beta)
    if terms.clip_coef is not None:
        g = torch._foreach_mul(g, terms.clip_coef)
    if maximize:
        g = torch._foreach_neg(g)
    if terms.ewc_precision is not None:
        covered = [i for i, a in enumerate(terms.ewc_precision) if a is not None]
        if covered:
            offsets = torch._foreach_sub([params[i] for i in covered], [terms.ewc_anchor[i] for i in covered])
            pulled = torch._foreach_addcmul(
                [g[i] for i in covered],
                [terms.ewc_precision[i] for i in covered],
                offsets,
                [terms.lam(i) for i in covered],
            )
            g = list(g)
            for i, value in zip(covered, pulled):
                g[i] = value
    return g


def descent_(params: list[Tensor], grads: list[Tensor], terms: StepTerms, lr, backend: str) -> None:
    """Step 8, DESCENT, for the Python backends: after an update that was not skipped."""
    coefficients = terms.descent_coefficients(lr)
    if coefficients is None or not params:
        return
    from .multitask.fused import task_combine_  # the multitask package imports this module

    task_combine_(
        params, [grads, *(terms.combine_from or [])], coefficients, accumulate=True, backend=backend
    )
