r"""The loss along the straight line between two solutions, and its barrier.

``interpolate`` loads ``(1 - alpha) a + alpha b`` (every floating entry of the two state dicts,
BatchNorm statistics included; integer entries such as ``num_batches_tracked`` from ``a``) and
evaluates the data loss and accuracy there. The barrier is the largest rise of the loss above the
chord, ``max_alpha L(alpha) - ((1 - alpha) L(0) + alpha L(1))`` (Frankle et al. 2020; Entezari et
al. 2022): about zero when the two solutions are linearly mode connected.

Example:
    >>> import torch, cl_optim
    >>> model = torch.nn.Linear(3, 2)
    >>> a = {k: v.clone() for k, v in model.state_dict().items()}
    >>> b = {k: v + 1 for k, v in a.items()}
    >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    >>> path = cl_optim.landscape.interpolate(model, a, b, data, steps=5)
    >>> sorted(path)
    ['accuracy', 'alpha', 'barrier', 'loss']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, Optional

import torch
from torch import nn

from ..fisher.batch import logits
from .objective import Objective

__all__ = ["interpolate", "barrier"]


def barrier(alpha: list, loss: list) -> float:
    """``max_alpha L(alpha) - ((1 - alpha) L(0) + alpha L(1))`` over a path from alpha 0 to 1."""
    start, end = loss[0], loss[-1]
    return max(value - ((1 - a) * start + a * end) for a, value in zip(alpha, loss))


def interpolate(
    model: nn.Module,
    state_a: dict,
    state_b: dict,
    data: Iterable,
    steps: int = 21,
    loss_fn: Optional[Callable] = None,
    *,
    mode: Optional[str] = "eval",
) -> dict:
    """``{"alpha", "loss", "accuracy", "barrier"}`` along the line from ``state_a`` to ``state_b``
    (state dicts of ``model``); accuracy is None where the targets are not class indices. The
    model's own state is restored afterwards."""
    if steps < 2:
        raise ValueError("steps must be >= 2")
    keys = set(model.state_dict())
    for name, state in (("state_a", state_a), ("state_b", state_b)):
        if set(state) != keys:
            missing, extra = sorted(keys - set(state)), sorted(set(state) - keys)
            raise ValueError(
                f"{name} is not a state dict of this model (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        for k, v in state.items():
            if v.shape != model.state_dict()[k].shape:
                raise ValueError(
                    f"{name}[{k!r}] has shape {tuple(v.shape)}, the model {tuple(model.state_dict()[k].shape)}"
                )
    alphas = [i / (steps - 1) for i in range(steps)]
    losses, accuracies = [], []
    with Objective(model, data, loss_fn, mode=mode, derivatives=False) as objective:
        own = model.state_dict()
        # Copies first: a state dict of the model itself shares its tensors, which loading overwrites.
        a = {k: v.detach().to(own[k].device, torch.float64 if own[k].is_floating_point() else v.dtype, copy=True)
             for k, v in state_a.items()}  # fmt: skip
        b = {
            k: v.detach().to(own[k].device, torch.float64, copy=True)
            for k, v in state_b.items()
            if own[k].is_floating_point()
        }
        for alpha in alphas:
            mixed = {k: ((1 - alpha) * a[k] + alpha * b[k]).to(own[k].dtype) if k in b else a[k] for k in own}
            model.load_state_dict(mixed)
            losses.append(objective.loss())
            accuracies.append(_accuracy(model, objective.batches))
    return {
        "alpha": alphas,
        "loss": losses,
        "accuracy": None if any(a is None for a in accuracies) else accuracies,
        "barrier": barrier(alphas, losses),
    }


def _accuracy(model, batches) -> Optional[float]:
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            targets = batch.targets
            if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
                return None
            out = logits(model(*batch.args, **batch.kwargs))
            correct += int((out.argmax(-1) == targets).sum())
            total += targets.numel()
    return correct / total if total else None
