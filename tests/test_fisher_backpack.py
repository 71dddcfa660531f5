"""The empirical Fisher of ``cl_optim.fisher.estimate`` against BackPACK's ``SumGradSquared`` (Dangel
et al., ICLR 2020), an implementation we did not write, on Linear and Conv1d/Conv2d models.

BackPACK is not a dependency (its wheel pulls torchvision, which pulls another torch): CI
installs it with ``--no-deps`` and runs this file; the README's test run skips it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cl_optim import fisher

backpack = pytest.importorskip("backpack")
SumGradSquared = pytest.importorskip("backpack.extensions").SumGradSquared


def _backpack_fisher(model: nn.Module, batches) -> dict:
    """sum over samples of squared per-sample gradients of the cross-entropy, over the sample count."""
    extended = backpack.extend(copy.deepcopy(model))
    loss_fn = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    totals = {name: torch.zeros_like(p) for name, p in extended.named_parameters()}
    count = 0
    for x, y in batches:
        extended.zero_grad()
        loss = loss_fn(extended(x), y)
        with backpack.backpack(SumGradSquared()):
            loss.backward()
        for name, p in extended.named_parameters():
            totals[name] += p.sum_grad_squared
        count += x.shape[0]
    return {name: t / count for name, t in totals.items()}


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)), (20,)),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=(1, 0)), nn.Tanh(),
            nn.Flatten(), nn.Linear(8 * 5 * 4, 5),
        ),
        (3, 10, 9),
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(4, 6, 5, padding=2), nn.ReLU(), nn.Conv1d(6, 6, 3, dilation=2), nn.Tanh(), nn.Flatten(),
            nn.Linear(6 * 12, 5),
        ),
        (4, 16),
    ),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_empirical_fisher_matches_backpack(kind):
    make, shape = MODELS[kind]
    torch.manual_seed(0)
    model = make().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(b, *shape, generator=gen), torch.randint(0, 5, (b,), generator=gen)) for b in (9, 7)
    ]
    got = fisher.estimate(model, batches, estimator="empirical")
    want = _backpack_fisher(model, batches)
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-9)
