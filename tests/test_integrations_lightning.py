"""Lightning's manual optimization with SAM: ``sam_step`` makes the two passes and Lightning counts
the step (``global_step``, ``max_steps``, checkpoints), with the numbers of a hand-written loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cl_optim

pl = pytest.importorskip("lightning.pytorch", reason="the integrations extra installs lightning")
from cl_optim.integrations.lightning import sam_step  # noqa: E402


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen)
    return x, (x[:, 0] > 0).long()


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    )


class SamModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = _net()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return sam_step(self, lambda: F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return cl_optim.SAM(self.parameters(), cl_optim.SGD, rho=0.05, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_sam_step_is_counted_and_matches_a_hand_written_loop(tmp_path, precision):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    module = SamModule()
    trainer = pl.Trainer(max_steps=7, accelerator="cpu", devices=1, precision=precision, logger=False,
                         default_root_dir=str(tmp_path), enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, loader)
    sam = module.optimizers().optimizer
    assert trainer.global_step == 7 and sam.steps == 7  # max_steps stopped the run at 7
    assert list(tmp_path.rglob("*.ckpt")), "a checkpoint was written"
    if precision != "32-true":
        return
    net = _net()
    opt = cl_optim.SAM(net.parameters(), cl_optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    for step in range(7):
        bx, by = batches[step % len(batches)]
        F.cross_entropy(net(bx), by).backward()
        opt.first_step(zero_grad=True)
        with cl_optim.preserve_bn_stats(net):
            F.cross_entropy(net(bx), by).backward()
        opt.second_step(zero_grad=True)
    for got, want in zip(module.net.state_dict().values(), net.state_dict().values()):
        torch.testing.assert_close(got, want)


def test_sam_step_refuses_another_optimizer():
    class Plain(SamModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    x, y = _data()
    with pytest.raises(TypeError, match="needs a cl_optim.SAM"):
        trainer.fit(Plain(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
