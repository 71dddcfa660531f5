"""torch's own optimizer test inputs, pointed at cl_optim: ``optim_db`` of SGD and AdamW.

``torch.testing._internal.common_optimizers`` (shipped in the torch wheel) lists, per optimizer,
the constructor inputs torch tests itself with and the error inputs with the errors torch must
raise. Here every input runs against cl_optim's class of the same name on each CPU backend, with
the expectations torch's test suite (TestOptimRenewed) has for torch's own classes: the same
errors; a step that changes nothing without gradients; the numbers of torch's optimizer; a
state dict that round-trips unchanged, loads into a fresh optimizer (also an old one whose
``step`` is a Python number and whose groups lack later keys) and continues the same run;
``copy.deepcopy`` and ``torch.save``/``torch.load`` of the optimizer; step and state-dict hooks;
``repr``. Where cl_optim deliberately does more than torch, ``DEVIATIONS`` says what and why, and
the input is checked to run and give torch's numbers instead.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.nn import Parameter
from torch.testing._internal import common_optimizers  # needs expecttest (in the dev extra)

import cl_optim
from cl_optim._backend import resolve

OptimizerErrorEnum = common_optimizers.OptimizerErrorEnum

CLASSES = {torch.optim.SGD: cl_optim.SGD, torch.optim.AdamW: cl_optim.AdamW}
INFOS = [info for info in common_optimizers.optim_db if info.optim_cls in CLASSES]


def _runs(backend: str) -> bool:
    try:
        return resolve(backend, torch.device("cpu"), torch.float32) == backend
    except RuntimeError:
        return False


BACKENDS = [b for b in ("forloop", "foreach", "cpp") if _runs(b)]

# Inputs torch refuses and cl_optim runs, with torch's (for-loop) numbers: torch's foreach
# implementation cannot take a tensor lr without capturable; cl_optim's foreach backend reads it.
DEVIATIONS = {
    "lr as Tensor doesn't work with foreach & not capturable": "cl_optim's foreach backend takes a tensor lr",
}


def _inputs(info):
    return [(info, oi) for oi in info.optim_inputs_func(device="cpu", dtype=torch.float32)]


CASES = [case for info in INFOS for case in _inputs(info)]
IDS = [f"{info.optim_cls.__name__}-{oi.desc}" for info, oi in CASES]


def _model_and_grads(seed: int = 0):
    """Two parameter tensors (a weight and a bias) and a fixed gradient sequence for 5 steps."""
    gen = torch.Generator().manual_seed(seed)
    weight = Parameter(torch.randn(10, 5, generator=gen))
    bias = Parameter(torch.randn(10, generator=gen))
    grads = [(torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen)) for _ in range(5)]
    return [weight, bias], grads


def _kwargs(oi, **more):
    kwargs = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in oi.kwargs.items()}
    return {**kwargs, **more}


def _run(opt, params, grads):
    for gw, gb in grads:
        params[0].grad, params[1].grad = gw.clone(), gb.clone()
        opt.step()
    return [p.detach().clone() for p in params]


def _assert_same(got, want, backend):
    exact = backend in ("forloop", "foreach")  # the compiled kernels: fp32 rounding, not bit for bit
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **(dict(rtol=0, atol=0) if exact else dict(rtol=2e-5, atol=1e-6)))


# ------------------------------------------------------------------------------------- errors


def _error_cases():
    for info in INFOS:
        for error in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
            yield pytest.param(
                info, error, id=f"{info.optim_cls.__name__}-{error.optimizer_error_input.desc}"
            )


@pytest.mark.parametrize("info,error", list(_error_cases()))
def test_error_inputs_raise_what_torch_raises(info, error):
    cls = CLASSES[info.optim_cls]
    optim_input = error.optimizer_error_input
    params = optim_input.params if optim_input.params is not None else [Parameter(torch.randn(2, 3))]
    if optim_input.desc in DEVIATIONS:
        opt = cls(params, **optim_input.kwargs)  # runs, with torch's for-loop numbers
        reference = info.optim_cls([Parameter(p.detach().clone()) for p in params],
                                   **{k: v for k, v in optim_input.kwargs.items() if k != "foreach"})  # fmt: skip
        for p, q in zip(params, reference.param_groups[0]["params"]):
            p.grad = q.grad = torch.ones_like(p)
        opt.step()
        reference.step()
        torch.testing.assert_close(params[0].detach(), reference.param_groups[0]["params"][0].detach())
        return
    if error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        expect = pytest.warns if issubclass(error.error_type, Warning) else pytest.raises
        with expect(error.error_type, match=error.error_regex):
            cls(params, **optim_input.kwargs)
    else:
        opt = cls(params, **optim_input.kwargs)
        expect = pytest.warns if issubclass(error.error_type, Warning) else pytest.raises
        with expect(error.error_type, match=error.error_regex):
            opt.step()


# ------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,oi", CASES, ids=IDS)
def test_every_input_gives_torchs_numbers(info, oi, backend):
    params, grads = _model_and_grads()
    reference_params = [Parameter(p.detach().clone()) for p in params]
    want = _run(info.optim_cls(reference_params, **_kwargs(oi)), reference_params, grads)
    got = _run(CLASSES[info.optim_cls](params, **_kwargs(oi, backend=backend)), params, grads)
    _assert_same(got, want, backend)


@pytest.mark.parametrize("info,oi", CASES, ids=IDS)
@pytest.mark.parametrize(
    "flags", [dict(foreach=False), dict(foreach=True), dict(fused=True), dict(differentiable=False)]
)
def test_torchs_implementation_flags_are_taken(info, oi, flags):
    """``foreach=``/``fused=`` pick a backend; ``differentiable=False`` (and AdamW's
    ``capturable=False``) are torch's defaults and accepted."""
    # torch refuses a tensor lr with foreach=True (DEVIATIONS); its for-loop numbers are the reference.
    params, grads = _model_and_grads()
    reference_params = [Parameter(p.detach().clone()) for p in params]
    want = _run(info.optim_cls(reference_params, **_kwargs(oi, foreach=False)), reference_params, grads)
    opt = CLASSES[info.optim_cls](params, **_kwargs(oi, **flags))
    got = _run(opt, params, grads)
    _assert_same(got, want, next(iter(opt.backends_used.values())))


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.optim_cls.__name__)
def test_true_differentiable_and_capturable_are_refused_clearly(info):
    cls = CLASSES[info.optim_cls]
    with pytest.raises(ValueError, match="differentiable=True"):
        cls([Parameter(torch.ones(2))], differentiable=True)
    if info.has_capturable_arg:
        with pytest.raises(ValueError, match="capturable=True"):
            cls([Parameter(torch.ones(2))], capturable=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,oi", CASES, ids=IDS)
def test_no_gradient_no_change(info, oi, backend):
    params, _ = _model_and_grads()
    before = [p.detach().clone() for p in params]
    opt = CLASSES[info.optim_cls](params, **_kwargs(oi, backend=backend))
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and len(opt.state) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,oi", CASES, ids=IDS)
def test_state_dict_round_trips_and_resumes(info, oi, backend):
    cls = CLASSES[info.optim_cls]
    params, grads = _model_and_grads()
    opt = cls(params, **_kwargs(oi, backend=backend))
    _run(opt, params, grads[:2])
    saved = opt.state_dict()
    groups_before = copy.deepcopy(saved["param_groups"])
    opt.load_state_dict(saved)
    assert opt.state_dict()["param_groups"] == groups_before  # no key added by loading

    resumed_params = [Parameter(p.detach().clone()) for p in params]
    resumed = cls(resumed_params, **_kwargs(oi, backend=backend))
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    _assert_same(_run(resumed, resumed_params, grads[2:]), _run(opt, params, grads[2:]), "forloop")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,oi", CASES, ids=IDS)
def test_an_old_state_dict_loads(info, oi, backend):
    """A checkpoint of an older torch: ``step`` a Python number, groups without the later keys."""
    cls = CLASSES[info.optim_cls]
    params, grads = _model_and_grads()
    opt = cls(params, **_kwargs(oi, backend=backend))
    _run(opt, params, grads[:2])
    old = copy.deepcopy(opt.state_dict())
    for state in old["state"].values():
        if "step" in state:
            state["step"] = float(state["step"])
    for group in old["param_groups"]:
        for key in ("maximize", "differentiable", "capturable", "foreach", "fused"):
            group.pop(key, None)
    resumed_params = [Parameter(p.detach().clone()) for p in params]
    resumed = cls(resumed_params, **_kwargs(oi, backend=backend))
    resumed.load_state_dict(old)
    _assert_same(_run(resumed, resumed_params, grads[2:]), _run(opt, params, grads[2:]), "forloop")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,oi", CASES, ids=IDS)
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_optimizer_steps_as_the_original(info, oi, backend, how):
    cls = CLASSES[info.optim_cls]
    params, grads = _model_and_grads()
    opt = cls(params, **_kwargs(oi, backend=backend))
    _run(opt, params, grads[:2])
    if how == "deepcopy":
        twin = copy.deepcopy(opt)
    else:
        buffer = io.BytesIO()
        torch.save(opt, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert twin.backend == opt.backend
    twin_params = twin.param_groups[0]["params"]
    _assert_same(_run(twin, twin_params, grads[2:]), _run(opt, params, grads[2:]), "forloop")


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.optim_cls.__name__)
def test_hooks_fire_and_the_optimizer_prints(info):
    params, grads = _model_and_grads()
    opt = CLASSES[info.optim_cls](params)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda *a: calls.append("sd_pre"))
    opt.register_load_state_dict_post_hook(lambda *a: calls.append("load_post"))
    _run(opt, params, grads[:1])
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd_pre", "load_post"]
    assert type(opt).__name__ in repr(opt) and "backend" in repr(opt)


def test_fused_on_a_device_without_a_compiled_backend_says_why():
    p = Parameter(torch.ones(2, device="meta"))
    p.grad = torch.ones(2, device="meta")
    with pytest.raises(RuntimeError, match="none is written for meta tensors"):
        cl_optim.AdamW([p], fused=True).step()
