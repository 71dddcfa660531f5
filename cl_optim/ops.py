"""Every fused op of cl_optim, declared once as a ``torch.library`` op.

The schemas live here, with fake implementations so that ``torch.compile`` can trace through an
optimizer step; the compiled backends register their kernels against them (``csrc/bindings.cpp``
for the CPU). Lists that may be empty switch a term off: an empty ``restore_from`` is no RESTORE,
an empty ``fisher`` no FISHER_EMA, an empty ``ewc_precision`` no EWC, a ``None``
``combine_coef`` no COMBINE (``combine_from`` then empty; otherwise ``K`` source lists of n
tensors one after the other, source-major, and ``K + 1`` coefficients, the first for ``grads``;
a ``(2, K + 1)`` ``combine_coef`` adds DESCENT, its second row ``d``: after the update
``p += lr/grad_scale * (d_0 grads + d_1 x_1 + ...)``, ``K <= 3``; see ``cl_optim/_terms.py``). The scalars that change
every step and may live on the device — ``grad_scale``, ``found_inf``, ``clip_coef``, SAM's
``scale`` and ``finite`` — are 0-dim tensors (``None``: the term is off), so no step needs a host
read of them: a non-zero ``found_inf`` makes the step restore the weights (RESTORE) and change
nothing else, inside the op. ``adamw_step_`` increments its ``steps`` itself (unless skipped)
and derives the bias corrections from them.

Importing this module defines the schemas only; it loads no extension and touches no device.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

LIBRARY = "cl_optim"

SCHEMAS = {
    "sgd_step_": (
        "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, int[] buffer_ready, "
        "Tensor[] restore_from, Tensor[] combine_from, Tensor? combine_coef, Tensor(c!)[] fisher, Tensor?[] ewc_precision, Tensor?[] ewc_anchor, "
        "float[] ewc_lam, Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef, float fisher_beta, bool maximize, "
        "float lr, float momentum, float dampening, float weight_decay, bool nesterov) -> ()"
    ),
    "adamw_step_": (
        "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor[] restore_from, Tensor[] combine_from, "
        "Tensor? combine_coef, Tensor(f!)[] fisher, "
        "Tensor?[] ewc_precision, Tensor?[] ewc_anchor, float[] ewc_lam, Tensor? grad_scale, Tensor? found_inf, "
        "Tensor? clip_coef, float fisher_beta, bool maximize, float lr, float beta1, float beta2, float eps, "
        "float weight_decay) -> ()"
    ),
    "grad_sq_norm": (
        "grad_sq_norm(Tensor[] grads, Tensor[] params, Tensor[] fisher, int[] weighted, float eta) -> Tensor"
    ),
    "sam_perturb_": (
        "sam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] saves, Tensor scale, int[] weighted, "
        "float eta, Tensor(c!)[] fisher, float fisher_beta, Tensor? grad_scale, Tensor? finite) -> ()"
    ),
    "fisher_accumulate_": "fisher_accumulate_(Tensor(a!)[] fisher, Tensor[] grads, float weight) -> ()",
    "ewc_grad_add_": (
        "ewc_grad_add_(Tensor(a!)[] grads, Tensor[] params, Tensor[] precision, Tensor[] anchor, float[] lam) -> ()"
    ),
    "ewc_penalty": "ewc_penalty(Tensor[] params, Tensor[] precision, Tensor[] anchor, float[] lam) -> Tensor",
    "ewc_consolidate_": (
        "ewc_consolidate_(Tensor(a!)[] precision, Tensor(b!)[] anchor, Tensor[] fisher, Tensor[] params, "
        "float decay, float weight, bool weighted_anchor) -> Tensor"
    ),
    # Multi-task: `grads` holds T lists of n tensors one after the other (task-major, T*n entries).
    "task_gram": "task_gram(Tensor[] grads, int num_tasks) -> Tensor",
    "task_combine_": (
        "task_combine_(Tensor(a!)[] out, Tensor[] grads, Tensor coefficients, bool accumulate) -> ()"
    ),
    # Per-sample Fisher: out (M, N) fp32 += sum_b (deltas[b]^T inputs[b])**2, deltas (B, R, M),
    # inputs (B, R, N); the per-sample products are formed tile by tile, never all at once.
    "per_sample_sq_accumulate_": "per_sample_sq_accumulate_(Tensor(a!) out, Tensor deltas, Tensor inputs) -> ()",
}

# Ops with a C++ CPU kernel only, in the cl_optim library alone: the step loops of the per-sample
# Fisher's LSTM rule (cl_optim/fisher/lstm_steps.py; on a GPU the rule keeps cuDNN's fused forward
# and its Python step loop, which a GPU run has yet to time against a kernel).
CPU_SCHEMAS = {
    "lstm_forward_steps_": (
        "lstm_forward_steps_(Tensor(a!) gates, Tensor(b!) output, Tensor(c!) states, Tensor(d!) factors, "
        "Tensor(e!) through, Tensor w_hh, Tensor h0, Tensor c0, bool reverse) -> ()"
    ),
    "lstm_backward_steps_": (
        "lstm_backward_steps_(Tensor(a!) dz, Tensor factors, Tensor through, Tensor gates, Tensor d_own, "
        "Tensor w_hh, Tensor dh_last, Tensor dc_last, bool reverse) -> ()"
    ),
}


def _no_output(*args, **kwargs):
    return None


def _grad_sq_norm_fake(grads, params, fisher, weighted, eta):
    return (grads[0] if grads else torch.empty(0)).new_empty((), dtype=torch.float64)


def _ewc_penalty_fake(params, precision, anchor, lam):
    return (params[0] if params else torch.empty(0)).new_empty((), dtype=torch.float64)


def _ewc_consolidate_fake(precision, anchor, fisher, params, decay, weight, weighted_anchor):
    return (precision[0] if precision else torch.empty(0)).new_empty((len(precision),), dtype=torch.float64)


def _task_gram_fake(grads, num_tasks):
    return (grads[0] if grads else torch.empty(0)).new_empty((num_tasks, num_tasks), dtype=torch.float64)


_FAKES = {
    "task_gram": _task_gram_fake,
    "grad_sq_norm": _grad_sq_norm_fake,
    "ewc_penalty": _ewc_penalty_fake,
    "ewc_consolidate_": _ewc_consolidate_fake,
}


def _refusing_mixed_meta(op: str, fake):
    """``fake`` behind a check: torch dispatches a call with any tensor on the meta device to the
    meta kernel, so one meta tensor among real ones (a coefficient built on "meta") would make a
    whole step a silent no-op. Fake tensors (tracing, ``torch.compile``) and all-meta calls pass."""

    def checked(*args, **kwargs):
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        meta = [t for t in leaves if t.is_meta]
        if meta:
            real = [t for t in leaves if not t.is_meta and type(t) in (torch.Tensor, torch.nn.Parameter)]
            if real:
                from ._checks import check_op

                check_op(op, args, kwargs)  # names the tensor, as the Python backends do
                raise RuntimeError(
                    f"cl_optim.{op}: tensors on the meta device next to tensors on {real[0].device}; "
                    "every tensor argument must be on the parameters' device"
                )
        return fake(*args, **kwargs)

    return checked


def define_library(name: str) -> torch.library.Library:
    """Declare every op of ``SCHEMAS``, with its fake kernel, in the library ``name``.

    ``cl_optim`` holds the ops of the C++/CUDA backends; the Triton backend declares the same
    schemas as ``cl_optim_triton`` (its kernels serve CUDA tensors, and CPU tensors under
    ``TRITON_INTERPRET=1``, so they cannot share a dispatch key with the C++ ones).
    """
    library = torch.library.Library(name, "DEF")
    for op, schema in SCHEMAS.items():
        library.define(schema)
        torch.library.register_fake(
            f"{name}::{op}", _refusing_mixed_meta(op, _FAKES.get(op, _no_output)), lib=library
        )
    return library


_library = define_library(LIBRARY)
for _op, _schema in CPU_SCHEMAS.items():
    _library.define(_schema)
    torch.library.register_fake(f"{LIBRARY}::{_op}", _no_output, lib=_library)
