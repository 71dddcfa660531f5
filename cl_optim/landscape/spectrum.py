r"""The spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

For a unit random vector ``v`` and ``m`` Lanczos steps from it, ``T_m = S diag(theta) S^T``; the
nodes ``theta_j`` with weights ``tau_j = S_{0j}^2`` form a Gaussian quadrature of the spectral
measure seen from ``v``, ``sum_i (v^T u_i)^2 delta(lambda - lambda_i)``, whose expectation is the
density ``1/n sum_i delta(lambda - lambda_i)`` (Lin, Saad, Yang 2016; Ghorbani, Krishnan, Xiao 2019).
The density is the average over ``runs`` vectors of the nodes smoothed by a Gaussian of width
``sigma``.

Example:
    >>> import torch, cl_optim
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = [(torch.randn(16, 3), torch.randint(0, 2, (16,)))]
    >>> grid, density = cl_optim.landscape.hessian_spectrum(model, data, runs=2, steps=10)
    >>> grid.shape == density.shape
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .eigen import _ritz, lanczos
from .objective import Objective, rademacher

__all__ = ["hessian_spectrum"]


def hessian_spectrum(
    model: nn.Module,
    data: Iterable,
    runs: int = 4,
    steps: int = 60,
    loss_fn: Optional[Callable] = None,
    *,
    points: int = 512,
    sigma: Optional[float] = None,
    mode: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """``(grid, density)``: the smoothed spectral density of the Hessian on ``points`` values.

    Args:
        runs: random start vectors (Rademacher, normalised), each ``steps`` Lanczos steps
            (Hessian-vector products).
        sigma: the Gaussian width; default 1% of the spread of the nodes.
        mode, dtype, generator: as :func:`cl_optim.landscape.hvp`.

    Returns:
        fp64 tensors; the density integrates to 1 over the grid (up to the tails cut at its ends).
    """
    if runs < 1 or steps < 1 or points < 2:
        raise ValueError("runs, steps >= 1 and points >= 2")
    nodes, weights = [], []
    with Objective(model, data, loss_fn, mode=mode, dtype=dtype) as objective:
        for _ in range(runs):
            start = rademacher(1, objective.size, generator, dtype, objective.device)[0]
            alpha, beta, _ = lanczos(objective.hvp, start, min(steps, objective.size))
            theta, vectors = _ritz(alpha, beta)
            nodes.append(theta)
            weights.append(vectors[0] ** 2)
    theta, tau = torch.cat(nodes), torch.cat(weights) / runs
    low, high = float(theta.min()), float(theta.max())
    spread = max(high - low, 1e-12 * max(1.0, abs(high)))
    width = sigma if sigma is not None else 0.01 * spread
    if not width > 0:
        raise ValueError("sigma must be > 0")
    grid = torch.linspace(low - 5 * width, high + 5 * width, points, dtype=torch.float64)
    kernel = torch.exp(-((grid[:, None] - theta[None, :]) ** 2) / (2 * width**2)) / (
        width * math.sqrt(2 * math.pi)
    )
    return grid, kernel @ tau
