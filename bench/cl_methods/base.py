"""What a method of the main job adds to the shared training loop (bench/continual.py).

A method builds the model and the optimizer it trains with (by default the job's MLP and
cl_optim's SGD with momentum; an EWC method adds its penalty, a SAM variant wraps the SGD, a
growth method builds columns), and the loop asks it, for each batch, for the loss at the model's
current weights (called once per pass: SAM and its variants call it again at perturbed weights, so
anything drawn for the batch — replayed samples, a teacher's outputs — is drawn once, here), and
tells it when a step, a batch and a task are done.

The plain method, ``finetune``, is :class:`Method` itself: SGD with momentum on the task's
cross-entropy, nothing kept between tasks.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cl_optim


class MultiHeadMLP(nn.Module):
    """The job's network: ``inputs``-256-256 (ReLU), one linear head per entry of ``heads`` (its
    class count); ``active`` selects the head that answers."""

    def __init__(self, inputs: int, heads: list[int], hidden: int = 256):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(hidden, c) for c in heads)
        self.active = 0

    def forward(self, x):
        return self.heads[self.active](self.trunk(x))


class Method:
    """``finetune``: SGD with momentum on the task's cross-entropy, nothing kept between tasks."""

    scenarios: tuple[str, ...] | None = None  # the scenarios the method runs in (None: all)
    measures_flatness = True  # False where the seen tasks' losses do not depend on trained weights

    @classmethod
    def from_args(cls, args) -> Method:
        """The method as the job's command line configures it (``args``: its parsed arguments)."""
        return cls()

    def make_model(self, inputs: int, heads: list[int]) -> nn.Module:
        """The network, before any task: ``heads`` holds the class count of each head."""
        return MultiHeadMLP(inputs, heads)

    def prepare(self, model: nn.Module, tasks: list[dict], args, device) -> dict:
        """Called once before the first task, before the optimizer is built; returns fields for
        the method's result (large_lr: the learning rate it measured)."""
        return {}

    def make_ewc(self, model: nn.Module, args):
        """The EWC penalty the optimizer applies (consolidated by the loop after each task), or None."""
        return None

    def make_optimizer(self, params, args, **kwargs):
        """The optimizer over ``params`` given the shared settings (lr, momentum, ewc, backend)."""
        return cl_optim.SGD(params, **kwargs)

    def optimizer(self, model: nn.Module, args):
        """``(optimizer, ewc or None)``: the job's SGD settings (``--lr``, momentum 0.9) through
        :meth:`make_optimizer`, with the penalty of :meth:`make_ewc`."""
        ewc = self.make_ewc(model, args)
        kwargs = dict(lr=args.lr, momentum=0.9, ewc=ewc, backend=args.backend)
        return self.make_optimizer(model.parameters(), args, **kwargs), ewc

    def batch_loss(self, model: nn.Module, x: Tensor, y: Tensor, task: dict) -> Callable[[], Tensor]:
        return lambda: F.cross_entropy(model(x), y)

    def before_task(self, model: nn.Module, task: dict, opt) -> None:
        """Called when a task starts, before its first batch (a growth method adds parameters)."""

    def after_step(self) -> None:
        """Called after each optimizer step, outside the timed part (large_lr: its sharpness monitor)."""

    def after_batch(self, x: Tensor, y: Tensor, task: dict) -> None:
        """Called once per batch, after the step."""

    def after_task(self, model: nn.Module, task: dict) -> None:
        """Called once the task's training (and any Fisher) is done."""

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        """What the method predicts from (the accuracy's argmax): the active head's outputs."""
        return model(x)

    def report(self) -> dict:
        """Fields the method adds to its result once every task is trained."""
        return {}


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
