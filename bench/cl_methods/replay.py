"""``replay``: experience replay from a reservoir buffer (Chaudhry et al. 2019, "On Tiny Episodic
Memories in Continual Learning"): every sample seen is offered to a 200-sample reservoir (Vitter's
algorithm R: sample n is kept with probability 200/n, over a uniformly chosen slot), and each batch
is trained together with as many samples drawn from the buffer, each through its own task's head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method


class Replay(Method):
    def __init__(self, capacity: int = 200, seed: int = 0):
        self.capacity = capacity
        self.x: list = []
        self.y: list = []
        self.head: list = []
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)

    @classmethod
    def from_args(cls, args):
        return cls(seed=args.seed)

    def batch_loss(self, model, x, y, task):
        n = min(len(x), len(self.x))
        if n == 0:
            return super().batch_loss(model, x, y, task)
        pick = torch.randint(len(self.x), (n,), generator=self.gen).tolist()  # drawn once per batch
        rx = torch.stack([self.x[i] for i in pick]).to(x.device)
        ry = torch.stack([self.y[i] for i in pick]).to(y.device)
        heads = torch.tensor([self.head[i] for i in pick])

        def loss():
            total = F.cross_entropy(model(x), y, reduction="sum")
            active = model.active
            try:
                for h in heads.unique().tolist():
                    rows = (heads == h).nonzero().flatten().to(x.device)
                    model.active = h
                    total = total + F.cross_entropy(model(rx[rows]), ry[rows], reduction="sum")
            finally:
                model.active = active
            return total / (len(x) + n)

        return loss

    def after_batch(self, x, y, task):
        for xi, yi in zip(x.cpu(), y.cpu()):
            self.seen += 1
            if len(self.x) < self.capacity:
                self.x.append(xi)
                self.y.append(yi)
                self.head.append(task["head"])
                continue
            slot = int(torch.randint(self.seen, (1,), generator=self.gen))
            if slot < self.capacity:
                self.x[slot], self.y[slot], self.head[slot] = xi, yi, task["head"]
