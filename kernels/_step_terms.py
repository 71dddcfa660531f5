"""The optional terms of the SGD and AdamW steps as the Triton launchers pass them: device scalars
(a 1-element fp32 tensor each, or a placeholder with the flag off) and the per-tensor EWC lambdas."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def device_scalar(value: Optional[Tensor], device: torch.device) -> tuple[Tensor, bool]:
    """``(tensor, on)``: the scalar as fp32 on ``device``, or a placeholder and ``False``."""
    if value is None:
        return torch.ones(1, dtype=torch.float32, device=device), False
    return value.reshape(1).to(device=device, dtype=torch.float32), True


def inv_scale(grad_scale: Optional[Tensor], device: torch.device) -> tuple[Tensor, bool]:
    """1/grad_scale rounded as GradScaler.unscale_ (reciprocal in fp64, then fp32), on the device."""
    if grad_scale is None:
        return device_scalar(None, device)
    return grad_scale.reshape(1).to(device=device, dtype=torch.float64).reciprocal().float(), True


def split_by(keys: list) -> dict:
    """``key -> indices``: the tensors of one launch group share every constexpr flag (e.g. EWC
    covered or not, momentum buffer started or not), so a kernel never reads an absent tensor."""
    groups: dict = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return groups


def pick(values: Optional[list], index: list[int]) -> Optional[list]:
    return None if values is None else [values[i] for i in index]
