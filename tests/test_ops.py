"""The torch.library ops of cl_optim/ops.py: schemas, fake kernels and the compiled CPU kernels.

``torch.library.opcheck`` checks each op's schema (mutation annotations), its fake
implementation against the real kernel, and that it survives torch.compile's tracing.
"""

from __future__ import annotations

import pytest
import torch

import cl_optim.ops  # noqa: F401  (defines the schemas)
from cl_optim._backend import resolve

try:
    HAS_CPP = resolve("cpp", torch.device("cpu"), torch.float32) == "cpp"
except RuntimeError as error:  # pragma: no cover - a machine without a C++ toolchain
    HAS_CPP, CPP_ERROR = False, error

needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="the cpp backend cannot be built on this machine")
ops = torch.ops.cl_optim


def _tensors(n=3, size=37, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(size + i, generator=gen).to(dtype) for i in range(n)]


def _ewc(params):
    return [torch.rand(p.shape) for p in params], [torch.randn(p.shape) for p in params], [0.5] * len(params)


def _sgd_args(dtype=torch.float32, found_inf=0.0, combine=True):
    params, grads, bufs = _tensors(dtype=dtype), _tensors(dtype=dtype), _tensors(dtype=dtype)
    precision, anchor, lam = _ewc(params)
    restore = [p.clone() + 1 for p in params]
    fisher = [torch.rand(p.shape) for p in params]
    # COMBINE: two sources, three coefficients
    sources = (
        [t * 0.5 for t in _tensors(dtype=dtype)] + [t - 1 for t in _tensors(dtype=dtype)] if combine else []
    )
    coef = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64) if combine else None
    return (params, grads, bufs, [1, 0, 1], restore, sources, coef, fisher, precision, anchor, lam, torch.tensor(8.0),
            torch.tensor(found_inf), torch.tensor(0.7), 0.9, False, 0.1, 0.9, 0.1, 1e-2, False)  # fmt: skip


def _adamw_args(amsgrad=True):
    params, grads = _tensors(), _tensors()
    m, v = _tensors(), [t.abs() for t in _tensors()]
    vmax = [t.clone() for t in v] if amsgrad else []
    steps = [torch.tensor(float(i)) for i in range(3)]
    precision, anchor, lam = _ewc(params)
    return (params, grads, m, v, vmax, steps, [], [], None, [], precision, anchor, lam, None, None, None, 0.0, True,
            1e-3, 0.9, 0.999, 1e-8, 1e-2)  # fmt: skip


def _task_lists(num_tasks, dtype=torch.float32):
    """T task lists of three tensors, task-major (the ops' `grads`)."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(37 + i, generator=gen).to(dtype) for _ in range(num_tasks) for i in range(3)]


_FP64_PAIR = torch.tensor([1.0, 0.25], dtype=torch.float64)  # coefficients of any float dtype


def _sam_perturb_args(kinds, grad_scale, finite):
    fisher = [t.abs() for t in _tensors()]
    return (
        _tensors(),
        _tensors(),
        _tensors(),
        torch.tensor(0.05),
        kinds,
        0.5,
        fisher,
        0.9,
        grad_scale,
        finite,
    )


@needs_cpp
@pytest.mark.parametrize(
    "op,args",
    [
        ("sgd_step_", _sgd_args()),
        ("sgd_step_", _sgd_args(torch.bfloat16)),
        ("sgd_step_", _sgd_args(found_inf=1.0)),
        ("adamw_step_", _adamw_args()),
        ("adamw_step_", _adamw_args(amsgrad=False)),
        ("sgd_step_", _sgd_args(combine=False)),
        ("grad_sq_norm", (_tensors(), _tensors(), [], [1, 0, 1], 0.01)),
        ("grad_sq_norm", (_tensors(), [], [t.abs() for t in _tensors()], [2, 3, 0], 0.5)),
        ("sam_perturb_", _sam_perturb_args([1, 1, 0], torch.tensor(2.0), torch.tensor(True))),
        ("sam_perturb_", _sam_perturb_args([3, 2, 3], None, None)),
        ("task_gram", (_task_lists(3), 3)),
        ("task_gram", (_task_lists(2, torch.bfloat16), 2)),
        ("task_combine_", (_tensors(), _task_lists(3), torch.tensor([0.5, -1.0, 2.0]), False)),
        ("task_combine_", (_tensors(dtype=torch.float16), _task_lists(2, torch.float16), _FP64_PAIR, True)),
    ],
    ids=[
        "sgd",
        "sgd_bf16",
        "sgd_skipped",
        "adamw_amsgrad",
        "adamw",
        "sgd_without_combine",
        "grad_sq_norm",
        "grad_sq_norm_fisher",
        "sam_perturb",
        "sam_perturb_fisher",
        "task_gram",
        "task_gram_bf16",
        "task_combine",
        "task_combine_accumulate_fp16",
    ],  # fmt: skip
)
def test_opcheck(op, args):
    torch.library.opcheck(getattr(ops, op).default, args)


@needs_cpp
def test_ops_trace_without_graph_breaks():
    params, grads = _tensors(), _tensors()
    m, v = _tensors(), [t.abs() for t in _tensors()]

    steps = [torch.tensor(0.0) for _ in params]

    def step(params, grads, m, v):
        ops.adamw_step_(params, grads, m, v, [], steps, [], [], None, [], [], [], [], None, None, None, 0.0, False, 1e-3,
                        0.9, 0.999, 1e-8, 1e-2)  # fmt: skip
        return ops.grad_sq_norm(grads, [], [], [], 0.0)

    expected_params = [p.clone() for p in params]
    expected_m, expected_v = [t.clone() for t in m], [t.clone() for t in v]
    expected = step(expected_params, grads, expected_m, expected_v)
    for t in steps:  # the op counted the step: count it again from 0 for the compiled run
        t.zero_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(params, grads, m, v)
    torch.testing.assert_close(got, expected)
    for a, b in zip(params + m + v, expected_params + expected_m + expected_v):
        torch.testing.assert_close(a, b)


def test_the_cpp_backend_builds_where_ci_requires_it():
    """CI sets CL_OPTIM_REQUIRE_CPP=1: there, a failed build fails instead of skipping tests."""
    import os

    if os.environ.get("CL_OPTIM_REQUIRE_CPP") == "1":
        assert HAS_CPP, f"the cpp backend did not build: {CPP_ERROR!r}"


@needs_cpp
def test_opcheck_fisher_and_ewc_ops():
    params, grads = _tensors(), _tensors()
    fisher = [torch.rand(p.shape) for p in params]
    precision, anchor, lam = _ewc(params)
    torch.library.opcheck(ops.fisher_accumulate_.default, (fisher, grads, 0.5))
    torch.library.opcheck(ops.ewc_grad_add_.default, (grads, params, precision, anchor, lam))
    torch.library.opcheck(ops.ewc_penalty.default, (params, precision, anchor, lam))
    torch.library.opcheck(ops.ewc_consolidate_.default, (precision, anchor, fisher, params, 0.9, 1.0, True))


def _small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _opt_state(opt, model):
    return [p.detach() for p in model.parameters()] + [
        value for p in model.parameters() for value in opt.state[p].values()
    ]


@needs_cpp
@pytest.mark.parametrize(
    "make",
    [
        lambda m: cl_optim.AdamW(m.parameters(), lr=1e-2, amsgrad=True, fisher_ema=0.9, backend="cpp"),
        lambda m: cl_optim.SGD(m.parameters(), lr=1e-2, momentum=0.9, nesterov=True, backend="cpp"),
    ],
    ids=["adamw", "sgd"],
)
def test_whole_optimizer_step_compiles_without_graph_breaks(make):
    """fullgraph=True fails on any graph break; the compiled steps give the eager numbers."""
    torch._dynamo.reset()  # other tests' compilations of Optimizer.step count towards its recompile limit
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        model = _small_model()
        opt = make(model)
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
        for i in range(4):
            model(x + i).square().sum().backward()
            step()
            opt.zero_grad()
        results.append(_opt_state(opt, model))
    assert len(results[0]) > 4
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_foreach_adamw_step_compiles_without_graph_breaks(amsgrad):
    """The foreach backend read the step counts on the host (``.tolist()``), a graph break; under
    torch.compile it forms the bias corrections as tensor ops (one rounding apart from eager)."""
    torch._dynamo.reset()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        model = _small_model()
        opt = cl_optim.AdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad, backend="foreach")
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
        for i in range(4):
            model(x + i).square().sum().backward()
            step()
            opt.zero_grad()
        results.append(_opt_state(opt, model))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@needs_cpp
@pytest.mark.parametrize(
    "base,kwargs",
    [(cl_optim.AdamW, dict(adaptive="fisher_ema", fisher_ema=0.9)), (cl_optim.SGD, dict(momentum=0.9))],
    ids=["adamw_fisher_sam", "sgd"],
)
def test_sam_steps_compile_without_graph_breaks(base, kwargs):
    torch._dynamo.reset()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        model = _small_model()
        opt = cl_optim.SAM(model.parameters(), base, rho=0.05, lr=1e-2, backend="cpp", **kwargs)
        first, second = opt.first_step, opt.second_step
        if compiled:
            first = torch.compile(first, fullgraph=True, backend="aot_eager")
            second = torch.compile(second, fullgraph=True, backend="aot_eager")
        for i in range(4):
            model(x + i).square().sum().backward()
            first()
            opt.zero_grad()
            model(x + i).square().sum().backward()
            second()
            opt.zero_grad()
        results.append(_opt_state(opt, model))
        assert opt.steps == 4
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


_WHOLE_STEP = """
import torch, cl_optim

def run(compiled):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    params = list(model.parameters())
    opt = cl_optim.SAM(params, cl_optim.AdamW, rho=0.05, lr=1e-2, backend="cpp")
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def step(x):
        loss = model(x).square().mean()
        loss.backward()
        opt.first_step()
        for p in params:
            p.grad = None
        model(x).square().mean().backward()
        opt.second_step()
        for p in params:
            p.grad = None
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        go = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        for i in range(3):
            go(x + i)
    return [p.detach() for p in params] + [v for p in params for v in opt.state[p].values()]

for a, b in zip(run(False), run(True)):
    torch.testing.assert_close(a, b)
print("ok")
"""


@needs_cpp
def test_a_whole_sam_training_step_compiles_with_trace_autograd_ops():
    """The README's recipe: forward, backward, first_step, forward, backward, second_step in one
    fullgraph-compiled function (dynamo traces backward with trace_autograd_ops=True; gradients
    are dropped with ``p.grad = None``, as Optimizer.zero_grad is not traced), equal to eager.

    In a process of its own: this compilation leaves dynamo state that a later compilation of an
    optimizer's step in the same process trips over (torch 2.13: "'model' not in
    cell_and_freevars", even after ``torch._dynamo.reset()``)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", _WHOLE_STEP], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
