"""Never crash, never corrupt: what users did that once crashed the process or damaged state.

Each case is a user's sequence — a head grown in place after a momentum step, a state dict of
another model, a 1e20 gradient under SAM, a gradient of another dtype — and must end in a clear
error (or, where the input is valid, the right numbers), with parameters and state as they were.
The ones that once killed the process (heap corruption, segfault) run in a subprocess, so that a
regression fails a test instead of the test run.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from test_op_checks import AVAILABLE

import cl_optim

PYTHON_BACKENDS = ("forloop", "foreach")
STEP_BACKENDS = [b for b in AVAILABLE if b != "triton"] + (["triton"] if "triton" in AVAILABLE else [])


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b != "triton"])
def test_the_crashes_of_the_report_are_clear_errors_now(backend):
    """The sequences of the reliability report, each of which aborted (134) or segfaulted (139)
    the process on the cpp backend: now each raises, names the problem, and changes nothing."""
    result = _run(f"""
        import torch, cl_optim
        backend = {backend!r}

        def expect(fn, words):
            try:
                fn()
            except (RuntimeError, ValueError) as error:
                assert any(w in str(error) for w in words), str(error)
                return
            raise AssertionError("no error")

        # 1. a head grown in place after a momentum step (2**20 rows: far past the old buffer)
        head = torch.nn.Linear(4, 3)
        opt = cl_optim.SGD(head.parameters(), lr=0.1, momentum=0.9, backend=backend)
        head(torch.randn(2, 4)).sum().backward(); opt.step()
        head.weight.data = torch.randn(2**20, 4); head.bias.data = torch.randn(2**20)
        head.weight.grad = torch.randn(2**20, 4); head.bias.grad = torch.randn(2**20)
        before = head.weight.detach().clone()
        expect(opt.step, ["shape"])
        assert torch.equal(head.weight.detach(), before)

        # 2. an AdamW state dict of a 3-class model loaded into a 4-class one, and the reverse
        small, large = torch.nn.Linear(4, 3), torch.nn.Linear(4, 4)
        for src, dst in ((small, large), (large, small)):
            a = cl_optim.AdamW(src.parameters(), backend=backend)
            src(torch.randn(2, 4)).sum().backward(); a.step()
            b = cl_optim.AdamW(dst.parameters(), backend=backend)
            expect(lambda: b.load_state_dict(a.state_dict()), ["another model"])
            assert len(b.state) == 0

        # 3. SAM, then a layer grows between two steps (SAM never compared grad and param shapes)
        layer = torch.nn.Linear(4, 3)
        sam = cl_optim.SAM(layer.parameters(), cl_optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
        for _ in range(2):
            layer(torch.randn(2, 4)).sum().backward(); sam.first_step(zero_grad=True)
            layer(torch.randn(2, 4)).sum().backward(); sam.second_step(zero_grad=True)
        layer(torch.randn(2, 4)).sum().backward()  # a gradient of the old shape ...
        layer.weight.data = torch.randn(2**20, 4)  # ... then the layer grows
        weight = layer.weight.detach().clone()
        expect(sam.first_step, ["shape"])
        assert torch.equal(layer.weight.detach(), weight)
        # With a gradient of the new shape the perturbation runs; the momentum buffer of the old
        # shape is found at the update, and the weights are put back.
        layer.weight.grad = torch.randn(2**20, 4)
        sam.first_step()
        assert not torch.equal(layer.weight.detach(), weight)
        expect(sam.second_step, ["shape"])
        assert torch.equal(layer.weight.detach(), weight)
        print("ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_a_grown_head_keeps_its_state_with_pad_state(backend):
    """The README's path for new classes: ewc.pad_ for the EWC buffers, opt.pad_state_ for the
    optimizer's; the old rows keep their momentum and Fisher, the new ones start at zero."""
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    ewc = cl_optim.EWC(head, lam=1.0)
    opt = cl_optim.SGD(head.parameters(), lr=0.1, momentum=0.9, fisher_ema=0.9, ewc=ewc, backend=backend)
    head(torch.randn(2, 4)).square().sum().backward()
    opt.step()
    ewc.consolidate({n: torch.ones_like(p) for n, p in head.named_parameters()})
    old = {k: v.clone() for k, v in opt.state[head.weight].items()}
    head.weight.data = torch.cat([head.weight.data, torch.zeros(1, 4)])
    head.bias.data = torch.cat([head.bias.data, torch.zeros(1)])
    opt.pad_state_(head.weight)
    opt.pad_state_(head.bias)
    ewc.pad_("weight")
    ewc.pad_("bias")
    state = opt.state[head.weight]
    for key in ("momentum_buffer", "fisher_ema"):
        assert state[key].shape == (4, 4)
        assert torch.equal(state[key][:3], old[key]) and torch.equal(state[key][3], torch.zeros(4))
    head.zero_grad()
    head(torch.randn(2, 4)).square().sum().backward()
    opt.step()  # runs, on the grown shapes
    assert torch.isfinite(head.weight).all()


def test_pad_state_replaces_a_new_parameter_in_its_group():
    head = torch.nn.Linear(4, 3)
    opt = cl_optim.AdamW(head.parameters(), lr=0.1)
    head(torch.randn(2, 4)).sum().backward()
    opt.step()
    grown = torch.nn.Parameter(torch.cat([head.weight.detach(), torch.ones(2, 4)]))
    step = opt.state[head.weight]["step"].clone()
    opt.pad_state_(head.weight, grown)
    assert any(p is grown for p in opt.param_groups[0]["params"])
    assert head.weight not in opt.state and opt.state[grown]["exp_avg"].shape == (5, 4)
    assert torch.equal(opt.state[grown]["step"], step)
    with pytest.raises(ValueError, match="cannot grow"):
        opt.pad_state_(grown, torch.nn.Parameter(torch.zeros(2, 4)))


# ------------------------------------------------------------------------- SAM: large and non-finite


@pytest.mark.parametrize("backend", AVAILABLE)
def test_sam_takes_a_large_finite_gradient(backend):
    """A gradient around 1e20 has a squared norm beyond fp32 (the issue's ewc_sam run died on
    "value cannot be converted to type float without overflow"): the step is made, and the
    perturbation is rho * g / ||g|| (closed form)."""
    w = torch.nn.Parameter(torch.zeros(4))
    opt = cl_optim.SAM([w], cl_optim.SGD, rho=0.5, lr=0.0, backend=backend)
    g = torch.tensor([3e20, 4e20, 0.0, 0.0])
    w.grad = g.clone()
    opt.first_step(zero_grad=True)
    torch.testing.assert_close(w.detach(), torch.tensor([0.3, 0.4, 0.0, 0.0]))
    w.grad = g.clone()
    opt.second_step(zero_grad=True)
    assert not bool(opt.last_step_skipped)
    assert torch.equal(w.detach(), torch.zeros(4))  # lr 0: restored exactly


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("base", ["cl_optim", "torch"])
def test_a_nonfinite_second_pass_is_skipped_like_a_nonfinite_first_pass(backend, base):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    base_class = cl_optim.SGD if base == "cl_optim" else torch.optim.SGD
    kwargs = dict(backend=backend) if base == "cl_optim" else {}
    opt = cl_optim.SAM(model.parameters(), base_class, rho=0.05, lr=0.1, momentum=0.9, **kwargs)
    x = torch.randn(4, 3)
    for _ in range(2):  # one step: momentum buffers exist
        model(x).sum().backward()
        opt.first_step(zero_grad=True) if _ == 0 else opt.second_step(zero_grad=True)
    params = [p.detach().clone() for p in model.parameters()]
    state = [s["momentum_buffer"].clone() for s in opt.state.values()]
    model(x).sum().backward()
    opt.first_step(zero_grad=True)
    model(x).sum().backward()
    model.weight.grad[0, 1] = float("nan")
    opt.second_step(zero_grad=True)
    assert bool(opt.last_step_skipped)
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p.detach(), before)
    for s, before in zip(opt.state.values(), state):
        assert torch.equal(s["momentum_buffer"], before)


def test_skip_nonfinite_false_lets_the_second_pass_through_as_torch_does():
    w = torch.nn.Parameter(torch.ones(2))
    opt = cl_optim.SAM([w], cl_optim.SGD, rho=0.05, lr=0.1, skip_nonfinite=False, backend="forloop")
    w.grad = torch.ones(2)
    opt.first_step(zero_grad=True)
    w.grad = torch.tensor([float("inf"), 1.0])
    opt.second_step(zero_grad=True)
    assert not bool(opt.last_step_skipped) and torch.isinf(w[0])


@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b != "triton"])
def test_a_pass1_overflow_lowers_the_grad_scale(backend):
    """Under GradScaler an overflow in the second pass halves the scale; one in the first pass
    now does too (first_step(grad_scaler=...)), where before it only skipped the step."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = cl_optim.SAM([w], cl_optim.SGD, rho=0.05, lr=0.1, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def backward(coefficients):
        scaler.scale((w * torch.tensor(coefficients)).sum()).backward()

    backward([1.0, float("inf"), 1.0])  # pass 1 overflows
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    backward([1.0, 2.0, 3.0])  # a finite second pass
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert bool(opt.last_step_skipped) and torch.equal(w.detach(), torch.ones(3))
    # a finite step afterwards keeps the scale and steps
    opt.zero_grad()
    backward([1.0, 2.0, 3.0])
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    backward([1.0, 2.0, 3.0])
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**9 and not bool(opt.last_step_skipped)
    torch.testing.assert_close(w.detach(), torch.ones(3) - 0.1 * torch.tensor([1.0, 2.0, 3.0]))


# ---------------------------------------------------------------------------- validate first


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_a_gradient_of_another_dtype_counts_no_adamw_step(backend):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = cl_optim.AdamW([a, b], lr=0.1, backend=backend)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    if hasattr(b, "grad_dtype"):  # torch 2.10+ refuses a gradient of another dtype unless told
        b.grad_dtype = None
    a.grad, b.grad = torch.ones(3), torch.ones(2, dtype=torch.float64)
    before = [a.detach().clone(), b.detach().clone()]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="dtype"):
            opt.step()
    assert [float(opt.state[p]["step"]) for p in (a, b)] == [1.0, 1.0]
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_a_bad_later_group_stops_the_step_before_any_group_moves(backend):
    """Two groups: the second's momentum buffer is of another shape (a grown layer). The first
    group must not be stepped before the second is found wrong."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = cl_optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9, backend=backend)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    b.data = torch.ones(5)
    b.grad = torch.ones(5)
    before = a.detach().clone(), opt.state[a]["momentum_buffer"].clone()
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(opt.state[a]["momentum_buffer"], before[1])


# ------------------------------------------------------------- accepted silently, now refused


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: cl_optim.SAM(ps, cl_optim.SGD, rho=float("inf"), lr=0.1),
        lambda ps: cl_optim.SGD(ps, lr=float("inf")),
        lambda ps: cl_optim.SGD(ps, lr=0.1, momentum=float("nan")),
        lambda ps: cl_optim.AdamW(ps, lr=0.1, eps=float("inf")),
        lambda ps: cl_optim.AdamW([{"params": ps, "lr": -1.0}]),
        lambda ps: cl_optim.SGD([{"params": ps, "weight_decay": -0.1}], lr=0.1),
    ],
    ids=[
        "sam_rho_inf",
        "sgd_lr_inf",
        "sgd_momentum_nan",
        "adamw_eps_inf",
        "adamw_group_lr",
        "sgd_group_decay",
    ],
)
def test_bad_hyperparameters_are_refused_at_construction(make):
    with pytest.raises(ValueError, match="Invalid"):
        make([torch.nn.Parameter(torch.ones(2))])


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize(
    "kind,key,value",
    [("sgd", "lr", -0.1), ("sgd", "momentum", -1.0), ("adamw", "betas", (0.9, 1.5)), ("adamw", "eps", float("nan")),
     ("sam", "rho", -0.05), ("sam", "lr", float("inf"))],
)  # fmt: skip
def test_hyperparameters_changed_after_construction_are_checked_at_step(backend, kind, key, value):
    w = torch.nn.Parameter(torch.ones(3))
    if kind == "sam":
        opt = cl_optim.SAM([w], cl_optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend=backend)
    else:
        opt = (cl_optim.SGD if kind == "sgd" else cl_optim.AdamW)([w], lr=0.1, backend=backend)
    opt.param_groups[0][key] = value
    w.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"param_groups\[0\]: Invalid"):
        opt.first_step() if kind == "sam" else opt.step()
    assert torch.equal(w.detach(), torch.ones(3)) and not opt.state.get(w)


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def test_ewc_exclude_takes_one_pattern_as_a_string():
    ewc = cl_optim.EWC(_model(), exclude="2")  # one pattern, not the patterns "2" letter by letter
    assert ewc.names == ["0.weight", "0.bias"]
    ewc = cl_optim.EWC(_model(), include="0.weight")
    assert ewc.names == ["0.weight"]


@pytest.mark.parametrize("kwargs", [dict(exclude=["head"]), dict(include=["encoder.*"]),
                                    dict(lam_overrides={"decoder": 5.0})])  # fmt: skip
def test_ewc_patterns_that_match_nothing_are_refused(kwargs):
    with pytest.raises(ValueError, match="matches no parameter"):
        cl_optim.EWC(_model(), **kwargs)


def test_ewc_refuses_bare_parameters_and_infinite_lambdas():
    with pytest.raises(TypeError, match=r"pass the model itself"):
        cl_optim.EWC(_model().parameters())
    with pytest.raises(ValueError, match="Invalid lam"):
        cl_optim.EWC(_model(), lam=float("inf"))
    with pytest.raises(ValueError, match="Invalid lam override"):
        cl_optim.EWC(_model(), lam_overrides={"0": float("inf")})


def test_ewc_notices_a_replaced_module():
    model = _model()
    ewc = cl_optim.EWC(model, lam=1.0)
    opt = cl_optim.SGD(model.parameters(), lr=0.1, ewc=ewc)
    ewc.consolidate({n: torch.ones_like(p) for n, p in model.named_parameters()})
    model[2] = torch.nn.Linear(5, 3)  # a new head: new parameter objects
    for call in (ewc.penalty, ewc.penalty_value, ewc.add_grad_,
                 lambda: ewc.consolidate({n: torch.ones_like(p) for n, p in model.named_parameters()})):  # fmt: skip
        with pytest.raises(RuntimeError, match=r"'2.weight' is not the one EWC tracks.*pad_"):
            call()
    # an optimizer stepping the new parameters finds them too
    opt.add_param_group({"params": model[2].parameters()})
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="not the one EWC tracks"):
        opt.step()
    ewc.pad_("2.weight", model[2].weight)
    ewc.pad_("2.bias", model[2].bias)
    assert ewc.tasks == 1 and float(ewc.penalty_value()) >= 0


def test_ewc_consolidate_refuses_a_fisher_of_no_use_and_keeps_the_task_count():
    model = _model()
    ewc = cl_optim.EWC(model, lam=1.0, exclude="2")
    fisher = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no entry for any parameter"):
        ewc.consolidate({})
    with pytest.raises(ValueError, match="'module.' prefix"):
        ewc.consolidate({f"module.{n}": f for n, f in fisher.items()})
    with pytest.raises(ValueError, match="no parameters of the model"):
        ewc.consolidate({**fisher, "other.weight": torch.ones(2)})
    assert ewc.tasks == 0
    ewc.consolidate(fisher)  # the excluded head's entries are passed over
    assert ewc.tasks == 1


def test_fisher_of_a_single_output_under_the_categorical_likelihood_is_refused():
    model = torch.nn.Linear(3, 1)
    data = [(torch.randn(4, 3), torch.randn(4, 1))]
    with pytest.raises(ValueError, match="likelihood='gaussian'"):
        cl_optim.fisher.estimate(model, data)
    fisher = cl_optim.fisher.estimate(model, data, likelihood="gaussian")
    assert float(fisher["weight"].sum()) > 0


def test_a_replaced_module_in_a_later_group_stops_the_step_before_the_first_group_moves():
    """EWC's check of a replaced head runs for every group before any group is stepped."""
    model = _model()
    ewc = cl_optim.EWC(model, lam=1.0)
    ewc.consolidate({n: torch.ones_like(p) for n, p in model.named_parameters()})
    model[2] = torch.nn.Linear(5, 3)  # replaced after tracking
    opt = cl_optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1,
                       momentum=0.9, ewc=ewc, fisher_ema=0.9)  # fmt: skip
    model(torch.randn(2, 4)).sum().backward()
    before = [p.detach().clone() for p in model[0].parameters()]
    with pytest.raises(RuntimeError, match="not the one EWC tracks"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(model[0].parameters(), before))
    assert all("momentum_buffer" not in opt.state[p] for p in model[0].parameters())


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_a_momentum_buffer_saved_as_none_is_started(backend):
    """A state dict of an SGD without momentum may hold momentum_buffer = None: with momentum the
    buffer is started at the first step, as torch.optim.SGD does."""
    w = torch.nn.Parameter(torch.ones(3))
    reference = torch.nn.Parameter(torch.ones(3))
    opt = cl_optim.SGD([w], lr=0.1, momentum=0.9, backend=backend)
    torch_opt = torch.optim.SGD([reference], lr=0.1, momentum=0.9)
    opt.state[w]["momentum_buffer"] = None
    for step in range(3):
        w.grad = torch.full((3,), float(step + 1))
        reference.grad = w.grad.clone()
        opt.step()
        torch_opt.step()
    torch.testing.assert_close(w.detach(), reference.detach())
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], torch_opt.state[reference]["momentum_buffer"])


def _empirical_fisher_one_sample_at_a_time(model, data):
    params = dict(model.named_parameters())
    totals = {n: torch.zeros_like(p) for n, p in params.items()}
    seen = 0
    for x, y in data:
        for n in range(len(y)):
            loss = torch.nn.functional.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
            for name, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                totals[name] += g.square()
            seen += 1
    return {n: t / seen for n, t in totals.items()}


def test_a_shared_layer_the_model_reduces_over_the_batch_goes_through_the_whole_model():
    """Batch 0 of one sample; a later batch of three. The table is looked up once for the whole
    batch and its output summed over the leading dimension: expanding it to the batch would change
    the output, so it is not expanded and goes through torch.func on the whole model: the right
    number, not a refusal or a wrong one."""

    class Reduces(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(2, 2)
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, x):
            shared = self.table(torch.zeros(1, dtype=torch.long))  # (1, 2), one lookup for the batch
            return self.linear(x) + shared.sum(0)  # summed over its leading dimension

    torch.manual_seed(0)
    model = Reduces()
    data = [(torch.randn(1, 3), torch.tensor([0])), (torch.randn(3, 3), torch.tensor([0, 1, 1]))]
    got = cl_optim.fisher.estimate(model, data, estimator="empirical")
    want = _empirical_fisher_one_sample_at_a_time(model, data)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8)
    assert got.meta["per_sample"]["table"].startswith("torch.func (model)")


def test_a_forward_that_breaks_under_the_expansion_goes_through_the_whole_model():
    class Reshapes(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(2, 3)
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, x):
            shared = self.table(torch.zeros(1, dtype=torch.long)).view(3)  # needs exactly one row
            return self.linear(x + shared)

    torch.manual_seed(0)
    model = Reshapes()
    data = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]
    got = cl_optim.fisher.estimate(model, data, estimator="empirical")
    want = _empirical_fisher_one_sample_at_a_time(model, data)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8)
    assert got.meta["per_sample"]["table"].startswith("torch.func (model)")


@pytest.mark.parametrize("amsgrad", [False, True])
def test_an_allocation_that_fails_in_a_first_step_leaves_no_half_made_state(amsgrad, monkeypatch):
    """AdamW's first step makes every parameter's moments before it assigns any: an allocation
    that fails (out of memory) leaves no parameter with part of its state, and the step made again
    once memory is there gives the numbers of a step that never failed."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, twins):
        p.grad = torch.randn(4)
        q.grad = p.grad.clone()
    opt = cl_optim.AdamW(params, lr=1e-2, backend="forloop", amsgrad=amsgrad)
    calls, real = [0], torch.zeros_like

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:  # the second parameter's second moment
            raise torch.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros_like", failing)
    with pytest.raises(torch.OutOfMemoryError):
        opt.step()
    monkeypatch.setattr(torch, "zeros_like", real)
    assert all(len(opt.state[p]) == 0 for p in params) and all(
        torch.equal(p, q) for p, q in zip(params, twins)
    )
    opt.step()
    reference = cl_optim.AdamW(twins, lr=1e-2, backend="forloop", amsgrad=amsgrad)
    reference.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)
        assert sorted(opt.state[p]) == sorted(reference.state[q])
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], reference.state[q][key])
