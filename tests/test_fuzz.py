"""Property-based fuzzing (hypothesis): random models, hyper-parameters and terms, every backend
against the forloop oracle; random state-dict round trips mid-run; random malformed inputs that
must raise, never crash or change anything.

Bounded for CI: a fixed number of examples per property, derandomized (the same examples every
run, so a failure reproduces); ``HYPOTHESIS_PROFILE=long`` runs many more, with fresh examples.
"""

from __future__ import annotations

import io
import os

import pytest
import torch
from conftest import assert_close_lowp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_op_checks import ALIGNED, _assert_unchanged, _snapshot, _valid
from test_op_checks import AVAILABLE as OP_BACKENDS
from test_op_checks import BACKENDS as CALL_OP

import cl_optim

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.register_profile("long", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

STEP_BACKENDS = [b for b in OP_BACKENDS if b != "forloop"]
LOWP_ATOL = {torch.bfloat16: 3e-2, torch.float16: 3e-3}


# ------------------------------------------------------------------------------ strategies


@st.composite
def models(draw):
    """A list of parameter specs: shape (0-3 dims, sizes 0-9), transposed or not, with a gradient or not."""
    n = draw(st.integers(1, 5))
    specs = []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
        transposed = len(shape) == 2 and draw(st.booleans())
        specs.append((shape, transposed, draw(st.booleans()) or not specs))
    return specs


@st.composite
def setups(draw):
    kind = draw(st.sampled_from(["sgd", "adamw", "sam_sgd", "sam_adamw"]))
    if kind.endswith("sgd"):
        momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
        nesterov = momentum > 0 and draw(st.booleans())
        hyper = dict(lr=draw(st.floats(1e-3, 0.3)), momentum=momentum, nesterov=nesterov,
                     dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.3])),
                     weight_decay=draw(st.sampled_from([0.0, 1e-2])))  # fmt: skip
    else:
        hyper = dict(lr=draw(st.floats(1e-4, 3e-2)), betas=(draw(st.sampled_from([0.0, 0.5, 0.9])),
                     draw(st.sampled_from([0.9, 0.99, 0.999]))), eps=draw(st.sampled_from([1e-8, 1e-6, 1e-3])),
                     weight_decay=draw(st.sampled_from([0.0, 1e-2])), amsgrad=draw(st.booleans()))  # fmt: skip
    hyper["maximize"] = draw(st.booleans())
    fisher_ema = draw(st.sampled_from([None, 0.9]))
    if kind.startswith("sam"):
        hyper["rho"] = draw(st.sampled_from([0.0, 0.05, 0.5]))
        hyper["adaptive"] = draw(
            st.sampled_from([False, True, "official", "fisher"] + (["fisher_ema"] if fisher_ema else []))
        )
    return dict(
        kind=kind,
        hyper=hyper,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        specs=draw(models()),
        two_groups=draw(st.booleans()),
        fisher_ema=fisher_ema,
        ewc=draw(st.booleans()),
        amp=draw(st.sampled_from([None, "finite", "overflow_at_1"])),
        steps=draw(st.integers(1, 4)),
        reload_at=draw(st.sampled_from([None, 0, 1, 2])),
        seed=draw(st.integers(0, 2**16)),
    )


# ------------------------------------------------------------------------------- the runs


def _params(setup, dtype):
    gen = torch.Generator().manual_seed(setup["seed"])
    params = []
    for shape, transposed, _ in setup["specs"]:
        full = torch.randn(tuple(reversed(shape)) if transposed else shape, generator=gen)
        params.append(torch.nn.Parameter((full.t() if transposed else full).to(dtype)))
    return params


def _grads(setup, params, step):
    gen = torch.Generator().manual_seed(setup["seed"] + 1000 * (step + 1))
    return [torch.randn(p.shape, generator=gen) if has_grad else None
            for p, (_, _, has_grad) in zip(params, setup["specs"])]  # fmt: skip


def _build(setup, params, backend):
    ewc = None
    if setup["ewc"]:
        named = [(f"p{i}", p) for i, p in enumerate(params)]
        ewc = cl_optim.EWC(named, lam=0.5)
        gen = torch.Generator().manual_seed(setup["seed"] + 7)
        ewc.consolidate({name: torch.rand(p.shape, generator=gen) for name, p in named})
    groups = [{"params": params}]
    if setup["two_groups"] and len(params) > 1:
        groups = [{"params": params[:1]}, {"params": params[1:], "lr": setup["hyper"]["lr"] / 2}]
    cls = cl_optim.SGD if setup["kind"].endswith("sgd") else cl_optim.AdamW
    if setup["kind"].startswith("sam"):
        return cl_optim.SAM(
            groups, cls, backend=backend, ewc=ewc, fisher_ema=setup["fisher_ema"], **setup["hyper"]
        )
    return cls(groups, backend=backend, ewc=ewc, fisher_ema=setup["fisher_ema"], **setup["hyper"])


def _run(setup, backend, dtype):
    params = _params(setup, dtype)
    opt = _build(setup, params, backend)
    sam = setup["kind"].startswith("sam")
    for step in range(setup["steps"]):
        for p, g in zip(params, _grads(setup, params, step)):
            p.grad = None if g is None else (g * 8.0 if setup["amp"] else g).to(dtype)
        if sam:  # the first pass; the second pass's gradient at the perturbed weights follows
            opt.first_step()
            for p, g in zip(params, _grads(setup, params, step + 100)):
                p.grad = None if g is None else (g * 8.0 if setup["amp"] else g).to(dtype)
        if setup["amp"]:  # GradScaler's hand-over: the step unscales, and skips on found_inf
            opt.grad_scale = torch.tensor(8.0)
            opt.found_inf = torch.tensor(1.0 if setup["amp"] == "overflow_at_1" and step == 1 else 0.0)
        opt.second_step() if sam else opt.step()
        if step == setup["reload_at"]:  # a checkpoint mid-run: save, rebuild, load, continue
            buffer = io.BytesIO()
            torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(),
                        "ewc": opt.ewc.state_dict() if opt.ewc else None}, buffer)  # fmt: skip
            buffer.seek(0)
            saved = torch.load(buffer)
            params = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
            opt = _build(setup, params, backend)
            opt.load_state_dict(saved["opt"])
            if opt.ewc is not None:
                opt.ewc.load_state_dict(saved["ewc"])
    out = [p.detach() for p in params]
    for p in params:
        out += [v for _, v in sorted(opt.state[p].items())]
    return out


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@given(setup=setups())
def test_every_backend_matches_the_oracle(backend, setup):
    dtype = setup["dtype"]
    oracle = _run(setup, "forloop", dtype)
    candidate = _run(setup, backend, dtype)
    assert len(candidate) == len(oracle)
    if dtype == torch.float32:
        for got, want in zip(candidate, oracle):
            exact = backend == "foreach"
            torch.testing.assert_close(got, want, **(dict(rtol=0, atol=0) if exact else {}))
        return
    reference = _run(setup, "forloop", torch.float64)
    for got, want, ref in zip(candidate, oracle, reference):
        if got.dtype == dtype:
            assert_close_lowp(got, want, ref, LOWP_ATOL[dtype])
        else:  # fp32 state (running Fisher) and step counts
            torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-3)


# ------------------------------------------------------------------------- malformed inputs


MALFORMED_LISTS = {
    "sgd_step_": ["grads", "momentum_buffers", "restore_from", "fisher", "ewc_precision", "ewc_anchor"],
    "adamw_step_": ["grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "restore_from", "fisher"],
    "sam_perturb_": ["grads", "saves", "fisher"],
    "grad_sq_norm": ["params", "fisher"],
    "fisher_accumulate_": ["fisher"],
    "ewc_grad_add_": ["grads", "precision", "anchor"],
    "ewc_penalty": ["precision", "anchor"],
    "ewc_consolidate_": ["precision", "anchor", "fisher"],
}


@st.composite
def malformations(draw):
    op = draw(st.sampled_from(sorted(MALFORMED_LISTS)))
    name = draw(st.sampled_from(MALFORMED_LISTS[op]))
    how = draw(st.sampled_from(["resize", "reshape", "dtype", "drop", "extra", "expand", "scalar"]))
    index = draw(st.integers(0, 2))
    size = draw(st.integers(0, 5000))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int32]))
    return op, name, how, index, size, dtype


def _malform(tensors, how, index, size, dtype):
    out = list(tensors)
    t = out[index]
    if how == "resize":
        out[index] = torch.zeros(size if size != t.numel() else size + 1, dtype=t.dtype)
    elif how == "reshape":
        if t.numel() < 2:
            return None
        out[index] = t.reshape(-1, 1) if t.dim() == 1 else t.reshape(-1)
    elif how == "dtype":
        out[index] = t.to(dtype)
    elif how == "drop":
        del out[index]
    elif how == "extra":
        out.append(t.clone())
    elif how == "expand":
        out[index] = torch.zeros(1, dtype=t.dtype).expand(t.shape) if t.numel() > 1 else None
        if out[index] is None:
            return None
    elif how == "scalar":
        out[index] = torch.zeros((), dtype=t.dtype)
    return out


@pytest.mark.parametrize("backend", OP_BACKENDS)
@given(case=malformations())
def test_malformed_inputs_raise_and_change_nothing(backend, case):
    op, name, how, index, size, dtype = case
    args = _valid(op)
    spoiled = _malform(args[name], how, index, size, dtype)
    if spoiled is None:
        return
    if how == "expand" and not ALIGNED[op][name]:
        return  # an expanded view of a list the op only reads is valid input
    args[name] = spoiled
    snapshot = _snapshot(args)
    with pytest.raises((RuntimeError, ValueError, TypeError, NotImplementedError)):
        CALL_OP[backend](op, args)
    _assert_unchanged(snapshot)
