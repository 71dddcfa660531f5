"""What a method of the main job adds to the shared training loop (bench/continual.py).

The loop asks the method, for each batch, for the loss at the model's current weights (called
once per pass: SAM and its variants call it again at perturbed weights, so anything drawn for the
batch — replayed samples, a teacher's outputs — is drawn once, here), and tells it when a batch
and a task are done.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Method:
    """Plain training: the task's cross-entropy, nothing kept between tasks."""

    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor, task: dict) -> Callable[[], Tensor]:
        return lambda: F.cross_entropy(model(x), y)

    def before_task(self, model: nn.Module, task: dict, opt) -> None:
        """Called when a task starts, before its first batch (a growth method adds parameters)."""

    def after_batch(self, x: Tensor, y: Tensor, task: dict) -> None:
        """Called once per batch, after the step."""

    def after_task(self, model: nn.Module, task: dict) -> None:
        """Called once the task's training (and any Fisher) is done."""

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        """What the method predicts from (the accuracy's argmax): the active head's outputs."""
        return model(x)


def frozen_copy(model: nn.Module) -> nn.Module:
    """The model as it is now, in eval mode, with no gradients: the previous task's network."""
    import copy

    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def head_outputs(model: nn.Module, x: Tensor, heads: list[int]) -> list[Tensor]:
    """The logits of each head in ``heads`` on ``x`` (a multi-head model selects one by ``active``),
    ``active`` restored afterwards."""
    active = model.active
    try:
        out = []
        for head in heads:
            model.active = head
            out.append(model(x))
        return out
    finally:
        model.active = active


@torch.no_grad()
def no_grad_outputs(model: nn.Module, x: Tensor, heads: list[int]) -> list[Tensor]:
    return head_outputs(model, x, heads)
