"""cl_optim.SGD / AdamW as drop-ins for torch.optim: numbers, state names, state dicts, schedulers."""

from __future__ import annotations

import io

import pytest
import torch

import cl_optim
from cl_optim._backend import COMPILED, resolve


def _runs_on_cpu(name):
    try:
        return resolve(name, torch.device("cpu"), torch.float32) == name
    except RuntimeError:
        return False


COMPILED_ON_CPU = [name for name in COMPILED if _runs_on_cpu(name)]
# What fused=True picks on CPU: Triton runs CPU tensors only under its interpreter (the tests set
# TRITON_INTERPRET=1) and is never picked by fused/auto there.
FUSED_ON_CPU = [name for name in COMPILED_ON_CPU if name != "triton"]
AUTO_ON_CPU = resolve("auto", torch.device("cpu"), torch.float32)

SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.7, dampening=0.2, weight_decay=1e-3, maximize=True),
    dict(lr=torch.tensor(0.05), momentum=0.9),
]
ADAMW_CASES = [
    dict(lr=1e-2),
    dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True),
    dict(lr=3e-3, weight_decay=0.0, maximize=True),
    dict(lr=torch.tensor(1e-2), amsgrad=True),
]
PAIRS = [(torch.optim.SGD, cl_optim.SGD, c) for c in SGD_CASES] + [
    (torch.optim.AdamW, cl_optim.AdamW, c) for c in ADAMW_CASES
]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_equal_state(a, b, **tolerance):
    """Same keys and values; bit for bit unless a tolerance is given (``{}``: fp32 defaults)."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tolerance)


@pytest.mark.parametrize("backend", ["forloop", "foreach", *COMPILED_ON_CPU])
@pytest.mark.parametrize("torch_cls,ours_cls,kwargs", PAIRS)
def test_same_numbers_and_state_as_torch(torch_cls, ours_cls, kwargs, backend):
    ref_model, model = _model(), _model()
    ref = torch_cls(ref_model.parameters(), **kwargs)
    ours = ours_cls(model.parameters(), backend=backend, **kwargs)
    _train(ref_model, ref, 12)
    _train(model, ours, 12)
    # The Python backends run torch's own ops: bit for bit. A compiled kernel rounds its fp32
    # intermediates its own way (torch's CPU kernels use FMA): assert_close's fp32 defaults.
    exact = {} if backend in COMPILED_ON_CPU else dict(rtol=0, atol=0)
    for a, b in zip(_params(ref_model), _params(model)):
        torch.testing.assert_close(b, a, **exact)
    for p_ref, p in zip(ref_model.parameters(), model.parameters()):
        _assert_equal_state(ref.state[p_ref], ours.state[p], **exact)  # step counts: exact either way
    assert ours.backends_used == {"cpu/torch.float32": backend}


@pytest.mark.parametrize("torch_cls,ours_cls,kwargs", PAIRS)
def test_state_dict_moves_both_ways(torch_cls, ours_cls, kwargs):
    """torch -> cl_optim -> torch mid-training, each continuing the other's trajectory exactly."""
    m_torch, m_ours = _model(), _model()
    opt_torch = torch_cls(m_torch.parameters(), **kwargs)
    _train(m_torch, opt_torch, 5)
    m_ours.load_state_dict(m_torch.state_dict())
    opt_ours = ours_cls(m_ours.parameters(), backend="foreach", **kwargs)  # bit for bit with torch
    opt_ours.load_state_dict(_roundtrip(opt_torch.state_dict()))
    _train(m_torch, opt_torch, 5, start=5)
    _train(m_ours, opt_ours, 5, start=5)
    for a, b in zip(_params(m_torch), _params(m_ours)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    # ... and back into a fresh torch optimizer.
    m_back = _model()
    m_back.load_state_dict(m_ours.state_dict())
    opt_back = torch_cls(m_back.parameters(), **kwargs)
    opt_back.load_state_dict(_roundtrip(opt_ours.state_dict()))
    _train(m_back, opt_back, 3, start=10)
    _train(m_ours, opt_ours, 3, start=10)
    for a, b in zip(_params(m_back), _params(m_ours)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    "ours_cls,torch_cls", [(cl_optim.SGD, torch.optim.SGD), (cl_optim.AdamW, torch.optim.AdamW)]
)
def test_lr_scheduler_and_param_groups(ours_cls, torch_cls):
    results = []
    for cls in (torch_cls, ours_cls):
        model = _model()
        groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}]
        opt = cls(groups, lr=0.1) if cls is torch_cls else cls(groups, lr=0.1, backend="foreach")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for i in range(6):
            _train(model, opt, 1, start=i)
            sched.step()
        results.append((_params(model), [g["lr"] for g in opt.param_groups]))
    assert results[0][1] == results[1][1] == [0.0125, 0.0025]
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_add_param_group_uses_defaults():
    model = _model()
    opt = cl_optim.AdamW(model[0].parameters(), lr=0.01, weight_decay=0.0)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.1})
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[1]["lr"] == 0.1
    _train(model, opt, 2)
    assert all(len(opt.state[p]) == 3 for p in model.parameters())


def test_bad_hyperparameters_raise():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="learning rate"):
        cl_optim.SGD(params, lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        cl_optim.SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        cl_optim.AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="unknown backend 'cuda2'"):
        cl_optim.AdamW(params, backend="cuda2")
    with pytest.raises(ValueError, match="more than one parameter group"):
        cl_optim.SGD([{"params": params}, {"params": params}], lr=0.1)


def test_unavailable_backend_raises_its_reason_and_leaves_params():
    p = torch.nn.Parameter(torch.ones(3))
    opt = cl_optim.SGD([p], lr=0.1, backend="cuda")
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="backend .cuda. cannot run.*CUDA tensors, not cpu"):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    fused = cl_optim.AdamW([p], fused=True)
    fused.step()
    assert fused.backends_used == {"cpu/torch.float32": FUSED_ON_CPU[0]} if FUSED_ON_CPU else True


def test_torch_foreach_keyword_selects_backend():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    for flag, expected in ((True, "foreach"), (False, "forloop")):
        opt = cl_optim.SGD([p], lr=0.1, foreach=flag)
        opt.step()
        assert opt.backends_used == {"cpu/torch.float32": expected}


def test_sparse_gradient_is_rejected_before_any_change():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Parameter(torch.ones(4))
    opt = cl_optim.SGD([dense, emb.weight], lr=0.1)
    before = emb.weight.detach().clone()
    dense.grad = torch.ones(4)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(dense.detach(), torch.ones(4)) and torch.equal(emb.weight.detach(), before)


def test_mixed_dtypes_are_bucketed_and_recorded():
    a = torch.nn.Parameter(torch.ones(4))
    b = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = cl_optim.AdamW([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(4), torch.ones(4, dtype=torch.bfloat16)
    opt.step()
    assert opt.backends_used == {"cpu/torch.float32": AUTO_ON_CPU, "cpu/torch.bfloat16": AUTO_ON_CPU}
    assert opt.state[b]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(b.detach().float(), a.detach(), rtol=0, atol=4e-3)


def test_report_names_every_backend():
    text = cl_optim.report(file=io.StringIO())
    for name in ("cuda", "triton", "cpp", "foreach", "forloop"):
        assert f"  {name} " in text
    assert "foreach  cpu   available" in text
    assert "cuda     cpu   unavailable: " in text
