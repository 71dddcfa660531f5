"""The SAM family against other libraries: INFTY 0.1.2 (C-Flat, C-Flat++, GAM, LookSAM; installed
by `.ci/run` with --no-deps, skipped where absent) and pytorch_optimizer (WSAM, FriendlySAM; a dev
dependency). Where theirs is right the numbers agree; where it is wrong (INFTY's LookSAM never
applies g_v) the test shows theirs departs from the paper's rule and ours does not."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch.nn.functional as F
from sam_family_reference import run_reference

import cl_optim


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def _batch(i):
    gen = torch.Generator().manual_seed(10 + i)
    return torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)


def _run_ours(opt, model, steps):
    for i in range(steps):
        x, y = _batch(i)
        loss = lambda x=x, y=y: F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss().backward()
        opt.step(lambda loss=loss: (opt.zero_grad(), loss().backward()))


def _run_infty(cls, model, args, steps, base_kwargs):
    opt = cls(model.parameters(), torch.optim.SGD(model.parameters(), **base_kwargs), model, args)
    for i in range(steps):
        x, y = _batch(i)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return None, [loss]

        opt.step(closure=closure)
    return opt


def _close(a, b, rtol=1e-10, atol=1e-12):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


BASE = dict(lr=0.1, momentum=0.9)


def test_cflat_with_grad_norm_rho_1_matches_infty():
    """INFTY's C-Flat ascends along h with radius 1 whatever its settings (grad_norm_rho=1.0);
    it undoes perturbations by subtraction where we restore a copy: rounding only."""
    c_flat = pytest.importorskip("infty.optim.geometry_reshaping.c_flat")
    ours, theirs = _model(), _model()
    _run_ours(
        cl_optim.CFlat(ours.parameters(), torch.optim.SGD, rho=0.1, lamb=0.2, grad_norm_rho=1.0, **BASE),
        ours,
        4,
    )
    _run_infty(c_flat.C_Flat, theirs, {"rho": 0.1, "lamb": 0.2}, 4, BASE)
    _close(ours, theirs)


def test_cflat_plus_matches_infty():
    c_flat = pytest.importorskip("infty.optim.geometry_reshaping.c_flat")
    trigger = dict(A=1.2, k=0.5, t0=2, cof=0.5)
    ours, theirs = _model(), _model()
    opt = cl_optim.CFlat(ours.parameters(), torch.optim.SGD, rho=0.1, lamb=0.2, grad_norm_rho=1.0,
                         strategy="plus", **trigger, **BASE)  # fmt: skip
    _run_ours(opt, ours, 6)
    infty_opt = _run_infty(
        c_flat.C_Flat, theirs, {"rho": 0.1, "lamb": 0.2, "strategy": "plus", **trigger}, 6, BASE
    )
    _close(ours, theirs)
    assert opt.trigger["A"] == pytest.approx(float(infty_opt.A), rel=1e-9)


def test_gam_matches_infty():
    """INFTY's GAM defaults (beta_1 = 1, beta_2 = -1, beta_3 = 1, gamma = 0.3) and its radius-1
    gradient-norm ascent."""
    gam = pytest.importorskip("infty.optim.geometry_reshaping.gam")
    ours, theirs = _model(), _model()
    opt = cl_optim.GAM(ours.parameters(), torch.optim.SGD, rho=0.1, grad_norm_rho=1.0, grad_beta_1=1.0,
                       grad_beta_2=-1.0, grad_beta_3=1.0, grad_gamma=0.3, **BASE)  # fmt: skip
    _run_ours(opt, ours, 4)
    _run_infty(gam.GAM, theirs, {"rho": 0.1}, 4, BASE)
    _close(ours, theirs)


def test_infty_looksam_never_applies_its_correction_and_ours_does():
    """INFTY 0.1.2 stores `old_g` and reads `old_grad`: alpha changes nothing in its LookSAM
    (its reuse steps are plain SGD steps), while ours follows Algorithm 2."""
    looksam = pytest.importorskip("infty.optim.geometry_reshaping.looksam")
    runs = {}
    for alpha in (0.0, 0.7):
        theirs = _model()
        _run_infty(looksam.LookSAM, theirs, {"rho": 0.1, "k": 2, "alpha": torch.tensor(alpha)}, 5, BASE)
        ours = _model()
        _run_ours(
            cl_optim.LookSAM(ours.parameters(), torch.optim.SGD, rho=0.1, k=2, alpha=alpha, **BASE), ours, 5
        )
        runs[alpha] = (theirs, ours)
    _close(runs[0.0][0], runs[0.7][0], rtol=0, atol=0)  # theirs: the correction is never there
    assert (
        max((p - q).abs().max() for p, q in zip(runs[0.0][1].parameters(), runs[0.7][1].parameters())) > 1e-4
    )


@pytest.mark.parametrize("decouple", [False, True])
def test_wsam_matches_pytorch_optimizer(decouple):
    """pytorch_optimizer's WSAM is the same rule (its norm is accumulated otherwise: 1e-9)."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ours, theirs = _model(), _model()
    opt = cl_optim.WSAM(ours.parameters(), torch.optim.SGD, rho=0.05, gamma=0.7, decouple=decouple, **BASE)
    their_opt = pytorch_optimizer.WSAM(theirs, theirs.parameters(), torch.optim.SGD, rho=0.05, gamma=0.7,
                                       decouple=decouple, **BASE)  # fmt: skip
    _run_ours(opt, ours, 4)
    for i in range(4):
        x, y = _batch(i)
        their_opt.zero_grad()
        F.cross_entropy(theirs(x), y).backward()
        their_opt.first_step(zero_grad=True)
        F.cross_entropy(theirs(x), y).backward()
        their_opt.second_step(zero_grad=True)
    _close(ours, theirs, rtol=1e-8, atol=1e-9)


def _reference(variant, model, steps, **hyper):
    params0 = [p.detach().clone() for p in model.parameters()]

    def loss_at(params, t):
        x, y = _batch(t)
        h = torch.tanh(x @ params[0].T + params[1])
        return F.cross_entropy(h @ params[2].T + params[3], y)

    return run_reference(variant, params0, loss_at, steps, "sgd", BASE, **hyper)["params"]


def _distance(model, reference):
    return max((p.detach() - r).abs().max().item() for p, r in zip(model.parameters(), reference))


def test_friendly_sam_matches_the_official_order_and_pytorch_optimizer_4():
    """pytorch_optimizer 3.9 updated the mean with the corrected gradient; 4.x follows the official
    code, as we do (both within rounding of the reference)."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    hyper = dict(rho=0.1, sigma=1.0, lmbda=0.6)
    reference = _reference("friendly_sam", _model(), 5, **hyper)
    ours = _model()
    _run_ours(cl_optim.FriendlySAM(ours.parameters(), torch.optim.SGD, **hyper, **BASE), ours, 5)
    assert _distance(ours, reference) < 1e-10
    if int(importlib.metadata.version("pytorch_optimizer").split(".")[0]) >= 4:
        theirs = _model()
        _run_ours(
            pytorch_optimizer.FriendlySAM(theirs.parameters(), torch.optim.SGD, **hyper, **BASE), theirs, 5
        )
        _close(ours, theirs, rtol=1e-8, atol=1e-9)
