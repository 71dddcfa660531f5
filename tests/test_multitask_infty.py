"""cl_optim.multitask.combine against INFTY 0.1.2 (THUDM's continual-learning optimizer toolkit),
where INFTY is right: PCGrad in a fixed order and CAGrad with the official rescaling.

INFTY is not a dependency (it pulls torchvision): `.ci/run` installs it with `--no-deps` and runs
this file after the README's test command, in which it is skipped. INFTY's GradVac is not
compared: it updates the EMA target only when the pair conflicts (the paper updates it every
step) and moves both gradients of its two tasks at once from the original pair.
"""

from __future__ import annotations

import random

import pytest
import torch

from cl_optim import multitask

infty = pytest.importorskip("infty")


def _model_and_losses():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)

    def losses():
        out = model(x)
        return out, [out[:, 0].square().mean(), -out[:, 1].mean(), (out.sum(1) ** 2).mean()]

    return model, losses


@pytest.mark.parametrize(
    "name,args,ours",
    [
        ("pcgrad", {}, {"method": "pcgrad", "shuffle": False}),
        ("cagrad", {"calpha": 0.4, "rescale": 1}, {"method": "cagrad", "c": 0.4}),
    ],
)
def test_combine_matches_infty(monkeypatch, name, args, ours):
    from infty.optim.gradient_filtering.cagrad import CAGrad
    from infty.optim.gradient_filtering.pcgrad import PCGrad

    model, losses = _model_and_losses()
    params = list(model.parameters())
    task_grads = [list(torch.autograd.grad(loss, params, retain_graph=True)) for loss in losses()[1]]
    monkeypatch.setattr(random, "shuffle", lambda seq: None)  # INFTY's order becomes 0..T-1
    cls = {"pcgrad": PCGrad, "cagrad": CAGrad}[name]
    opt = cls(params, torch.optim.SGD(params, lr=0.1), model, args)
    opt.step(closure=losses, delay=True)  # INFTY writes the combined gradient into .grad (fp32)
    theirs = torch.cat([p.grad.reshape(-1) for p in params]).double()
    mine = torch.cat([g.reshape(-1) for g in multitask.combine(task_grads, **ours)])
    assert float((theirs - mine).norm() / mine.norm()) < 1e-6
