"""``combined``: the combination the design proposes — progressive growth + SAM + dynamic loss
weights + representation alignment — for task-incremental scenarios.

A PNN (:mod:`.pnn`: a frozen column per earlier task, laterals into the new one), trained with SAM
(:mod:`.sam`: the job's SGD with momentum at ``--rho``), on the new task's cross-entropy and an alignment
term, the squared distance of the new column's penultimate features to the previous column's on
the same inputs (what the earlier column learnt, offered as a target the new one may leave),
weighted by homoscedastic uncertainty (Kendall, Gal & Cipolla 2018)::

    exp(-s_1) CE + s_1 + exp(-s_2) ALIGN + s_2

with ``s_1, s_2`` learned per task (new parameters of each task's group, from 0). Forgetting is 0
by construction (frozen columns); what the combination can change is how well each new task is
learnt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pnn import Progressive
from .sam import SAM


class Combined(Progressive, SAM):  # the columns of Progressive, the optimizer of SAM
    def __init__(self):
        self.log_vars: dict = {}  # task head -> (s_ce, s_align)

    def before_task(self, model, task, opt) -> None:
        super().before_task(model, task, opt)
        head = task["head"]
        if head > 0 and head not in self.log_vars:  # the first task has no earlier column to align with
            weights = torch.nn.Parameter(torch.zeros(2, device=next(model.columns[head].parameters()).device))
            self.log_vars[head] = weights
            opt.add_param_group({"params": [weights]})

    def batch_loss(self, model, x, y, task):
        if task["head"] == 0:
            return super().batch_loss(model, x, y, task)
        s = self.log_vars[task["head"]]

        def loss():
            logits, features, previous = model.forward_all(x)
            align = (features - previous).pow(2).sum(1).mean()
            return torch.exp(-s[0]) * F.cross_entropy(logits, y) + s[0] + torch.exp(-s[1]) * align + s[1]

        return loss
