"""``align``: representation alignment, the new task's cross-entropy plus
``lam * mean_x ||f_t(x) - f_{t-1}(x)||^2`` on the penultimate features (the trunk's output) of the
new task's inputs, ``f_{t-1}`` the network after the previous task (``lam = 1``): the features the
old heads read stay where they were (as feature distillation, Hou et al. 2019; here unnormalised)."""

from __future__ import annotations

import torch

from .base import Method, frozen_copy


class Align(Method):
    def __init__(self, lam: float = 1.0):
        self.lam = lam
        self.teacher = None

    def batch_loss(self, model, x, y, task):
        base = super().batch_loss(model, x, y, task)
        if self.teacher is None:
            return base
        with torch.no_grad():
            old = self.teacher.trunk(x)  # once per batch

        def loss():
            return base() + self.lam * (model.trunk(x) - old).pow(2).sum(1).mean()

        return loss

    def after_task(self, model, task):
        self.teacher = frozen_copy(model)
