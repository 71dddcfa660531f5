"""Flatness in the main job: what each method's solutions look like to cl_optim.landscape.

After every task, for every task seen so far, at the current weights: the top Hessian eigenvalue
and the Hessian trace of that task's training loss (cross-entropy, eval mode, on its first
``SUBSET`` training samples, through the task's own head); and the loss barrier on the straight
line from the previous task's solution to the new one, on the previous task's data and on the
new task's. The ``large_lr`` method trains with plain SGD at the edge of stability measured on
the first task: ``lr = 2 / lambda_max`` of the first task's loss at the solution ``finetune``
reaches on it (the job's SGD with momentum, ``--lr``, ``--epochs``, from the same initial
weights): the largest learning rate at which plain gradient descent stays in that region. At the
initial weights the loss is far flatter than anywhere training goes: an edge measured there
(``2/2.65`` on split, ``2/0.61`` on permuted; also after one epoch of plain SGD) collapsed the
network to chance. A
:class:`cl_optim.landscape.SharpnessMonitor` records the first task's sharpness against
``2 / lr`` as it trains.
"""

from __future__ import annotations

import copy

import torch

from cl_optim import landscape

SUBSET = 256  # training samples per task for the Hessian measurements
PROBES = 20  # Hutchinson probes for the trace
MONITOR_EVERY = 25  # steps between two sharpness measurements of large_lr


def task_data(task, device, samples=SUBSET):
    x, y = task["train"]
    return [(x[:samples].to(device), y[:samples].to(device))]


def _on_head(model, task, fn):
    active = model.active
    model.active = task["head"]
    try:
        return fn()
    finally:
        model.active = active


def measure_seen_tasks(model, tasks, device, seed, samples=SUBSET, probes=PROBES, tol=1e-3) -> dict:
    """Top eigenvalue and trace of each seen task's loss at the current weights (``--quick``:
    fewer samples and probes)."""
    sharpness, trace = [], []
    for task in tasks:
        data = task_data(task, device, samples)
        gen = torch.Generator().manual_seed(seed)
        values, _ = _on_head(model, task, lambda d=data, g=gen: landscape.hessian_eigenvalues(
            model, d, tol=tol, max_iter=40, mode="eval", generator=g))  # fmt: skip
        estimate, _ = _on_head(model, task, lambda d=data, g=gen: landscape.hessian_trace(
            model, d, n_probes=probes, mode="eval", generator=g))  # fmt: skip
        sharpness.append(float(values[0]))
        trace.append(float(estimate))
    return {"sharpness": sharpness, "trace": trace}


def consecutive_barrier(model, before: dict, after: dict, previous, new, device) -> dict:
    """The loss barrier from the previous task's solution to the new one, on each task's data."""
    out = {}
    for label, task in (("previous_task", previous), ("new_task", new)):
        data = task_data(task, device)
        path = _on_head(model, task, lambda d=data: landscape.interpolate(model, before, after, d, steps=11))
        out[label] = path["barrier"]
    return out


def edge_of_stability_lr(
    model, task, device, seed, lr: float, epochs: int, batch_size: int
) -> tuple[float, float]:
    """``(2 / lambda_max, lambda_max)`` of the first task's loss where ``finetune`` ends it: SGD
    with momentum 0.9 at ``lr`` for ``epochs`` on a copy of the model (the model is not trained)."""
    probe = copy.deepcopy(model)
    probe.active = task["head"]
    opt = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9)
    x, y = (t.to(device) for t in task["train"])
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(x[batch]), y[batch]).backward()
            opt.step()
    values, _ = landscape.hessian_eigenvalues(probe, task_data(task, device), tol=1e-3, max_iter=40, mode="eval",
                                              generator=torch.Generator().manual_seed(seed))  # fmt: skip
    top = float(values[0])
    if not top > 0:
        raise ValueError(f"the first task's loss has no positive curvature ({top}): no edge to train at")
    return 2.0 / top, top


class FirstTaskMonitor:
    """A SharpnessMonitor on the first task's loss (through its head), whatever head trains."""

    def __init__(self, model, task, optimizer, device):
        self.model, self.task = model, task
        self.monitor = landscape.SharpnessMonitor(model, task_data(task, device), optimizer, every=MONITOR_EVERY,
                                                  mode="eval")  # fmt: skip

    def step(self):
        return _on_head(self.model, self.task, self.monitor.step)

    @property
    def history(self):
        return self.monitor.history
