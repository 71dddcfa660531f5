r"""Sharpness as optimizers see it: SAM's worst-case loss increase, the stability threshold of an
optimizer, and the preconditioned sharpness that Adam's threshold is about.

* ``sam_sharpness``: ``max_{||e|| <= rho} L(w + e) - L(w)``, the maximiser found by ``steps``
  normalised ascent steps projected on the ball (one step: ``e = rho g / ||g||``, SAM's own
  perturbation); ``per_batch=True`` gives m-sharpness (Foret et al. 2021, §4): each batch its own
  perturbation and increase, averaged by samples.
* ``stability_threshold``: gradient descent with step ``lr`` is stable on a quadratic while the
  sharpness ``lambda_max(H)`` stays below ``2/lr``; with heavy-ball momentum ``beta`` (torch's
  form, ``v = beta v + (1-d) g``) below ``2(1+beta)/(lr (1-d))``; Adam/AdamW keep the
  *preconditioned* sharpness ``lambda_max(P^-1 H)``, ``P = diag(sqrt(v_hat) + eps)``, below
  ``(2+2 beta1)/((1-beta1) lr)``, 38/lr at beta1 = 0.9 (Cohen et al. 2021, arXiv 2103.00065;
  Cohen et al. 2022, arXiv 2207.14484). At the edge of stability, training keeps the sharpness
  near that value.
* ``preconditioned_sharpness``: ``lambda_max(P^-1/2 H P^-1/2)`` from the optimizer's own
  ``exp_avg_sq`` and step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, Optional

import torch
from torch import nn

from .eigen import _order, _ritz, lanczos
from .objective import Objective, gaussian

__all__ = ["sam_sharpness", "stability_threshold", "preconditioned_sharpness", "is_adaptive"]


def sam_sharpness(
    model: nn.Module,
    data: Iterable,
    rho: float,
    steps: int = 1,
    loss_fn: Optional[Callable] = None,
    *,
    per_batch: bool = False,
    mode: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
) -> float:
    """The loss increase at the worst point of the ``rho``-ball found by ``steps`` ascent steps
    (see the module docstring). The model's weights are restored bit for bit."""
    if not rho > 0 or steps < 1:
        raise ValueError("rho must be > 0 and steps >= 1")
    with Objective(model, data, loss_fn, mode=mode, dtype=dtype) as objective:
        if not per_batch:
            return _increase(objective, objective.batches, rho, steps)
        total = 0.0
        for batch in objective.batches:
            total += _increase(objective, [batch], rho, steps) * batch.size
        return total / objective.total


def _increase(objective: Objective, batches: list, rho: float, steps: int) -> float:
    saved, keep = objective.batches, objective.total
    objective.batches, objective.total = batches, sum(b.size for b in batches)
    origin = [p.detach().clone() for p in objective.params]
    try:
        base = objective.loss()
        e = [torch.zeros_like(p) for p in objective.params]
        for _ in range(steps):
            g = objective.gradient()
            norm = float(g.norm())
            if norm == 0.0:
                break
            pieces = torch.split(g, [p.numel() for p in objective.params])
            e = [a + (rho / steps) * b.view_as(a).to(a.dtype) / norm for a, b in zip(e, pieces)]
            length = float(torch.sqrt(sum((x.double() ** 2).sum() for x in e)))
            if length > rho:  # project back on the ball
                e = [x * (rho / length) for x in e]
            with torch.no_grad():
                for p, o, x in zip(objective.params, origin, e):
                    p.copy_(o + x)
        return objective.loss() - base
    finally:
        objective.batches, objective.total = saved, keep
        with torch.no_grad():  # the next batch of m-sharpness starts from the weights again
            for p, o in zip(objective.params, origin):
                p.copy_(o)


def _groups(optimizer):
    base = getattr(optimizer, "base_optimizer", None)  # SAM and its family: the base update's threshold
    return base if base is not None else optimizer


def is_adaptive(optimizer) -> bool:
    """Whether the optimizer preconditions by a second moment (its threshold is on the
    preconditioned sharpness)."""
    opt = _groups(optimizer)
    return any("betas" in group for group in opt.param_groups)


def stability_threshold(optimizer) -> float:
    """The sharpness the optimizer's first parameter group keeps below (module docstring); the
    threshold of Adam/AdamW applies to :func:`preconditioned_sharpness`."""
    opt = _groups(optimizer)
    values = [_threshold(group) for group in opt.param_groups]
    if len(set(values)) > 1:
        raise ValueError(
            f"the parameter groups have different thresholds {values}: measure them one at a time"
        )
    return values[0]


def _threshold(group: dict) -> float:
    lr = float(group["lr"])
    if not lr > 0:
        raise ValueError(f"the learning rate must be > 0 for a stability threshold, got {lr}")
    if "betas" in group:
        beta1 = float(group["betas"][0])
        return (2 + 2 * beta1) / ((1 - beta1) * lr)
    momentum = float(group.get("momentum", 0.0))
    if group.get("nesterov", False):
        raise ValueError(
            "the stability threshold of Nesterov momentum is not the heavy-ball one; not derived here"
        )
    dampening = float(group.get("dampening", 0.0)) if momentum else 0.0
    return 2 * (1 + momentum) / (lr * (1 - dampening))


def preconditioned_sharpness(
    model: nn.Module,
    data: Iterable,
    optimizer,
    loss_fn: Optional[Callable] = None,
    *,
    tol: float = 1e-3,
    max_iter: int = 60,
    mode: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    generator: Optional[torch.Generator] = None,
) -> float:
    """``lambda_max(P^-1/2 H P^-1/2)`` with Adam's preconditioner ``P = sqrt(v / (1 - beta2^t)) + eps``
    from ``optimizer.state`` (every parameter that requires grad must have taken a step)."""
    opt = _groups(optimizer)
    with Objective(model, data, loss_fn, mode=mode, dtype=dtype) as objective:
        scales = []
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        for p in objective.params:
            group, state = group_of.get(id(p)), opt.state.get(p, {})
            if group is None or "betas" not in group:
                raise ValueError(
                    "preconditioned_sharpness needs an Adam-type optimizer holding every parameter"
                )
            if "exp_avg_sq" not in state:
                raise ValueError("the optimizer has not stepped yet: no second moment to precondition with")
            step = float(state["step"])
            v_hat = state["exp_avg_sq"].to(dtype) / (1 - group["betas"][1] ** step)
            scales.append((1 / torch.sqrt(v_hat.sqrt() + group["eps"])).reshape(-1))
        scale = torch.cat(scales).to(objective.device)

        def operator(v):
            return objective.hvp(v * scale) * scale

        start = gaussian(1, objective.size, generator, dtype, objective.device)[0]

        def converged(alpha, beta, basis):
            values, vectors = _ritz(alpha, beta)
            top = _order(values, "LA")[0]
            return abs(beta[-1] * float(vectors[-1, top])) <= tol * max(abs(float(values[top])), 1e-12)

        alpha, beta, _ = lanczos(operator, start, min(max_iter, objective.size), check=converged)
        values, _ = _ritz(alpha, beta)
        return float(values.max())
