"""GSAM (Zhuang et al., ICLR 2022) against the paper's rule written here on flattened vectors, and
against INFTY 0.1.2's GSAM where INFTY is installed (`.ci/run` installs it with --no-deps)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import cl_optim
from cl_optim._backend import _REGISTRY


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    return model, lambda: F.cross_entropy(model(x), y)


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def reference_gsam_gradient(model, loss_fn, rho, alpha, adaptive=False, eps=1e-12):
    """The GSAM gradient at the current weights, from the paper: ascend along g1 (ASAM: T = |w|),
    take g2 there, remove alpha times g1's part orthogonal to g2."""
    params = list(model.parameters())
    g1 = _flat(torch.autograd.grad(loss_fn(), params))
    w = _flat([p.detach() for p in params])
    weight = w.abs() if adaptive else torch.ones_like(w)
    e = rho * weight**2 * g1 / ((weight * g1).norm() + eps)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(w + e, params)
    g2 = _flat(torch.autograd.grad(loss_fn(), params))
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(w, params)
    cosine = (g1 @ g2) / (g1.norm() * g2.norm() + eps)
    vertical = g1 - cosine * g1.norm() * g2 / (g2.norm() + eps)
    return g2 - alpha * vertical


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 2.0])
def test_three_steps_match_the_paper_rule(alpha, adaptive):
    model, loss_fn = _model()
    ref_model = copy.deepcopy(model)
    torch.manual_seed(1)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    loss_fn = lambda: F.cross_entropy(model(x), y)
    ref_loss = lambda: F.cross_entropy(ref_model(x), y)
    opt = cl_optim.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, alpha=alpha, adaptive=adaptive,
                        lr=0.2, momentum=0.9)  # fmt: skip
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.2, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step(lambda: (opt.zero_grad(), loss_fn().backward()))
        grad = reference_gsam_gradient(ref_model, ref_loss, 0.1, alpha, adaptive)
        at = 0
        for p in ref_model.parameters():
            p.grad = grad[at : at + p.numel()].view_as(p).clone()
            at += p.numel()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"],
                                   rtol=1e-12, atol=1e-13)  # fmt: skip


def _candidates():
    names = ["foreach"]
    if _REGISTRY["cpp"].unavailable_reason(torch.device("cpu"), torch.float32) is None:
        names.append("cpp")
    return names


@pytest.mark.parametrize("backend", _candidates())
def test_backends_match_the_oracle_with_the_fused_base(backend):
    runs = {}
    for name in ("forloop", backend):
        model, loss_fn = _model()
        model.float()
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        loss_fn = lambda model=model, x=x, y=y: F.cross_entropy(model(x), y)
        torch.manual_seed(3)
        opt = cl_optim.GSAM(model.parameters(), cl_optim.AdamW, rho=0.05, alpha=0.4, lr=1e-2, backend=name)
        for _ in range(4):
            opt.zero_grad()
            loss_fn().backward()
            opt.first_step(zero_grad=True)
            loss_fn().backward()
            opt.second_step(zero_grad=True)
        runs[name] = [p.detach().clone() for p in model.parameters()] + [
            opt.state[p][key].clone() for p in model.parameters() for key in ("exp_avg", "exp_avg_sq")
        ]
    for a, b in zip(runs["forloop"], runs[backend]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_rho_follows_the_learning_rate():
    model, loss_fn = _model()
    opt = cl_optim.GSAM(model.parameters(), torch.optim.SGD, rho=0.2, rho_min=0.02, lr=0.4)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for expected in (0.2, 0.02 + 0.18 * 0.5, 0.02 + 0.18 * 0.25):
        opt.zero_grad()
        loss_fn().backward()
        opt.first_step(zero_grad=True)
        assert opt.param_groups[0]["rho"] == pytest.approx(expected, rel=1e-12)
        loss_fn().backward()
        opt.second_step(zero_grad=True)
        scheduler.step()
    with pytest.raises(ValueError, match="rho_min"):
        cl_optim.GSAM(model.parameters(), torch.optim.SGD, rho=0.1, rho_min=0.2, lr=0.1)
    with pytest.raises(ValueError, match="alpha"):
        cl_optim.GSAM(model.parameters(), torch.optim.SGD, alpha=-1.0, lr=0.1)


def test_a_nonfinite_second_pass_skips_the_step():
    model, loss_fn = _model()
    opt = cl_optim.GSAM(model.parameters(), cl_optim.SGD, rho=0.05, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss_fn().backward()
    opt.first_step(zero_grad=True)
    (loss_fn() * float("nan")).backward()
    opt.second_step(zero_grad=True)
    assert bool(opt.last_step_skipped)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_checkpoint_resumes_exactly():
    a, loss_a = _model()
    opt_a = cl_optim.GSAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

    def step(opt, loss_fn):
        opt.zero_grad()
        loss_fn().backward()
        opt.first_step(zero_grad=True)
        loss_fn().backward()
        opt.second_step(zero_grad=True)

    step(opt_a, loss_a)
    b, loss_b = _model()
    b.load_state_dict(a.state_dict())
    opt_b = cl_optim.GSAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for _ in range(2):
        step(opt_a, loss_a)
        step(opt_b, loss_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_matches_infty():
    """INFTY 0.1.2's GSAM implements the official rule (its unperturb subtracts e instead of
    restoring a copy: rounding only)."""
    infty = pytest.importorskip("infty.optim.geometry_reshaping.gsam")
    ours_model, loss_ours = _model()
    theirs_model, _ = _model()
    torch.manual_seed(1)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    loss_ours = lambda: F.cross_entropy(ours_model(x), y)
    base = torch.optim.SGD(theirs_model.parameters(), lr=0.1, momentum=0.9)
    theirs = infty.GSAM(theirs_model.parameters(), base, theirs_model, {"rho": 0.05, "alpha": 0.4})

    def their_closure():
        theirs.zero_grad()
        loss = F.cross_entropy(theirs_model(x), y)
        loss.backward()
        return None, [loss]

    ours = cl_optim.GSAM(ours_model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1, momentum=0.9)
    for _ in range(3):
        theirs.step(closure=their_closure)
        ours.zero_grad()
        loss_ours().backward()
        ours.step(lambda: (ours.zero_grad(), loss_ours().backward()))
    for p, q in zip(ours_model.parameters(), theirs_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
