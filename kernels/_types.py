"""torch dtype -> Triton dtype of the tensors the kernels read and write."""

from __future__ import annotations

import torch
import triton.language as tl

_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def triton_dtype(dtype: torch.dtype):
    if dtype not in _DTYPES:
        raise TypeError(f"the Triton kernels take fp32, fp16 or bf16 tensors, got {dtype}")
    return _DTYPES[dtype]
