r"""The trace of the Hessian of the data loss: Hutchinson's estimator, and Hutch++.

Hutchinson: ``tr(H) = E[z^T H z]`` for Rademacher ``z``; the mean over probes, with its standard
error ``std / sqrt(probes)``. Hutch++ (Meyer, Musco, Musco, Willett 2021) spends a third of the
probes on a sketch ``Q = orth(H S)``, takes ``tr(Q^T H Q)`` exactly and Hutchinson only on the
rest ``(I - Q Q^T) H (I - Q Q^T)``, whose trace is small when a few eigenvalues dominate: the
variance falls from ``O(1/m)`` to ``O(1/m^2)`` there. Probes go through the Hessian in blocks (one
double backward per block and batch).

Example:
    >>> import torch, cl_optim
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
    >>> estimate, error = cl_optim.landscape.hessian_trace(model, data, n_probes=30)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, Optional

import torch
from torch import nn

from .objective import Objective, rademacher, standard_error

__all__ = ["hessian_trace"]


def hessian_trace(
    model: nn.Module,
    data: Iterable,
    n_probes: int = 100,
    loss_fn: Optional[Callable] = None,
    *,
    method: str = "hutchinson",
    block: int = 10,
    mode: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
) -> tuple[float, float]:
    """``(estimate, standard_error)`` of the Hessian trace of the data loss.

    Args:
        n_probes: Hessian-vector products to spend (Hutch++: a third on the sketch, a third on
            its product, a third on the residual).
        method: ``"hutchinson"`` or ``"hutch++"``.
        block: probes per double backward.
        mode, dtype, generator: as :func:`cl_optim.landscape.hvp`; ``generator`` draws the probes.
    """
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    if n_probes < (3 if method == "hutch++" else 2) or block < 1:
        raise ValueError("n_probes must be >= 2 (>= 3 for hutch++) and block >= 1")
    with Objective(model, data, loss_fn, mode=mode, dtype=dtype) as objective:
        n, device = objective.size, objective.device

        def quadratic_forms(count, project=None):
            """``z^T H z`` for ``count`` Rademacher probes, drawn a block at a time (all of them at
            once would take ``count x n`` memory)."""
            values = []
            for start in range(0, count, block):
                part = rademacher(min(block, count - start), n, generator, dtype, device)
                if project is not None:
                    part = project(part)
                values.append((objective.hvp(part) * part).sum(1))
            return torch.cat(values).to(torch.float64)

        if method == "hutchinson":
            values = quadratic_forms(n_probes)
            return float(values.mean()), standard_error(values)
        sketch = max(1, n_probes // 3)
        s = rademacher(sketch, n, generator, dtype, device)
        hs = torch.cat([objective.hvp(s[i : i + block]) for i in range(0, sketch, block)])
        q, _ = torch.linalg.qr(hs.t().to(torch.float64))  # (n, sketch), orthonormal columns
        q = q.t().to(dtype)
        hq = torch.cat([objective.hvp(q[i : i + block]) for i in range(0, q.shape[0], block)])
        exact = float((hq * q).sum().to(torch.float64))
        rest = n_probes - 2 * sketch
        if rest < 2:
            return exact, 0.0 if q.shape[0] >= n else float("inf")
        values = quadratic_forms(rest, lambda g: g - (g @ q.t()) @ q)  # (I - Q Q^T) g
        estimate = exact + float(values.mean())
        # The residual can vanish (a sketch as large as the space): rounding still bounds the error.
        return estimate, max(standard_error(values), 10 * torch.finfo(dtype).eps * abs(estimate))
