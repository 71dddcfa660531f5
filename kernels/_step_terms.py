"""The optional terms of the SGD and AdamW steps as the Triton launchers pass them: device scalars
(a 1-element fp32 tensor each, or a placeholder with the flag off) and the per-tensor EWC lambdas."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class StepInputs:
    """The optional terms of one SGD/AdamW launch call, ready for the kernels: contiguous lists
    (None entries where a term is absent), which tensors EWC covers, and the device scalars."""

    saves: list
    fishers: list
    precision: list
    anchor: list
    covered: list
    inv_scale: Tensor
    amp: bool
    found_inf: Tensor
    skip: bool
    clip: Tensor
    clipped: bool
    sources: list  # COMBINE: K lists aligned with the parameters
    combine_coef: Tensor  # COMBINE: K + 1 fp32 coefficients on the device (a placeholder when off)
    combining: bool
    descent_coef: Tensor  # DESCENT: K + 1 fp32 coefficients d_j * lr / grad_scale (placeholder when off)
    descending: bool


def step_inputs(
    views,
    n,
    device,
    restore_from,
    fisher,
    ewc_precision,
    ewc_anchor,
    grad_scale,
    found_inf,
    clip_coef,
    combine_from=None,
    combine_coef=None,
    lr=0.0,
):
    covered = [bool(ewc_precision) and ewc_precision[i] is not None for i in range(n)]
    scale, amp = inv_scale(grad_scale, device)
    skip, has_skip = device_scalar(found_inf, device)
    clip, clipped = device_scalar(clip_coef, device)
    return StepInputs(
        saves=views(restore_from) if restore_from else [None] * n,
        fishers=views(fisher, written=True) if fisher else [None] * n,
        precision=views([ewc_precision[i] if covered[i] else None for i in range(n)]),
        anchor=views([ewc_anchor[i] if covered[i] else None for i in range(n)]),
        covered=covered,
        inv_scale=scale,
        amp=amp,
        found_inf=skip,
        skip=has_skip,
        clip=clip,
        clipped=clipped,
        sources=[
            views(list(combine_from[j * n : (j + 1) * n]))
            for j in range(len(combine_from or []) // max(n, 1))
        ],
        combine_coef=(
            torch.ones(1, dtype=torch.float32, device=device)
            if combine_coef is None
            else combine_coef.reshape(-1, combine_coef.shape[-1])[0].to(device=device, dtype=torch.float32)
        ),
        combining=combine_coef is not None,
        descent_coef=_descent(combine_coef, lr, grad_scale, device),
        descending=combine_coef is not None and combine_coef.dim() == 2,
    )


def _descent(combine_coef, lr, grad_scale, device) -> Tensor:
    """DESCENT's coefficients ``d_j * lr * (1/grad_scale)`` formed in fp64 by device ops (as the
    Python backends form them), then fp32."""
    if combine_coef is None or combine_coef.dim() != 2:
        return torch.ones(1, dtype=torch.float32, device=device)
    out = combine_coef[1].to(device=device, dtype=torch.float64) * float(lr)
    if grad_scale is not None:
        out = out * inv_scale(grad_scale, device)[0].to(torch.float64)
    return out.float()
