"""MultiTaskSAM beyond the F-MTL reference (tests/test_multitask_sam_reference.py): equal to SAM
with one task, the backends against the forloop oracle, the running Fisher and EWC terms,
checkpoints, ownership of parameters, and bad input that changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import cl_optim
from cl_optim._backend import _REGISTRY

AGGREGATORS = ["sum", "mean", "pcgrad", "cagrad", "mgda", "imtl", "gradvac"]


class Net(torch.nn.Module):
    def __init__(self, tasks=2, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        # No bias before the batch norm: its gradient is exactly zero in exact arithmetic, rounding
        # noise in floats, which Adam scales up to a full step (a difference of noise, not of code).
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(5, 12, bias=False), torch.nn.BatchNorm1d(12), torch.nn.Tanh()
        )
        self.heads = torch.nn.ModuleList(torch.nn.Linear(12, 3) for _ in range(tasks))
        self.unused = torch.nn.Linear(2, 2)  # reached by no loss
        self.to(dtype)
        self.x = torch.randn(20, 5, dtype=dtype)
        self.ys = [torch.randint(0, 3, (20,)) for _ in range(tasks)]

    def losses(self):
        features = self.trunk(self.x)
        return [F.cross_entropy(head(features), y) for head, y in zip(self.heads, self.ys)]


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict, b: dict, atol=0.0):
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_one_task_is_sam():
    """T = 1: every parameter is the task's own, the norm is SAM's global one: the same step."""
    a, b = Net(tasks=1), Net(tasks=1)
    opt_a = cl_optim.MultiTaskSAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9)
    opt_b = cl_optim.SAM(b.parameters(), torch.optim.SGD, rho=0.1, lr=0.2, momentum=0.9)
    for _ in range(3):
        opt_a.step(a.losses)

        def closure():
            opt_b.zero_grad()
            with cl_optim.preserve_bn_stats(b):
                loss = b.losses()[0]
                loss.backward()
            return loss

        opt_b.zero_grad()
        b.losses()[0].backward()
        opt_b.step(closure)
    _assert_same(_snapshot(a), _snapshot(b), atol=1e-12)


def _compiled_backends():
    return [
        name
        for name in ("cpp",)
        if _REGISTRY[name].unavailable_reason(torch.device("cpu"), torch.float32) is None
    ]


@pytest.mark.parametrize("backend", ["foreach", *_compiled_backends()])
@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_backends_match_the_oracle(backend, aggregator):
    """Parameters, Adam moments and BN statistics after 3 steps, fp32, against forloop."""
    runs = {}
    for name in ("forloop", backend):
        model = Net(dtype=torch.float32)
        opt = cl_optim.MultiTaskSAM(
            model.parameters(), cl_optim.AdamW, rho=0.05, aggregator=aggregator, lr=1e-2, backend=name,
            aggregator_options={"shuffle": False} if aggregator in ("pcgrad", "gradvac") else None,
        )  # fmt: skip
        for _ in range(3):
            opt.step(model.losses)
        runs[name] = (_snapshot(model), copy.deepcopy(opt.state_dict()["state"]))
    _assert_same(runs["forloop"][0], runs[backend][0], atol=2e-6)
    for index, state in runs["forloop"][1].items():
        for key, value in state.items():
            torch.testing.assert_close(runs[backend][1][index][key], value, rtol=1e-5, atol=2e-6)


def test_running_fisher_is_that_of_the_summed_loss_and_perturbations_read_the_old_one():
    """F <- beta F + (1-beta) (sum_t g_t)^2 at w; adaptive='fisher_ema' perturbs along the Fisher
    before the update, so with F = 0 the first step is plain SAM's."""
    beta = 0.9
    model, plain = Net(), Net()
    params = list(model.parameters())
    losses = model.losses()
    total = torch.autograd.grad(sum(losses), params, allow_unused=True)
    opt = cl_optim.MultiTaskSAM(
        params, torch.optim.SGD, rho=0.1, adaptive="fisher_ema", fisher_ema=beta, lr=0.1
    )
    opt_plain = cl_optim.MultiTaskSAM(plain.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    model.load_state_dict(plain.state_dict())  # undo the BN update of the forward above
    opt.step(model.losses)
    opt_plain.step(plain.losses)
    _assert_same(_snapshot(model), _snapshot(plain), atol=1e-14)
    fisher = opt.running_fisher()
    for p, g in zip(params, total):
        if g is None:
            assert p not in fisher
            continue
        torch.testing.assert_close(fisher[p].double(), (1 - beta) * g.double() ** 2, rtol=1e-6, atol=1e-12)
    opt.step(model.losses)
    opt_plain.step(plain.losses)
    assert not torch.allclose(model.trunk[0].weight, plain.trunk[0].weight, rtol=0, atol=1e-12)


def test_ewc_pull_is_added_at_the_restored_weights():
    """With EWC, the update is SGD's on Agg + lam * A * (w - mu), at w (not w + e)."""
    with_ewc, without = Net(), Net()
    ewc = cl_optim.EWC(with_ewc, lam=3.0)
    precision = {name: torch.rand_like(p) for name, p in with_ewc.named_parameters()}
    ewc.consolidate(precision)  # the anchor is the current weights
    with torch.no_grad():
        for p in with_ewc.parameters():
            p.add_(0.01)
        for p in without.parameters():
            p.add_(0.01)
    anchor = {name: p.detach().clone() - 0.01 for name, p in with_ewc.named_parameters()}
    before = dict(with_ewc.named_parameters())
    before = {name: p.detach().clone() for name, p in before.items()}
    opt_ewc = cl_optim.MultiTaskSAM(with_ewc.parameters(), cl_optim.SGD, rho=0.05, lr=0.1, ewc=ewc)
    opt_plain = cl_optim.MultiTaskSAM(without.parameters(), cl_optim.SGD, rho=0.05, lr=0.1)
    opt_ewc.step(with_ewc.losses)
    opt_plain.step(without.losses)
    for name, p in with_ewc.named_parameters():
        if name.startswith("unused"):
            torch.testing.assert_close(p, before[name], rtol=0, atol=0)  # no gradient: no step
            continue
        pull = 3.0 * precision[name].double() * (before[name].double() - anchor[name].double())
        expected = dict(without.named_parameters())[name].double() - 0.1 * pull
        torch.testing.assert_close(p.double(), expected, rtol=0, atol=1e-6)


def test_nonfinite_task_gradients_skip_the_step_without_a_host_read():
    model = Net()
    opt = cl_optim.MultiTaskSAM(model.parameters(), cl_optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.step(model.losses)
    calls = [0]

    def nan_in_stage_two():
        calls[0] += 1
        losses = model.losses()
        if calls[0] == 2:  # the first perturbed forward only
            losses[0] = losses[0] * float("nan")
        return losses

    before = _snapshot(model)
    state = copy.deepcopy(opt.state_dict()["state"])
    opt.step(nan_in_stage_two)
    assert bool(opt.last_step_skipped)
    _assert_same({k: v for k, v in before.items() if "running" not in k and "num_batches" not in k},
                 {k: v for k, v in _snapshot(model).items() if "running" not in k and "num_batches" not in k})  # fmt: skip
    for index, entry in state.items():
        torch.testing.assert_close(
            opt.state_dict()["state"][index]["momentum_buffer"], entry["momentum_buffer"]
        )
    opt.step(model.losses)  # and it goes on
    assert not bool(opt.last_step_skipped)
    assert opt.steps == 3


@pytest.mark.parametrize(
    "closure_result, error",
    [
        (lambda losses: losses[0], "list of the T task losses"),
        (lambda losses: [], "empty list"),
        (lambda losses: [losses[0], torch.tensor([1.0, 2.0])], "one-element tensor"),
        (lambda losses: [losses[0], torch.tensor(1.0)], "does not depend"),
    ],
)
def test_bad_closures_change_nothing(closure_result, error):
    model = Net()
    opt = cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises((TypeError, ValueError), match=error):
        opt.step(lambda: closure_result(model.losses()))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.steps == 0 and not opt.state


def test_a_failing_second_stage_restores_the_weights():
    model = Net()
    opt = cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    calls = [0]

    def closure(kind):
        calls[0] += 1
        losses = model.losses()
        if calls[0] == 3:
            if kind == "raise":
                raise KeyError("data loader failed")
            return losses[:1]
        return losses

    for kind, error in (("raise", KeyError), ("short", ValueError)):
        calls[0] = 0
        with pytest.raises(error):
            opt.step(lambda kind=kind: closure(kind))
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.step(model.losses)  # no step left pending


def test_gradvac_targets_survive_a_checkpoint():
    a, b = Net(), Net()
    options = dict(aggregator="gradvac", aggregator_options={"shuffle": False, "beta": 0.5}, lr=0.1)
    opt_a = cl_optim.MultiTaskSAM(a.parameters(), torch.optim.SGD, **options)
    for _ in range(2):
        opt_a.step(a.losses)
    saved, saved_model = copy.deepcopy(opt_a.state_dict()), _snapshot(a)
    assert saved["multitask"]["g"]["state"] is not None and saved["multitask"]["h"]["state"] is not None
    b.load_state_dict(saved_model)
    opt_b = cl_optim.MultiTaskSAM(b.parameters(), torch.optim.SGD, **options)
    opt_b.load_state_dict(saved)
    for _ in range(2):
        opt_a.step(a.losses)
        opt_b.step(b.losses)
    _assert_same(_snapshot(a), _snapshot(b))


def test_shared_by_name_equals_inferred_and_misuse_is_refused():
    a, b = Net(), Net()
    opt_a = cl_optim.MultiTaskSAM(a.parameters(), torch.optim.SGD, rho=0.1, aggregator="mgda", lr=0.1)
    shared = [name for name, _ in b.named_parameters() if name.startswith("trunk")]  # weight, BN weight, bias
    opt_b = cl_optim.MultiTaskSAM(b.named_parameters(), torch.optim.SGD, rho=0.1, aggregator="mgda", lr=0.1,
                                  shared=shared)  # fmt: skip
    opt_a.step(a.losses)
    opt_b.step(b.losses)
    _assert_same(_snapshot(a), _snapshot(b), atol=1e-14)

    with pytest.raises(ValueError, match="not a parameter name"):
        cl_optim.MultiTaskSAM(b.named_parameters(), torch.optim.SGD, lr=0.1, shared=["trunk.9.weight"])
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        cl_optim.MultiTaskSAM(b.parameters(), torch.optim.SGD, lr=0.1, shared=[torch.zeros(2)])
    # The trunk's first layer left out of shared=: both tasks reach it, so it cannot be a head.
    opt = cl_optim.MultiTaskSAM(b.named_parameters(), torch.optim.SGD, lr=0.1, shared=shared[1:])
    before = [p.detach().clone() for p in b.parameters()]
    with pytest.raises(
        ValueError, match=r"'trunk.0.weight' is not in shared= but the losses of tasks \[0, 1\]"
    ):
        opt.step(b.losses)
    assert all(torch.equal(p, q) for p, q in zip(b.parameters(), before))


def test_unreached_parameters_get_no_stale_update():
    model = Net()
    opt = cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    model.unused.weight.grad = torch.ones_like(model.unused.weight)  # stale, from elsewhere
    before = model.unused.weight.detach().clone()
    opt.step(model.losses)
    assert model.unused.weight.grad is None and torch.equal(model.unused.weight, before)


def test_options_and_two_step_api_are_refused_clearly():
    model = Net()
    with pytest.raises(ValueError, match="unknown aggregator"):
        cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, aggregator="nash", lr=0.1)
    with pytest.raises(ValueError, match="takes no option"):
        cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, aggregator="mgda", lr=0.1,
                              aggregator_options={"c": 0.5})  # fmt: skip
    with pytest.raises(ValueError, match="unknown aggregate"):
        cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, aggregate="mean_then_sam", lr=0.1)
    with pytest.raises(ValueError, match="unknown norm_scope"):
        cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, norm_scope="layer", lr=0.1)
    opt = cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="call step\\(closure\\)"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()


def test_agem_with_a_memory_task():
    """Two entries, the second the memory. With rho = 0 every h_t is exactly 0, so the shared
    gradient is A-GEM's projection of the first task's gradient (combine), the heads their own."""
    model = Net()
    shared = list(model.trunk.parameters())
    reference = copy.deepcopy(model)
    losses = reference.losses()
    task_grads = [list(torch.autograd.grad(loss, list(reference.trunk.parameters()), retain_graph=True))
                  for loss in losses]  # fmt: skip
    assert sum(float((a * b).sum()) for a, b in zip(*task_grads)) < 0  # they conflict: a projection
    expected = cl_optim.multitask.combine(task_grads, "agem")
    before = [p.detach().clone() for p in shared]
    opt = cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, rho=0.0, aggregator="agem", lr=0.1)
    opt.step(model.losses)
    for p, b, g in zip(shared, before, expected):
        torch.testing.assert_close(p, b - 0.1 * g, rtol=0, atol=1e-14)
    three = Net(tasks=3)
    opt3 = cl_optim.MultiTaskSAM(three.parameters(), torch.optim.SGD, aggregator="agem", lr=0.1)
    before = [p.detach().clone() for p in three.parameters()]
    with pytest.raises(ValueError, match="'agem' takes two task losses"):
        opt3.step(three.losses)
    assert all(torch.equal(p, b) for p, b in zip(three.parameters(), before))


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_closure_that_zeroes_the_gradients_changes_nothing(set_to_none):
    """SAM users' closures often start with zero_grad(): the aggregated gradient is not in .grad
    while the closure runs, so neither form of zero_grad can erase it."""
    a, b = Net(), Net()
    opt_a = cl_optim.MultiTaskSAM(a.parameters(), torch.optim.SGD, rho=0.1, aggregator="imtl", lr=0.1)
    opt_b = cl_optim.MultiTaskSAM(b.parameters(), torch.optim.SGD, rho=0.1, aggregator="imtl", lr=0.1)

    def zeroing():
        opt_b.zero_grad(set_to_none=set_to_none)
        return b.losses()

    for _ in range(2):
        opt_a.step(a.losses)
        opt_b.step(zeroing)
    _assert_same(_snapshot(a), _snapshot(b))


def test_dtensor_parameters_are_refused_clearly(tmp_path):
    """A one-rank gloo group in a child process (the process group is global state)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist, cl_optim
        from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor
        dist.init_process_group("gloo", init_method="file://{tmp_path / "init"}", rank=0, world_size=1)
        mesh = DeviceMesh("cpu", [0])
        w = torch.nn.Parameter(distribute_tensor(torch.ones(3), mesh, [Replicate()]))
        opt = cl_optim.MultiTaskSAM([w], torch.optim.SGD, lr=0.1)
        try:
            opt.step(lambda: [(w * w).sum(), w.sum()])
        except NotImplementedError as error:
            print("refused:", error)
        dist.destroy_process_group()
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "refused: MultiTaskSAM does not take DTensor" in run.stdout, run.stdout + run.stderr
