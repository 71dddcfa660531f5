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


def _kind(optimizer) -> str:
    """ "sgd", "adam" (coupled weight decay), "adamw" (decoupled), or an error for optimizers whose
    threshold is not derived here (RMSprop, Adagrad, Adamax, NAdam, RAdam, LBFGS, ...)."""
    import cl_optim

    opt = _groups(optimizer)
    if isinstance(opt, (torch.optim.SGD, cl_optim.SGD)):
        return "sgd"
    if isinstance(opt, (torch.optim.AdamW, cl_optim.AdamW)):
        return "adamw"
    if type(opt) is torch.optim.Adam:
        return "adamw" if any(g.get("decoupled_weight_decay", False) for g in opt.param_groups) else "adam"
    raise ValueError(
        f"no stability threshold is derived here for {type(opt).__name__}: SGD (with or without heavy-ball "
        "momentum), Adam and AdamW (and SAM over them) are"
    )


def is_adaptive(optimizer) -> bool:
    """Whether the optimizer preconditions by a second moment (its threshold is on the
    preconditioned sharpness): Adam and AdamW."""
    return _kind(optimizer) != "sgd"


def stability_threshold(optimizer) -> float:
    """The sharpness the optimizer's parameter groups keep below (module docstring); for Adam and
    AdamW it applies to :func:`preconditioned_sharpness`. SGD's weight decay ``wd`` adds ``wd`` to
    every curvature, so the bound on ``lambda_max(H)`` is lowered by ``wd``; Adam's coupled decay
    is in its preconditioned sharpness instead."""
    kind = _kind(optimizer)
    values = [_threshold(group, kind) for group in _groups(optimizer).param_groups]
    if len(set(values)) > 1:
        raise ValueError(
            f"the parameter groups have different thresholds {values}: measure them one at a time"
        )
    return values[0]


def _threshold(group: dict, kind: str) -> float:
    lr = float(group["lr"])
    if not lr > 0:
        raise ValueError(f"the learning rate must be > 0 for a stability threshold, got {lr}")
    if kind != "sgd":
        beta1 = float(group["betas"][0])
        return (2 + 2 * beta1) / ((1 - beta1) * lr)
    momentum = float(group.get("momentum", 0.0))
    if group.get("nesterov", False):
        raise ValueError(
            "the stability threshold of Nesterov momentum is not the heavy-ball one; not derived here"
        )
    dampening = float(group.get("dampening", 0.0)) if momentum else 0.0
    return 2 * (1 + momentum) / (lr * (1 - dampening)) - float(group.get("weight_decay", 0.0))


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
    from ``optimizer.state`` (every parameter that requires grad must have taken a step): ``v`` is
    ``max_exp_avg_sq`` with AMSGrad (what the update divides by), and Adam's coupled weight decay
    ``wd`` is part of the optimised objective (``H + wd I``); AdamW's decoupled decay is not."""
    kind = _kind(optimizer)
    if kind == "sgd":
        raise ValueError("preconditioned_sharpness needs Adam or AdamW; for SGD measure hessian_eigenvalues")
    opt = _groups(optimizer)
    with Objective(model, data, loss_fn, mode=mode, dtype=dtype) as objective:
        scales, decay = [], []
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        for p in objective.params:
            group, state = group_of.get(id(p)), opt.state.get(p, {})
            if group is None or "betas" not in group:
                raise ValueError(
                    "preconditioned_sharpness needs an Adam-type optimizer holding every parameter"
                )
            key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
            if key not in state:
                raise ValueError(f"the optimizer has not stepped yet: no {key} to precondition with")
            step = float(state["step"])
            v_hat = state[key].to(dtype) / (1 - group["betas"][1] ** step)
            scales.append((1 / torch.sqrt(v_hat.sqrt() + group["eps"])).reshape(-1))
            coupled = kind == "adam" and float(group.get("weight_decay", 0.0)) > 0
            decay.append(
                torch.full((p.numel(),), float(group["weight_decay"]) if coupled else 0.0, dtype=dtype)
            )
        scale = torch.cat(scales).to(objective.device)
        decay = torch.cat(decay).to(objective.device)

        def operator(v):
            return (objective.hvp(v * scale) + decay * v * scale) * scale

        start = gaussian(1, objective.size, generator, dtype, objective.device)[0]

        def converged(alpha, beta, basis):
            values, vectors = _ritz(alpha, beta)
            top = _order(values, "LA")[0]
            return abs(beta[-1] * float(vectors[-1, top])) <= tol * max(abs(float(values[top])), 1e-12)

        alpha, beta, _ = lanczos(operator, start, min(max_iter, objective.size), check=converged)
        values, _ = _ritz(alpha, beta)
        return float(values.max())
