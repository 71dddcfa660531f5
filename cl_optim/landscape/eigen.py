r"""Extreme eigenvalues of the Hessian of the data loss, by Lanczos with full reorthogonalisation.

Lanczos builds an orthonormal Krylov basis ``Q_m`` with ``Q_m^T H Q_m = T_m`` tridiagonal; the
eigenvalues of ``T_m`` (Ritz values) converge to the extreme eigenvalues of ``H`` from both ends,
far faster than power iteration, which only finds the largest *magnitude* (a negative one on an
indefinite Hessian, and slowly when the top two are close). A Ritz pair ``(theta, Q_m s)`` has
residual ``||H Q_m s - theta Q_m s|| = |beta_m s_m|``, the stopping test. Every new vector is
orthogonalised twice against the whole basis, so no ghost copies of converged eigenvalues appear.

Example:
    >>> import torch, cl_optim
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
    >>> values, vectors = cl_optim.landscape.hessian_eigenvalues(model, data, k=2)
    >>> values.shape, vectors.shape
    (torch.Size([2]), torch.Size([2, 26]))
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .objective import Objective, gaussian

__all__ = ["hessian_eigenvalues", "lanczos"]

WHICH = ("LA", "SA", "LM")


def lanczos(operator: Callable, start: Tensor, steps: int, *, check: Optional[Callable] = None):
    """Lanczos on a symmetric ``operator`` (flat ``(1, n)`` block in, out) from ``start``.

    Returns ``(alpha, beta, basis)`` (diagonal, off-diagonal, the orthonormal vectors as rows).
    ``check(alpha, beta, basis)`` is called after each step and stops the iteration when it
    returns True. Stops early on an invariant subspace (``beta`` below rounding).
    """
    steps = min(steps, start.numel())
    basis = torch.empty((steps, start.numel()), dtype=start.dtype, device=start.device)  # filled row by row
    basis[0] = start / start.norm()
    alpha, beta = [], []
    for j in range(steps):
        q = basis[j]
        w = operator(q.unsqueeze(0))[0]
        a = torch.dot(w, q)
        w = w - a * q - (beta[-1] * basis[j - 1] if beta else 0.0)
        stacked = basis[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - stacked.t() @ (stacked @ w)
        alpha.append(float(a))
        b = float(w.norm())
        beta.append(b)
        if check is not None and check(alpha, beta, stacked):
            break
        if b <= 1e-10 * max(1.0, max(abs(x) for x in alpha)) or j + 1 >= steps:
            break  # an invariant subspace (the Ritz values are exact), or the steps are spent
        basis[j + 1] = w / b
    return alpha, beta, basis[: len(alpha)]


def _ritz(alpha, beta):
    m = len(alpha)
    tri = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(beta[: m - 1], dtype=torch.float64)
        tri += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(tri)
    return values, vectors


def _order(values: Tensor, which: str) -> Tensor:
    if which == "LA":
        return torch.argsort(values, descending=True)
    if which == "SA":
        return torch.argsort(values)
    return torch.argsort(values.abs(), descending=True)


def hessian_eigenvalues(
    model: nn.Module,
    data: Iterable,
    k: int = 1,
    loss_fn: Optional[Callable] = None,
    which: str = "LA",
    tol: float = 1e-4,
    max_iter: Optional[int] = None,
    init: Optional[Tensor] = None,
    *,
    mode: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    r"""The ``k`` extreme eigenvalues of the Hessian of the data loss and their eigenvectors.

    Args:
        k: how many.
        which: ``"LA"`` algebraically largest (the sharpness; right on an indefinite Hessian),
            ``"SA"`` algebraically smallest (the most negative), ``"LM"`` largest magnitude.
        tol: stop when every wanted Ritz pair has residual ``|beta_m s_m| <= tol * |theta|``.
        max_iter: Lanczos steps at most (one Hessian-vector product each); default
            ``min(n, max(60, 10 k))``.
        init: earlier eigenvectors ``(j, n)`` (or ``(n,)``) to warm-start from: the start vector
            is their sum plus a little noise, so a slowly moving top eigenvector (a training run
            measured every few steps) converges in a few products.
        mode, dtype: as :func:`cl_optim.landscape.hvp` (the basis is kept in ``dtype``).
        generator: the random start vector's.

    Returns:
        ``(values, vectors)``: fp32/64 tensors ``(k,)`` in the order of ``which`` and ``(k, n)``
        flat unit eigenvectors over the parameters that require grad.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if k < 1 or not tol > 0:
        raise ValueError("k must be >= 1 and tol > 0")
    with Objective(model, data, loss_fn, mode=mode, dtype=dtype) as objective:
        n = objective.size
        if k > n:
            raise ValueError(f"k = {k} eigenvalues of a {n} x {n} Hessian")
        steps = min(n, max_iter if max_iter is not None else max(60, 10 * k))
        start = gaussian(1, n, generator, dtype, objective.device)[0]
        if init is not None:
            init = torch.as_tensor(init).to(dtype=dtype, device=objective.device)
            if init.dim() not in (1, 2) or init.shape[-1] != n:
                raise ValueError(
                    f"init must be (n,) or (j, n) with n = {n} (the parameters that require grad), got "
                    f"{tuple(init.shape)}"
                )
            init = init.reshape(-1, n)
            if not bool(torch.isfinite(init).all()):
                raise ValueError("init contains inf or nan")
            warm = (init / init.norm(dim=1, keepdim=True).clamp_min(1e-30)).sum(0)
            start = warm + 1e-3 * start / start.norm() * max(1.0, float(warm.norm()))

        def converged(alpha, beta, basis):
            if len(alpha) < k:
                return False
            values, vectors = _ritz(alpha, beta)
            wanted = _order(values, which)[:k]
            residual = abs(beta[-1]) * vectors[-1, wanted].abs()
            scale = values[wanted].abs().clamp_min(1e-12 * max(1.0, float(values.abs().max())))
            return bool((residual <= tol * scale).all())

        alpha, beta, basis = lanczos(objective.hvp, start, steps, check=converged)
        if len(alpha) == steps and steps < n and not converged(alpha, beta, basis):
            warnings.warn(
                f"hessian_eigenvalues: not converged to tol={tol} in max_iter={steps} Hessian-vector products; "
                "the values are the best Ritz values so far (raise max_iter or tol)",
                UserWarning,
                stacklevel=2,
            )
        values, vectors = _ritz(alpha, beta)
        wanted = _order(values, which)[: min(k, len(alpha))]
        if len(wanted) < k:
            raise ValueError(
                f"the Krylov space closed after {len(alpha)} steps: fewer than k = {k} eigenvalues"
            )
        eigvecs = vectors[:, wanted].t().to(dtype=dtype, device=basis.device) @ basis
        eigvecs = eigvecs / eigvecs.norm(dim=1, keepdim=True)
        return values[wanted].to(dtype), eigvecs
