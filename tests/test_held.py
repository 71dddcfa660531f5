"""Lists held in C++ between steps (cl_optim/_held.py, csrc/cpu/held_lists.cpp): the same numbers,
state and refusals as the list calls, and never a stale tensor."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cl_optim
import cl_optim._sam_ascent as sam_ascent_module
import cl_optim._sam_passes as sam_passes_module
import cl_optim.adamw as adamw_module
import cl_optim.sgd as sgd_module
from cl_optim._held import Held

SHAPES = [(7, 3), (5,), (2, 3, 4), (1,), (64,)]


@contextlib.contextmanager
def _lists_only():
    """Every op call with Python lists, as before the held calls existed."""
    modules = (adamw_module, sam_ascent_module, sam_passes_module, sgd_module)
    saved = [m.held for m in modules]
    for m in modules:
        m.held = lambda *args: None
    try:
        yield
    finally:
        for m, held in zip(modules, saved):
            m.held = held


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _grads(params, step, nonfinite=False):
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    if nonfinite:
        grads[2][0, 1, 2] = float("inf")
    return grads


def _helds(opt) -> list:
    plans = opt._plans._plans.values()
    return [h for plan in plans for _, b in plan.buckets for k, h in b.buffers.items() if k[0] == "held"]


CONFIGS = {
    "adamw": lambda ps: cl_optim.AdamW(ps, lr=0.1, weight_decay=0.01, backend="cpp"),
    "adamw_amsgrad_maximize": lambda ps: cl_optim.AdamW(
        ps, lr=0.1, amsgrad=True, maximize=True, backend="cpp"
    ),
    "adamw_fisher_ema": lambda ps: cl_optim.AdamW(ps, lr=0.1, fisher_ema=0.9, backend="cpp"),
    "adamw_ewc": lambda ps: cl_optim.AdamW(ps, lr=0.1, ewc=_ewc(ps), backend="cpp"),
    "sgd": lambda ps: cl_optim.SGD(ps, lr=0.1, backend="cpp"),
    "sgd_nesterov_ewc": lambda ps: cl_optim.SGD(
        ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, ewc=_ewc(ps), backend="cpp"
    ),
    "sgd_dampening_maximize": lambda ps: cl_optim.SGD(
        ps, lr=0.1, momentum=0.9, dampening=0.3, maximize=True, backend="cpp"
    ),
    "sam_sgd": lambda ps: cl_optim.SAM(ps, cl_optim.SGD, rho=0.05, lr=0.1, momentum=0.9, backend="cpp"),
    "sam_adamw": lambda ps: cl_optim.SAM(ps, cl_optim.AdamW, rho=0.05, lr=0.1, backend="cpp"),
    "asam_adamw": lambda ps: cl_optim.SAM(ps, cl_optim.AdamW, rho=0.5, adaptive=True, lr=0.1, backend="cpp"),
    "fisher_sam_ema": lambda ps: cl_optim.SAM(
        ps, cl_optim.AdamW, rho=0.05, adaptive="fisher_ema", fisher_ema=0.9, lr=0.1, backend="cpp"
    ),
}


def _ewc(params):
    ewc = cl_optim.EWC([(f"p{i}", p) for i, p in enumerate(params)], lam=3.0)
    gen = torch.Generator().manual_seed(7)
    ewc.consolidate({p: torch.rand(p.shape, generator=gen) for p in params})
    return ewc


def _train(config: str, steps: int = 5):
    params = _params()
    opt = CONFIGS[config](params)
    for step in range(steps):
        nonfinite = step == 3  # SAM's second pass skips on a non-finite gradient
        if isinstance(opt, cl_optim.SAM):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g  # new tensors every pass, as backward after zero_grad(set_to_none=True)
            opt.first_step()
            for p, g in zip(params, _grads(params, 50 + step, nonfinite)):
                p.grad = g
            opt.second_step()
        else:
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            opt.step()
    return params, opt


def _state_tensors(opt, params):
    base = opt.base_optimizer if isinstance(opt, cl_optim.SAM) else opt
    return [
        (i, k, v)
        for i, p in enumerate(params)
        for k, v in sorted(base.state[p].items())
        if torch.is_tensor(v)
    ]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_held_calls_give_the_list_calls_numbers(config):
    params, opt = _train(config)
    with _lists_only():
        want_params, want_opt = _train(config)
    base = opt.base_optimizer if isinstance(opt, cl_optim.SAM) else opt
    assert any(isinstance(h, Held) for h in _helds(base)), "the held path did not run"
    for got, want in zip(params, want_params):
        assert torch.equal(got.detach(), want.detach())
    got_state, want_state = _state_tensors(opt, params), _state_tensors(want_opt, want_params)
    assert [(i, k) for i, k, _ in got_state] == [(i, k) for i, k, _ in want_state]
    assert got_state or config == "sgd"  # (SGD without momentum keeps no state)
    for (i, k, got), (_, _, want) in zip(got_state, want_state):
        assert torch.equal(got, want), (i, k)


def _step(opt, params, step):
    for p, g in zip(params, _grads(params, step)):
        p.grad = g
    opt.step()


def _both(change):
    """Two steps, ``change(opt, params)``, two more steps: held against lists."""
    results = []
    for held in (True, False):
        with contextlib.nullcontext() if held else _lists_only():
            params = _params()
            opt = cl_optim.AdamW(params, lr=0.1, backend="cpp")
            for step in range(2):
                _step(opt, params, step)
            change(opt, params)
            for step in range(2, 4):
                _step(opt, params, step)
            results.append((params, opt))
    (params, opt), (want_params, want_opt) = results
    for got, want in zip(params, want_params):
        assert torch.equal(got.detach(), want.detach())
    for (_, _, got), (_, _, want) in zip(_state_tensors(opt, params), _state_tensors(want_opt, want_params)):
        assert torch.equal(got, want)
    return opt, params


def test_a_state_tensor_replaced_between_steps_is_the_one_stepped():
    def replace(opt, params):
        opt.state[params[0]]["exp_avg"] = torch.full_like(params[0], 0.25)

    opt, params = _both(replace)
    assert float(opt.state[params[0]]["step"]) == 4.0


def test_a_state_dict_replaced_between_steps_is_the_one_stepped():
    def replace(opt, params):
        opt.state[params[1]] = {k: v.clone() + 1.0 for k, v in opt.state[params[1]].items()}

    _both(replace)


def test_load_state_dict_between_steps():
    donor_params = _params(seed=3)
    donor = cl_optim.AdamW(donor_params, lr=0.1)
    for step in range(3):
        _step(donor, donor_params, 10 + step)
    saved = copy.deepcopy(donor.state_dict())

    def load(opt, params):
        opt.load_state_dict(copy.deepcopy(saved))  # (torch keeps the given tensors: each run its own)
        assert not opt._plans._plans  # the held lists go with the plans

    opt, params = _both(load)
    assert float(opt.state[params[0]]["step"]) == 5.0


def _held_adamw():
    """An AdamW two steps in, its lists held."""
    params = _params()
    opt = cl_optim.AdamW(params, lr=0.1, backend="cpp")
    for step in range(2):
        _step(opt, params, step)
    assert _helds(opt)
    return opt, params


def test_a_refusal_through_held_lists_names_the_problem_and_writes_nothing():
    opt, params = _held_adamw()
    opt.state[params[2]]["exp_avg_sq"] = torch.zeros(3)
    before = [p.detach().clone() for p in params]
    steps = [float(opt.state[p]["step"]) for p in params]
    for p, g in zip(params, _grads(params, 2)):
        p.grad = g
    with pytest.raises(RuntimeError, match=r"exp_avg_sq.*shape"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert [float(opt.state[p]["step"]) for p in params] == steps


def test_a_grown_parameter_behind_held_lists_steps_as_with_lists():
    def grow(opt, params):
        params[4].data = torch.randn(80, generator=torch.Generator().manual_seed(5))
        opt.pad_state_(params[4])

    opt, params = _both(grow)
    assert opt.state[params[4]]["exp_avg"].shape == (80,)


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_the_op_not_a_held_call():
    opt, params = _held_adamw()
    for p, g in zip(params, _grads(params, 2)):
        p.grad = g
    with _OpNames() as mode:
        opt.step()
    assert any("cl_optim.adamw_step_" in name for name in mode.names), mode.names


def test_held_lists_decline_what_the_dispatcher_would_handle_first():
    held = Held(torch.zeros(2))
    assert held.hold(1, [torch.zeros(2)]) and held.lists[1] is not None
    for special in (
        torch.zeros(2, device="meta"),
        torch._neg_view(torch.ones(2)),
        torch._efficientzerotensor(2),
        torch.ones(2).to_sparse(),
        _Wrapped(torch.ones(2)),
    ):
        assert not held.hold(1, [torch.zeros(2), special])
        assert len(held.lists[1]) == 1  # nothing new held
    with pytest.raises(RuntimeError, match="no slot 10"):
        held.calls.hold(10, [torch.zeros(2)])


class _Wrapped(torch.Tensor):
    """A ``__torch_dispatch__`` wrapper: its data lives in an inner tensor (review of 9860a73)."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=inner.device)

    def __init__(self, inner):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, _Wrapped) else t  # noqa: E731
        return func(
            *torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {})
        )


def _last_step_with(grad_of):
    """SGD with momentum, four steps, the last one's second gradient replaced by ``grad_of(g)``:
    held against lists, and both against a plain gradient of the same values on ``foreach``."""
    results = []
    for mode in ("held", "lists", "foreach"):
        with _lists_only() if mode == "lists" else contextlib.nullcontext():
            params = _params()
            opt = cl_optim.SGD(
                params, lr=0.1, momentum=0.9, backend="foreach" if mode == "foreach" else "cpp"
            )
            for step in range(4):
                grads = _grads(params, step)
                if step == 3 and mode != "foreach":
                    grads[1] = grad_of(grads[1])
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
            results.append([p.detach().clone() for p in params])
    for got, want in zip(results[0], results[1]):
        assert torch.equal(got, want)
    for got, want in zip(results[1], results[2]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "grad_of",
    [
        lambda g: torch._neg_view(-g),  # a lazy negation: the held call read the raw storage's sign
        lambda g: _Wrapped(g),  # a wrapper subclass (an AsyncCollectiveTensor's kind): it crashed
    ],
    ids=["negative_view", "wrapper_subclass"],
)
def test_a_gradient_the_dispatcher_unfolds_takes_the_list_call(grad_of):
    _last_step_with(grad_of)


def test_a_zero_tensor_gradient_takes_the_list_call():
    """``torch._efficientzerotensor`` has no storage: the held call crashed (review of 9860a73)."""
    results = []
    for mode in ("held", "lists"):
        with _lists_only() if mode == "lists" else contextlib.nullcontext():
            params = _params()
            opt = cl_optim.SGD(params, lr=0.1, momentum=0.9, backend="cpp")
            for step in range(4):
                for p, g in zip(params, _grads(params, step)):
                    p.grad = g
                if step == 3:
                    params[1].grad = torch._efficientzerotensor(params[1].shape)
                try:
                    opt.step()
                except RuntimeError as error:  # the same refusal both ways, if any
                    results.append(str(error))
                    break
            results.append([p.detach().clone() for p in params])
    assert len(results) == 2 or results[0] == results[2]
    if len(results) == 2:
        assert all(torch.equal(a, b) for a, b in zip(*results))


class _MyParameter(torch.nn.Parameter):
    pass


@pytest.mark.parametrize("config", ["adamw", "sam_adamw"])
def test_parameter_subclasses_step_through_lists(config):
    """A ``Parameter`` subclass (FSDP1's FlatParameter is one): the held path made the step raise
    (review of 9860a73); now the bucket takes the list calls."""
    for mode in ("held", "lists"):
        with _lists_only() if mode == "lists" else contextlib.nullcontext():
            gen = torch.Generator().manual_seed(0)
            params = [_MyParameter(torch.randn(s, generator=gen)) for s in SHAPES]
            opt = CONFIGS[config](params)
            for step in range(3):
                for p, g in zip(params, _grads(params, step)):
                    p.grad = g
                if isinstance(opt, cl_optim.SAM):
                    opt.first_step()
                    opt.second_step()
                else:
                    opt.step()
            if mode == "held":
                got = [p.detach().clone() for p in params]
    assert all(torch.equal(a, p.detach()) for a, p in zip(got, params))


def test_the_state_of_each_parameter_follows_its_key():
    """The state rebuilt with the same dicts in the same order under swapped keys: the cached
    lookup compared the values only and kept stepping each parameter with the other's state
    (review of 9860a73)."""
    results = []
    for mode in ("held", "lists"):
        with _lists_only() if mode == "lists" else contextlib.nullcontext():
            gen = torch.Generator().manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(4, generator=gen)) for _ in range(3)]
            opt = cl_optim.AdamW(params, lr=0.1, backend="cpp")
            for step in range(2):
                _step(opt, params, step)
            keys, values = list(opt.state), list(opt.state.values())
            opt.state.clear()
            for p, state in zip([keys[1], keys[0], keys[2]], values):
                opt.state[p] = state
            for step in range(2, 4):
                _step(opt, params, step)
            results.append(
                [p.detach().clone() for p in params] + [v for _, _, v in _state_tensors(opt, params)]
            )
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_held_calls_show_in_the_profiler():
    opt, params = _held_adamw()
    with torch.profiler.profile() as prof:
        _step(opt, params, 2)
    assert any("adamw_step_" in event.name for event in prof.events())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("config", ["adamw_ewc", "sam_adamw", "sgd_nesterov_ewc"])
def test_held_calls_in_every_dtype_and_a_channels_last_layout(config, dtype):
    results = []
    for mode in ("held", "lists"):
        with _lists_only() if mode == "lists" else contextlib.nullcontext():
            gen = torch.Generator().manual_seed(0)
            weight = torch.randn(4, 3, 5, 6, generator=gen).to(dtype).to(memory_format=torch.channels_last)
            params = [torch.nn.Parameter(weight), torch.nn.Parameter(torch.randn(7, generator=gen).to(dtype))]
            opt = CONFIGS[config](params)
            for step in range(4):
                for p, g in zip(params, _grads(params, step)):
                    p.grad = (
                        g.to(dtype).contiguous(memory_format=torch.channels_last)
                        if g.dim() == 4
                        else g.to(dtype)
                    )
                if isinstance(opt, cl_optim.SAM):
                    opt.first_step()
                    opt.second_step()
                else:
                    opt.step()
            base = opt.base_optimizer if isinstance(opt, cl_optim.SAM) else opt
            assert (mode == "lists") != bool(_helds(base))
            results.append(
                [p.detach().clone() for p in params] + [v for _, _, v in _state_tensors(opt, params)]
            )
    assert all(torch.equal(a, b) for a, b in zip(*results))
