"""The SAM family against an independent reference of each paper's rule
(`tests/sam_family_reference.py`, written from the papers by someone who did not read cl_optim):
several steps of a nonlinear problem in fp64, parameters, the base optimizer's state and each
variant's own state, and the number of gradient evaluations per step."""

from __future__ import annotations

import copy

import pytest
import torch
from sam_family_reference import fisher_mask, run_reference

import cl_optim
from cl_optim._optimizer import FISHER_KEY

SHAPES = [(3, 2), (3,), (2,)]
NAMES = ["layer.weight", "bn.weight", "head"]  # SAM-ON selects the second by name
STEPS = 7


def _init():
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


def _targets():
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(3, generator=gen, dtype=torch.float64) for _ in range(STEPS)]


TARGETS = _targets()


def loss_at(params, t):
    """Smooth, nonlinear, every tensor reached: gradients that differ between passes."""
    w, b, v = params
    hidden = torch.tanh(w @ v + b - TARGETS[t])
    return (hidden**2).sum() + 0.1 * (v**4).sum() + 0.05 * (w**2).sum() * torch.cos(b).sum()


BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=1e-2)),
}


def run_mine(make, base, steps=STEPS, named=False, prepare=None):
    params = [torch.nn.Parameter(p.clone()) for p in _init()]
    base_cls, kwargs = BASES[base]
    opt = make(list(zip(NAMES, params)) if named else params, base_cls, **kwargs)
    if prepare is not None:
        prepare(opt, params)
    passes = []
    for t in range(steps):
        calls = [1]

        def closure(t=t, calls=calls):
            calls[0] += 1
            opt.zero_grad()
            loss = loss_at(params, t)
            loss.backward()
            return loss

        opt.zero_grad()
        loss_at(params, t).backward()
        opt.step(closure)
        passes.append(calls[0])
    return opt, params, passes


def check_against(opt, params, passes, ref, base, *, rtol=1e-9, atol=1e-12):
    assert passes == ref["passes"]
    for mine, theirs in zip(params, ref["params"]):
        torch.testing.assert_close(mine.detach(), theirs, rtol=rtol, atol=atol)
    keys = ("momentum_buffer",) if base == "sgd" else ("exp_avg", "exp_avg_sq")
    for p, theirs in zip(params, ref["base_state"]):
        for key in keys:
            torch.testing.assert_close(opt.state[p][key], theirs[key], rtol=rtol, atol=atol)


def reference(variant, base, **hyper):
    return run_reference(variant, _init(), loss_at, STEPS, base, BASES[base][1], **hyper)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("decouple", [True, False])
def test_wsam(base, decouple):
    ref = reference("wsam", base, rho=0.1, gamma=0.7, decouple=decouple)
    opt, params, passes = run_mine(
        lambda p, b, **k: cl_optim.WSAM(p, b, rho=0.1, gamma=0.7, decouple=decouple, **k), base
    )
    check_against(opt, params, passes, ref, base)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_looksam(base, layerwise):
    hyper = dict(rho=0.1, k=3, alpha=0.7, layerwise=layerwise)
    ref = reference("looksam", base, **hyper)
    opt, params, passes = run_mine(lambda p, b, **k: cl_optim.LookSAM(p, b, **hyper, **k), base)
    check_against(opt, params, passes, ref, base)
    assert passes == [2, 1, 1, 2, 1, 1, 2]  # the closure on SAM steps only
    for p, g_v in zip(params, ref["variant_state"]["g_v"]):
        torch.testing.assert_close(opt.sam_state[p]["looksam_gv"], g_v, rtol=1e-9, atol=1e-12)


def test_looksam_reuse_steps_apply_the_stored_direction():
    """INFTY 0.1.2 stores `old_g` and reads `old_grad`, so its reuse steps are plain SGD steps;
    pytorch_optimizer restores stale weights. Ours differs from plain SGD on reuse steps and
    never moves the weights back."""
    hyper = dict(rho=0.1, k=3, alpha=0.7)
    opt, params, _ = run_mine(lambda p, b, **k: cl_optim.LookSAM(p, b, **hyper, **k), "sgd", steps=2)
    plain = reference("looksam", "sgd", **{**hyper, "alpha": 0.0, "layerwise": False})
    ref = run_reference("looksam", _init(), loss_at, 2, "sgd", BASES["sgd"][1], **hyper, layerwise=False)
    assert not torch.allclose(params[0].detach(), run_reference(
        "looksam", _init(), loss_at, 2, "sgd", BASES["sgd"][1], **{**hyper, "alpha": 0.0}, layerwise=False
    )["params"][0])  # fmt: skip
    torch.testing.assert_close(params[0].detach(), ref["params"][0])
    assert plain["passes"] != []


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_msam(base):
    ref = reference("msam", base, rho=0.3)
    opt, params, passes = run_mine(lambda p, b, **k: cl_optim.MSAM(p, b, rho=0.3, **k), base)
    assert passes == [1] * STEPS  # the closure is never called
    check_against(opt, params, [1] * STEPS, {**ref, "passes": [1] * STEPS}, base)
    assert opt.at_ascent
    opt.move_back()
    for p, theta in zip(params, ref["variant_state"]["theta"]):
        torch.testing.assert_close(p.detach(), theta, rtol=1e-9, atol=1e-12)
    opt.move_back()  # a no-op where the weights already are
    torch.testing.assert_close(params[0].detach(), ref["variant_state"]["theta"][0])
    opt.move_forward()
    torch.testing.assert_close(params[0].detach(), ref["params"][0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_friendly_sam(base):
    hyper = dict(rho=0.1, sigma=1.0, lmbda=0.6)
    ref = reference("friendly_sam", base, **hyper)
    opt, params, passes = run_mine(lambda p, b, **k: cl_optim.FriendlySAM(p, b, **hyper, **k), base)
    check_against(opt, params, passes, ref, base)
    for p, m in zip(params, ref["variant_state"]["m"]):
        torch.testing.assert_close(opt.sam_state[p]["fsam_momentum"], m, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_gam(base):
    hyper = dict(
        rho=0.05, grad_norm_rho=0.2, grad_beta_1=0.6, grad_beta_2=-0.5, grad_beta_3=0.4, grad_gamma=0.3
    )
    ref = reference("gam", base, **hyper)
    opt, params, passes = run_mine(lambda p, b, **k: cl_optim.GAM(p, b, **hyper, **k), base)
    assert passes == [4] * STEPS
    check_against(opt, params, passes, ref, base)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("grad_norm_rho", [None, 1.0])
def test_cflat(base, grad_norm_rho):
    ref = reference(
        "cflat", base, rho=0.1, lamb=0.5, grad_norm_rho=0.1 if grad_norm_rho is None else grad_norm_rho
    )
    opt, params, passes = run_mine(
        lambda p, b, **k: cl_optim.CFlat(p, b, rho=0.1, lamb=0.5, grad_norm_rho=grad_norm_rho, **k), base
    )
    assert passes == [4] * STEPS
    check_against(opt, params, passes, ref, base)


def test_cflat_plus_trigger():
    trigger = dict(A=2.0, k=0.5, t0=3, cof=0.3)
    ref = reference("cflat", "sgd", rho=0.1, lamb=0.5, grad_norm_rho=0.1, strategy="plus", **trigger)
    assert 1 in ref["passes"] and 4 in ref["passes"]  # the gate opens on some steps only
    opt, params, passes = run_mine(
        lambda p, b, **k: cl_optim.CFlat(p, b, rho=0.1, lamb=0.5, strategy="plus", **trigger, **k), "sgd"
    )
    check_against(opt, params, passes, ref, "sgd")
    assert opt.trigger["A"] == pytest.approx(ref["variant_state"]["A"], rel=1e-12)
    assert opt.state_dict()["sam"]["cflat_A"] == opt.trigger["A"]


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_rwp(base):
    ref = reference("rwp", base, rho=0.05, alpha=0.4, generator_seed=3)
    opt, params, passes = run_mine(
        lambda p, b, **k: cl_optim.RWP(
            p, b, rho=0.05, alpha=0.4, generator=torch.Generator().manual_seed(3), **k
        ),
        base,
    )
    check_against(opt, params, passes, ref, base)


@pytest.mark.parametrize("interval, start", [(1, 0), (3, 0), (2, 3), (1, 5)])
def test_interval_and_late_phase_sam(interval, start):
    ref = reference("interval_sam", "sgd", rho=0.1, interval=interval, start=start)
    opt, params, passes = run_mine(
        lambda p, b, **k: cl_optim.SAM(p, b, rho=0.1, interval=interval, start_step=start, **k), "sgd"
    )
    check_against(opt, params, passes, ref, "sgd")  # momentum carried over the switch


def test_sam_on_by_name_and_by_module():
    ref = reference("sam_on", "sgd", rho=0.1, norm_mask=[False, True, False])
    opt, params, passes = run_mine(
        lambda p, b, **k: cl_optim.SAM(p, b, rho=0.1, only_norm_layers=True, **k), "sgd", named=True
    )
    check_against(opt, params, passes, ref, "sgd")
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.LayerNorm(3))
    opt = cl_optim.SAM(model.parameters(), torch.optim.SGD, only_norm_layers=model, lr=0.1)
    assert opt.param_groups[0]["perturb"] == [False, False, True, True, True, True]
    with pytest.raises(ValueError, match="named_parameters"):
        cl_optim.SAM(model.parameters(), torch.optim.SGD, only_norm_layers=True, lr=0.1)


def test_per_group_perturb_flag():
    params = [torch.nn.Parameter(p.clone()) for p in _init()]
    opt = cl_optim.SAM(
        [{"params": params[:1], "perturb": False}, {"params": params[1:]}],
        torch.optim.SGD,
        rho=0.1,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-3,
    )
    ref = reference("sam_on", "sgd", rho=0.1, norm_mask=[False, True, True])
    for t in range(STEPS):
        opt.zero_grad()
        loss_at(params, t).backward()
        opt.step(lambda t=t: (opt.zero_grad(), loss_at(params, t).backward()))
    for mine, theirs in zip(params, ref["params"]):
        torch.testing.assert_close(mine.detach(), theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 1.0])
def test_ssam_fisher_mask(sparsity):
    gen = torch.Generator().manual_seed(2)
    scores = [torch.rand(s, generator=gen, dtype=torch.float32) for s in SHAPES]
    masks = fisher_mask([s.double() for s in scores], sparsity)
    ref = reference("ssam_fisher", "sgd", rho=0.1, masks=masks)

    def prefill(opt, params):  # the running Fisher as if accumulated before: the mask's scores
        for p, s in zip(params, scores):
            opt.sam_state[p][FISHER_KEY] = s.clone()

    opt, params, passes = run_mine(
        lambda p, b, **k: cl_optim.SAM(p, b, rho=0.1, mask="fisher", sparsity=sparsity, fisher_ema=0.9, **k),
        "sgd",
        prepare=prefill,
    )
    check_against(opt, params, passes, ref, "sgd")
    packed = [opt.sam_state[p]["ssam_mask"] for p in params]
    assert all(m.dtype == torch.uint8 and m.numel() == (p.numel() + 7) // 8 for m, p in zip(packed, params))
    # state_dict round trip keeps the 1-bit masks as they are
    state = copy.deepcopy(opt.state_dict())
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = cl_optim.SAM(
        params2, torch.optim.SGD, rho=0.1, mask="fisher", sparsity=sparsity, fisher_ema=0.9, lr=0.05
    )
    opt2.load_state_dict(state)
    assert all(torch.equal(opt2.sam_state[q]["ssam_mask"], m) and opt2.sam_state[q]["ssam_mask"].dtype == torch.uint8
               for q, m in zip(params2, packed))  # fmt: skip


FUSED_BASES = {"sgd": cl_optim.SGD, "adamw": cl_optim.AdamW}


@pytest.mark.parametrize("backend", ["forloop", "foreach", "cpp"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize(
    "name", ["gsam", "looksam", "looksam_layerwise", "gam", "cflat", "rwp", "wsam", "wsam_decoupled"]
)
def test_a_fused_base_reads_the_combination_in_its_update(name, base, backend, monkeypatch):
    """With a cl_optim base (fp64 here) the final combination is the COMBINE term of the
    restore+update pass, never written into ``.grad``: the reference's numbers (GSAM: those of
    GSAM over torch's optimizer, checked against INFTY and the official rule in test_gsam.py)
    on every CPU backend; LookSAM's per-tensor norms keep the written form. WSAM's decoupled
    descent is the DESCENT term of the same pass (tests/test_backends.py has it bitwise against the
    written form on every backend)."""
    if backend == "cpp":
        from cl_optim._backend import resolve

        try:
            resolve("cpp", torch.device("cpu"), torch.float64)
        except RuntimeError as error:  # pragma: no cover - CI builds it (CL_OPTIM_REQUIRE_CPP)
            pytest.skip(str(error))
    hyper = {
        "gsam": dict(rho=0.1, alpha=0.4),
        "looksam": dict(rho=0.1, k=3, alpha=0.7, layerwise=False),
        "looksam_layerwise": dict(rho=0.1, k=3, alpha=0.7, layerwise=True),
        "gam": dict(rho=0.05, grad_norm_rho=0.2, grad_beta_1=0.6, grad_beta_2=-0.5, grad_beta_3=0.4,
                    grad_gamma=0.3),
        "cflat": dict(rho=0.1, lamb=0.5, grad_norm_rho=0.1),
        "rwp": dict(rho=0.05, alpha=0.4),
        "wsam": dict(rho=0.1, gamma=0.7, decouple=False),
        "wsam_decoupled": dict(rho=0.1, gamma=0.7, decouple=True),
    }[name]  # fmt: skip
    cls = {"gsam": cl_optim.GSAM, "gam": cl_optim.GAM, "cflat": cl_optim.CFlat, "rwp": cl_optim.RWP,
           "wsam": cl_optim.WSAM, "wsam_decoupled": cl_optim.WSAM}.get(name, cl_optim.LookSAM)  # fmt: skip
    extra = (lambda: dict(generator=torch.Generator().manual_seed(3))) if name == "rwp" else dict
    combined = []
    original = cl_optim.SGD._fused_step if base == "sgd" else cl_optim.AdamW._fused_step

    def spy(self, *args, combine=None, **kwargs):
        combined.append(combine is not None)
        return original(self, *args, combine=combine, **kwargs)

    monkeypatch.setattr(FUSED_BASES[base], "_fused_step", spy)

    def make(p, _, **k):
        return cls(p, FUSED_BASES[base], **hyper, backend=backend, **extra(), **k)

    opt, params, passes = run_mine(make, base)
    if name == "gsam":
        monkeypatch.undo()
        ref_opt, ref_params, ref_passes = run_mine(lambda p, b, **k: cls(p, b, **hyper, **k), base)
        assert passes == ref_passes
        for mine, theirs in zip(params, ref_params):
            torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-9, atol=1e-12)
    else:
        seed = dict(generator_seed=3) if name == "rwp" else {}
        ref = reference(name.replace("_layerwise", "").replace("_decoupled", ""), base, **hyper, **seed)
        check_against(opt, params, passes, ref, base)
    # COMBINE on every step but LookSAM's SAM steps (their update uses g_s) and its per-tensor form
    expected = {"looksam_layerwise": [False] * STEPS,
                "looksam": [t % 3 != 0 for t in range(STEPS)]}.get(name, [True] * STEPS)  # fmt: skip
    assert combined == expected
