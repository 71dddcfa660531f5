"""cl_optim.EWC: the exact collapse, online EWC, the fused update, Fisher EMA, state and shapes."""

from __future__ import annotations

import io

import pytest
import torch

import cl_optim

LAM = 3.0


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    return model.to(dtype)


def _random_like(model, gen, scale=1.0, positive=False):
    out = {}
    for name, p in model.named_parameters():
        t = torch.rand(p.shape, generator=gen) if positive else torch.randn(p.shape, generator=gen)
        out[name] = t * scale
    return out


def _set_params(model, values):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(values[name])


def _tasks(model, n, seed=1):
    """n tasks of (Fisher, anchor), random; a few Fisher entries exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(n):
        fisher = _random_like(model, gen, positive=True)
        for f in fisher.values():
            f.view(-1)[::5] = 0.0
        tasks.append((fisher, _random_like(model, gen)))
    return tasks


def _explicit_separate(model, tasks, lam):
    total = 0.0
    for fisher, anchor in tasks:
        for name, p in model.named_parameters():
            total = total + 0.5 * lam * (fisher[name] * (p - anchor[name]) ** 2).sum()
    return total


def _grads_of(value, model):
    grads = torch.autograd.grad(value, list(model.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


def test_separate_mode_is_the_exact_sum_of_per_task_penalties():
    model = _model()
    tasks = _tasks(model, 5)
    ewc = cl_optim.EWC(model, lam=LAM, mode="separate")
    for fisher, anchor in tasks:
        _set_params(model, anchor)  # the weights at the end of that task
        ewc.consolidate(fisher)
    assert ewc.tasks == 5
    for seed in (10, 11):
        _set_params(model, _random_like(model, torch.Generator().manual_seed(seed)))
        expected = _explicit_separate(model, tasks, LAM)
        got = ewc.penalty()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for a, b in zip(_grads_of(got, model), _grads_of(_explicit_separate(model, tasks, LAM), model)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Two buffers per parameter, whatever the number of tasks.
    assert len(ewc.state_dict()["entries"]["0.weight"]) == 4


def test_online_mode_follows_schwarz_recurrence():
    model = _model()
    gamma = 0.8
    tasks = _tasks(model, 4, seed=2)
    ewc = cl_optim.EWC(model, lam=LAM, mode="online", gamma=gamma)
    running = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for fisher, anchor in tasks:
        _set_params(model, anchor)
        ewc.consolidate(fisher)
        running = {name: gamma * running[name] + fisher[name] for name in running}  # F~_t = g F~_{t-1} + F_t
    last_anchor = tasks[-1][1]
    _set_params(model, _random_like(model, torch.Generator().manual_seed(3)))
    # penalty during the next task: 1/2 ||theta - theta*_{t-1}||^2 in the metric gamma * F~_{t-1}
    expected = sum(
        0.5 * LAM * (gamma * running[name] * (p - last_anchor[name]) ** 2).sum()
        for name, p in model.named_parameters()
    )
    torch.testing.assert_close(ewc.penalty(), expected, rtol=1e-5, atol=1e-6)


def test_add_grad_equals_autograd_of_penalty_with_overrides_and_exclusions():
    model = _model()
    ewc = cl_optim.EWC(model, lam=LAM, exclude=["2.bias"], lam_overrides={"0.*": 10.0})
    assert ewc.names == ["0.weight", "0.bias", "2.weight"]
    for fisher, anchor in _tasks(model, 2):
        _set_params(model, anchor)
        ewc.consolidate(fisher)
    _set_params(model, _random_like(model, torch.Generator().manual_seed(4)))
    expected = _grads_of(ewc.penalty(), model)
    model.zero_grad()
    ewc.add_grad_()
    for (name, p), g in zip(model.named_parameters(), expected):
        if name == "2.bias":
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g)
    assert expected[0].abs().sum() > 0 and expected[3].abs().sum() == 0


def _loss(model, i):
    gen = torch.Generator().manual_seed(100 + i)
    x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen)
    dtype = next(model.parameters()).dtype
    return torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)


def _consolidated(model, mode="separate"):
    ewc = cl_optim.EWC(model, lam=LAM, mode=mode, gamma=1.0 if mode == "separate" else 0.9)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    for fisher, anchor in _tasks(model, 2, seed=5):
        _set_params(model, anchor)
        ewc.consolidate(fisher)
    _set_params(model, snapshot)
    return ewc


@pytest.mark.parametrize("backend", ["forloop", "foreach"])
@pytest.mark.parametrize("mode", ["separate", "online"])
@pytest.mark.parametrize(
    "ours,theirs,kwargs",
    [
        (cl_optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
        (cl_optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    ],
    ids=["SGD", "AdamW"],
)
def test_fused_ewc_update_equals_autograd_penalty_and_torch_optimizer(ours, theirs, kwargs, mode, backend):
    m_ref, m_ours = _model(), _model()
    ewc_ref, ewc_ours = _consolidated(m_ref, mode), _consolidated(m_ours, mode)
    opt_ref = theirs(m_ref.parameters(), **kwargs)
    opt_ours = ours(m_ours.parameters(), ewc=ewc_ours, backend=backend, **kwargs)
    for i in range(10):
        opt_ref.zero_grad()
        (_loss(m_ref, i) + ewc_ref.penalty()).backward()
        opt_ref.step()
        opt_ours.zero_grad()
        _loss(m_ours, i).backward()
        opt_ours.step()
    for a, b in zip(m_ours.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ewc_ours.penalty() > 0


@pytest.mark.parametrize("base", [cl_optim.SGD, torch.optim.SGD])
def test_sam_adds_the_ewc_gradient_at_the_restored_weights(base):
    """cl_optim base (fused) and torch base (add_grad_) give the same SAM+EWC trajectory,
    equal to SAM over the task loss with lam*A*(w - mu) evaluated at w, not at w + e."""
    results = []
    for variant in ("ours", "manual"):
        model = _model()
        ewc = _consolidated(model)
        if variant == "ours":
            opt = cl_optim.SAM(model.parameters(), base, rho=0.1, ewc=ewc, lr=0.05, momentum=0.9)
        else:
            opt = cl_optim.SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
        for i in range(6):
            _loss(model, i).backward()
            opt.first_step(zero_grad=True)
            _loss(model, i).backward()
            if variant == "manual":
                with torch.no_grad():
                    saved = [p.clone() for p in model.parameters()]
                    for p in model.parameters():
                        p.copy_(opt._saved[id(p)])
                    ewc.add_grad_()
                    for p, s in zip(model.parameters(), saved):
                        p.copy_(s)
            opt.second_step(zero_grad=True)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["forloop", "foreach"])
def test_fisher_ema_reads_the_task_gradient_before_the_penalty(backend):
    model = _model()
    ewc = _consolidated(model)
    beta = 0.9
    opt = cl_optim.AdamW(model.parameters(), lr=1e-2, ewc=ewc, fisher_ema=beta, backend=backend)
    expected = {p: torch.zeros_like(p) for p in model.parameters()}
    for i in range(5):
        opt.zero_grad()
        _loss(model, i).backward()
        for p in model.parameters():
            expected[p] = beta * expected[p] + (1 - beta) * p.grad**2
        opt.step()
    running = opt.running_fisher()
    assert len(running) == 4
    for p in model.parameters():
        assert running[p].dtype == torch.float32
        torch.testing.assert_close(running[p], expected[p])
    ewc.consolidate(running)  # a task boundary: the running Fisher folds in
    assert ewc.tasks == 3


def test_sam_fisher_ema_uses_the_unscaled_first_pass_gradient():
    model = _model()
    beta = 0.5
    opt = cl_optim.SAM(model.parameters(), cl_optim.SGD, rho=0.1, fisher_ema=beta, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=10_000)
    expected = {p: torch.zeros_like(p) for p in model.parameters()}
    for i in range(3):
        scaler.scale(_loss(model, i)).backward()
        for p in model.parameters():
            expected[p] = beta * expected[p] + (1 - beta) * (p.grad / 2.0**10) ** 2
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(_loss(model, i)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    for p in model.parameters():
        torch.testing.assert_close(opt.running_fisher()[p], expected[p])
    # A non-finite first pass leaves the running Fisher untouched.
    before = {p: f.clone() for p, f in opt.running_fisher().items()}
    scaler.scale(_loss(model, 9)).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(_loss(model, 9)).backward()
    scaler.step(opt)
    scaler.update()
    for p, f in opt.running_fisher().items():
        assert torch.equal(f, before[p])


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_fp32_state_survives_save_and_load_with_a_bf16_model():
    model = _model(dtype=torch.bfloat16)
    ewc = cl_optim.EWC(model, lam=LAM)
    ewc.consolidate({n: torch.rand(p.shape) * 1e-3 for n, p in model.named_parameters()})
    opt = cl_optim.AdamW(model.parameters(), lr=1e-3, ewc=ewc, fisher_ema=0.99)
    for i in range(3):
        opt.zero_grad()
        _loss(model, i).float().backward()
        opt.step()
    saved_ewc, saved_opt = _roundtrip(ewc.state_dict()), _roundtrip(opt.state_dict())

    model2 = _model(seed=7, dtype=torch.bfloat16)
    model2.load_state_dict(model.state_dict())
    ewc2 = cl_optim.EWC(model2, lam=1.0)
    ewc2.load_state_dict(saved_ewc)
    opt2 = cl_optim.AdamW(model2.parameters(), lr=1e-3, ewc=ewc2, fisher_ema=0.99)
    opt2.load_state_dict(saved_opt)  # torch would cast the Fisher to bf16 here
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        e, e2 = ewc._entries[name], ewc2._entries[name]
        assert e2.precision.dtype == e2.anchor.dtype == torch.float32
        assert torch.equal(e.precision, e2.precision) and torch.equal(e.anchor, e2.anchor)
        f, f2 = opt.state[p]["fisher_ema"], opt2.state[p2]["fisher_ema"]
        assert f2.dtype == torch.float32 and torch.equal(f, f2)
        assert opt2.state[p2]["exp_avg"].dtype == torch.bfloat16
    assert ewc2.lam == LAM and ewc2.tasks == 1
    torch.testing.assert_close(ewc2.penalty(), ewc.penalty())


@pytest.mark.parametrize(
    "spoil, error",
    [
        (lambda sd, last: sd["entries"][last].__setitem__("anchor", "not a tensor"), TypeError),
        (lambda sd, last: sd["entries"][last].__setitem__("anchor", torch.zeros(2, 2)), RuntimeError),
        (
            lambda sd, last: sd["entries"][last].__setitem__(
                "precision", torch.zeros(3, 7, dtype=torch.int64)
            ),
            TypeError,
        ),
        (lambda sd, last: sd["entries"][last].__setitem__("lam", "x"), ValueError),
        (lambda sd, last: sd["entries"][last].pop("constant"), KeyError),
        (lambda sd, last: sd.__setitem__("tasks", "seven"), ValueError),
        (lambda sd, last: sd.__setitem__("history", 5), TypeError),
    ],
    ids=[
        "anchor-not-tensor",
        "anchor-shape",
        "precision-int",
        "entry-lam",
        "no-constant",
        "tasks",
        "history",
    ],
)
def test_a_state_dict_that_fails_to_load_changes_nothing(spoil, error):
    """Everything in a state dict is read and checked before anything is assigned: a malformed
    entry (the last one, so that the others would already be loaded) leaves the lambdas, the task
    count, the history and every (A, mu) as they were."""
    model = _model()
    ewc = cl_optim.EWC(model, lam=LAM)
    ewc.consolidate({n: torch.rand(p.shape) for n, p in model.named_parameters()})
    saved = _roundtrip(ewc.state_dict())
    saved["lam"], saved["history"] = 2 * LAM, [{"decay": 0.5}, {"decay": 0.5}]
    for entry in saved["entries"].values():
        entry["lam"], entry["precision"] = 5.0, entry["precision"] + 1
    spoil(saved, list(saved["entries"])[-1])
    before = {n: (e.precision.clone(), e.anchor.clone(), e.lam, e.constant) for n, e in ewc._entries.items()}
    with pytest.raises(error):
        ewc.load_state_dict(saved)
    assert ewc.lam == LAM and ewc.tasks == 1 and len(ewc.history) == 1
    for name, (precision, anchor, lam, constant) in before.items():
        entry = ewc._entries[name]
        assert torch.equal(entry.precision, precision) and torch.equal(entry.anchor, anchor)
        assert entry.lam == lam and entry.constant == constant


def test_a_grown_parameter_must_be_padded_explicitly():
    model = _model()
    ewc = cl_optim.EWC(model, lam=LAM)
    ewc.consolidate({n: torch.ones_like(p) for n, p in model.named_parameters()})
    old_anchor = ewc._entries["2.weight"].anchor.clone()
    # New output classes: the head grows from 3 to 5 rows.
    model[2].weight.data = torch.cat([model[2].weight.detach(), torch.randn(2, 7)])  # grown in place
    grown = model[2].weight
    with pytest.raises(RuntimeError, match="changed shape.*pad_"):
        ewc.penalty()
    ewc.pad_("2.weight")
    entry = ewc._entries["2.weight"]
    assert entry.precision.shape == (5, 7)
    assert torch.equal(entry.precision[:3], torch.ones(3, 7)) and torch.equal(
        entry.precision[3:], torch.zeros(2, 7)
    )
    assert torch.equal(entry.anchor[:3], old_anchor) and torch.equal(entry.anchor[3:], grown.detach()[3:])
    with pytest.raises(ValueError, match="cannot go from"):
        ewc.pad_("2.weight", torch.nn.Parameter(torch.zeros(4, 7)))


def test_parameters_added_later_start_without_importance():
    model = _model()
    ewc = cl_optim.EWC(model, lam=LAM)
    ewc.consolidate({n: torch.ones_like(p) for n, p in model.named_parameters()})
    model.add_module("head2", torch.nn.Linear(7, 4))
    assert ewc.track(model) == ["head2.weight", "head2.bias"]
    model.zero_grad()
    ewc.add_grad_()
    assert model.head2.weight.grad is None  # A = 0: no term
    ewc.consolidate({n: torch.ones_like(p) for n, p in model.named_parameters()})
    assert ewc._entries["head2.weight"].precision.sum() == 28


def test_generic_fusion_rule():
    model = _model()
    ewc = cl_optim.EWC(model, lam=LAM, mode="online", gamma=1.0)
    f1 = {n: torch.full_like(p, 4.0) for n, p in model.named_parameters()}
    f2 = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    ewc.consolidate(f1, decay=0.5, weight=0.5)  # FACIL with alpha = 0.5
    ewc.consolidate(f2, decay=0.5, weight=0.5)
    assert torch.equal(ewc._entries["0.bias"].precision, torch.full((7,), 0.5 * (0.5 * 4.0) + 0.5 * 2.0))
    assert torch.equal(ewc._entries["0.bias"].anchor, model[0].bias.detach())


def test_bad_input_is_refused_and_nothing_changes():
    model = _model()
    with pytest.raises(ValueError, match="gamma must be 1"):
        cl_optim.EWC(model, mode="separate", gamma=0.9)
    with pytest.raises(ValueError, match="Invalid mode"):
        cl_optim.EWC(model, mode="offline")
    with pytest.raises(ValueError, match="fisher_ema"):
        cl_optim.SGD(model.parameters(), lr=0.1, fisher_ema=1.0)
    with pytest.raises(TypeError, match="cl_optim.EWC"):
        cl_optim.SGD(model.parameters(), lr=0.1, ewc={"lam": 1})
    ewc = cl_optim.EWC(model, lam=LAM)
    ewc.consolidate({n: torch.ones_like(p) for n, p in model.named_parameters()})
    before = ewc.state_dict()
    before = {n: (e["precision"].clone(), e["anchor"].clone()) for n, e in before["entries"].items()}
    bad = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    bad["2.bias"] = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="non-finite"):
        ewc.consolidate(bad)
    bad["2.bias"] = torch.ones(4)
    with pytest.raises(ValueError, match="shape"):
        ewc.consolidate(bad)
    after = ewc.state_dict()["entries"]
    for n, (a, mu) in before.items():
        assert torch.equal(after[n]["precision"], a) and torch.equal(after[n]["anchor"], mu)
    assert ewc.tasks == 1


def test_selectors_by_module_parameter_and_include():
    model = _model()
    assert cl_optim.EWC(model, exclude=[model[2]]).names == ["0.weight", "0.bias"]
    assert cl_optim.EWC(model, include=[model[0].bias, "2"]).names == ["0.bias", "2.weight", "2.bias"]
    ewc = cl_optim.EWC(model, lam=1.0, lam_overrides={model[2]: 0.0})
    assert [e.lam for e in ewc._entries.values()] == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(TypeError, match="selector"):
        cl_optim.EWC(model, exclude=[3])


def test_add_grad_leaves_frozen_parameters_alone():
    model = _model()
    ewc = _consolidated(model)
    model[0].bias.requires_grad_(False)
    _set_params(model, _random_like(model, torch.Generator().manual_seed(8)))
    model.zero_grad()
    ewc.add_grad_()
    assert model[0].bias.grad is None and model[0].weight.grad is not None


def test_penalty_value_equals_penalty_on_every_backend():
    model = _model()
    for backend in ("forloop", "auto"):
        ewc = cl_optim.EWC(model, lam=LAM, backend=backend)
        for fisher, anchor in _tasks(model, 3, seed=11):
            _set_params(model, anchor)
            ewc.consolidate(fisher)
        _set_params(model, _random_like(model, torch.Generator().manual_seed(12)))
        torch.testing.assert_close(ewc.penalty_value().float(), ewc.penalty().detach(), rtol=1e-5, atol=1e-5)


def test_clipping_the_task_gradient_or_the_total_gradient():
    """The two orders of EWC and gradient clipping, both documented: with ``ewc=`` on the
    optimizer the pull is added inside the step, after ``clip_grad_norm_`` clipped the task
    gradient (the pull keeps its strength lam); ``ewc.add_grad_()`` before clipping, with an
    optimizer without ``ewc=``, clips the total gradient."""
    max_norm, lam = 0.5, 50.0

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        ewc = cl_optim.EWC(model, lam=lam)
        ewc.consolidate({n: torch.ones_like(p) for n, p in model.named_parameters()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3)  # away from the anchor: a pull to clip or not
        model(torch.randn(8, 4, generator=torch.Generator().manual_seed(1))).square().sum().backward()
        return model, ewc

    # task gradient clipped, pull unclipped (fused)
    model, ewc = setup()
    task = [p.grad.clone() for p in model.parameters()]
    expected = []
    scale = min(1.0, max_norm / (torch.stack([g.norm() for g in task]).norm().item() + 1e-6))
    for p, g in zip(model.parameters(), task):
        expected.append(p.detach() - 0.1 * (g * scale + lam * 0.3))
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    cl_optim.SGD(model.parameters(), lr=0.1, ewc=ewc).step()
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), want)

    # total gradient clipped
    model, ewc = setup()
    total = [p.grad + lam * 0.3 for p in model.parameters()]
    scale = min(1.0, max_norm / (torch.stack([g.norm() for g in total]).norm().item() + 1e-6))
    expected = [p.detach() - 0.1 * g * scale for p, g in zip(model.parameters(), total)]
    ewc.add_grad_()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    cl_optim.SGD(model.parameters(), lr=0.1).step()
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), want)


def _step_terms_equal(got, want) -> bool:
    return all(
        len(a) == len(b)
        and all(x is y if isinstance(x, torch.Tensor) or x is None else x == y for x, y in zip(a, b))
        for a, b in zip(got, want)
    )


def test_the_kept_step_terms_follow_every_change_of_the_entries():
    """A trusted step's EWC lists are kept for the same bucket while no entry changes: after each
    change (a first consolidation, a later one in place, gamma, a loaded state dict, pad_, a new
    bucket) they are what a fresh lookup gives, and in between the kept ones are handed out."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ewc = cl_optim.EWC(model, lam=2.0, mode="online", gamma=0.9)
    bucket = list(model.parameters())
    fisher = lambda: {n: torch.rand_like(p) for n, p in model.named_parameters()}  # noqa: E731

    def check():
        got = ewc.step_terms(bucket, trusted=True)
        kept = ewc._terms_cache
        ewc._terms_cache = None
        want = ewc.step_terms(bucket, trusted=True)
        assert _step_terms_equal(got, want)
        return kept

    assert check() is not None and all(a is None for a in ewc.step_terms(bucket, trusted=True)[0])
    ewc.consolidate(fisher())  # the first: A and mu made
    check()
    first = ewc.step_terms(bucket, trusted=True)
    assert all(a is not None for a in first[0]) and first[2] == [2.0 * 0.9] * 4
    kept = ewc._terms_cache
    assert (
        ewc.step_terms(bucket, trusted=True)[0] is not first[0] and ewc._terms_cache is kept
    )  # copies of the kept
    ewc.consolidate(fisher())  # in place: the same tensors, a new collapse constant (an assignment)
    check()
    ewc.gamma = 0.5  # the scale of online mode
    assert ewc.step_terms(bucket, trusted=True)[2] == [2.0 * 0.5] * 4
    saved = ewc.state_dict()
    ewc.load_state_dict(saved)  # new tensors
    loaded = ewc.step_terms(bucket, trusted=True)
    assert all(a is e.precision for a, e in zip(loaded[0], ewc._entries.values()))
    check()
    layer = model[0]
    layer.weight.data = torch.randn(5, 4)  # grown in place, then padded: new A and mu
    ewc.pad_("0.weight")
    padded = ewc.step_terms(bucket, trusted=True)
    assert padded[0][0].shape == (5, 4) and padded[1][0].shape == (5, 4)
    check()
    other = bucket[:2]  # another bucket object: looked up again
    assert all(a is b for a, b in zip(ewc.step_terms(other, trusted=True)[0], padded[0][:2], strict=True))
