"""``pnn``: Progressive Neural Networks (Rusu et al. 2016), for task-incremental scenarios.

One column per task, each the job's MLP (``inputs``-256-256-head). When a task starts, every
existing column is frozen (``requires_grad`` off: the fused optimizers skip parameters without a
gradient, so a frozen column has no state and no step) and a new column is added, whose hidden
layer ``i >= 2`` and head also read the previous columns' activations through lateral adapters::

    h_i^(k) = relu(W_i^(k) h_{i-1}^(k) + U_i^(k) relu(V_i^(k) [a_1 h_{i-1}^(1), ..., a_{k-1} h_{i-1}^(k-1)]))

(``a_j`` learned scalars, ``V`` a projection of the concatenated previous activations to
``ADAPTER`` units, ``U`` back to the layer's width; the head is the same without the ``relu``).
Earlier tasks are answered by their own frozen columns: forgetting is exactly 0 by construction,
and the parameter count grows with every task (quadratically through the laterals). Mammoth's MLP
version builds the adapters but never uses them (its ``forward`` tests an attribute that is always
empty); here a test checks that a column's output moves when an earlier column's activations do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method

ADAPTER = 64  # units of a lateral adapter's projection


class Lateral(nn.Module):
    """``U relu(V [a_1 h_1, ..., a_n h_n])`` from ``n`` earlier columns' activations of width ``width``."""

    def __init__(self, previous: int, width: int, out: int):
        super().__init__()
        self.scales = nn.Parameter(torch.empty(previous).uniform_(0.5, 1.5))
        self.project = nn.Linear(previous * width, ADAPTER)
        self.out = nn.Linear(ADAPTER, out, bias=False)

    def forward(self, activations: list) -> torch.Tensor:
        scaled = torch.cat([a * s for a, s in zip(activations, self.scales)], 1)
        return self.out(F.relu(self.project(scaled)))


class Column(nn.Module):
    def __init__(self, inputs: int, hidden: int, classes: int, previous: int):
        super().__init__()
        self.layer1 = nn.Linear(inputs, hidden)
        self.layer2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        self.lateral2 = Lateral(previous, hidden, hidden) if previous else None
        self.lateral_head = Lateral(previous, hidden, classes) if previous else None

    def forward(self, x, earlier: list):
        """``(h1, h2, logits)`` given the earlier columns' ``(h1, h2)``."""
        h1 = F.relu(self.layer1(x))
        pre2 = self.layer2(h1)
        if self.lateral2 is not None:
            pre2 = pre2 + self.lateral2([h[0] for h in earlier])
        h2 = F.relu(pre2)
        logits = self.head(h2)
        if self.lateral_head is not None:
            logits = logits + self.lateral_head([h[1] for h in earlier])
        return h1, h2, logits


class ProgressiveMLP(nn.Module):
    """Columns added by :meth:`add_column`; ``active`` selects the column (the task) to answer."""

    def __init__(self, inputs: int, hidden: int = 256):
        super().__init__()
        self.inputs, self.hidden = inputs, hidden
        self.columns = nn.ModuleList()
        self.active = 0

    def add_column(self, classes: int) -> list:
        """Freeze every column and add one for a new task; returns its parameters."""
        for p in self.parameters():
            p.requires_grad_(False)
        column = Column(self.inputs, self.hidden, classes, len(self.columns))
        self.columns.append(column)
        return list(column.parameters())

    def forward(self, x):
        return self.forward_all(x)[0]

    def forward_all(self, x):
        """``(logits, penultimate features of the active column, those of the one before or None)``."""
        earlier = []
        for column in self.columns[: self.active]:
            h1, h2, _ = column(x, earlier)
            earlier.append((h1, h2))
        _, h2, logits = self.columns[self.active](x, earlier)
        return logits, h2, earlier[-1][1] if earlier else None


class Progressive(Method):
    """Adds a column when a task starts (its parameters join the optimizer as a new group)."""

    # The column is picked by the task: task identity at test time, which only split gives. The
    # earlier tasks' losses do not depend on any trainable parameter (frozen columns) and the
    # parameter set grows: no curvature or barrier to compare.
    scenarios = ("split",)
    measures_flatness = False

    def make_model(self, inputs, heads):
        model = ProgressiveMLP(inputs)
        model.add_column(heads[0])  # the first task's column now, the others as their tasks start
        return model

    def before_task(self, model, task, opt) -> None:
        if task["head"] < len(model.columns):
            return  # the first column came with the model
        opt.add_param_group({"params": model.add_column(task["classes"])})
