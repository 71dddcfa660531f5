"""The Triton backend's ops: the schemas of ``cl_optim/ops.py`` declared again as the library
``cl_optim_triton`` (with their fake kernels, so ``torch.compile`` sees them), implemented by the
launchers of this package for CUDA tensors, and for CPU tensors under ``TRITON_INTERPRET=1``.

Every call is checked first (``cl_optim/_checks.py``, the rules of the C++ ops) and launched on
the device of its tensors, whatever the current device.
"""

from __future__ import annotations

import contextlib

import torch

from cl_optim._checks import KERNEL_DTYPES, check_op
from cl_optim.ops import define_library

from .adamw_step import adamw_step_
from .ewc_consolidate import ewc_consolidate_
from .ewc_grad_add import ewc_grad_add_
from .ewc_penalty import ewc_penalty
from .fisher_accumulate import fisher_accumulate_
from .grad_norm import grad_sq_norm
from .per_sample_sq import per_sample_sq_accumulate_
from .sam_perturb import sam_perturb_
from .sgd_step import sgd_step_
from .task_combine import task_combine_
from .task_gram import task_gram

LIBRARY = "cl_optim_triton"
IMPLEMENTATIONS = {
    "sgd_step_": sgd_step_,
    "adamw_step_": adamw_step_,
    "fisher_accumulate_": fisher_accumulate_,
    "ewc_grad_add_": ewc_grad_add_,
    "ewc_penalty": ewc_penalty,
    "ewc_consolidate_": ewc_consolidate_,
    "grad_sq_norm": grad_sq_norm,
    "sam_perturb_": sam_perturb_,
    "task_gram": task_gram,
    "task_combine_": task_combine_,
    "per_sample_sq_accumulate_": per_sample_sq_accumulate_,
}


def checked(name: str, launcher):
    """``launcher`` behind the input checks of op ``name`` and a device guard: nothing is
    launched, allocated or written before every tensor has been checked against its parameter."""
    limits = dict(dtypes=KERNEL_DTYPES, device_types=("cuda", "cpu"))
    if name == "adamw_step_":
        limits["steps_on_lead_device"] = True

    def run(*args, **kwargs):
        checked_inputs = check_op(name, args, kwargs, **limits)
        if checked_inputs.n and checked_inputs.device.type == "cuda":
            guard = torch.cuda.device(checked_inputs.device)
        else:
            guard = contextlib.nullcontext()
        with guard:
            return launcher(*args, **kwargs)

    run.__name__ = run.__qualname__ = f"{name}_checked"
    return run


_library = define_library(LIBRARY)
for _name, _impl in IMPLEMENTATIONS.items():
    for _key in ("CUDA", "CPU"):
        _library.impl(_name, checked(_name, _impl), _key)

ops = torch.ops.cl_optim_triton
