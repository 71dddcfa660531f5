"""The Triton backend's ops: the schemas of ``cl_optim/ops.py`` declared again as the library
``cl_optim_triton`` (with their fake kernels, so ``torch.compile`` sees them), implemented by the
launchers of this package for CUDA tensors, and for CPU tensors under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import torch

from cl_optim.ops import define_library

from .adamw_step import adamw_step_
from .ewc_consolidate import ewc_consolidate_
from .ewc_grad_add import ewc_grad_add_
from .ewc_penalty import ewc_penalty
from .fisher_accumulate import fisher_accumulate_
from .grad_norm import grad_sq_norm
from .sam_perturb import sam_perturb_
from .sgd_step import sgd_step_

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
}

_library = define_library(LIBRARY)
for _name, _impl in IMPLEMENTATIONS.items():
    for _key in ("CUDA", "CPU"):
        _library.impl(_name, _impl, _key)

ops = torch.ops.cl_optim_triton
