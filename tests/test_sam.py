"""cl_optim.SAM: the davda54 / pytorch_optimizer contract, checkpoints, errors and skipped steps."""

from __future__ import annotations

import io

import pytest
import pytorch_optimizer
import torch

import cl_optim

BASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    (cl_optim.SGD, dict(lr=0.1, momentum=0.9)),
    (torch.optim.AdamW, dict(lr=1e-2)),
    (cl_optim.AdamW, dict(lr=1e-2)),
]
BASE_IDS = ["torch.SGD", "cl_optim.SGD", "torch.AdamW", "cl_optim.AdamW"]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batch(i):
    gen = torch.Generator().manual_seed(i)
    return torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)


def _loss(model, i):
    x, y = _batch(i)
    return torch.nn.functional.mse_loss(model(x), y)


def _two_step(model, opt, steps, start=0):
    for i in range(start, start + steps):
        _loss(model, i).backward()
        opt.first_step(zero_grad=True)
        _loss(model, i).backward()
        opt.second_step(zero_grad=True)


def _closure_steps(model, opt, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i).backward()

        def closure(i=i):
            opt.zero_grad()
            loss = _loss(model, i)
            loss.backward()
            return loss

        opt.step(closure)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b, **tol):
    tol = tol or dict(rtol=0, atol=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


@pytest.mark.parametrize("adaptive", [False, True, "official"])
@pytest.mark.parametrize("base,kwargs", BASES, ids=BASE_IDS)
def test_closure_path_equals_two_step_path_bit_for_bit(base, kwargs, adaptive):
    m1, m2 = _model(), _model()
    _two_step(m1, cl_optim.SAM(m1.parameters(), base, rho=0.1, adaptive=adaptive, **kwargs), 6)
    _closure_steps(m2, cl_optim.SAM(m2.parameters(), base, rho=0.1, adaptive=adaptive, **kwargs), 6)
    _assert_same(_params(m1), _params(m2))


@pytest.mark.parametrize("backend", ["forloop", "foreach"])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("base,kwargs", BASES, ids=BASE_IDS)
def test_trajectory_matches_pytorch_optimizer_sam(base, kwargs, adaptive, backend):
    torch_base = {cl_optim.SGD: torch.optim.SGD, cl_optim.AdamW: torch.optim.AdamW}.get(base, base)
    ref_model, model = _model(), _model()
    ref = pytorch_optimizer.SAM(ref_model.parameters(), torch_base, rho=0.1, adaptive=adaptive, **kwargs)
    ours = cl_optim.SAM(model.parameters(), base, rho=0.1, adaptive=adaptive, backend=backend, **kwargs)
    start = _params(model)
    _two_step(ref_model, ref, 10)
    _two_step(model, ours, 10)
    _assert_same(_params(model), _params(ref_model), rtol=1e-6, atol=1e-7)
    assert max((a - b).abs().max() for a, b in zip(_params(model), start)) > 1e-2


def test_official_asam_normalises_weights_only_and_eta_is_an_option():
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 0.0]]))
    b = torch.nn.Parameter(torch.tensor([3.0, -1.0]))
    g_w, g_b = torch.tensor([[0.1, 0.2], [-0.3, 0.4]]), torch.tensor([0.5, -0.6])
    for adaptive, eta, t_w, t_b in [
        ("official", None, w.detach().abs() + 0.01, torch.ones(2)),
        ("official", 0.5, w.detach().abs() + 0.5, torch.ones(2)),
        (True, None, w.detach().abs(), b.detach().abs()),
    ]:
        ww, bb = (torch.nn.Parameter(t.detach().clone()) for t in (w, b))
        opt = cl_optim.SAM([ww, bb], torch.optim.SGD, rho=0.2, adaptive=adaptive, eta=eta, lr=0.1)
        ww.grad, bb.grad = g_w.clone(), g_b.clone()
        opt.first_step()
        norm = torch.cat([(t_w * g_w).flatten(), t_b * g_b]).norm()
        torch.testing.assert_close(ww.detach(), w.detach() + 0.2 * t_w**2 * g_w / norm)
        torch.testing.assert_close(bb.detach(), b.detach() + 0.2 * t_b**2 * g_b / norm)
        opt.second_step()


def test_restore_is_in_place_and_the_save_buffer_is_reused_not_saved():
    model = _model()
    opt = cl_optim.SAM(model.parameters(), cl_optim.SGD, lr=0.1, momentum=0.9)
    ptrs = [p.data_ptr() for p in model.parameters()]
    _two_step(model, opt, 1)
    buffers = {id(p): opt._saved[id(p)].data_ptr() for p in model.parameters()}
    _two_step(model, opt, 3, start=1)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert {id(p): opt._saved[id(p)].data_ptr() for p in model.parameters()} == buffers
    state = opt.state_dict()
    assert all(set(s) == {"momentum_buffer"} for s in state["state"].values())
    assert len(state["state"]) == 4 and state["sam"] == {"steps": 4}


def test_restore_is_bitwise_exact_in_bf16():
    p = torch.nn.Parameter(torch.randn(1000).to(torch.bfloat16))
    before = p.detach().clone()
    opt = cl_optim.SAM([p], cl_optim.SGD, rho=0.5, lr=0.0)
    p.grad = torch.randn(1000).to(torch.bfloat16)
    opt.first_step()
    assert not torch.equal(p.detach(), before)
    p.grad = torch.randn(1000).to(torch.bfloat16)
    opt.second_step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("base,kwargs", BASES, ids=BASE_IDS)
def test_resume_from_checkpoint_reproduces_trajectory(base, kwargs):
    model = _model()
    opt = cl_optim.SAM(model.parameters(), base, rho=0.05, **kwargs)
    _two_step(model, opt, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    state = opt.state_dict()["state"]
    assert {"momentum_buffer"} <= set(state[0]) or {"exp_avg", "exp_avg_sq"} <= set(state[0])
    _two_step(model, opt, 5, start=5)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = _model(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    opt2 = cl_optim.SAM(resumed.parameters(), base, rho=0.05, **kwargs)
    opt2.load_state_dict(checkpoint["opt"])
    assert opt2.steps == 5
    _two_step(resumed, opt2, 5, start=5)
    _assert_same(_params(resumed), _params(model))


def test_scheduler_and_add_param_group_act_on_the_base_optimizer():
    model = _model()
    opt = cl_optim.SAM(model[0].parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.add_param_group({"params": model[2].parameters(), "rho": 0.2})
    assert opt.base_optimizer.param_groups[1]["momentum"] == 0.9
    assert opt.base_optimizer.param_groups[1]["rho"] == 0.2
    _two_step(model, opt, 1)
    sched.step()
    assert [g["lr"] for g in opt.base_optimizer.param_groups] == [0.05, 0.1 * 0.5]
    assert all("momentum_buffer" in opt.base_optimizer.state[p] for p in model.parameters())


def test_nonfinite_first_pass_skips_the_step_without_host_sync(monkeypatch):
    # The Python perturbation path (what runs on devices without a compiled kernel); the cpp
    # kernels take their scalars as host numbers, which for CPU tensors is no synchronisation.
    model = _model()
    opt = cl_optim.SAM(model.parameters(), cl_optim.SGD, lr=0.1, momentum=0.9, backend="foreach")
    _two_step(model, opt, 2)
    before = _params(model)
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    _loss(model, 2).backward()
    next(model.parameters()).grad[0, 0] = float("nan")

    def no_sync(*args, **kwargs):
        raise AssertionError("first_step read a device value on the host")

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "item", no_sync)
        patch.setattr(torch.Tensor, "__bool__", no_sync)
        opt.first_step(zero_grad=True)
    _assert_same(_params(model), before)  # nothing perturbed
    _loss(model, 2).backward()
    opt.second_step(zero_grad=True)
    assert bool(opt.last_step_skipped)
    _assert_same(_params(model), before)
    _assert_same([opt.state[p]["momentum_buffer"] for p in model.parameters()], momentum)
    _two_step(model, opt, 1, start=3)  # and training goes on
    assert not bool(opt.last_step_skipped)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_first_pass_with_a_torch_base_is_skipped_too():
    model = _model()
    opt = cl_optim.SAM(model.parameters(), torch.optim.AdamW, lr=0.1)
    _two_step(model, opt, 1)
    before = _params(model)
    _loss(model, 1).backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    opt.first_step(zero_grad=True)
    _loss(model, 1).backward()
    opt.second_step(zero_grad=True)
    assert bool(opt.last_step_skipped)
    _assert_same(_params(model), before)


# ------------------------------------------------------------------------------------ bad input


def _unchanged(model, before):
    _assert_same(_params(model), before)


def test_bad_construction_raises():
    model = _model()
    with pytest.raises(ValueError, match="Invalid rho"):
        cl_optim.SAM(model.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="Invalid adaptive"):
        cl_optim.SAM(model.parameters(), torch.optim.SGD, adaptive="asam2", lr=0.1)
    with pytest.raises(TypeError, match="class"):
        cl_optim.SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="more than one parameter group"):
        params = list(model.parameters())
        cl_optim.SAM([{"params": params}, {"params": params[:1]}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="set fisher_ema=beta"):
        cl_optim.SAM(model.parameters(), torch.optim.SGD, adaptive="fisher_ema", lr=0.1)
    with pytest.raises(ValueError, match="Invalid eta"):
        cl_optim.SAM(model.parameters(), torch.optim.SGD, adaptive="fisher", eta=-1.0, lr=0.1)
    opt = cl_optim.SAM(model[0].parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="Invalid rho"):
        opt.add_param_group({"params": model[2].parameters(), "rho": -1.0})
    with pytest.raises(ValueError, match="set fisher_ema=beta"):
        opt.add_param_group({"params": model[2].parameters(), "adaptive": "fisher_ema"})
    assert len(opt.param_groups) == 1


def test_fisher_sam_weight_kinds_are_checked():
    from cl_optim.sam import FISHER_RUNNING, grad_sq_norm, sam_perturb_

    g, p = [torch.ones(3)], [torch.zeros(3)]
    with pytest.raises(RuntimeError, match="needs `fisher`"):
        grad_sq_norm(g, p, [FISHER_RUNNING], 1.0)
    with pytest.raises(RuntimeError, match="weight kind 7 is not 0"):
        sam_perturb_(p, g, [torch.empty(3)], torch.tensor(1.0), [7], 1.0)
    with pytest.raises(RuntimeError, match="weighted has 2 entries for 1 grads"):
        grad_sq_norm(g, p, [1, 1], 1.0)
    assert torch.equal(p[0], torch.zeros(3))


def test_fisher_ema_sam_perturbs_less_along_high_fisher_directions():
    """Two coordinates with the same gradient: the one with the larger running Fisher moves less,
    by the ratio (1 + eta*F_small) / (1 + eta*F_large)."""
    w = torch.nn.Parameter(torch.zeros(2))
    opt = cl_optim.SAM([w], cl_optim.SGD, rho=0.1, adaptive="fisher_ema", eta=1.0, fisher_ema=0.5, lr=0.1)
    opt.state[w]["fisher_ema"] = torch.tensor([0.0, 3.0])
    w.grad = torch.tensor([1.0, 1.0])
    opt.first_step()
    e = w.detach().clone()
    assert e[0] / e[1] == pytest.approx(4.0, rel=1e-6)
    assert float(e.square().div(torch.tensor([1.0, 0.25])).sum()) == pytest.approx(
        0.01, rel=1e-5
    )  # ||T^-1 e|| = rho
    torch.testing.assert_close(opt.state[w]["fisher_ema"], torch.tensor([0.5, 2.0]))  # updated after use
    opt.second_step()


def test_sparse_gradients_are_rejected_with_params_unchanged():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = cl_optim.SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    before = _params(emb)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.first_step()
    _unchanged(emb, before)
    assert opt._run["pending"] is None


def test_closure_without_backward_raises_and_restores():
    model = _model()
    opt = cl_optim.SAM(model.parameters(), cl_optim.SGD, lr=0.1, momentum=0.9)
    before = _params(model)
    _loss(model, 0).backward()
    with pytest.raises(RuntimeError, match="did not call backward"):
        opt.step(lambda: _loss(model, 0))
    _unchanged(model, before)
    assert not opt.state  # no update, no momentum
    _closure_steps(model, opt, 1)  # the optimizer is still usable


def test_failing_closure_restores_the_weights():
    model = _model()
    opt = cl_optim.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    before = _params(model)
    _loss(model, 0).backward()

    def closure():
        raise KeyError("data loader died")

    with pytest.raises(KeyError):
        opt.step(closure)
    _unchanged(model, before)


def test_step_order_errors_leave_params_unchanged():
    model = _model()
    opt = cl_optim.SAM(model.parameters(), cl_optim.AdamW, lr=0.1)
    before = _params(model)
    _loss(model, 0).backward()
    with pytest.raises(RuntimeError, match="without a pending first_step"):
        opt.second_step()
    _unchanged(model, before)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    opt.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="weights are perturbed"):
        opt.state_dict()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="no gradient at the perturbed weights"):
        opt.second_step()
    _unchanged(model, before)
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.first_step()


def test_a_plain_base_optimizer_state_dict_loads_into_sam():
    """Switching an existing run to SAM keeps its momentum: torch.optim.SGD's state dict loads."""
    model = _model()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(3):
        _loss(model, i).backward()
        plain.step()
        plain.zero_grad()
    opt = cl_optim.SAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.1, momentum=0.9)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["rho"] == 0.07 and opt.steps == 0
    for p in model.parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], plain.state[p]["momentum_buffer"])
    _two_step(model, opt, 2, start=3)
    assert opt.base_optimizer.state is opt.state


@pytest.mark.parametrize("backend", ["forloop", "foreach", "cpp"])
def test_parameter_with_a_gradient_only_in_the_second_pass_is_updated_from_its_own_value(backend):
    """A tensor that was not perturbed (no first-pass gradient) but has a second-pass gradient is
    updated like any other, from its unperturbed value; the perturbed one is restored first."""
    w1, w2 = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.full((2,), 2.0))
    opt = cl_optim.SAM([w1, w2], cl_optim.SGD, rho=0.1, lr=0.5, backend=backend)
    w1.grad = torch.tensor([1.0, 0.0, 0.0])
    opt.first_step(zero_grad=True)
    assert not torch.equal(w1.detach(), torch.ones(3)) and torch.equal(w2.detach(), torch.full((2,), 2.0))
    w1.grad, w2.grad = torch.ones(3), torch.ones(2)
    opt.second_step()
    torch.testing.assert_close(w1.detach(), torch.full((3,), 0.5))  # restored to 1, then 1 - 0.5 * 1
    torch.testing.assert_close(w2.detach(), torch.full((2,), 1.5))
