"""Everything SAM supports, for each variant: backends against the oracle with a fused base,
GradScaler (a power-of-two scale gives the unscaled trajectory), non-finite passes skip the step,
checkpoints resume exactly, bad options are refused, gradient accumulation (global and per
micro-batch) equals the large-batch step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import cl_optim
from cl_optim._backend import _REGISTRY, resolve
from cl_optim._optimizer import FISHER_KEY


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    )


def _data(i, n=16):
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def _loss(model, i):
    x, y = _data(i)
    return F.cross_entropy(model(x), y)


# name -> (factory(model, base, **base_kwargs), closure calls per step pattern)
VARIANTS = {
    "gsam": lambda m, b, **k: cl_optim.GSAM(m.parameters(), b, rho=0.05, alpha=0.4, **k),
    "wsam": lambda m, b, **k: cl_optim.WSAM(m.parameters(), b, rho=0.05, gamma=0.7, **k),
    "wsam_coupled": lambda m, b, **k: cl_optim.WSAM(
        m.parameters(), b, rho=0.05, gamma=0.7, decouple=False, **k
    ),
    "looksam": lambda m, b, **k: cl_optim.LookSAM(m.parameters(), b, rho=0.05, k=2, alpha=0.7, **k),
    "looksam_layerwise": lambda m, b, **k: cl_optim.LookSAM(
        m.parameters(), b, rho=0.05, k=2, layerwise=True, **k
    ),
    "friendly_sam": lambda m, b, **k: cl_optim.FriendlySAM(m.parameters(), b, rho=0.05, lmbda=0.6, **k),
    "msam": lambda m, b, **k: cl_optim.MSAM(m.parameters(), b, rho=0.3, **k),
    "gam": lambda m, b, **k: cl_optim.GAM(m.parameters(), b, rho=0.05, grad_norm_rho=0.1, **k),
    "cflat": lambda m, b, **k: cl_optim.CFlat(m.parameters(), b, rho=0.05, lamb=0.5, **k),
    "rwp": lambda m, b, **k: cl_optim.RWP(
        m.parameters(), b, rho=0.05, generator=torch.Generator().manual_seed(0), **k
    ),
    "sam_interval": lambda m, b, **k: cl_optim.SAM(
        m.parameters(), b, rho=0.05, interval=2, start_step=1, **k
    ),
    "sam_on": lambda m, b, **k: cl_optim.SAM(m.parameters(), b, rho=0.05, only_norm_layers=m, **k),
    "ssam": lambda m, b, **k: cl_optim.SAM(m.parameters(), b, rho=0.05, mask="fisher", fisher_ema=0.5, **k),
}
FOUR_PASS = ("gam", "cflat")
BASES = {
    "sgd": (cl_optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (cl_optim.AdamW, dict(lr=1e-2, weight_decay=1e-2)),
    "torch_sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "torch_adamw": (torch.optim.AdamW, dict(lr=1e-2)),
}


def _step(name, model, opt, i, scaler=None, poison=None):
    """One iteration in the variant's convention; ``poison``: put a NaN in the last pass."""
    scale = (lambda loss: scaler.scale(loss)) if scaler is not None else (lambda loss: loss)

    def closure():
        opt.zero_grad()
        loss = _loss(model, i) * (float("nan") if poison else 1.0)
        scale(loss).backward()
        return loss

    opt.zero_grad()
    scale(_loss(model, i)).backward()
    if name == "msam":
        if poison:
            next(model.parameters()).grad.fill_(float("nan"))
        opt.step() if scaler is None else scaler.step(opt)
    elif scaler is None:
        opt.step(closure)
    elif name in FOUR_PASS:
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        opt.step(closure)
    elif getattr(opt, "is_sam_step", True):
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        closure()
        scaler.step(opt)
    else:
        scaler.step(opt)
    if scaler is not None:
        scaler.update()


def _snapshot(model, opt):
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        out += [v.clone() for key, v in opt.state[p].items()
                if isinstance(v, torch.Tensor) and v.shape == p.shape and key != FISHER_KEY]  # fmt: skip
        out += [
            v.clone()
            for key, v in opt.sam_state.get(p, {}).items()
            if v.shape == p.shape and key != FISHER_KEY
        ]
    return out


def _candidates():
    names = ["foreach", "cpp"]
    if "triton" in _REGISTRY or _triton_importable():
        names.append("triton")
    return names


def _cpp_builds():
    try:
        return resolve("cpp", torch.device("cpu"), torch.float32) == "cpp"
    except Exception:  # an unavailable backend raises, naming why
        return False


def _triton_importable():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("backend", _candidates())
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_backends_match_the_oracle(name, base, backend):
    if name == "msam" and base == "sgd":
        pass  # SGD momentum 0.9: MSAM's direction
    runs = {}
    for which in ("forloop", backend):
        model = _model()
        cls, kwargs = BASES[base]
        opt = VARIANTS[name](model, cls, backend=which, **kwargs)
        for i in range(4):
            _step(name, model, opt, i)
        runs[which] = _snapshot(model, opt)
    assert len(runs["forloop"]) == len(runs[backend])
    for a, b in zip(runs["forloop"], runs[backend]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["sgd", "torch_adamw"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_grad_scaler_gives_the_unscaled_trajectory(name, base):
    cls, kwargs = BASES[base]
    m_amp, m_ref = _model(), _model()
    opt_amp, opt_ref = VARIANTS[name](m_amp, cls, **kwargs), VARIANTS[name](m_ref, cls, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10_000)
    for i in range(5):
        _step(name, m_amp, opt_amp, i, scaler=scaler)
        _step(name, m_ref, opt_ref, i)
    for a, b in zip(m_amp.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == 2.0**12


@pytest.mark.parametrize("name", sorted(set(VARIANTS) - {"sam_interval"}))
def test_grad_scaler_overflow_in_the_last_pass_skips_the_step_and_lowers_the_scale(name):
    model = _model()
    opt = VARIANTS[name](model, cl_optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10_000)
    for i in range(2):
        _step(name, model, opt, i, scaler=scaler)
    if not getattr(opt, "is_sam_step", True):
        _step(name, model, opt, 2, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    _step(name, model, opt, 3, scaler=scaler, poison=True)
    assert bool(opt.last_step_skipped)
    assert scaler.get_scale() == 2.0**11
    for a, b in zip(model.parameters(), before):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)  # MSAM: back to p~ by the same c v


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_a_nonfinite_pass_skips_the_step(name):
    model = _model()
    opt = VARIANTS[name](model, cl_optim.AdamW, lr=1e-2)
    for i in range(2):
        _step(name, model, opt, i)
    if not getattr(opt, "is_sam_step", True):
        _step(name, model, opt, 2)
    before = _snapshot(model, opt)
    _step(name, model, opt, 3, poison=True)
    assert bool(opt.last_step_skipped)
    after = _snapshot(model, opt)
    for a, b in zip(after, before):
        if name == "friendly_sam":  # its mean took the (finite) first-pass gradient, as SAM's running Fisher
            continue
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("base", ["sgd", "torch_adamw"])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_checkpoint_resumes_exactly(name, base):
    cls, kwargs = BASES[base]
    a = _model()
    opt_a = VARIANTS[name](a, cls, **kwargs)
    for i in range(3):
        _step(name, a, opt_a, i)
    b = _model(seed=1)
    b.load_state_dict(a.state_dict())
    opt_b = VARIANTS[name](b, cls, **kwargs)
    if name == "rwp":
        opt_b.generator.manual_seed(99)  # the saved generator state must win
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for i in range(3, 6):
        _step(name, a, opt_a, i)
        _step(name, b, opt_b, i)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_msam_checkpoint_at_theta_resumes_exactly():
    """The README recipe: move_back, save model and optimizer, move_forward (or load and move_forward)."""
    a = _model()
    opt_a = cl_optim.MSAM(a.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    for i in range(3):
        _step("msam", a, opt_a, i)
    opt_a.move_back()
    saved_model, saved_opt = copy.deepcopy(a.state_dict()), copy.deepcopy(opt_a.state_dict())
    opt_a.move_forward()
    b = _model(seed=1)
    b.load_state_dict(saved_model)
    opt_b = cl_optim.MSAM(b.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    opt_b.load_state_dict(saved_opt)
    assert not opt_b.at_ascent
    opt_b.move_forward()
    for i in range(3, 5):
        _step("msam", a, opt_a, i)
        _step("msam", b, opt_b, i)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_bad_options_are_refused():
    m = _model()
    cases = [
        (lambda: cl_optim.WSAM(m.parameters(), torch.optim.SGD, gamma=1.0, lr=0.1), "gamma"),
        (lambda: cl_optim.LookSAM(m.parameters(), torch.optim.SGD, k=0, lr=0.1), "k"),
        (lambda: cl_optim.LookSAM(m.parameters(), torch.optim.SGD, alpha=-1.0, lr=0.1), "alpha"),
        (lambda: cl_optim.LookSAM(m.parameters(), torch.optim.SGD, interval=3, lr=0.1), "takes k"),
        (lambda: cl_optim.FriendlySAM(m.parameters(), torch.optim.SGD, sigma=-1.0, lr=0.1), "sigma"),
        (lambda: cl_optim.FriendlySAM(m.parameters(), torch.optim.SGD, lmbda=1.5, lr=0.1), "lmbda"),
        (lambda: cl_optim.MSAM(m.parameters(), torch.optim.SGD, lr=0.1), "momentum"),
        (lambda: cl_optim.MSAM(m.parameters(), torch.optim.SGD, adaptive=True, lr=0.1, momentum=0.9), "adaptive"),
        (lambda: cl_optim.GAM(m.parameters(), torch.optim.SGD, grad_norm_rho=-1.0, lr=0.1), "grad_norm_rho"),
        (lambda: cl_optim.GAM(m.parameters(), torch.optim.SGD, grad_gamma=float("nan"), lr=0.1), "grad_gamma"),
        (lambda: cl_optim.CFlat(m.parameters(), torch.optim.SGD, strategy="fast", lr=0.1), "strategy"),
        (lambda: cl_optim.CFlat(m.parameters(), torch.optim.SGD, lamb=float("inf"), lr=0.1), "lamb"),
        (lambda: cl_optim.RWP(m.parameters(), torch.optim.SGD, alpha=1.5, lr=0.1), "alpha"),
        (lambda: cl_optim.RWP(m.parameters(), torch.optim.SGD, generator=3, lr=0.1), "generator"),
        (lambda: cl_optim.SAM(m.parameters(), torch.optim.SGD, interval=0, lr=0.1), "interval"),
        (lambda: cl_optim.SAM(m.parameters(), torch.optim.SGD, start_step=-1, lr=0.1), "start_step"),
        (lambda: cl_optim.SAM(m.parameters(), torch.optim.SGD, mask="topk", lr=0.1), "mask"),
        (lambda: cl_optim.SAM(m.parameters(), torch.optim.SGD, mask="fisher", lr=0.1), "fisher_ema"),
        (lambda: cl_optim.SAM(m.parameters(), torch.optim.SGD, mask="fisher", fisher_ema=0.9, sparsity=1.5, lr=0.1), "sparsity"),
        (lambda: cl_optim.SAM(m.parameters(), torch.optim.SGD, only_norm_layers="yes", lr=0.1), "only_norm_layers"),
    ]  # fmt: skip
    for make, word in cases:
        with pytest.raises((ValueError, TypeError), match=word):
            make()


def test_steps_in_the_wrong_order_are_refused_and_change_nothing():
    m = _model()
    before = [p.detach().clone() for p in m.parameters()]
    msam = cl_optim.MSAM(m.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="no second pass"):
        msam.first_step()
    gam = cl_optim.GAM(m.parameters(), torch.optim.SGD, lr=0.1)
    _loss(m, 0).backward()
    with pytest.raises(RuntimeError, match="closure"):
        gam.step()
    with pytest.raises(RuntimeError, match="four passes"):
        gam.second_step()
    look = cl_optim.LookSAM(m.parameters(), torch.optim.SGD, k=3, lr=0.1)
    _step("looksam", m, look, 0)
    after_sam_step = [p.detach().clone() for p in m.parameters()]
    _loss(m, 1).backward()
    with pytest.raises(RuntimeError, match="not a SAM step"):
        look.first_step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), after_sam_step))
    assert not all(torch.equal(p, q) for p, q in zip(after_sam_step, before))


def test_a_closure_that_fails_in_a_later_pass_restores_the_weights():
    m = _model()
    opt = cl_optim.CFlat(m.parameters(), cl_optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in m.parameters()]
    calls = [0]

    def closure():
        calls[0] += 1
        if calls[0] == 2:
            raise KeyError("data loader broke")
        opt.zero_grad()
        _loss(m, 0).backward()

    _loss(m, 0).backward()
    with pytest.raises(KeyError):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert opt.state_dict()["sam"]["steps"] == 0


# ------------------------------------------------------------------------- gradient accumulation


def _large_batch_sam(base, kwargs, opt_kwargs, steps=3, variant=cl_optim.SAM):
    model = _model()
    opt = variant(model.parameters(), base, **opt_kwargs, **kwargs)
    for i in range(steps):
        x, y = _data(i, n=16)
        loss = lambda x=x, y=y: F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss().backward()
        opt.step(lambda loss=loss: (opt.zero_grad(), loss().backward()))
    return model


@pytest.mark.parametrize(
    "variant, opt_kwargs",
    [(cl_optim.SAM, dict(rho=0.05)), (cl_optim.GSAM, dict(rho=0.05)), (cl_optim.CFlat, dict(rho=0.05)),
     (cl_optim.LookSAM, dict(rho=0.05, k=2))],
)  # fmt: skip
def test_global_accumulation_equals_the_large_batch_step(variant, opt_kwargs):
    """k micro-batches accumulated in every pass (the closure accumulates too): one perturbation
    from the accumulated gradient, the same step as the whole batch (to rounding)."""
    kwargs = dict(lr=0.1, momentum=0.9)
    big = _large_batch_sam(cl_optim.SGD, kwargs, opt_kwargs, variant=variant)
    model = _model()
    opt = variant(model.parameters(), cl_optim.SGD, **opt_kwargs, **kwargs)
    k = 4
    for i in range(3):
        x, y = _data(i, n=16)

        def accumulated(x=x, y=y):
            opt.zero_grad()
            for xs, ys in zip(x.chunk(k), y.chunk(k)):
                (F.cross_entropy(model(xs), ys) / k).backward()

        accumulated()
        opt.step(accumulated)
    for a, b in zip(model.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", [cl_optim.SAM, cl_optim.GSAM])
def test_local_accumulation_is_the_mean_of_per_micro_batch_sam_gradients(variant):
    """second_step(accumulate=True): each micro-batch perturbed by its own gradient (m-sharpness);
    the update uses the mean of their perturbed gradients (checked against that mean computed
    micro-batch by micro-batch with a fresh optimizer and no update)."""
    k, rho = 4, 0.05
    model = _model()
    opt = variant(model.parameters(), cl_optim.SGD, rho=rho, lr=0.1)
    x, y = _data(0, n=16)
    w0 = [p.detach().clone() for p in model.parameters()]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for xs, ys in zip(x.chunk(k), y.chunk(k)):  # the reference: SAM's gradient of each micro-batch
        probe = _model()
        probe.load_state_dict(model.state_dict())
        probe_opt = variant(probe.parameters(), torch.optim.SGD, rho=rho, lr=1.0)
        (F.cross_entropy(probe(xs), ys) / k).backward()
        probe_opt.first_step(zero_grad=True)
        (F.cross_entropy(probe(xs), ys) / k).backward()
        grads = {id(q): None for q in probe.parameters()}
        probe_opt.second_step()  # lr 1, no momentum: w0 - g_sam
        for e, q, w in zip(expected, probe.parameters(), w0):
            e += w - q.detach()
        del grads
    for j, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k))):
        (F.cross_entropy(model(xs), ys) / k).backward()
        opt.first_step(zero_grad=True)
        (F.cross_entropy(model(xs), ys) / k).backward()
        opt.second_step(zero_grad=True, accumulate=j < k - 1)
        if j < k - 1:
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))  # no update yet
            assert all(p.grad is None for p in model.parameters())
    for p, w, e in zip(model.parameters(), w0, expected):
        torch.testing.assert_close(p.detach(), w - 0.1 * e, rtol=1e-5, atol=1e-7)
    assert opt.steps == 1


def test_local_accumulation_is_refused_where_state_moves_once_per_step():
    m = _model()
    for opt in (cl_optim.LookSAM(m.parameters(), cl_optim.SGD, lr=0.1),
                cl_optim.FriendlySAM(m.parameters(), cl_optim.SGD, lr=0.1),
                cl_optim.WSAM(m.parameters(), cl_optim.SGD, lr=0.1)):  # fmt: skip
        _loss(m, 0).backward()
        opt.first_step(zero_grad=True)
        _loss(m, 0).backward()
        with pytest.raises(NotImplementedError, match="global form"):
            opt.second_step(accumulate=True)
        opt.second_step(zero_grad=True)


# --------------------------------------------------------------------------------- torch.compile


COMPILED = {
    "gsam": lambda p: cl_optim.GSAM(p, cl_optim.SGD, rho=0.05, lr=1e-2, momentum=0.9, backend="cpp"),
    "wsam": lambda p: cl_optim.WSAM(p, cl_optim.SGD, rho=0.05, lr=1e-2, momentum=0.9, backend="cpp"),
    "friendly_sam": lambda p: cl_optim.FriendlySAM(p, cl_optim.AdamW, rho=0.05, lr=1e-2, backend="cpp"),
    "looksam": lambda p: cl_optim.LookSAM(
        p, cl_optim.SGD, rho=0.05, k=1, lr=1e-2, momentum=0.9, backend="cpp"
    ),
    # the global generator: dynamo cannot trace randn(generator=...) (a graph break, documented)
    "rwp": lambda p: cl_optim.RWP(p, cl_optim.SGD, rho=0.05, lr=1e-2, momentum=0.9, backend="cpp"),
}


@pytest.mark.skipif(not _cpp_builds(), reason="the cpp backend cannot be built on this machine")
@pytest.mark.parametrize("name", sorted(COMPILED))
def test_first_and_second_step_compile_without_graph_breaks(name):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        opt = COMPILED[name](list(model.parameters()))
        first, second = opt.first_step, opt.second_step
        if compiled:
            first = torch.compile(first, fullgraph=True, backend="aot_eager")
            second = torch.compile(second, fullgraph=True, backend="aot_eager")
        for i in range(3):
            model(x + i).square().sum().backward()
            first()
            opt.zero_grad()
            model(x + i).square().sum().backward()
            second()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "make",
    [lambda m: cl_optim.GSAM(m.parameters(), torch.optim.SGD, interval=2, lr=0.1),
     lambda m: cl_optim.WSAM(m.parameters(), torch.optim.SGD, interval=2, lr=0.1),
     lambda m: cl_optim.WSAM(m.parameters(), torch.optim.SGD, interval=2, decouple=False, lr=0.1),
     lambda m: cl_optim.FriendlySAM(m.parameters(), torch.optim.SGD, interval=2, lr=0.1),
     lambda m: cl_optim.RWP(m.parameters(), torch.optim.SGD, interval=2, lr=0.1)],
    ids=["gsam", "wsam", "wsam_coupled", "friendly_sam", "rwp"],
)  # fmt: skip
def test_a_base_step_between_sam_steps_uses_the_plain_gradient(make):
    """interval=2: the second step is `w - lr g(w)` exactly, with nothing of the SAM step before
    (no stale first-pass gradient combined in)."""
    model = _model()
    opt = make(model)
    _step("x", model, opt, 0)
    assert not opt.is_sam_step
    w1 = [p.detach().clone() for p in model.parameters()]
    grads = torch.autograd.grad(_loss(model, 1), list(model.parameters()))
    _step("x", model, opt, 1)
    for p, w, g in zip(model.parameters(), w1, grads):
        torch.testing.assert_close(p.detach(), w - 0.1 * g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["cflat", "looksam", "gsam"])
def test_batch_norm_statistics_move_once_per_step_with_preserve_bn_stats_in_the_closure(name):
    """The README recipe: the closure (run only at perturbed weights) runs its forward and
    backward under preserve_bn_stats, so the running statistics are those of the user's one
    forward per step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.Tanh(), torch.nn.Linear(7, 3)
    )
    twin = copy.deepcopy(model)
    factories = {
        "cflat": lambda m: cl_optim.CFlat(m.parameters(), cl_optim.SGD, rho=0.05, lr=0.1),
        "looksam": lambda m: cl_optim.LookSAM(m.parameters(), cl_optim.SGD, k=2, lr=0.1),
        "gsam": lambda m: cl_optim.GSAM(m.parameters(), cl_optim.SGD, lr=0.1),
    }
    opt = factories[name](model)
    for i in range(3):
        x, y = _data(i)
        twin_state = {k: v.clone() for k, v in twin.state_dict().items()}
        twin.load_state_dict({**twin_state, **{k: v for k, v in model.state_dict().items() if "running" not in k
                                                and "num_batches" not in k}})  # fmt: skip
        twin(x)  # one forward per step: the statistics expected

        def closure(x=x, y=y):
            opt.zero_grad()
            with cl_optim.preserve_bn_stats(
                model
            ):  # the backward too: BN's saved buffers are version-checked
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            return loss

        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(closure)
        bn, twin_bn = model[1], twin[1]
        torch.testing.assert_close(bn.running_mean, twin_bn.running_mean)
        torch.testing.assert_close(bn.running_var, twin_bn.running_var)
        assert int(bn.num_batches_tracked) == i + 1
