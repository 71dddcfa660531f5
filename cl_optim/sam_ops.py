"""The two fused ops of a SAM ascent, on every backend: the (weighted) squared gradient norm and
the perturbation ``w <- w + scale * T**2 * g`` with its restore copy (``csrc/cpu/sam.cpp``,
``csrc/cuda/sam.cu``, ``kernels/grad_norm.py``/``kernels/sam_perturb.py``; the forloop path is the
oracle). :class:`cl_optim.SAM` and its variants plan the buckets and call these.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._backend import kernel_op
from ._checks import check_grad_sq_norm, check_sam_perturb_
from ._terms import opmath_dtype

__all__ = ["grad_sq_norm", "sam_perturb_", "PLAIN", "ASAM", "FISHER_BATCH", "FISHER_RUNNING"]

# Per-tensor weight kinds of grad_sq_norm / sam_perturb_ (csrc/include/cl_optim/elementwise.h).
PLAIN, ASAM, FISHER_BATCH, FISHER_RUNNING = 0, 1, 2, 3


def _weights(params, grads, weighted, eta, fisher, dtype=None) -> list[tuple[int, Optional[Tensor]]]:
    """Per tensor, its weight kind and the tensor the Python backends materialise (in ``dtype``,
    default opmath): ``T = |p| + eta`` for ASAM, ``T**2 = 1/(1 + eta*F)`` for Fisher-SAM, None for
    ``T = 1``."""
    out = []
    for i, p in enumerate(params):
        kind = PLAIN if weighted is None else int(weighted[i])
        dtype = dtype or opmath_dtype(grads[i].dtype)
        if kind == PLAIN:
            out.append((kind, None))
        elif kind == ASAM:
            out.append((kind, p.to(dtype).abs().add_(eta)))
        elif kind == FISHER_BATCH:
            out.append((kind, grads[i].to(dtype).square().mul_(eta).add_(1).reciprocal_()))
        else:  # FISHER_RUNNING (the kinds are checked before: cl_optim/_checks.py)
            out.append((kind, fisher[i].to(dtype).mul(eta).add_(1).reciprocal_()))
    return out


def _weight_sq(kind: int, w: Optional[Tensor]) -> Optional[Tensor]:
    return w * w if kind == ASAM else w


# --------------------------------------------------------------------------------- fused ops


def grad_sq_norm(
    grads: list[Tensor],
    params: Optional[list[Tensor]] = None,
    weighted: Optional[list[int]] = None,
    eta: float = 0.0,
    *,
    fisher: Optional[list[Tensor]] = None,
    backend: str = "forloop",
) -> Tensor:
    """``sum_i ||T_i * g_i||^2`` over a (device, dtype) bucket, an fp64 scalar on its device.

    ``weighted[i]`` is the weight kind of tensor ``i`` (``True``/``False`` also work):
    ``PLAIN`` (0, ``T = 1``), ``ASAM`` (1, ``T = |p| + eta``), ``FISHER_BATCH`` (2,
    ``T**2 = 1/(1 + eta*g**2)``) or ``FISHER_RUNNING`` (3, ``T**2 = 1/(1 + eta*fisher[i])``).
    Computed and accumulated in fp64 on every backend, whatever the gradient dtype: a large finite
    gradient (1e20, whose square overflows fp32) gives a finite norm, and only a non-finite gradient
    makes the result non-finite, which is how callers detect it without a host read.

    >>> grad_sq_norm([torch.tensor([3.0, 4.0])])
    tensor(25., dtype=torch.float64)
    >>> grad_sq_norm([torch.tensor([1.0, 3.0])], weighted=[FISHER_BATCH], eta=1.0)  # 1/2 + 9/10
    tensor(1.4000, dtype=torch.float64)
    """
    if backend in ("forloop", "foreach"):  # the compiled ops check their inputs themselves
        check_grad_sq_norm(grads, params, fisher, weighted)
    if backend in ("cpp", "cuda", "triton"):
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        kinds = [int(w) for w in weighted] if weighted is not None else []
        return kernel_op(backend, "grad_sq_norm", grads[0])(
            grads, params if ASAM in kinds else [], fisher if FISHER_RUNNING in kinds else [], kinds, eta
        )
    if backend not in ("forloop", "foreach"):
        raise ValueError(f"grad_sq_norm has no {backend!r} implementation")
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    # In fp64, as the kernels: the square of a large finite gradient (1e20) overflows fp32.
    acc = torch.float64
    weights = _weights(params or [None] * len(grads), grads, weighted, eta, fisher, acc) if weighted else None
    kinds = [PLAIN] * len(grads) if weights is None else [kind for kind, _ in weights]
    # SAM and ASAM: the norm of T*g; Fisher-SAM: the sum of g**2 * T**2 (no square root of T**2).
    normed = [i for i, kind in enumerate(kinds) if kind in (PLAIN, ASAM)]
    terms = [
        grads[i] if kinds[i] == PLAIN else weights[i][1] * grads[i].to(weights[i][1].dtype) for i in normed
    ]
    if backend == "foreach":
        norms = torch._foreach_norm(terms, 2, dtype=acc) if terms else []
    else:
        norms = [torch.linalg.vector_norm(t, 2, dtype=acc) for t in terms]
    squares = dict(zip(normed, (n.square() for n in norms)))
    for i in range(len(grads)):
        if i not in squares:
            g = grads[i].to(weights[i][1].dtype)
            squares[i] = (g * g * weights[i][1]).sum(dtype=acc)
    return torch.stack([squares[i] for i in range(len(grads))]).sum()


def sam_perturb_(
    params: list[Tensor],
    grads: list[Tensor],
    saves: list[Tensor],
    scale: Tensor,
    weighted: Optional[list[int]] = None,
    eta: float = 0.0,
    *,
    backend: str = "forloop",
    fisher: Optional[list[Tensor]] = None,
    fisher_beta: float = 0.0,
    grad_scale: Optional[Tensor] = None,
    finite: Optional[Tensor] = None,
) -> None:
    """``save <- p; p <- p + scale * T**2 * g`` over a bucket, in fp32, ``scale`` a device scalar.

    ``T`` as in :func:`grad_sq_norm` (the running-Fisher kind reads ``fisher`` before its update
    below). Elements whose perturbation is not finite (``scale == 0`` with an inf/nan gradient)
    are not moved, so a skipped step leaves the weights exactly as they were. With ``fisher``, the
    FISHER_EMA term of the first-pass gradient ``F <- beta*F + (1-beta)*(g/grad_scale)**2`` is
    applied too, where the device flag ``finite`` is set.

    >>> p, g, save = torch.zeros(2), torch.tensor([1.0, 3.0]), torch.empty(2)
    >>> sam_perturb_([p], [g], [save], torch.tensor(0.5), [FISHER_BATCH], 1.0); p
    tensor([0.2500, 0.1500])
    """
    if backend in ("forloop", "foreach"):  # the compiled ops check their inputs themselves
        check_sam_perturb_(params, grads, saves, scale, weighted, fisher, grad_scale, finite)
    if backend in ("cpp", "cuda", "triton"):
        if not params:
            return
        kernel_op(backend, "sam_perturb_", params[0])(
            params, grads, saves, scale.detach(), [int(w) for w in weighted] if weighted is not None else [], eta,
            fisher if fisher is not None else [], fisher_beta, grad_scale, finite,
        )  # fmt: skip
        return
    if backend not in ("forloop", "foreach"):
        raise ValueError(f"sam_perturb_ has no {backend!r} implementation")
    weights_sq = [_weight_sq(kind, w) for kind, w in _weights(params, grads, weighted, eta, fisher)] if weighted \
        else [None] * len(params)  # fmt: skip
    if fisher is not None:  # after the weights: they read the Fisher before this update
        _fisher_ema_where_(fisher, grads, fisher_beta, grad_scale, finite)
    if backend == "forloop":
        for p, g, save, w in zip(params, grads, saves, weights_sq):
            save.copy_(p)
            e = _perturbation(p, g, w, scale)
            torch.nan_to_num_(e, nan=0.0, posinf=0.0, neginf=0.0)
            _add_in_opmath_(p, e)
        return
    if not params:
        return
    torch._foreach_copy_(saves, params)
    dtype = opmath_dtype(params[0].dtype)
    g = [grad.to(dtype) for grad in grads]
    e = [g_i if w is None else torch.mul(w, g_i) for g_i, w in zip(g, weights_sq)]
    e = torch._foreach_mul(e, scale)
    for e_i in e:
        torch.nan_to_num_(e_i, nan=0.0, posinf=0.0, neginf=0.0)
    if dtype == params[0].dtype:
        torch._foreach_add_(params, e)
    else:
        moved = torch._foreach_add([p.to(dtype) for p in params], e)
        torch._foreach_copy_(params, moved)


def _fisher_ema_where_(fisher, grads, beta, grad_scale, finite) -> None:
    # Per tensor even on the foreach path: torch has no foreach `where`, and this runs once per
    # SAM step on the first-pass gradient; the compiled backends fuse it into the perturbation.
    inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
    for f, g in zip(fisher, grads):
        g = g.to(torch.float32)
        if inv_scale is not None:
            g = g * inv_scale
        ema = f.mul(beta).addcmul_(g, g, value=1 - beta)
        f.copy_(ema if finite is None else torch.where(finite, ema, f))


def _perturbation(p: Tensor, g: Tensor, weight_sq: Optional[Tensor], scale: Tensor) -> Tensor:
    g = g.to(opmath_dtype(p.dtype))
    if weight_sq is not None:
        g = weight_sq * g
    return g * scale


def _add_in_opmath_(p: Tensor, e: Tensor) -> None:
    if p.dtype == e.dtype:
        p.add_(e)
    else:
        p.copy_(p.to(e.dtype).add_(e))
