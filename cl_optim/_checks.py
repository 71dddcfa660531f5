"""Input checks of the fused ops on the Python side: the Triton launchers and the ``forloop`` /
``foreach`` backends. The same rules and wording as ``csrc/op_checks.h`` (the C++ and CUDA
kernels), mirrored function for function.

Every op checks every tensor it will touch before it reads or writes any memory: each list is
aligned with the op's lead list (the parameters, or the gradients for the ops without them), one
tensor per lead tensor, of its shape, on its device, with the lead's dtype (or fp32 for the
Fisher and EWC buffers), dense and strided. A mismatch raises a ``RuntimeError`` naming the op,
the list, the index and both shapes, and nothing has been changed: a kernel sized from the lead
list would otherwise read and write past the end of a shorter tensor, and a Python loop would
raise half-way through an update. ``tests/test_op_checks.py`` calls every op of every backend
with every kind of mismatch.

``None`` entries are absent tensors only where an op allows them (a Python backend's momentum
buffer not started yet, an uncovered EWC entry); ``None`` or an empty list switches a term off.
One difference from the C++ rules, on purpose: the Python backends also take an all-fp64 call
(fp64 Fisher and EWC buffers next to fp64 parameters), the oracle's own fp64 reference; the
kernels take fp32 buffers only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

LIKE, FP32 = "like", "fp32"  # the dtype of an aligned list: the lead's, or fp32

# The dtypes each kind of backend runs (the CPU C++ kernels and the Python backends also fp64).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_DTYPES = (*KERNEL_DTYPES, torch.float64)

_SHAPE_HINT = " (state of another model, or a parameter that changed shape after its state was created)"


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _has_internal_overlap(t: Tensor) -> bool:
    # What ATen's has_internal_overlap says "Yes" to: a zero stride over a dimension longer than one.
    return any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape))


class OpInputs:
    """The checks of one op call (see ``csrc/op_checks.h``, class ``OpInputs``)."""

    def __init__(
        self,
        op: str,
        lead_name: str,
        lead: Sequence[Tensor],
        *,
        written: bool,
        dtypes: tuple = ALL_DTYPES,
        device_types: Optional[tuple[str, ...]] = None,
    ):
        self.op, self.lead_name, self.lead = op, lead_name, list(lead)
        self.n = len(self.lead)
        if self.n == 0:
            return
        first = self.lead[0]
        if first is None:
            raise RuntimeError(f"{op}: {lead_name}[0] is undefined")
        self.device, self.dtype = first.device, first.dtype
        if device_types is not None and self.device.type not in device_types:
            raise RuntimeError(
                f"{op}: {lead_name}[0] is on {self.device}; this kernel runs on {' or '.join(device_types)} tensors"
            )
        if self.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise RuntimeError(f"{op}: {lead_name} are {self.dtype}; the kernels take {names} tensors")
        for i, t in enumerate(self.lead):
            if t is None:
                raise RuntimeError(f"{op}: {lead_name}[{i}] is undefined")
            if t.dtype != self.dtype:
                raise RuntimeError(
                    f"{op}: {lead_name}[{i}] is {t.dtype}, {lead_name}[0] {self.dtype} (one launch takes one dtype)"
                )
            self._check_tensor(lead_name, i, t, written)

    def aligned(
        self, name: str, tensors, want: str, *, optional: bool, written: bool, absent_ok: bool = False
    ) -> None:
        """One tensor per lead tensor, of its shape (``optional``: or none, the term is off);
        ``absent_ok``: ``None`` entries are absent tensors (a momentum buffer not started, an EWC
        entry not covered), as the C++ ops take ``Tensor?[]`` for the EWC lists."""
        if optional and not tensors:
            return
        tensors = [] if tensors is None else tensors
        self.count(name, len(tensors), optional=False)
        for i, t in enumerate(tensors):
            if t is None:
                if not absent_ok:
                    raise RuntimeError(f"{self.op}: {name}[{i}] is undefined")
                continue
            self._check_entry(name, i, t, want, written)

    def count(self, name: str, size: int, *, optional: bool) -> None:
        if optional and size == 0:
            return
        if size != self.n:
            raise RuntimeError(f"{self.op}: {name} has {size} entries for {self.n} {self.lead_name}")

    def scalar(self, name: str, t: Optional[Tensor]) -> None:
        if t is None or not isinstance(t, Tensor):
            return
        if t.numel() != 1:
            raise RuntimeError(f"{self.op}: {name} must have one element, got shape {_shape(t)}")
        if t.layout != torch.strided:
            raise RuntimeError(f"{self.op}: {name} must be a dense tensor")

    def _check_entry(self, name: str, i: int, t: Tensor, want: str, written: bool) -> None:
        lead = self.lead[i]
        if t.shape != lead.shape:
            raise RuntimeError(
                f"{self.op}: {name}[{i}] has shape {_shape(t)}, {self.lead_name}[{i}] has shape "
                f"{_shape(lead)}{_SHAPE_HINT}"
            )
        expected = torch.float32 if want == FP32 else self.dtype
        # An all-fp64 call (fp64 Fisher next to fp64 parameters) is the oracle's own fp64
        # reference; the kernels, which never see fp64 buffers, take fp32 only.
        if t.dtype != expected and not (want == FP32 and t.dtype == self.dtype == torch.float64):
            why = (
                " (the Fisher and EWC buffers are fp32)" if want == FP32 else " (the dtype of its parameter)"
            )
            raise RuntimeError(f"{self.op}: {name}[{i}] is {t.dtype}, expected {expected}{why}")
        self._check_tensor(name, i, t, written)

    def _check_tensor(self, name: str, i: int, t: Tensor, written: bool) -> None:
        if t.layout != torch.strided:
            raise RuntimeError(
                f"{self.op}: {name}[{i}] has layout {t.layout}; the kernels take dense tensors"
            )
        if t.device != self.device:
            raise RuntimeError(
                f"{self.op}: {name}[{i}] is on {t.device}, {self.lead_name}[0] on {self.device}"
            )
        if written and _has_internal_overlap(t):
            raise RuntimeError(
                f"{self.op}: {name}[{i}] is written but several of its elements share memory (an expanded view)"
            )


def check_step_terms(in_: OpInputs, restore_from, fisher, ewc_precision, ewc_anchor, ewc_lam, grad_scale,
                     found_inf, clip_coef, combine_from=None, combine_coef=None) -> None:  # fmt: skip
    in_.aligned("restore_from", restore_from, LIKE, optional=True, written=False)
    check_combine(in_, combine_from, combine_coef)
    in_.aligned("fisher", fisher, FP32, optional=True, written=True)
    in_.aligned("ewc_precision", ewc_precision, FP32, optional=True, written=False, absent_ok=True)
    in_.aligned("ewc_anchor", ewc_anchor, FP32, optional=True, written=False, absent_ok=True)
    precision, anchor = ewc_precision or [], ewc_anchor or []
    if len(precision) != len(anchor):
        raise RuntimeError("ewc_precision and ewc_anchor differ in length")
    for i, (a, mu) in enumerate(zip(precision, anchor)):
        if (a is None) != (mu is None):
            raise RuntimeError(f"EWC precision and anchor must be given together (tensor {i})")
    if isinstance(ewc_lam, (list, tuple)):
        in_.count("ewc_lam", len(ewc_lam), optional=not precision)
    in_.scalar("grad_scale", grad_scale)
    in_.scalar("found_inf", found_inf)
    in_.scalar("clip_coef", clip_coef)


# DESCENT reads the gradient and COMBINE's sources in the update's pass; CUDA's kernels read at most
# 3 there (csrc/op_checks.h), so every backend takes at most 3.
MAX_DESCENT_SOURCES = 3


def check_combine(in_: OpInputs, combine_from, combine_coef) -> None:
    """COMBINE: ``combine_coef`` a dense floating-point tensor on the lead's device, 1-D with
    ``K + 1`` entries, or 2-D ``(2, K + 1)`` (row 0 COMBINE's, row 1 DESCENT's), ``combine_from``
    ``K`` lists aligned with the lead (source-major); both absent switch the terms off."""
    sources = list(combine_from) if combine_from else []
    if combine_coef is None:
        if sources:
            raise RuntimeError(f"{in_.op}: combine_from has {len(sources)} entries but combine_coef is None")
        return
    if not isinstance(combine_coef, Tensor) or not (
        combine_coef.dim() == 1 or (combine_coef.dim() == 2 and combine_coef.shape[0] == 2)
    ):
        got = tuple(combine_coef.shape) if isinstance(combine_coef, Tensor) else type(combine_coef).__name__
        raise RuntimeError(
            f"{in_.op}: combine_coef must be a 1-D tensor (K + 1 coefficients) or a 2-D one (2, K + 1) "
            f"(COMBINE's, then DESCENT's), got {got}"
        )
    if not combine_coef.dtype.is_floating_point or combine_coef.layout != torch.strided:
        raise RuntimeError(
            f"{in_.op}: combine_coef must be a dense floating-point tensor, got {combine_coef.dtype}"
        )
    k = combine_coef.shape[-1] - 1
    if k < 0:
        raise RuntimeError(f"{in_.op}: combine_coef is empty (it needs K + 1 coefficients)")
    if combine_coef.dim() == 2 and k > MAX_DESCENT_SOURCES:
        raise RuntimeError(
            f"{in_.op}: DESCENT (a 2-D combine_coef) takes at most {MAX_DESCENT_SOURCES} sources, got {k}"
        )
    if len(sources) != k * in_.n:
        raise RuntimeError(
            f"{in_.op}: combine_from has {len(sources)} entries for {k} sources of {in_.n} {in_.lead_name} "
            "(source-major, K*n; K = len(combine_coef) - 1)"
        )
    for j in range(k):
        in_.aligned(f"combine_from (source {j + 1})", sources[j * in_.n : (j + 1) * in_.n], LIKE,
                    optional=False, written=False)  # fmt: skip
    if in_.n and combine_coef.device != in_.device:
        raise RuntimeError(
            f"{in_.op}: combine_coef is on {combine_coef.device}, {in_.lead_name}[0] on {in_.device}"
        )


def check_sam_weights(in_: OpInputs, weighted, params, fisher) -> None:
    weighted = list(weighted) if weighted is not None else []
    in_.count("weighted", len(weighted), optional=True)
    for kind in weighted:
        if int(kind) not in (0, 1, 2, 3):
            raise RuntimeError(
                f"SAM weight kind {int(kind)} is not 0 (plain), 1 (ASAM), 2 (Fisher-SAM, batch) or "
                "3 (Fisher-SAM, running Fisher)"
            )
        if int(kind) == 1 and not params:
            raise RuntimeError("ASAM needs the parameters, one per gradient")
        if int(kind) == 3 and not fisher:
            raise RuntimeError(
                "Fisher-SAM with the running Fisher needs `fisher`, one fp32 tensor per gradient"
            )


# ---------------------------------------------------------------------------------- per op
# Each takes the op's arguments by their schema names (cl_optim/ops.py) and the backend's limits.


def check_sgd_step_(params, grads, momentum_buffers, buffer_ready, restore_from, fisher, ewc_precision,
                    ewc_anchor, ewc_lam, grad_scale, found_inf, clip_coef, combine_from=None, combine_coef=None,
                    **limits) -> OpInputs:  # fmt: skip
    in_ = OpInputs("sgd_step_", "params", params, written=True, **limits)
    in_.aligned("grads", grads, LIKE, optional=False, written=False)
    # None: a buffer the Python backends start from the gradient (the C++ ops take buffer_ready).
    in_.aligned("momentum_buffers", momentum_buffers, LIKE, optional=True, written=True, absent_ok=True)
    if momentum_buffers and buffer_ready is not None:
        in_.count("buffer_ready", len(buffer_ready), optional=False)
    check_step_terms(in_, restore_from, fisher, ewc_precision, ewc_anchor, ewc_lam, grad_scale, found_inf,
                     clip_coef, combine_from, combine_coef)  # fmt: skip
    return in_


def check_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, restore_from, fisher,
                      ewc_precision, ewc_anchor, ewc_lam, grad_scale, found_inf, clip_coef, combine_from=None,
                      combine_coef=None, steps_on_lead_device: bool = False, **limits) -> OpInputs:  # fmt: skip
    in_ = OpInputs("adamw_step_", "params", params, written=True, **limits)
    in_.aligned("grads", grads, LIKE, optional=False, written=False)
    in_.aligned("exp_avgs", exp_avgs, LIKE, optional=False, written=True)
    in_.aligned("exp_avg_sqs", exp_avg_sqs, LIKE, optional=False, written=True)
    in_.aligned("max_exp_avg_sqs", max_exp_avg_sqs, LIKE, optional=True, written=True)
    in_.count("steps", len(steps), optional=False)
    for i, s in enumerate(steps):
        if not isinstance(s, Tensor) or s.numel() != 1 or s.layout != torch.strided:
            raise RuntimeError(f"adamw_step_: steps[{i}] must be a one-element tensor (the step count)")
        if not s.dtype.is_floating_point:
            raise RuntimeError(
                f"adamw_step_: steps[{i}] is {s.dtype}; step counts are floating-point tensors"
            )
        if steps_on_lead_device and (s.device != in_.device or s.dtype != torch.float32):
            raise RuntimeError(
                f"adamw_step_: steps[{i}] is {s.dtype} on {s.device}; the kernels count steps in fp32 on the "
                f"parameters' device ({in_.device})"
            )
    check_step_terms(in_, restore_from, fisher, ewc_precision, ewc_anchor, ewc_lam, grad_scale, found_inf,
                     clip_coef, combine_from, combine_coef)  # fmt: skip
    return in_


def check_grad_sq_norm(grads, params, fisher, weighted, **limits) -> OpInputs:
    in_ = OpInputs("grad_sq_norm", "grads", grads, written=False, **limits)
    in_.aligned("params", params, LIKE, optional=True, written=False)
    in_.aligned("fisher", fisher, FP32, optional=True, written=False)
    check_sam_weights(in_, weighted, params, fisher)
    return in_


def check_sam_perturb_(
    params, grads, saves, scale, weighted, fisher, grad_scale, finite, **limits
) -> OpInputs:
    in_ = OpInputs("sam_perturb_", "params", params, written=True, **limits)
    in_.aligned("grads", grads, LIKE, optional=False, written=False)
    in_.aligned("saves", saves, LIKE, optional=False, written=True)
    in_.aligned("fisher", fisher, FP32, optional=True, written=True)
    check_sam_weights(in_, weighted, params, fisher)
    in_.scalar("scale", scale)
    in_.scalar("grad_scale", grad_scale)
    in_.scalar("finite", finite)
    return in_


def check_fisher_accumulate_(fisher, grads, **limits) -> OpInputs:
    in_ = OpInputs("fisher_accumulate_", "grads", grads, written=False, **limits)
    in_.aligned("fisher", fisher, FP32, optional=False, written=True)
    return in_


def check_ewc_grad_add_(grads, params, precision, anchor, lam, **limits) -> OpInputs:
    in_ = OpInputs("ewc_grad_add_", "params", params, written=False, **limits)
    in_.aligned("grads", grads, LIKE, optional=False, written=True)
    in_.aligned("precision", precision, FP32, optional=False, written=False)
    in_.aligned("anchor", anchor, FP32, optional=False, written=False)
    in_.count("lam", len(lam), optional=False)
    return in_


def check_ewc_penalty(params, precision, anchor, lam, **limits) -> OpInputs:
    in_ = OpInputs("ewc_penalty", "params", params, written=False, **limits)
    in_.aligned("precision", precision, FP32, optional=False, written=False)
    in_.aligned("anchor", anchor, FP32, optional=False, written=False)
    in_.count("lam", len(lam), optional=False)
    return in_


def check_ewc_consolidate_(precision, anchor, fisher, params, **limits) -> OpInputs:
    in_ = OpInputs("ewc_consolidate_", "params", params, written=False, **limits)
    in_.aligned("precision", precision, FP32, optional=False, written=True)
    in_.aligned("anchor", anchor, FP32, optional=False, written=True)
    in_.aligned("fisher", fisher, FP32, optional=False, written=False)
    return in_


def _task_slices(op: str, grads, num_tasks: int, n: Optional[int] = None) -> list:
    """The T task lists of a task-major ``grads`` (T*n entries)."""
    if num_tasks < 1:
        raise RuntimeError(f"{op}: num_tasks must be at least 1, got {num_tasks}")
    grads = list(grads)
    if n is None:
        if len(grads) % num_tasks:
            raise RuntimeError(
                f"{op}: grads has {len(grads)} entries, not a multiple of num_tasks = {num_tasks} (T lists of n "
                "tensors, task-major)"
            )
        n = len(grads) // num_tasks
    elif len(grads) != num_tasks * n:
        raise RuntimeError(
            f"{op}: grads has {len(grads)} entries for {num_tasks} tasks of {n} tensors (task-major, T*n)"
        )
    return [grads[t * n : (t + 1) * n] for t in range(num_tasks)]


def check_task_gram(grads, num_tasks, **limits) -> OpInputs:
    tasks = _task_slices("task_gram", grads, int(num_tasks))
    in_ = OpInputs("task_gram", "grads", tasks[0], written=False, **limits)
    for t in range(1, len(tasks)):
        in_.aligned(f"grads (task {t})", tasks[t], LIKE, optional=False, written=False)
    return in_


def check_task_combine_(out, grads, coefficients, **limits) -> OpInputs:
    in_ = OpInputs("task_combine_", "out", out, written=True, **limits)
    if not isinstance(coefficients, Tensor) or coefficients.dim() != 1:
        raise RuntimeError(
            f"task_combine_: coefficients must be a 1-D tensor (one per task), got "
            f"{_shape(coefficients) if isinstance(coefficients, Tensor) else type(coefficients).__name__}"
        )
    if not coefficients.dtype.is_floating_point or coefficients.layout != torch.strided:
        raise RuntimeError(
            f"task_combine_: coefficients must be a dense floating-point tensor, got {coefficients.dtype}"
        )
    num_tasks = coefficients.numel()
    if num_tasks == 0:
        raise RuntimeError("task_combine_: coefficients is empty (no task)")
    tasks = _task_slices("task_combine_", grads, num_tasks, in_.n)
    for t, task in enumerate(tasks):
        in_.aligned(f"grads (task {t})", task, LIKE, optional=False, written=False)
    if in_.n and coefficients.device != in_.device:
        raise RuntimeError(
            f"task_combine_: coefficients are on {coefficients.device}, out[0] on {in_.device}"
        )
    return in_


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense (ATen's is_non_overlapping_and_dense): the elements fill a block of
    memory without gaps (contiguous, channels_last, any permutation), so a kernel can walk it from
    its data pointer; the strides, sorted, are those of a contiguous tensor."""
    if t.numel() == 0 or t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _bytes_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether the bytes two strided tensors span intersect (a conservative test of shared memory)."""
    if a.numel() == 0 or b.numel() == 0:
        return False

    def span(t):
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def check_per_sample_sq_accumulate_(
    out, deltas, inputs, *, dtypes=KERNEL_DTYPES, device_types=None, **limits
) -> OpInputs:
    """``out`` a dense fp32 ``(M, N)`` matrix without shared elements; ``deltas`` ``(B, R, M)`` and
    ``inputs`` ``(B, R, N)`` dense, of one kernel dtype, on out's device (any strides)."""
    op = "per_sample_sq_accumulate_"
    for name, t, dims in (("out", out, 2), ("deltas", deltas, 3), ("inputs", inputs, 3)):
        if not isinstance(t, Tensor):
            got = "None" if t is None else type(t).__name__
            raise RuntimeError(f"{op}: {name} must be a tensor, got {got}")
        if t.layout != torch.strided:
            raise RuntimeError(f"{op}: {name} has layout {t.layout}; the kernels take dense tensors")
        if t.dim() != dims:
            raise RuntimeError(f"{op}: {name} must have {dims} dimensions, got shape {_shape(t)}")
    if out.dtype != torch.float32:
        raise RuntimeError(f"{op}: out is {out.dtype}, expected torch.float32 (the Fisher is fp32)")
    if device_types is not None and out.device.type not in device_types:
        raise RuntimeError(
            f"{op}: out is on {out.device}; this kernel runs on {' or '.join(device_types)} tensors"
        )
    if not is_dense(out):
        raise RuntimeError(
            f"{op}: out must be a dense matrix whose elements do not share memory (contiguous or transposed), "
            f"got strides {list(out.stride())}"
        )
    if out.requires_grad:
        raise RuntimeError(
            f"{op}: out requires grad; autograd cannot record this in-place sum (pass a tensor that does not, "
            "such as its .detach())"
        )
    for name, t in (("deltas", deltas), ("inputs", inputs)):
        if t.device != out.device:
            raise RuntimeError(f"{op}: {name} is on {t.device}, out on {out.device}")
        if _bytes_overlap(out, t):
            raise RuntimeError(
                f"{op}: out shares memory with {name} (out is written while they are still read)"
            )
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise RuntimeError(f"{op}: {name} is {t.dtype}; the kernels take {names} tensors")
    if deltas.dtype != inputs.dtype:
        raise RuntimeError(f"{op}: deltas are {deltas.dtype}, inputs {inputs.dtype} (one dtype per call)")
    batch, rows, m = deltas.shape
    if out.device.type == "cuda" and m > 65535 * 32:  # out's rows on the grid's second axis
        raise RuntimeError(f"{op}: out has {m} rows; the GPU kernels take at most 2097120")
    if inputs.shape[:2] != deltas.shape[:2] or tuple(out.shape) != (m, inputs.shape[2]):
        raise RuntimeError(
            f"{op}: shapes do not match: out {_shape(out)}, deltas {_shape(deltas)} (B, R, M), inputs "
            f"{_shape(inputs)} (B, R, N); out must be (M, N) and both inputs share B and R"
        )
    return OpInputs(op, "out", [out], written=True, dtypes=(torch.float32,))


CHECKS = {
    "task_gram": check_task_gram,
    "task_combine_": check_task_combine_,
    "sgd_step_": check_sgd_step_,
    "adamw_step_": check_adamw_step_,
    "grad_sq_norm": check_grad_sq_norm,
    "sam_perturb_": check_sam_perturb_,
    "fisher_accumulate_": check_fisher_accumulate_,
    "ewc_grad_add_": check_ewc_grad_add_,
    "ewc_penalty": check_ewc_penalty,
    "ewc_consolidate_": check_ewc_consolidate_,
    "per_sample_sq_accumulate_": check_per_sample_sq_accumulate_,
}


@functools.cache
def _checked_arguments(op: str) -> tuple[list[str], frozenset]:
    from .ops import SCHEMAS

    names = [argument.name for argument in torch._C.parse_schema(SCHEMAS[op]).arguments]
    return names, frozenset(inspect.signature(CHECKS[op]).parameters)


def check_op(op: str, args: Sequence, kwargs: Optional[dict] = None, **limits) -> OpInputs:
    """Check a call of ``op`` made with the arguments of its schema (``cl_optim/ops.py``)."""
    names, wanted = _checked_arguments(op)
    inputs = {**dict(zip(names, args)), **(kwargs or {})}
    return CHECKS[op](**{key: value for key, value in inputs.items() if key in wanted}, **limits)
