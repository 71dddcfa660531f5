"""Every fused op, on every backend, refuses every kind of mismatched input before it touches memory.

Each op is called with valid inputs in which one tensor list is spoiled in one way — a list one
entry short, an entry of another size (larger and smaller), of the same size but another shape,
of another dtype, sparse, or (for lists the op writes) an expanded view — and must raise an error
that names that list, leaving every tensor it was given unchanged (a rejected AdamW call counts
no step). Before these checks the C++ kernels sized every loop from the lead list and read and
wrote past the end of shorter tensors (a segfault or heap corruption).

Backends: ``cpp`` (``torch.ops.cl_optim``), ``triton`` (``torch.ops.cl_optim_triton`` under
the interpreter) and the Python backends through the functional API. The CUDA kernels share the
C++ checks (``csrc/op_checks.h``); a device mismatch needs a second device and is checked on the
Python validator here and on a GPU in tests/test_gpu_checks.py.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from cl_optim import _checks  # noqa: E402
from cl_optim._backend import resolve  # noqa: E402
from cl_optim._terms import StepTerms  # noqa: E402
from cl_optim.adamw import adamw_step_  # noqa: E402
from cl_optim.ewc import ewc_consolidate_, ewc_grad_add_, ewc_penalty, fisher_accumulate_  # noqa: E402
from cl_optim.multitask.fused import task_combine_, task_gram  # noqa: E402
from cl_optim.sam import grad_sq_norm, sam_perturb_  # noqa: E402
from cl_optim.sgd import sgd_step_  # noqa: E402

SHAPES = [(5,), (3, 4), (7,)]


def _available(backend: str) -> bool:
    try:
        return resolve(backend, torch.device("cpu"), torch.float32) == backend
    except RuntimeError:
        return False


def _tensors(dtype=torch.float32, seed=0, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(shape, generator=gen).to(dtype) for shape in SHAPES]
    return [t.abs() + 0.1 for t in out] if positive else out


def _valid(op: str) -> dict:
    """Valid arguments of ``op`` by schema name, with every optional term switched on."""
    p, g = _tensors(seed=1), _tensors(seed=2)
    fp32 = lambda seed: _tensors(seed=seed, positive=True)  # noqa: E731
    scalars = dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0), clip_coef=torch.tensor(0.5))
    terms = dict(restore_from=_tensors(seed=3), fisher=fp32(4), ewc_precision=fp32(5), ewc_anchor=_tensors(seed=6),
                 ewc_lam=[0.5, 1.0, 2.0], combine_from=_tensors(seed=10) + _tensors(seed=11),
                 combine_coef=torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), **scalars)  # fmt: skip
    if op == "sgd_step_":
        return dict(params=p, grads=g, momentum_buffers=_tensors(seed=7), buffer_ready=[1, 1, 1], **terms,
                    fisher_beta=0.9, maximize=False, lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01,
                    nesterov=False)  # fmt: skip
    if op == "adamw_step_":
        return dict(params=p, grads=g, exp_avgs=_tensors(seed=7), exp_avg_sqs=fp32(8), max_exp_avg_sqs=fp32(9),
                    steps=[torch.tensor(float(i + 1)) for i in range(3)], **terms, fisher_beta=0.9,
                    maximize=False, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)  # fmt: skip
    if op == "grad_sq_norm":
        return dict(grads=g, params=p, fisher=fp32(4), weighted=[1, 3, 1], eta=0.5)
    if op == "sam_perturb_":
        return dict(params=p, grads=g, saves=_tensors(seed=3), scale=torch.tensor(0.1), weighted=[1, 3, 0],
                    eta=0.5, fisher=fp32(4), fisher_beta=0.9, grad_scale=torch.tensor(2.0),
                    finite=torch.tensor(True))  # fmt: skip
    if op == "fisher_accumulate_":
        return dict(fisher=fp32(4), grads=g, weight=0.5)
    if op == "ewc_grad_add_":
        return dict(grads=g, params=p, precision=fp32(5), anchor=_tensors(seed=6), lam=[0.5, 1.0, 2.0])
    if op == "ewc_penalty":
        return dict(params=p, precision=fp32(5), anchor=_tensors(seed=6), lam=[0.5, 1.0, 2.0])
    if op == "ewc_consolidate_":
        return dict(precision=fp32(5), anchor=_tensors(seed=6), fisher=fp32(4), params=p, decay=1.0, weight=1.0,
                    weighted_anchor=True)  # fmt: skip
    if op == "task_gram":  # T = 2 task lists, task-major
        return dict(grads=p + g, num_tasks=2)
    if op == "task_combine_":  # T = 3
        coefficients = torch.tensor([0.5, -1.0, 2.0])
        return dict(
            out=_tensors(seed=3), grads=p + g + _tensors(seed=4), coefficients=coefficients, accumulate=True
        )
    raise AssertionError(op)


# The tensor lists of each op that are aligned with its lead list, and whether the op writes them.
ALIGNED = {
    "sgd_step_": {"grads": False, "momentum_buffers": True, "restore_from": False, "fisher": True,
                  "ewc_precision": False, "ewc_anchor": False},
    "adamw_step_": {"grads": False, "exp_avgs": True, "exp_avg_sqs": True, "max_exp_avg_sqs": True,
                    "restore_from": False, "fisher": True, "ewc_precision": False, "ewc_anchor": False},
    "grad_sq_norm": {"params": False, "fisher": False},
    "sam_perturb_": {"grads": False, "saves": True, "fisher": True},
    "fisher_accumulate_": {"fisher": True},
    "ewc_grad_add_": {"grads": True, "precision": False, "anchor": False},
    "ewc_penalty": {"precision": False, "anchor": False},
    "ewc_consolidate_": {"precision": True, "anchor": True, "fisher": False},
}  # fmt: skip
LEAD = {"grad_sq_norm": "grads", "fisher_accumulate_": "grads"}
FP32_LISTS = {"fisher", "ewc_precision", "ewc_anchor", "precision", "anchor"}
# Per-tensor values that must come one per lead tensor.
COUNTS = {"sgd_step_": ["buffer_ready", "ewc_lam"], "adamw_step_": ["ewc_lam"], "grad_sq_norm": ["weighted"],
          "sam_perturb_": ["weighted"], "ewc_grad_add_": ["lam"], "ewc_penalty": ["lam"]}  # fmt: skip

MISMATCHES = ("short", "larger", "smaller", "reshaped", "dtype", "sparse", "expanded")

# The multi-task ops take their T task lists task-major in one `grads` list (T*n entries, _valid's
# T below), so a list is spoiled task by task. The lead is task 0's list ("grads") for task_gram and
# `out` for task_combine_; the others are named as in the errors, "grads (task t)".
TASKS = {"task_gram": 2, "task_combine_": 3}
TASK_LISTS = {"task_gram": {"grads": False, "grads (task 1)": False},
              "task_combine_": {"out": True, "grads (task 0)": False, "grads (task 2)": False}}  # fmt: skip


def _spoil_task_list(args: dict, name: str, how: str) -> str:
    """Spoil one task list of a multi-task op's arguments; returns the error the op must raise."""
    if how == "sparse":
        expected = r"not|layout|sparse"
    elif how == "short":
        expected = r"grads has \d+ entries"
    else:  # a spoiled lead is named as the other side of a shape error, or as a dtype of its own
        expected = re.escape(name) + r"\[1\]"
    if name == "out":
        args["out"] = _spoil(args["out"], how, False)
        return expected
    t, n, flat = (0 if name == "grads" else int(name[len("grads (task ") : -1])), len(SHAPES), args["grads"]
    args["grads"] = flat[: t * n] + _spoil(flat[t * n : (t + 1) * n], how, False) + flat[(t + 1) * n :]
    return expected


def _spoil(tensors: list, how: str, fp32: bool) -> list:
    out = list(tensors)
    t = out[1]  # the (3, 4) entry
    if how == "short":
        return out[:-1]
    if how == "larger":
        out[1] = torch.zeros(3, 4 * 1024, dtype=t.dtype)
    elif how == "smaller":
        out[1] = torch.zeros(3, 1, dtype=t.dtype)
    elif how == "reshaped":
        out[1] = t.reshape(4, 3).clone()
    elif how == "dtype":
        out[1] = t.to(torch.float16)
    elif how == "sparse":
        out[1] = t.to_sparse()
    elif how == "expanded":
        out[1] = torch.zeros(1, 4, dtype=t.dtype).expand(3, 4)
    return out


# --------------------------------------------------------------------------- the backends


def _call_kernel(library: str, op: str, args: dict):
    from cl_optim.ops import SCHEMAS

    names = [a.name for a in torch._C.parse_schema(SCHEMAS[op]).arguments]
    if library == "cl_optim_triton":
        from cl_optim._backend import triton_ops

        triton_ops()
    return getattr(getattr(torch.ops, library), op)(*[args[name] for name in names])


def _step_terms(a: dict) -> StepTerms:
    # COMBINE's sources as StepTerms holds them: K lists (the last takes what is left, so a short
    # flat list reaches the checks as a short last source)
    flat, n = a["combine_from"], len(a["params"])
    k = max(len(flat) + n - 1, 0) // n if flat else 0
    sources = [flat[j * n : (j + 1) * n] for j in range(k - 1)] + [flat[(k - 1) * n :]] if k else None
    return StepTerms(restore_from=a["restore_from"], grad_scale=a["grad_scale"], found_inf=a["found_inf"],
                     fisher=a["fisher"], fisher_beta=a["fisher_beta"], clip_coef=a["clip_coef"],
                     ewc_precision=a["ewc_precision"], ewc_anchor=a["ewc_anchor"], ewc_lam=a["ewc_lam"],
                     combine_from=sources, combine_coef=a["combine_coef"])  # fmt: skip


def _call_python(backend: str, op: str, a: dict):
    """The functional API of the Python backends, from the schema's arguments."""
    if op == "sgd_step_":
        return sgd_step_(a["params"], a["grads"], a["momentum_buffers"], _step_terms(a), lr=a["lr"],
                         momentum=a["momentum"], dampening=a["dampening"], weight_decay=a["weight_decay"],
                         nesterov=a["nesterov"], maximize=a["maximize"], backend=backend)  # fmt: skip
    if op == "adamw_step_":
        return adamw_step_(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], a["max_exp_avg_sqs"],
                           a["steps"], _step_terms(a), lr=a["lr"], beta1=a["beta1"], beta2=a["beta2"],
                           eps=a["eps"], weight_decay=a["weight_decay"], maximize=a["maximize"],
                           backend=backend)  # fmt: skip
    if op == "grad_sq_norm":
        return grad_sq_norm(
            a["grads"], a["params"], a["weighted"], a["eta"], fisher=a["fisher"], backend=backend
        )
    if op == "sam_perturb_":
        return sam_perturb_(a["params"], a["grads"], a["saves"], a["scale"], a["weighted"], a["eta"],
                            backend=backend, fisher=a["fisher"], fisher_beta=a["fisher_beta"],
                            grad_scale=a["grad_scale"], finite=a["finite"])  # fmt: skip
    if op == "fisher_accumulate_":
        return fisher_accumulate_(a["fisher"], a["grads"], a["weight"], backend=backend)
    if op == "ewc_grad_add_":
        return ewc_grad_add_(a["grads"], a["params"], a["precision"], a["anchor"], a["lam"], backend=backend)
    if op == "ewc_penalty":
        return ewc_penalty(a["params"], a["precision"], a["anchor"], a["lam"], backend=backend)
    if op == "ewc_consolidate_":
        return ewc_consolidate_(a["precision"], a["anchor"], a["fisher"], a["params"], a["decay"], a["weight"],
                                a["weighted_anchor"], backend=backend)  # fmt: skip
    if op in TASKS:  # T lists whose concatenation is `grads` (the last takes what is left)
        n, flat, t = len(SHAPES), a["grads"], TASKS[op]
        lists = [flat[i * n : (i + 1) * n] for i in range(t - 1)] + [flat[(t - 1) * n :]]
        if op == "task_gram":
            return task_gram(lists, backend=backend)
        return task_combine_(a["out"], lists, a["coefficients"], accumulate=a["accumulate"], backend=backend)
    raise AssertionError(op)


BACKENDS = {
    "cpp": lambda op, args: _call_kernel("cl_optim", op, args),
    "triton": lambda op, args: _call_kernel("cl_optim_triton", op, args),
    "forloop": lambda op, args: _call_python("forloop", op, args),
    "foreach": lambda op, args: _call_python("foreach", op, args),
}
AVAILABLE = [name for name in BACKENDS if _available(name)]


def _snapshot(args: dict) -> list:
    tensors = []
    for value in args.values():
        for t in value if isinstance(value, list) else [value]:
            if isinstance(t, torch.Tensor):
                tensors.append((t, t.to_dense().clone() if t.layout != torch.strided else t.clone()))
    return tensors


def _assert_unchanged(snapshot: list) -> None:
    for t, before in snapshot:
        now = t.to_dense() if t.layout != torch.strided else t
        assert torch.equal(now, before), "a rejected call changed a tensor"


def _cases():
    for op, lists in ALIGNED.items():
        for name, written in lists.items():
            for how in MISMATCHES:
                if how == "expanded" and not written:
                    continue  # a read-only expanded view is fine (it is copied in)
                yield op, name, how


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("op,name,how", list(_cases()))
def test_a_mismatched_list_is_refused_and_nothing_changes(backend, op, name, how):
    args = _valid(op)
    args[name] = _spoil(args[name], how, name in FP32_LISTS)
    snapshot = _snapshot(args)
    # A sparse entry: the compiled ops do not even dispatch (no sparse kernel); the Python
    # backends refuse it in their checks. Either way, an error and no change.
    expected = r"not|layout|sparse" if how == "sparse" else rf"{name}(\[1\]| has 2 entries)"
    with pytest.raises((RuntimeError, NotImplementedError), match=expected):
        BACKENDS[backend](op, args)
    _assert_unchanged(snapshot)


def _task_cases():
    for op, lists in TASK_LISTS.items():
        for name, written in lists.items():
            for how in MISMATCHES:
                if how == "expanded" and not written:
                    continue
                yield op, name, how


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("op,name,how", list(_task_cases()))
def test_a_mismatched_task_list_is_refused_and_nothing_changes(backend, op, name, how):
    args = _valid(op)
    expected = _spoil_task_list(args, name, how)
    snapshot = _snapshot(args)
    with pytest.raises((RuntimeError, NotImplementedError), match=expected):
        BACKENDS[backend](op, args)
    _assert_unchanged(snapshot)


def _combine_cases():
    for op in ("sgd_step_", "adamw_step_"):
        for source in (1, 2):
            for how in MISMATCHES:
                if how != "expanded":  # read-only
                    yield op, source, how


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("op,source,how", list(_combine_cases()))
def test_a_mismatched_combine_source_is_refused_and_nothing_changes(backend, op, source, how):
    """COMBINE's sources (K lists one after the other in ``combine_from``) are checked as aligned lists."""
    args = _valid(op)
    n, flat = len(SHAPES), args["combine_from"]
    args["combine_from"] = (
        flat[: (source - 1) * n]
        + _spoil(flat[(source - 1) * n : source * n], how, False)
        + (flat[source * n :])
    )
    snapshot = _snapshot(args)
    if how == "sparse":
        expected = r"not|layout|sparse"
    elif how == "short":
        expected = r"combine_from has 5 entries for 2 sources"
    else:
        expected = rf"combine_from \(source {source}\)\[1\]"
    with pytest.raises((RuntimeError, NotImplementedError), match=expected):
        BACKENDS[backend](op, args)
    _assert_unchanged(snapshot)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("op", ["sgd_step_", "adamw_step_"])
@pytest.mark.parametrize(
    "bad,expected",
    [("two_dim", r"combine_coef must be a 1-D tensor"), ("integer", r"combine_coef must be a dense floating"),
     ("one_too_many", r"combine_from has 6 entries for 3 sources"), ("empty", r"combine_coef is empty"),
     ("sources_without_coef", r"combine_from has 6 entries but combine_coef is None"),
     ("three_rows", r"combine_coef must be a 1-D tensor \(K \+ 1 coefficients\) or a 2-D one \(2, K \+ 1\)"),
     ("descent_of_four", r"DESCENT \(a 2-D combine_coef\) takes at most 3 sources, got 4")],
)  # fmt: skip
def test_bad_combine_coefficients_are_refused_and_nothing_changes(backend, op, bad, expected):
    args = _valid(op)
    args["combine_coef"] = {
        "two_dim": args["combine_coef"].reshape(1, 3),
        "integer": torch.tensor([1, 2, 3]),
        "one_too_many": torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=torch.float64),
        "empty": torch.zeros(0, dtype=torch.float64),
        "sources_without_coef": None,
        "three_rows": torch.zeros(3, 3, dtype=torch.float64),
        "descent_of_four": torch.zeros(2, 5, dtype=torch.float64),
    }[bad]
    snapshot = _snapshot(args)
    with pytest.raises(RuntimeError, match=expected):
        BACKENDS[backend](op, args)
    _assert_unchanged(snapshot)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("op", [*ALIGNED, *TASK_LISTS])
def test_the_valid_inputs_run(backend, op):
    """The unspoiled arguments of the test above are accepted (so each refusal is the mismatch's)."""
    BACKENDS[backend](op, _valid(op))


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("op", list(ALIGNED))
def test_a_lead_of_mixed_dtypes_is_refused(backend, op):
    args = _valid(op)
    lead = LEAD.get(op, "params")
    args[lead] = _spoil(args[lead], "dtype", False)
    snapshot = _snapshot(args)
    with pytest.raises(RuntimeError, match=rf"{lead}\[1\]"):
        BACKENDS[backend](op, args)
    _assert_unchanged(snapshot)


# buffer_ready is the compiled ops' (the Python backends take None for a buffer not started).
@pytest.mark.parametrize(
    "backend,op,name",
    [(backend, op, name) for backend in AVAILABLE for op, names in COUNTS.items() for name in names
     if not (name == "buffer_ready" and backend in ("forloop", "foreach"))],
)  # fmt: skip
def test_a_short_per_tensor_list_is_refused(backend, op, name):
    args = _valid(op)
    args[name] = list(args[name])[:-1]
    snapshot = _snapshot(args)
    with pytest.raises(RuntimeError, match=rf"{name} has 2 entries"):
        BACKENDS[backend](op, args)
    _assert_unchanged(snapshot)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("bad", ["two_elements", "short", "integer"])
def test_bad_step_counts_are_refused_and_none_is_counted(backend, bad):
    args = _valid("adamw_step_")
    if bad == "two_elements":
        args["steps"][1] = torch.zeros(2)
    elif bad == "short":
        args["steps"] = args["steps"][:-1]
    else:
        args["steps"][1] = torch.tensor(3)
    snapshot = _snapshot(args)
    with pytest.raises(RuntimeError, match=r"steps"):
        BACKENDS[backend]("adamw_step_", args)
    _assert_unchanged(snapshot)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("op,name", [("sgd_step_", "grad_scale"), ("sgd_step_", "found_inf"),
                                     ("adamw_step_", "clip_coef"), ("sam_perturb_", "scale")])  # fmt: skip
def test_a_per_step_scalar_of_several_elements_is_refused(backend, op, name):
    args = _valid(op)
    args[name] = torch.ones(2)
    snapshot = _snapshot(args)
    with pytest.raises(RuntimeError, match=rf"{name} must have one element"):
        BACKENDS[backend](op, args)
    _assert_unchanged(snapshot)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_sam_weight_kinds_need_their_lists(backend):
    """ASAM without the parameters, the running-Fisher kind without a Fisher: refused (the Triton
    launcher once read address 0 there, and its perturbation silently used T = 1)."""
    for op, kinds, drop, message in (("grad_sq_norm", [1, 0, 0], "params", "ASAM needs the parameters"),
                                     ("grad_sq_norm", [3, 0, 0], "fisher", "running Fisher needs"),
                                     ("sam_perturb_", [3, 0, 0], "fisher", "running Fisher needs")):  # fmt: skip
        args = _valid(op)
        args["weighted"], args[drop] = kinds, []
        snapshot = _snapshot(args)
        with pytest.raises((RuntimeError, ValueError), match=message):
            BACKENDS[backend](op, args)
        _assert_unchanged(snapshot)


def test_the_python_validator_refuses_another_device():
    """Checked here on the validator (the CPU has one device); tests/test_gpu_checks.py calls the
    CUDA and Triton ops with a tensor on another device."""
    args = _valid("ewc_grad_add_")
    args["anchor"] = [t.to("meta") if i == 1 else t for i, t in enumerate(args["anchor"])]
    with pytest.raises(RuntimeError, match=r"anchor\[1\] is on meta, params\[0\] on cpu"):
        _checks.check_op(
            "ewc_grad_add_", [args[k] for k in ("grads", "params", "precision", "anchor", "lam")]
        )
    args = _valid("task_combine_")
    args["grads"] = [t.to("meta") if i == 7 else t for i, t in enumerate(args["grads"])]
    with pytest.raises(RuntimeError, match=r"grads \(task 2\)\[1\] is on meta, out\[0\] on cpu"):
        _checks.check_op("task_combine_", [args[k] for k in ("out", "grads", "coefficients", "accumulate")])
    args = _valid("task_combine_")
    with pytest.raises(RuntimeError, match=r"coefficients are on meta, out\[0\] on cpu"):
        _checks.check_op("task_combine_", [args["out"], args["grads"], args["coefficients"].to("meta"), True])


@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b in ("forloop", "foreach")])
def test_a_missing_gradient_is_refused_by_the_python_backends(backend):
    """None stands for an absent tensor only where an op allows it (a momentum buffer not started,
    an uncovered EWC entry); a None gradient is refused before anything is written."""
    args = _valid("adamw_step_")
    args["grads"] = [args["grads"][0], None, args["grads"][2]]
    snapshot = _snapshot(args)
    with pytest.raises(RuntimeError, match=r"grads\[1\] is undefined"):
        BACKENDS[backend]("adamw_step_", args)
    _assert_unchanged(snapshot)


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("op", sorted(ALIGNED))
def test_a_tensor_on_the_meta_device_is_refused_and_nothing_changes(backend, op):
    """One meta tensor among CPU ones sends a compiled op to its meta kernel: without a check the
    whole call was a silent no-op (a combine_coef built on "meta" skipped nothing and wrote
    nothing). Every backend refuses it, naming the tensor."""
    args = _valid(op)
    name = next(iter(ALIGNED[op]))
    args[name] = [t.to("meta") if i == 1 else t for i, t in enumerate(args[name])]
    snapshot = [(t, before) for t, before in _snapshot(args) if not t.is_meta]
    with pytest.raises(RuntimeError, match=rf"{name}\[1\] is on meta"):
        BACKENDS[backend](op, args)
    _assert_unchanged(snapshot)
    if op in ("sgd_step_", "adamw_step_"):
        args = _valid(op)
        args["combine_coef"] = args["combine_coef"].to("meta")
        snapshot = [(t, before) for t, before in _snapshot(args) if not t.is_meta]
        with pytest.raises(RuntimeError, match=r"combine_coef is on meta"):
            BACKENDS[backend](op, args)
        _assert_unchanged(snapshot)
