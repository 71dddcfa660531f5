r"""1-D and 2-D loss surfaces around the weights.

Directions are random and, by default, filter-normalised (Li et al. 2018, "Visualizing the Loss
Landscape of Neural Nets"): each filter (row of a weight of two or more dimensions) of a Gaussian
direction is scaled to the norm of the same filter of the weights, and one-dimensional
parameters (biases, norm scales) get no component, so that the picture does not depend on the
scale invariance of a layer. ``normalization="layer"`` scales each tensor to its weights' norm
instead, ``None`` keeps the plain Gaussian. ``basis="hessian"`` takes the top Hessian
eigenvectors (unit length: ``span`` is then a distance in weight space).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .eigen import hessian_eigenvalues
from .objective import Objective, _where, flatten

__all__ = ["loss_surface"]


def _random_direction(
    params: list, generator: Optional[torch.Generator], normalization: Optional[str]
) -> Tensor:
    pieces = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64, device=_where(generator)).to(
            p.device
        )
        if normalization is None:
            pass
        elif normalization == "layer":  # each tensor scaled to the norm of its weights
            d.mul_(p.detach().double().norm() / d.norm().clamp_min(1e-30))
        elif p.dim() <= 1:
            d.zero_()
        else:
            w = p.detach().double().reshape(p.shape[0], -1)
            rows = d.reshape(p.shape[0], -1)
            rows.mul_(w.norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True).clamp_min(1e-30))
        pieces.append(d.reshape(-1))
    return torch.cat(pieces)


def loss_surface(
    model: nn.Module,
    data: Iterable,
    directions: int = 1,
    span: float = 1.0,
    steps: int = 21,
    loss_fn: Optional[Callable] = None,
    *,
    normalization: Optional[str] = "filter",
    basis: str = "random",
    mode: Optional[str] = "eval",
    generator: Optional[torch.Generator] = None,
) -> dict:
    """``{"coordinates": [t...], "loss": (steps,) or (steps, steps), "directions": (d, n)}``: the
    data loss at ``w + a d_1`` (``+ b d_2``) for ``a, b`` in ``[-span, span]``; the weights are
    restored bit for bit."""
    if directions not in (1, 2):
        raise ValueError("directions must be 1 or 2")
    if basis not in ("random", "hessian"):
        raise ValueError("basis must be 'random' or 'hessian'")
    if normalization not in ("filter", "layer", None):
        raise ValueError("normalization must be 'filter', 'layer' or None")
    if steps < 2 or not span > 0:
        raise ValueError("steps must be >= 2 and span > 0")
    data = list(data)  # read twice with basis="hessian": a generator would be empty the second time
    if basis == "hessian":
        _, vectors = hessian_eigenvalues(
            model, data, k=directions, loss_fn=loss_fn, mode=mode, generator=generator
        )
        vectors = vectors.double()
    coordinates = torch.linspace(-span, span, steps, dtype=torch.float64)
    with Objective(model, data, loss_fn, mode=mode) as objective:
        if basis == "random":
            vectors = torch.stack(
                [_random_direction(objective.params, generator, normalization) for _ in range(directions)]
            )
        origin = flatten([p.detach().double() for p in objective.params])
        shape = (steps,) * directions
        loss = torch.empty(shape, dtype=torch.float64)
        for index in torch.cartesian_prod(*[torch.arange(steps)] * directions).reshape(-1, directions):
            point = origin + (coordinates[index].to(vectors.device) @ vectors)
            with torch.no_grad():
                at = 0
                for p in objective.params:
                    p.copy_(point[at : at + p.numel()].view_as(p))
                    at += p.numel()
            loss[tuple(index.tolist())] = objective.loss()
    return {"coordinates": coordinates.tolist(), "loss": loss, "directions": vectors}
