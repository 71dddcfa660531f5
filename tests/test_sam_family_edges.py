"""Edges of the SAM family that an independent review of the change found broken (each test
failed before its fix): state poisoned by one overflow, gates fed the scaled norm, parameters left
perturbed, selections lost by copies and plain checkpoints, options accepted and ignored."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import cl_optim


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 2)


X, Y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.randn(8, 2)


def _closure(model, opt, calls=None):
    def closure():
        if calls is not None:
            calls[0] += 1
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        return loss

    return closure


def _scaler(scale=2.0**10):
    return torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10_000)


@pytest.fixture(params=["host", "device"])
def flag_reads(request, monkeypatch):
    """Both ways a variant treats a device flag: read on the host where that is free (CPU), or
    selected on the device without a read (an accelerator's path, forced here on the CPU)."""
    if request.param == "device":
        import cl_optim.friendly_sam
        import cl_optim.looksam

        for module in (cl_optim.friendly_sam, cl_optim.looksam):
            monkeypatch.setattr(module, "known_on_host", lambda flag: None)
    return request.param


def test_friendly_sam_survives_one_overflow(flag_reads):
    model = _model()
    opt = cl_optim.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    closure = _closure(model, opt)
    skipped = []
    for step in range(6):
        closure()
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
        opt.step(closure)
        skipped.append(bool(opt.last_step_skipped))
        assert torch.isfinite(opt.sam_state[model.weight]["fsam_momentum"]).all()
    assert skipped == [False, False, True, False, False, False]


def test_friendly_sam_refused_first_step_leaves_its_mean():
    model = _model()
    opt = cl_optim.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    closure = _closure(model, opt)
    closure()
    opt.step(closure)
    mean = opt.sam_state[model.weight]["fsam_momentum"].clone()
    closure()
    opt.param_groups[0]["rho"] = -1.0
    with pytest.raises(ValueError, match="nothing was changed"):
        opt.first_step()
    assert torch.equal(opt.sam_state[model.weight]["fsam_momentum"], mean)


def test_cflat_plus_survives_a_nonfinite_norm_and_refuses_a_nonfinite_a():
    model = _model()
    opt = cl_optim.CFlat(
        model.parameters(), torch.optim.SGD, rho=0.2, strategy="plus", A=0.0, cof=1.0, lr=0.01
    )
    closure = _closure(model, opt)
    for step in range(6):
        closure()
        if step == 2:
            model.weight.grad[0, 0] = float("inf")
        opt.step(closure)
        assert torch.isfinite(torch.tensor(opt.trigger["A"]))
    state = opt.state_dict()
    state["sam"]["cflat_A"] = float("nan")
    with pytest.raises(ValueError, match="finite A"):
        opt.load_state_dict(state)


def test_cflat_plus_gate_in_the_amp_recipe_uses_the_unscaled_norm():
    """The gate is decided in first_step, on the norm of the unscaled gradient."""
    probe = _model()
    grads = torch.autograd.grad(F.mse_loss(probe(X), Y), list(probe.parameters()))
    norm = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads]))
    for a, expect_calls in ((1e6, 0), (float(norm) * 0.5, 3)):
        model = _model()
        opt = cl_optim.CFlat(model.parameters(), torch.optim.SGD, strategy="plus", A=a, k=0.0, t0=0, cof=0.0,
                             lr=0.01)  # fmt: skip
        scaler = _scaler()
        calls = [0]

        def closure(calls=calls, opt=opt, model=model, scaler=scaler):
            calls[0] += 1
            opt.zero_grad()
            loss = F.mse_loss(model(X), Y)
            scaler.scale(loss).backward()
            return loss

        scaler.scale(F.mse_loss(model(X), Y)).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        opt.step(closure)
        scaler.update()
        # E = A/2 - ||g||: gated (0 calls) for a large A, open (3 calls) for A/2 below ||g|| —
        # with the scaled norm (1024 ||g||) the second would be open for any A up to 2048 ||g||.
        assert calls[0] == expect_calls
        assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # stepped either way


@pytest.mark.parametrize("cls", [cl_optim.GAM, cl_optim.CFlat])
def test_a_parameter_that_gets_a_gradient_only_in_a_later_pass_is_never_left_perturbed(cls):
    class Net(torch.nn.Module):  # block b joins every other forward (stochastic depth)
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.head, self.calls = (
                torch.nn.Linear(4, 4),
                torch.nn.Linear(4, 4),
                torch.nn.Linear(4, 2),
                0,
            )

        def forward(self, x):
            self.calls += 1
            h = torch.tanh(self.a(x))
            if self.calls % 2 == 0:
                h = h + torch.tanh(self.b(h))
            return self.head(h)

    model = Net()
    opt = cls(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)  # lr 0: nothing may move
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    closure = _closure(model, opt)
    closure()
    opt.step(closure)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_a_plain_base_state_dict_keeps_the_family_group_settings():
    model = _model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.mse_loss(model(X), Y).backward()
    plain.step()
    saved = plain.state_dict()
    for make in (
        lambda: cl_optim.GAM(model.parameters(), torch.optim.SGD, grad_norm_rho=0.3, lr=0.1, momentum=0.9),
        lambda: cl_optim.CFlat(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9),
        lambda: cl_optim.GSAM(model.parameters(), torch.optim.SGD, rho_min=0.01, lr=0.1, momentum=0.9),
    ):
        opt = make()
        opt.load_state_dict(copy.deepcopy(saved))
        closure = _closure(model, opt)
        closure()
        opt.step(closure)  # KeyError 'grad_norm_rho' / 'lr_max' before
    body, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    opt = cl_optim.SAM([{"params": body.parameters(), "perturb": False}, {"params": head.parameters()}],
                       torch.optim.SGD, lr=0.1)  # fmt: skip
    plain = torch.optim.SGD([{"params": body.parameters()}, {"params": head.parameters()}], lr=0.1)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["perturb"] is False


def test_gsam_rho_schedule_covers_groups_added_later():
    model, head = _model(), torch.nn.Linear(2, 2)
    opt = cl_optim.GSAM(model.parameters(), torch.optim.SGD, rho=0.2, rho_min=0.02, lr=0.4)
    opt.add_param_group({"params": head.parameters(), "lr": 0.2})
    assert opt.param_groups[1]["lr_max"] == 0.2 and opt.param_groups[1]["rho_max"] == 0.2
    with pytest.raises(ValueError, match="lr_max > lr_min"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.0})
    assert len(opt.param_groups) == 2


def _perturbed(opt):
    return [[bool(f) for f in group.get("perturb", [True] * len(group["params"]))] if group.get("perturb", True)
            is not True else [True] * len(group["params"]) for group in opt.param_groups]  # fmt: skip


def test_sam_on_selection_survives_copies_pickles_and_new_groups():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = cl_optim.SAM(model.parameters(), torch.optim.SGD, only_norm_layers=model, lr=0.1)
    expected = [[False, False, True, True]]
    assert _perturbed(opt) == expected
    model2, opt2 = copy.deepcopy((model, opt))
    assert _perturbed(opt2) == expected
    buffer = io.BytesIO()
    torch.save((model, opt), buffer)
    buffer.seek(0)
    _, opt3 = torch.load(buffer, weights_only=False)
    assert _perturbed(opt3) == expected
    assert pickle.loads(pickle.dumps(opt))._norm_module is None
    head = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.LayerNorm(2))
    model.add_module("head", head)
    opt.add_param_group({"params": head.parameters()})
    assert _perturbed(opt)[1] == [False, False, True, True]
    named = torch.nn.Sequential()
    named.add_module("norm", torch.nn.LayerNorm(2))
    by_name = cl_optim.SAM(list(torch.nn.Linear(2, 2).named_parameters()), torch.optim.SGD, only_norm_layers=True,
                           lr=0.1)  # fmt: skip
    by_name.add_param_group({"params": [p for _, p in named.named_parameters(prefix="head.norm")],
                             "param_names": [n for n, _ in named.named_parameters(prefix="head")]})  # fmt: skip
    assert _perturbed(by_name) == [[False, False], [True, True]]


def test_msam_changing_rho_between_the_moves_does_not_move_theta():
    model = _model()
    opt = cl_optim.MSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    for _ in range(3):
        _closure(model, opt)()
        opt.step()
    opt.move_back()
    theta = model.weight.detach().clone()
    opt.move_forward()
    opt.param_groups[0]["rho"] = 0.0
    opt.move_back()
    torch.testing.assert_close(model.weight.detach(), theta, rtol=1e-6, atol=1e-7)
    assert not opt.at_ascent


def test_options_a_variant_cannot_honour_are_refused():
    m = _model()
    for kwargs in (
        dict(interval=2),
        dict(start_step=3),
        dict(only_norm_layers=True),
        dict(mask="fisher", fisher_ema=0.9),
    ):
        with pytest.raises(TypeError, match="MSAM takes no"):
            cl_optim.MSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)
    with pytest.raises(ValueError, match="perturb"):
        cl_optim.MSAM([{"params": m.parameters(), "perturb": False}], torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="RWP takes no mask"):
        cl_optim.RWP(m.parameters(), torch.optim.SGD, mask="fisher", fisher_ema=0.9, lr=0.1)


@pytest.mark.parametrize("cls", [cl_optim.RWP, cl_optim.MSAM])
def test_fisher_ema_is_kept_by_variants_without_an_ascent(cls):
    model = _model()
    opt = cls(model.parameters(), torch.optim.SGD, fisher_ema=0.9, lr=0.1, momentum=0.9)
    for _ in range(2):
        closure = _closure(model, opt)
        closure()
        opt.step(closure) if cls is cl_optim.RWP else opt.step()
    fisher = opt.running_fisher()
    assert set(fisher) == set(model.parameters()) and all(bool(f.gt(0).any()) for f in fisher.values())


def test_looksam_layerwise_builds_the_ssam_masks():
    model = _model()
    opt = cl_optim.LookSAM(model.parameters(), torch.optim.SGD, layerwise=True, k=1, mask="fisher", fisher_ema=0.9,
                           sparsity=0.5, lr=0.1)  # fmt: skip
    for _ in range(2):
        closure = _closure(model, opt)
        closure()
        opt.step(closure)
    assert all("ssam_mask" in opt.sam_state[p] for p in model.parameters())


def test_gam_batch_fisher_metric_does_not_depend_on_the_loss_scale():
    runs = []
    for scaled in (False, True):
        model = _model()
        opt = cl_optim.GAM(model.parameters(), torch.optim.SGD, adaptive="fisher", eta=10.0, lr=0.1)
        scaler = _scaler(2.0**12) if scaled else None
        for _ in range(3):

            def closure(opt=opt, model=model, scaler=scaler, scaled=scaled):
                opt.zero_grad()
                loss = F.mse_loss(model(X), Y)
                (scaler.scale(loss) if scaled else loss).backward()
                return loss

            closure()
            if scaled:
                opt.first_step(zero_grad=True, grad_scaler=scaler)
                opt.step(closure)
                scaler.update()
            else:
                opt.step(closure)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_running_fisher_moves_on_steps_without_an_ascent():
    """Before start_step SAM is plain SGD: its running Fisher equals cl_optim.SGD's."""
    a, b = _model(), _model()
    sam = cl_optim.SAM(a.parameters(), cl_optim.SGD, start_step=100, fisher_ema=0.9, lr=0.1)
    sgd = cl_optim.SGD(b.parameters(), fisher_ema=0.9, lr=0.1)
    for _ in range(4):
        for model, opt in ((a, sam), (b, sgd)):
            closure = _closure(model, opt)
            closure()
            opt.step(closure) if opt is sam else opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(sam.running_fisher()[p], sgd.running_fisher()[q])


def test_accumulation_guards():
    model = _model()
    opt = cl_optim.SAM(model.parameters(), torch.optim.SGD, fisher_ema=0.9, lr=0.1)
    _closure(model, opt)()
    opt.first_step(zero_grad=True)
    _closure(model, opt)()
    with pytest.raises(NotImplementedError, match="fisher_ema"):
        opt.second_step(accumulate=True)
    opt.second_step()
    opt = cl_optim.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    _closure(model, opt)()
    opt.first_step(zero_grad=True)
    _closure(model, opt)()
    opt.second_step(accumulate=True)
    for attempt in (lambda: copy.deepcopy(opt), opt.state_dict, lambda: pickle.dumps(opt)):
        with pytest.raises(RuntimeError, match="micro-batches"):
            attempt()


def test_ssam_masks_cover_a_group_added_later():
    model, head = _model(), torch.nn.Linear(2, 3)
    opt = cl_optim.SAM(
        model.parameters(), torch.optim.SGD, mask="fisher", fisher_ema=0.9, sparsity=0.9, lr=0.1
    )
    for _ in range(2):
        closure = _closure(model, opt)
        closure()
        opt.step(closure)
    opt.add_param_group({"params": head.parameters()})

    def closure():
        opt.zero_grad()
        loss = head(model(X)).square().mean()
        loss.backward()
        return loss

    for _ in range(2):
        closure()
        opt.step(closure)
    assert all("ssam_mask" in opt.sam_state[p] for p in head.parameters())


def test_looksam_keeps_its_direction_through_a_nonfinite_pass(flag_reads):
    model = _model()
    opt = cl_optim.LookSAM(model.parameters(), torch.optim.SGD, k=2, lr=0.1)
    closure = _closure(model, opt)
    for step in range(6):
        closure()
        if step == 2:  # a SAM step
            model.weight.grad[0, 0] = float("nan")
        opt.step(closure)
        assert torch.isfinite(opt.sam_state[model.weight]["looksam_gv"]).all()
        assert bool(opt.last_step_skipped) == (step == 2)


@pytest.mark.parametrize("base", [cl_optim.SGD, torch.optim.SGD], ids=["fused", "torch"])
def test_a_combination_that_would_overflow_skips_the_step(base):
    """GSAM's combination 1.4 g2 - 0.4 g1 of two finite fp32 gradients near the largest float
    overflows. Written into .grad (a torch.optim base) the second-pass check sees the inf; read by
    the fused update (COMBINE) it is never formed, and the bound sum |c_k| ||x_k|| stands in for
    the check: either way the step is skipped and the weights are restored."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = cl_optim.GSAM([p], base, rho=0.1, alpha=0.4, lr=0.1)
    p.grad = torch.full((2,), 3.3e38)
    opt.first_step(zero_grad=True)
    p.grad = torch.full((2,), 3.3e38)  # cos = 1: coefficients 1.4 and -0.4
    opt.second_step()
    assert bool(opt.last_step_skipped)
    assert torch.equal(p.detach(), torch.tensor([1.0, -2.0]))


def test_the_bound_lets_a_large_finite_combination_through():
    """Gradients of 1e30: far from the bound, the fused step is made (no false skip)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = cl_optim.GSAM([p], cl_optim.SGD, rho=0.1, alpha=0.4, lr=1e-30)
    p.grad = torch.full((2,), 1e30)
    opt.first_step(zero_grad=True)
    p.grad = torch.full((2,), 1e30)
    opt.second_step()
    assert not bool(opt.last_step_skipped)
    torch.testing.assert_close(p.detach(), torch.tensor([0.0, -3.0]))


def test_looksam_reuse_steps_move_the_running_fisher_with_the_batch_gradient():
    """On a reuse step the running Fisher takes g**2 of the batch gradient (as SAM steps take the
    first pass's), not of g + alpha ||g||/||g_v|| g_v: the same over a fused base (where the update
    reads g_v itself) and over torch's SGD (where the combination is written into .grad)."""
    fishers = []
    for base in (cl_optim.SGD, torch.optim.SGD):
        model = _model()
        opt = cl_optim.LookSAM(model.parameters(), base, rho=0.1, k=3, alpha=0.7, fisher_ema=0.9, lr=0.1)
        grads = []
        for _ in range(3):  # a SAM step, then two reuse steps
            opt.zero_grad()
            F.mse_loss(model(X), Y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])

            def closure(opt=opt, model=model):
                opt.zero_grad()
                loss = F.mse_loss(model(X), Y)
                loss.backward()
                return loss

            opt.step(closure)
        fisher = opt.running_fisher()
        fishers.append([fisher[p] for p in model.parameters()])
        # the last step was a reuse step: F = 0.9 F_before + 0.1 g**2 of its batch gradient
        expected_tail = [0.1 * g**2 for g in grads[-1]]
        for f, tail, g1, g2 in zip(fishers[-1], expected_tail, grads[0], grads[1]):
            before = 0.9 * (0.9 * 0.1 * g1**2 + 0.1 * g2**2)
            torch.testing.assert_close(f, before + tail)
    for a, b in zip(*fishers):
        torch.testing.assert_close(a, b)


def _scripted(opt, p, grads):
    """``opt.step`` with a closure that hands out the next gradient of ``grads`` (the first is the
    user's backward) and counts its calls."""
    queue = [torch.tensor(g, dtype=torch.float32) for g in grads]
    p.grad = queue.pop(0)

    def closure():
        p.grad = queue.pop(0)
        return torch.zeros(())

    opt.step(closure)
    assert not queue  # every pass ran


COMBINED_VARIANTS = {
    # name: (constructor, gradients of its passes that overflow when combined, finite large ones)
    "cflat": (lambda p: cl_optim.CFlat([p], cl_optim.SGD, rho=0.1, lamb=0.5, lr=1e-30),
              [[1.0, 1.0], [3.3e38, 3.3e38], [-3.3e38, -3.3e38], [3.3e38, 3.3e38]],  # 0.5 g3 + g1 - 0.5 g2
              [[1.0, 1.0], [1e30, -1e30], [2e30, 1e30], [-1e30, 3e30]]),
    "wsam": (lambda p: cl_optim.WSAM([p], cl_optim.SGD, rho=0.1, gamma=0.9, decouple=False, lr=1e-30),
             [[-3.3e38, -3.3e38], [3.3e38, 3.3e38]],  # 9 g2 - 8 g1
             [[1e30, -1e30], [2e30, 1e30]]),
    # decoupled: the update reads g1, then DESCENT w += lr (-9 g2 + 9 g1) in the same pass
    "wsam_decoupled": (lambda p: cl_optim.WSAM([p], cl_optim.SGD, rho=0.1, gamma=0.9, lr=1e-30),
                       [[-3.3e38, -3.3e38], [3.3e38, 3.3e38]],
                       [[1e30, -1e30], [2e30, 1e30]]),
    "rwp": (lambda p: cl_optim.RWP([p], cl_optim.SGD, rho=0.01, alpha=0.5, lr=1e-30,
                                   generator=torch.Generator().manual_seed(0)),
            None,  # a convex mix never overflows
            [[1e30, -1e30], [2e30, 1e30]]),
}  # fmt: skip


def _spy_combine(opt) -> list:
    """Whether each update of ``opt``'s fused base got a COMBINE term."""
    combined = []
    original = opt.base_optimizer._fused_step

    def spy(*args, combine=None, **kwargs):
        combined.append(combine is not None)
        return original(*args, combine=combine, **kwargs)

    opt.base_optimizer._fused_step = spy
    return combined


@pytest.mark.parametrize("name", sorted(COMBINED_VARIANTS))
def test_the_combination_read_by_the_update_is_bounded_like_the_written_one(name):
    """C-Flat, WSAM (both forms) and RWP hand their final combination to a fused base's update
    (COMBINE; decoupled WSAM's descent too, DESCENT), bounded by norms they had anyway (the ascents', the first pass's check) and the
    last gradient's: finite gradients whose combination overflows skip the step with the weights
    restored, as the written form's check would; large finite ones far from the bound step."""
    make, overflowing, large = COMBINED_VARIANTS[name]
    if overflowing is not None:
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        opt = make(p)
        _scripted(opt, p, overflowing)
        assert bool(opt.last_step_skipped)
        assert torch.equal(p.detach(), torch.tensor([1.0, -2.0]))
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make(p)
    combined = _spy_combine(opt)
    _scripted(opt, p, large)
    assert combined == [True] and not bool(opt.last_step_skipped)
    assert not torch.equal(p.detach(), torch.tensor([1.0, -2.0]))  # lr 1e-30 times ~1e30: it moved


@pytest.mark.parametrize("backend", ["forloop", "cpp"])
def test_decoupled_wsams_descent_row_is_not_in_the_bound(backend):
    """Finite gradients of norm about 2e37 with lr 1e-30: nothing either form computes is near
    the fp32 range (the descent lr a (g1 - g2) is about 1e8), so the fused step steps as the written
    form does. Bounding the descent row without its lr skipped it."""
    results = []
    for fuse in (True, False):
        p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        opt = cl_optim.WSAM([p], cl_optim.SGD, rho=0.1, gamma=0.9, lr=1e-30, backend=backend)
        opt._FUSE_COMBINATION = fuse
        combined = _spy_combine(opt) if fuse else []
        _scripted(opt, p, [[1e37, 1e37], [2e37, -1e37]])
        assert combined == ([True] if fuse else []) and not bool(opt.last_step_skipped), fuse
        results.append(p.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)
    assert float(results[0].abs().max()) > 1e7  # it moved by the descent


@pytest.mark.parametrize("sam_on", [False, True], ids=["asam", "sam_on"])
def test_an_asam_or_sam_on_ascent_norm_is_no_bound_and_the_combination_is_written(sam_on):
    """The ascents' norms bound C-Flat's sources only where they are plain norms over every
    parameter: ASAM's weighted norm or SAM-ON's subset leaves the combination written into .grad."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    kwargs = dict(only_norm_layers=model) if sam_on else dict(adaptive=True)
    opt = cl_optim.CFlat(model.parameters(), cl_optim.SGD, rho=0.1, lr=0.1, **kwargs)
    combined = _spy_combine(opt)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        return loss

    closure()
    opt.step(closure)
    assert combined == [False]


def test_the_last_pass_check_stays_for_a_gradient_outside_the_combination():
    """A bounded combination stands in for the check of the last gradient only over the parameters
    it combines: a parameter that gets its first gradient in the second pass, non-finite, still
    skips the step (GSAM combines the first pass's parameters)."""
    a, b = torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([0.5]))
    opt = cl_optim.GSAM([a, b], cl_optim.SGD, rho=0.1, alpha=0.4, lr=0.1)
    combined = _spy_combine(opt)
    a.grad = torch.tensor([0.3, 0.4])
    opt.first_step(zero_grad=True)
    a.grad, b.grad = torch.tensor([0.2, 0.1]), torch.tensor([float("nan")])
    opt.second_step()
    assert combined == [True] and bool(opt.last_step_skipped)
    assert torch.equal(a.detach(), torch.tensor([1.0, -2.0])) and torch.equal(b.detach(), torch.tensor([0.5]))


def test_a_step_keeps_only_its_own_ascent_norms():
    """FriendlySAM and per-tensor LookSAM ascend from their own first step: the list of the step's
    ascent norms is the step's, not one more entry per step for ever."""
    for make in (
        lambda ps: cl_optim.FriendlySAM(ps, cl_optim.SGD, lr=0.01),
        lambda ps: cl_optim.LookSAM(ps, cl_optim.SGD, k=1, layerwise=True, lr=0.01),
    ):
        model = _model()
        opt = make(model.parameters())
        for _ in range(20):
            _closure(model, opt)()
            opt.step(_closure(model, opt))
        assert len(opt._run["ascent_norms"]) <= len(list(model.parameters()))


def test_a_gradient_the_bound_cannot_read_restores_the_weights_and_names_the_problem():
    """The bound's norm pass reads every gradient before the update does: a sparse one (on a
    parameter without a first-pass gradient) is refused with the update's message, w + e undone."""
    for make in (
        lambda ps: cl_optim.RWP(ps, cl_optim.SGD, rho=0.5, lr=0.1),
        lambda ps: cl_optim.WSAM(ps, cl_optim.SGD, rho=0.5, decouple=False, lr=0.1),
    ):
        a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
        w = a.detach().clone()
        opt = make([a, b])
        a.grad = torch.ones(4)
        opt.first_step(zero_grad=True)
        a.grad, b.grad = torch.ones(4), torch.ones(4).to_sparse()
        with pytest.raises(RuntimeError, match="sparse gradients"):
            opt.second_step()
        assert torch.equal(a.detach(), w) and opt._run["pending"] is None


def test_a_coefficient_past_the_opmath_range_skips_the_step():
    """The kernel takes each COMBINE coefficient in fp32 for fp32 parameters: LookSAM's reuse weight
    alpha ||g|| / (||g_v|| + eps) with g_v = 0 and ||g|| = 1e27 is past it (inf there, inf * 0 a
    NaN): skipped, as the written form's check skips it."""
    for fuse in (True, False):
        w = torch.nn.Parameter(torch.zeros(3))
        opt = cl_optim.LookSAM([w], cl_optim.SGD, k=2, lr=1e-30)
        opt._FUSE_COMBINATION = fuse

        def closure(opt=opt, w=w):
            opt.zero_grad()
            loss = (w * torch.tensor([1e27, 0.0, 0.0])).sum()
            loss.backward()
            return loss

        for _ in range(2):  # a SAM step (g_v = 0: g_s is parallel to g), then a reuse step
            closure()
            opt.step(closure)
        assert bool(opt.last_step_skipped) and torch.isfinite(w).all(), fuse


def test_abort_restores_with_grad_enabled():
    """The integrations abort from an except block with autograd on: the restore is made anyway."""
    model = _model()
    w = model.weight.detach().clone()
    opt = cl_optim.SAM(model.parameters(), cl_optim.SGD, lr=0.1)
    F.mse_loss(model(X), Y).backward()
    opt.first_step(zero_grad=True)
    opt._abort()
    assert torch.equal(model.weight.detach(), w) and opt._run["pending"] is None
