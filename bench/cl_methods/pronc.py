"""``pronc``: progressive neural collapse (ProNC, arXiv 2505.24254), class-incremental.

Task 0 trains as usual (cross-entropy through the linear head). At its end the features' class
means fix a simplex-ETF frame of prototypes (:class:`cl_optim.heads.ETFHead`, the frame closest to
the means); every later task extends it by its new classes and trains with

    main * DR(f, m_y) + CE(head(f), y) + distill * DR(f, normalise(f_old))

(``DR(a, b) = 1/2 (<a/|a|, b> - 1)^2``, ``f`` the penultimate features, ``f_old`` the previous
network's), plus replay from a 200-sample reservoir as the paper's runs. From the second task on,
the prediction is ``argmax_c <f, m_c>`` over the classes seen. The weights are the paper's CIFAR-100
ones (``main = 18``, ``distill = 170``); on the job's digits they neither diverge nor suit the MLP
perfectly (``main = 1, distill = 10`` keeps the old pairs better and learns the new ones worse:
average 0.535 against 0.515, the last pair 0.09 against 0.94).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_optim.heads import ETFHead, dr_loss

from .base import frozen_copy
from .replay import Replay


class ProNC(Replay):
    scenarios = ("class_incremental",)  # a growing frame of class prototypes on one shared head

    def __init__(self, main: float = 18.0, distill: float = 170.0, seed: int = 0):
        super().__init__(capacity=200, seed=seed)
        self.main, self.distill = main, distill
        self.etf = None
        self.order: list[int] = []  # class label of each ETF column
        self.teacher = None  # the ETF's random directions come from Replay's seeded generator

    @classmethod
    def from_args(cls, args):
        return cls(seed=args.seed)

    def _columns(self, y):
        index = torch.full((max(self.order) + 1,), -1, dtype=torch.long)
        index[torch.tensor(self.order)] = torch.arange(len(self.order))
        return index[y.cpu()].to(y.device)

    def before_task(self, model, task, opt) -> None:
        if self.etf is None:
            return
        new = sorted(set(task["train"][1].unique().tolist()) - set(self.order))
        if new:
            self.etf.extend(len(new), generator=self.gen)
            self.order += new

    def batch_loss(self, model, x, y, task):
        replayed = super().batch_loss(model, x, y, task)  # the cross-entropy, with the buffer's samples
        if self.etf is None:
            return replayed
        with torch.no_grad():
            old = F.normalize(self.teacher.trunk(x), dim=1)  # once per batch
        prototypes = self.etf.prototypes.to(x.device)
        columns = self._columns(y)

        def loss():
            features = model.trunk(x)
            return (replayed() + self.main * dr_loss(features, columns, prototypes)
                    + self.distill * 0.5 * ((F.normalize(features, dim=1) * old).sum(1) - 1).pow(2).mean())  # fmt: skip

        return loss

    def after_task(self, model, task):
        if self.etf is None:  # the first frame: closest to task 0's class means
            x, y = task["train"]
            with torch.no_grad():
                features = model.trunk(x.to(next(model.parameters()).device)).cpu()
            self.order = sorted(y.unique().tolist())
            means = torch.stack([features[y == c].mean(0) for c in self.order])
            self.etf = ETFHead(features.shape[1], len(self.order), generator=self.gen)
            self.etf.align_to(means)
        self.teacher = frozen_copy(model)

    def logits(self, model, x):
        if self.etf is None or len(self.order) < 2:
            return super().logits(model, x)
        scores = model.trunk(x) @ self.etf.prototypes.to(x.device)
        out = torch.full((len(x), model.heads[model.active].out_features), float("-inf"), device=x.device)
        out[:, torch.tensor(self.order, device=x.device)] = scores
        return out
