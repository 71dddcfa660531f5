"""``large_lr``: plain SGD (no momentum) at the edge of stability measured on the first task,
``lr = 2 / lambda_max`` of the first task's loss where ``finetune`` ends it (bench/flatness.py): the
largest learning rate at which gradient descent can stay in that region. Gradient descent at the
edge of stability follows, on average, gradient flow on the loss plus a sharpness penalty (the
central flow of Cohen et al., arXiv 2410.24206), and a large learning rate is one of the training regimes reported to
forget less (Mirzadeh et al. 2020). A
:class:`cl_optim.landscape.SharpnessMonitor` records the first task's sharpness against ``2 / lr``
as it trains (the result's ``sharpness_curve``)."""

from __future__ import annotations

# bench/ is on sys.path when the job runs (and in the tests)
from flatness import FirstTaskMonitor, edge_of_stability_lr

import cl_optim

from .base import Method


class LargeLR(Method):
    def __init__(self):
        self.lr = None
        self.first_task = self.device = self.monitor = None

    def prepare(self, model, tasks, args, device) -> dict:
        self.lr, top = edge_of_stability_lr(model, tasks[0], device, args.seed, args.lr, args.epochs,
                                            args.batch_size)  # fmt: skip
        self.first_task, self.device = tasks[0], device
        return {"lr": self.lr, "first_task_sharpness_at_finetune": top}

    def optimizer(self, model, args):
        opt = cl_optim.SGD(model.parameters(), lr=self.lr, backend=args.backend)
        self.monitor = FirstTaskMonitor(model, self.first_task, opt, self.device)
        return opt, None

    def after_step(self) -> None:
        self.monitor.step()

    def report(self) -> dict:
        return {"sharpness_curve": self.monitor.history}
