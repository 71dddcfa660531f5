"""The main job's methods (bench/cl_methods): each loss against its formula written out, and what
each optimizer-side method builds."""

from __future__ import annotations

import argparse
import copy
import pathlib
import sys

import torch
import torch.nn.functional as F

import cl_optim

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from cl_methods import (  # noqa: E402
    METHODS,
    SCENARIOS,
    Align,
    Combined,
    LwF,
    Method,
    Progressive,
    ProgressiveMLP,
    Replay,
)


class TwoHeads(torch.nn.Module):
    def __init__(self, classes=(2, 2)):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, c) for c in classes)
        self.active = 0

    def forward(self, x):
        return self.heads[self.active](self.trunk(x))


def _task(head, labels, n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen)
    y = torch.tensor([labels[i % len(labels)] for i in range(n)])
    return {"name": f"t{head}", "head": head, "train": (x, y)}


def test_plain_method_is_the_cross_entropy():
    model, task = TwoHeads(), _task(0, [0, 1])
    x, y = task["train"]
    assert torch.equal(Method().batch_loss(model, x, y, task)(), F.cross_entropy(model(x), y))


def test_replay_keeps_a_reservoir_and_trains_each_sample_through_its_head():
    model, replay = TwoHeads(), Replay(capacity=10, seed=0)
    first, second = _task(0, [0, 1], n=30, seed=1), _task(1, [0, 1], n=30, seed=2)
    replay.after_batch(*first["train"], first)
    assert len(replay.x) == 10 and replay.seen == 30 and set(replay.head) == {0}
    # every stored sample is one of the stream's
    assert all(any(torch.equal(s, x) for x in first["train"][0]) for s in replay.x)
    model.active = 1
    x, y = second["train"][0][:4], second["train"][1][:4]
    loss = replay.batch_loss(model, x, y, second)
    value = loss()
    assert torch.equal(loss(), value)  # the replayed samples are drawn once per batch, not per pass
    # the mean of 8 per-sample losses: the batch's four through head 1, four replayed through head 0
    total = F.cross_entropy(model(x), y, reduction="sum")
    model.active = 0
    replayed = F.cross_entropy(model(torch.stack(replay.x)), torch.stack(replay.y), reduction="none")
    model.active = 1
    assert (total + 4 * replayed.min()) / 8 - 1e-6 <= value <= (total + 4 * replayed.max()) / 8 + 1e-6
    assert not torch.isclose(value, F.cross_entropy(model(x), y))  # the buffer is in it
    assert model.active == 1


def test_lwf_is_the_cross_entropy_at_the_teacher_and_distills_only_trained_classes():
    model = TwoHeads(classes=(4,))
    task0, task1 = _task(0, [0, 1]), _task(0, [2, 3], seed=3)
    lwf = LwF()
    lwf.after_task(model, task0)
    assert lwf.classes == {0: [0, 1]}
    x, y = task1["train"]
    # at the teacher's own weights the distillation term is 0
    torch.testing.assert_close(lwf.batch_loss(model, x, y, task1)(), F.cross_entropy(model(x), y))
    # moved weights: CE + T^2 KL over the columns of classes 0 and 1 only, written out
    with torch.no_grad():
        model.heads[0].weight.add_(0.3)
    got = lwf.batch_loss(model, x, y, task1)()
    t = 2.0
    teacher = lwf.teacher
    p_old = F.softmax(teacher(x)[:, :2] / t, -1)
    log_new = F.log_softmax(model(x)[:, :2] / t, -1)
    kl = (p_old * (p_old.log() - log_new)).sum(1).mean()
    torch.testing.assert_close(got, F.cross_entropy(model(x), y) + t * t * kl)


def test_align_pulls_the_features_towards_the_previous_network():
    model = TwoHeads()
    task0, task1 = _task(0, [0, 1]), _task(1, [0, 1], seed=4)
    align = Align(lam=0.5)
    align.after_task(model, task0)
    x, y = task1["train"]
    model.active = 1
    torch.testing.assert_close(align.batch_loss(model, x, y, task1)(), F.cross_entropy(model(x), y))
    old = copy.deepcopy(model.trunk)
    with torch.no_grad():
        model.trunk[0].bias.add_(0.2)
    got = align.batch_loss(model, x, y, task1)()
    want = F.cross_entropy(model(x), y) + 0.5 * (model.trunk(x) - old(x)).pow(2).sum(1).mean()
    torch.testing.assert_close(got, want)


def test_pnn_uses_its_laterals_and_freezes_the_earlier_columns():
    """Mammoth's MLP PNN never uses its adapters; here column 1's output moves when column 0's
    activations do, the gradient reaches the adapters, and column 0 neither trains nor changes."""
    torch.manual_seed(0)
    net = ProgressiveMLP(5, hidden=16)
    net.add_column(2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    Progressive().before_task(net, {"head": 1, "classes": 3}, opt)
    assert len(net.columns) == 2 and len(opt.param_groups) == 2
    assert not any(p.requires_grad for p in net.columns[0].parameters())
    assert all(p.requires_grad for p in net.columns[1].parameters())
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    net.active = 1
    out = net(x)
    assert out.shape == (8, 3)
    F.cross_entropy(out, y).backward()
    lateral = net.columns[1].lateral2
    assert lateral.project.weight.grad.abs().sum() > 0 and lateral.scales.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.columns[0].parameters())
    # column 1 reads column 0: a change there changes column 1's answer
    with torch.no_grad():
        net.columns[0].layer1.weight.add_(0.5)
    assert not torch.allclose(net(x), out)
    # and column 0 alone answers task 0, whatever column 1 does
    net.active = 0
    before = net(x).detach()
    opt.step()
    with torch.no_grad():
        net.columns[1].layer1.weight.add_(1.0)
    assert torch.equal(net(x), before)


def test_pnn_grows_its_parameters_with_laterals_from_every_earlier_column():
    net = ProgressiveMLP(4, hidden=8)
    sizes = []
    for _ in range(3):
        net.add_column(2)
        sizes.append(sum(p.numel() for p in net.parameters()))
    column = 4 * 8 + 8 + 8 * 8 + 8 + 8 * 2 + 2

    def lateral(n, out):
        return n + n * 8 * 64 + 64 + 64 * out

    assert sizes == [column, 2 * column + lateral(1, 8) + lateral(1, 2),
                     3 * column + lateral(1, 8) + lateral(1, 2) + lateral(2, 8) + lateral(2, 2)]  # fmt: skip


def test_pronc_fixes_an_etf_after_the_first_task_and_extends_it():
    from cl_methods import ProNC

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU())
            self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 6)])
            self.active = 0

        def forward(self, x):
            return self.heads[0](self.trunk(x))

    net, method = Net(), ProNC(main=2.0, distill=3.0)
    first, second = _task(0, [0, 1], n=20, seed=5), _task(0, [2, 3], n=20, seed=6)
    x0, y0 = first["train"]
    torch.testing.assert_close(method.batch_loss(net, x0, y0, first)(), F.cross_entropy(net(x0), y0))
    method.after_task(net, first)  # (no after_batch: an empty replay buffer keeps the loss exact)
    assert method.order == [0, 1] and method.etf.classes == 2
    method.before_task(net, second, None)
    assert method.order == [0, 1, 2, 3] and method.etf.classes == 4
    m = method.etf.prototypes
    torch.testing.assert_close(m.T @ m, torch.full((4, 4), -1 / 3).fill_diagonal_(1.0), rtol=0, atol=1e-6)
    # predictions: the seen classes' prototypes only
    logits = method.logits(net, x0)
    assert torch.isinf(logits[:, 4:]).all() and torch.isfinite(logits[:, :4]).all()
    torch.testing.assert_close(logits[:, :4], net.trunk(x0) @ m)
    # a later task's loss: cross-entropy + 2 DR to the prototypes + 3 DR to the old features (0 at
    # the teacher's own weights), written out; the ETF columns follow the class order
    x1, y1 = second["train"]
    value = method.batch_loss(net, x1, y1, second)()
    want = F.cross_entropy(net(x1), y1) + 2.0 * dr_loss_ref(net.trunk(x1), y1, m)
    torch.testing.assert_close(value, want)
    with torch.no_grad():
        net.trunk[0].bias.add_(0.3)  # away from the teacher: the distillation term appears
    moved = net.trunk(x1)
    old = method.teacher.trunk(x1)
    gap = (moved / moved.norm(dim=1, keepdim=True) * old / old.norm(dim=1, keepdim=True)).sum(1) - 1
    want = F.cross_entropy(net(x1), y1) + 2.0 * dr_loss_ref(moved, y1, m) + 3.0 * 0.5 * gap.pow(2).mean()
    torch.testing.assert_close(method.batch_loss(net, x1, y1, second)(), want)


def dr_loss_ref(features, targets, prototypes):
    unit = features / features.norm(dim=1, keepdim=True)
    return 0.5 * ((unit * prototypes.T[targets]).sum(1) - 1).pow(2).mean()


def test_combined_weighs_the_task_loss_and_the_alignment_by_learned_uncertainty():
    """exp(-s1) CE + s1 + exp(-s2) ||f_new - f_prev||^2 + s2 on a PNN; s1, s2 join the optimizer
    and get gradients; the first task is plain cross-entropy."""
    torch.manual_seed(0)
    net = ProgressiveMLP(5, hidden=16)
    net.add_column(2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    method = Combined()
    task0, task1 = {**_task(0, [0, 1]), "classes": 2}, {**_task(1, [0, 1], seed=7), "classes": 2}
    x, y = task0["train"]
    method.before_task(net, task0, opt)
    torch.testing.assert_close(method.batch_loss(net, x, y, task0)(), F.cross_entropy(net(x), y))
    method.before_task(net, task1, opt)
    assert len(opt.param_groups) == 3  # column 1, then its two loss weights
    s = method.log_vars[1]
    with torch.no_grad():
        s.copy_(torch.tensor([0.3, -0.2]))
    net.active = 1
    x, y = task1["train"]
    value = method.batch_loss(net, x, y, task1)()
    logits, new, previous = net.forward_all(x)
    want = (torch.exp(torch.tensor(-0.3)) * F.cross_entropy(logits, y) + 0.3
            + torch.exp(torch.tensor(0.2)) * (new - previous).pow(2).sum(1).mean() - 0.2)  # fmt: skip
    torch.testing.assert_close(value, want)
    value.backward()
    assert s.grad is not None and (s.grad != 0).all()


ARGS = argparse.Namespace(
    lr=0.02, rho=0.07, lam=300.0, gamma=0.8, backend="forloop", seed=3, epochs=1, batch_size=32
)
# name -> (optimizer class, its hyperparameters beyond the shared ones, EWC mode or None)
OPTIMIZER_SIDE = {
    "finetune": (cl_optim.SGD, {}, None),
    "ewc": (cl_optim.SGD, {}, "separate"),
    "online_ewc": (cl_optim.SGD, {}, "online"),
    "sam": (cl_optim.SAM, {}, None),
    "ewc_sam": (cl_optim.SAM, {}, "separate"),
    "gsam": (cl_optim.GSAM, {"alpha": 0.4}, None),
    "looksam": (cl_optim.LookSAM, {"k": 5, "alpha": 0.2}, None),
    "cflat": (cl_optim.CFlat, {"lamb": 0.2}, None),
    "cflat_ewc": (cl_optim.CFlat, {"lamb": 0.2}, "separate"),
    "combined": (cl_optim.SAM, {}, None),
}


def test_every_method_is_a_class_of_its_own_file():
    """A file per method (the EWC and SAM combinations next to the method they add the penalty to)."""
    assert METHODS["finetune"] is Method and list(METHODS)[0] == "finetune"
    shared_file = {"online_ewc": "ewc", "ewc_sam": "sam", "cflat_ewc": "cflat"}
    for name, cls in list(METHODS.items())[1:]:
        assert cls.__module__ == f"cl_methods.{shared_file.get(name, name)}", (name, cls.__module__)
    assert len(set(METHODS.values())) == len(METHODS)
    assert SCENARIOS == {"pnn": ("split",), "combined": ("split",), "pronc": ("class_incremental",)}


def test_optimizer_side_methods_build_the_optimizer_and_penalty_they_name():
    for name, (kind, options, ewc_mode) in OPTIMIZER_SIDE.items():
        method = METHODS[name].from_args(ARGS)
        model = method.make_model(6, [2, 2])
        opt, ewc = method.optimizer(model, ARGS)
        assert type(opt) is kind, name
        group = opt.param_groups[0]
        assert group["lr"] == 0.02 and group["momentum"] == 0.9, name
        base = opt.base_optimizer if isinstance(opt, cl_optim.SAM) else opt
        assert isinstance(base, cl_optim.SGD), name
        if isinstance(opt, cl_optim.SAM):
            assert group["rho"] == 0.07, name
        for option, value in options.items():
            assert getattr(opt, option) == value, (name, option)
        if ewc_mode is None:
            assert ewc is None, name
        else:
            assert ewc.mode == ewc_mode and ewc.lam == 300.0 and base.ewc is ewc, name
            if ewc_mode == "online":
                assert ewc.gamma == 0.8
        # every trainable parameter is optimized (a PNN: its first column)
        optimized = {id(p) for g in opt.param_groups for p in g["params"]}
        assert optimized == {id(p) for p in model.parameters() if p.requires_grad}, name


def test_large_lr_trains_plain_sgd_at_the_measured_edge_and_monitors_the_first_task():
    torch.manual_seed(0)
    method = METHODS["large_lr"].from_args(ARGS)
    model = method.make_model(5, [2])
    task = {**_task(0, [0, 1], n=64), "classes": 2}
    extra = method.prepare(model, [task], ARGS, torch.device("cpu"))
    assert extra["lr"] == 2.0 / extra["first_task_sharpness_at_finetune"] > 0
    opt, ewc = method.optimizer(model, ARGS)
    assert ewc is None and type(opt) is cl_optim.SGD
    assert opt.param_groups[0]["lr"] == extra["lr"] and opt.param_groups[0]["momentum"] == 0
    for _ in range(25):  # the monitor measures every 25 steps
        opt.zero_grad()
        F.cross_entropy(model(task["train"][0]), task["train"][1]).backward()
        opt.step()
        method.after_step()
    curve = method.report()["sharpness_curve"]
    assert len(curve) == 1 and abs(curve[0]["threshold"] - 2.0 / extra["lr"]) < 1e-9
