"""The fused EWC ops on tensor lists, every backend (``forloop``/``foreach``: one readable
implementation, checked as the compiled ops check their inputs; ``cpp``/``cuda``/``triton``: the
kernels): the Fisher's accumulation ``F += w g**2``, the penalty's gradient ``g += lam A (p - mu)``
and value, and a consolidation ``A <- decay A + weight F`` with its anchor. :class:`cl_optim.EWC`
calls them; they are usable alone.

Example:
    >>> import torch
    >>> from cl_optim.ewc_ops import ewc_penalty
    >>> p, mu, a = [torch.tensor([1.0, 2.0])], [torch.zeros(2)], [torch.ones(2)]
    >>> float(ewc_penalty(p, a, mu, [2.0]))  # 2/2 * (1 + 4)
    5.0
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import kernel_op
from ._checks import check_op

__all__ = ["fisher_accumulate_", "ewc_grad_add_", "ewc_penalty", "ewc_consolidate_"]


def _backend_impl(backend: str, forloop, op_name: str, like: Tensor):
    if backend in ("forloop", "foreach"):  # one readable implementation serves both

        def checked(*args):  # the compiled ops check their inputs themselves
            check_op(op_name, args)
            return forloop(*args)

        return checked
    if backend in ("cpp", "cuda", "triton"):
        return kernel_op(backend, op_name, like)
    raise ValueError(f"{op_name} has no {backend!r} implementation")


def fisher_accumulate_(fisher: list[Tensor], grads: list[Tensor], weight: float = 1.0, *, backend="forloop"):
    """``F += weight * g**2`` (fp32 ``F``), e.g. summing squared per-sample or batch gradients."""
    if not fisher:
        return

    def forloop(fisher, grads, weight):
        for f, g in zip(fisher, grads):
            g32 = g.to(torch.float32)
            f.addcmul_(g32, g32, value=weight)

    _backend_impl(backend, forloop, "fisher_accumulate_", fisher[0])(fisher, grads, weight)


def ewc_grad_add_(grads, params, precision, anchor, lam, *, backend="forloop") -> None:
    """``g += lam_i * A * (p - mu)`` per tensor, in fp32 whatever the parameter dtype."""
    if not grads:
        return

    def forloop(grads, params, precision, anchor, lam):
        for g, p, a, mu, lam_i in zip(grads, params, precision, anchor, lam):
            g.copy_(g.to(torch.float32).addcmul(a, p.to(torch.float32) - mu, value=lam_i))

    _backend_impl(backend, forloop, "ewc_grad_add_", grads[0])(grads, params, precision, anchor, list(lam))


def ewc_penalty(params, precision, anchor, lam, *, backend="forloop") -> Tensor:
    """``sum_i lam_i / 2 * sum A (p - mu)**2`` as an fp64 scalar (no graph)."""
    if not params:
        return torch.zeros((), dtype=torch.float64)

    def forloop(params, precision, anchor, lam):
        total = torch.zeros((), dtype=torch.float64, device=params[0].device)
        for p, a, mu, lam_i in zip(params, precision, anchor, lam):
            d = p.double() - mu.double()
            total = total + 0.5 * lam_i * (a.double() * d * d).sum()
        return total

    return _backend_impl(backend, forloop, "ewc_penalty", params[0])(params, precision, anchor, list(lam))


def ewc_consolidate_(precision, anchor, fisher, params, decay, weight, weighted_anchor, *, backend="forloop"):
    """``A <- decay*A + weight*F``; ``mu <-`` the Fisher-weighted anchor (``weighted_anchor``) or
    the current weights. Returns per tensor, as fp64, the increment of the collapse constant:
    ``sum decay*A * weight*F / A' * (mu - p)**2``, written without cancellation."""
    if not precision:
        return torch.zeros(0, dtype=torch.float64)

    def forloop(precision, anchor, fisher, params, decay, weight, weighted_anchor):
        gaps = []
        for a, mu, f, p in zip(precision, anchor, fisher, params):
            theta = p.to(torch.float32)
            old, fresh = decay * a, weight * f
            total = old + fresh
            if weighted_anchor:
                safe = torch.where(total > 0, total, torch.ones_like(total))
                # Only where the new precision is positive, as the kernels: with decay = weight = 0
                # a non-finite anchor would otherwise give 0 * inf = nan.
                gap = torch.where(total > 0, old * fresh / safe * (mu - theta) ** 2, torch.zeros_like(total))
                gaps.append(float(gap.double().sum()))
                mu.copy_(torch.where(total > 0, (old * mu + fresh * theta) / safe, theta))
            else:
                gaps.append(0.0)
                mu.copy_(theta)
            a.copy_(total)
        return torch.tensor(gaps, dtype=torch.float64)

    return _backend_impl(backend, forloop, "ewc_consolidate_", params[0])(
        precision, anchor, fisher, params, decay, weight, weighted_anchor
    )
