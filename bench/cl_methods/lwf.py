"""``lwf``: Learning without Forgetting (Li & Hoiem, ECCV 2016): the new task's cross-entropy plus
``lam * T^2 * KL(softmax(z_old / T) || softmax(z / T))`` on the new task's inputs, ``z_old`` the
previous model's outputs of every earlier head, at temperature ``T = 2`` and ``lam = 1`` (the
paper's values). Only the classes a head has been trained on are distilled: with one shared head
(class-incremental) the new classes' outputs are the ones being learnt, and distilling the old
model's (untrained, low) values for them would forbid the new task outright."""

from __future__ import annotations

import torch.nn.functional as F

from .base import Method, frozen_copy, head_outputs, no_grad_outputs


class LwF(Method):
    def __init__(self, temperature: float = 2.0, lam: float = 1.0):
        self.temperature, self.lam = temperature, lam
        self.teacher = None
        self.heads: list[int] = []  # the heads of the tasks learnt so far
        self.classes: dict = {}  # head -> the sorted classes it has been trained on

    def batch_loss(self, model, x, y, task):
        if self.teacher is None:
            return super().batch_loss(model, x, y, task)
        t = self.temperature
        old = [
            F.log_softmax(z / t, -1) for z in no_grad_outputs(self.teacher, x, self.heads)
        ]  # once per batch

        def loss():
            total = F.cross_entropy(model(x), y)
            for target, z in zip(old, head_outputs(model, x, self.heads)):
                total = total + self.lam * t * t * F.kl_div(F.log_softmax(z / t, -1), target, log_target=True,
                                                            reduction="batchmean")  # fmt: skip
            return total

        return loss

    def after_task(self, model, task):
        self.teacher = frozen_copy(model)
        head = task["head"]
        if head not in self.heads:
            self.heads.append(head)
        seen = set(self.classes.get(head, [])) | set(task["train"][1].unique().tolist())
        self.classes[head] = sorted(seen)
