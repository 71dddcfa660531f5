"""The LSTM rule's step loops (cl_optim/fisher/lstm_steps.py): the cpp ops against the torch-op
oracle on every output, the forward against torch's own nn.LSTM, the refusals of bad input, and
an estimate through the rule's own forward against one through torch's."""

from __future__ import annotations

import pytest
import torch
from test_fisher_cut import Tokens
from test_fisher_routes import _batches
from torch import nn

from cl_optim import fisher
from cl_optim.fisher import lstm_steps, recurrent

CPP = lstm_steps.backend_for(torch.zeros(1)) == "cpp"
needs_cpp = pytest.mark.skipif(not CPP, reason="the C++ extension does not build here")
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _forward_inputs(dtype, steps=5, batch=3, hidden=4, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *shape: (torch.randn(*shape, generator=gen) * scale).to(dtype)  # noqa: E731
    gates = r(steps, batch, 4 * hidden)
    gates[0, 0, :4] = torch.tensor([0.0, 1e-8, -100.0, 100.0], dtype=dtype)  # both ends of tanh/sigmoid
    gates[1, 0, 2 * hidden : 2 * hidden + 3] = torch.tensor(
        [-0.6, 0.6, -30.0], dtype=dtype
    )  # tanh's two forms
    return gates, r(4 * hidden, hidden) * 0.5, r(batch, hidden), r(batch, hidden)


def _run_forward(backend, gates, w_hh, h0, c0, reverse, batch_first):
    steps, batch, hidden = gates.shape[0], gates.shape[1], gates.shape[2] // 4
    gates = gates.clone()
    if batch_first:  # the last layer's output is (B, T, H): time-first views are strided
        output = torch.full((batch, steps, hidden), float("nan"), dtype=gates.dtype).transpose(0, 1)
    else:
        output = torch.full((steps, batch, hidden), float("nan"), dtype=gates.dtype)
    states = torch.full((steps + 1, batch, hidden), float("nan"), dtype=gates.dtype)
    factors, through = torch.full_like(gates, float("nan")), torch.full_like(states[1:], float("nan"))
    lstm_steps.forward_steps_(gates, output, states, factors, through, w_hh, h0, c0, reverse, backend=backend)
    hidden = gates.shape[2] // 4
    defined = torch.cat([gates[..., : 2 * hidden], gates[..., 3 * hidden :]], -1)  # the g quarter is not
    return {"gates": defined, "output": output, "states": states, "factors": factors, "through": through}


@needs_cpp
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "strided_output"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_forward_steps_cpp_matches_the_oracle(dtype, reverse, batch_first):
    inputs = _forward_inputs(dtype)
    want = _run_forward("forloop", *inputs, reverse, batch_first)
    got = _run_forward("cpp", *inputs, reverse, batch_first)
    for name in want:
        assert not got[name].isnan().any(), name  # every element written
        torch.testing.assert_close(got[name], want[name], **TOL[dtype], msg=name)


@needs_cpp
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_backward_steps_cpp_matches_the_oracle(dtype, reverse):
    gates, w_hh, h0, c0 = _forward_inputs(dtype, seed=1)
    forward = _run_forward("forloop", gates, w_hh, h0, c0, reverse, False)
    steps, batch, hidden = gates.shape[0], gates.shape[1], gates.shape[2] // 4
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(steps, batch, 2 * hidden, generator=gen).to(dtype)
    d_own = wide[..., hidden:]  # a direction's half of a bidirectional layer's gradient: strided
    dh_last, dc_last = torch.randn(2, batch, hidden, generator=gen).to(dtype)
    results = {}
    for backend in ("forloop", "cpp"):
        factors = forward["factors"].clone()
        dz = torch.full_like(factors, float("nan"))
        full_gates = torch.zeros(steps, batch, 4 * hidden, dtype=dtype)
        full_gates[..., hidden : 2 * hidden] = forward["gates"][..., hidden : 2 * hidden]  # f
        lstm_steps.backward_steps_(
            dz,
            factors,
            forward["through"],
            full_gates,
            d_own,
            w_hh,
            dh_last,
            dc_last,
            reverse,
            backend=backend,
        )
        torch.testing.assert_close(factors, forward["factors"], rtol=0, atol=0)  # only read
        results[backend] = dz
    assert not results["cpp"].isnan().any()
    torch.testing.assert_close(results["cpp"], results["forloop"], **TOL[dtype])


CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=2, bidirectional=True),
    dict(num_layers=2, batch_first=True, bias=False),
    dict(num_layers=1, bidirectional=True, batch_first=True),
]


@pytest.mark.parametrize("given_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("backend", ["forloop", pytest.param("cpp", marks=needs_cpp)])
def test_forward_keeping_gates_is_torchs_lstm(backend, config, given_state):
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 4, **config).eval()
    batch_first = config.get("batch_first", False)
    x = torch.randn((3, 6, 5) if batch_first else (6, 3, 5)) * 2
    states = 2 * config["num_layers"] if config.get("bidirectional") else config["num_layers"]
    hx = (torch.randn(states, 3, 4), torch.randn(states, 3, 4)) if given_state else None
    (out, (h, c)), inputs, kept = lstm_steps.lstm_forward_keeping_gates(lstm, x, hx, backend=backend)
    with torch.no_grad():
        want, (h_want, c_want) = lstm(x, hx)
    assert out.shape == want.shape and out.is_contiguous()
    for got_t, want_t in ((out, want), (h, h_want), (c, c_want)):
        torch.testing.assert_close(got_t, want_t, rtol=1e-5, atol=1e-6)
    assert len(inputs) == config["num_layers"] + 1 and set(kept) == {
        (layer, d)
        for layer in range(config["num_layers"])
        for d in range(2 if config.get("bidirectional") else 1)
    }


@needs_cpp
def test_the_step_ops_refuse_bad_input():
    gates, w_hh, h0, c0 = _forward_inputs(torch.float32)
    steps, batch, hidden = gates.shape[0], gates.shape[1], gates.shape[2] // 4
    out = torch.empty(steps, batch, hidden)
    states, factors, through = (
        torch.empty(steps + 1, batch, hidden),
        torch.empty_like(gates),
        torch.empty_like(out),
    )
    forward = torch.ops.cl_optim.lstm_forward_steps_
    with pytest.raises(RuntimeError, match="states has shape"):
        forward(gates, out, states[:-1], factors, through, w_hh, h0, c0, False)
    with pytest.raises(RuntimeError, match="w_hh is Double"):
        forward(gates, out, states, factors, through, w_hh.double(), h0, c0, False)
    with pytest.raises(RuntimeError, match="factors must be contiguous"):
        forward(
            gates,
            out,
            states,
            factors.transpose(0, 1).contiguous().transpose(0, 1),
            through,
            w_hh,
            h0,
            c0,
            False,
        )
    with pytest.raises(RuntimeError, match="fp32 or fp64"):
        forward(gates.half(), out, states, factors, through, w_hh, h0, c0, False)
    with pytest.raises(RuntimeError, match="output shares memory with through"):
        forward(gates, out, states, factors, out, w_hh, h0, c0, False)
    with pytest.raises(RuntimeError, match="gates shares memory with factors"):
        forward(gates, out, states, gates, through, w_hh, h0, c0, False)
    with pytest.raises(RuntimeError, match="dz shares memory with factors"):
        torch.ops.cl_optim.lstm_backward_steps_(factors, factors, through, gates, out, w_hh, h0, c0, False)
    with pytest.raises(ValueError, match="no 'triton' implementation"):
        lstm_steps.forward_steps_(gates, out, states, factors, through, w_hh, h0, c0, False, backend="triton")
    torch.testing.assert_close(gates, _forward_inputs(torch.float32)[0], rtol=0, atol=0)  # nothing written


@needs_cpp
def test_opcheck_the_step_ops():
    """Schemas (what each op writes), fake kernels (torch.compile) and the dispatcher's view."""
    gates, w_hh, h0, c0 = _forward_inputs(torch.float32)
    steps, batch, hidden = gates.shape[0], gates.shape[1], gates.shape[2] // 4
    out, states = torch.empty(steps, batch, hidden), torch.empty(steps + 1, batch, hidden)
    factors, through = torch.empty_like(gates), torch.empty(steps, batch, hidden)
    torch.library.opcheck(
        torch.ops.cl_optim.lstm_forward_steps_.default,
        (gates, out, states, factors, through, w_hh, h0, c0, True),
    )
    dz = torch.empty_like(gates)
    torch.library.opcheck(
        torch.ops.cl_optim.lstm_backward_steps_.default,
        (dz, factors, through, gates, torch.randn(steps, batch, hidden), w_hh, h0, c0, False),
    )


@needs_cpp
@pytest.mark.parametrize("estimator", ["empirical", "exact"])
def test_estimate_through_the_own_forward_matches_torchs(monkeypatch, estimator):
    """The rule's own forward (gates kept, the cpp ops) against torch's fused forward with the
    gates made again (the path without the op): the same Fisher to fp32 rounding, over several
    seeds (``exact``: the backward runs once per class on one forward)."""
    torch.manual_seed(4)
    model = Tokens(nn.LSTM, num_layers=2, bidirectional=True)
    data = _batches((7,), 3, tokens=9)
    own = fisher.estimate(model, data, estimator=estimator, reuse_plan=False)
    monkeypatch.setattr(recurrent, "keeps_gates", lambda module, x: False)
    fused = fisher.estimate(model, data, estimator=estimator, reuse_plan=False)
    for name in own:
        torch.testing.assert_close(own[name], fused[name], rtol=1e-4, atol=1e-9)
