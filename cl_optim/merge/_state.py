"""The checks and the bookkeeping every merge shares: aligned ``state_dict``\\ s, their floating
entries, and the merged dict built from new tensors only."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor


def check_models(models: Sequence[Mapping[str, Tensor]], names: Sequence[str]) -> list[str]:
    """The floating-point keys of aligned models: every model has the first one's keys, and each
    entry its shape, dtype and device (a clear error names the model and the key otherwise)."""
    if not models:
        raise ValueError("no models to merge")
    first = models[0]
    for name, model in zip(names, models):
        if not isinstance(model, Mapping):
            raise TypeError(
                f"{name} must be a state_dict (a mapping of names to tensors), got {type(model).__name__}"
            )
    for name, model in zip(names[1:], models[1:]):
        missing, extra = set(first) - set(model), set(model) - set(first)
        if missing or extra:
            raise ValueError(
                f"{name} does not have the keys of {names[0]}: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(extra)[:5]}"
            )
        for key, ref in first.items():
            t = model[key]
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{key!r}] is a {type(t).__name__}, not a tensor")
            if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(
                    f"{name}[{key!r}] is {t.dtype} {tuple(t.shape)} on {t.device}, {names[0]}[{key!r}] "
                    f"{ref.dtype} {tuple(ref.shape)} on {ref.device}"
                )
    return [key for key, t in first.items() if isinstance(t, Tensor) and t.is_floating_point()]


def per_model(value: Union[float, Sequence[float]], k: int, what: str) -> list[float]:
    """A float for every model, from one value or a list of ``k``; finite."""
    values = [float(value)] * k if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != k:
        raise ValueError(f"{what} has {len(values)} values for {k} experts")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be finite, got {values}")
    return values


def assemble(template: Mapping[str, Tensor], merged: Mapping[str, Tensor]) -> dict:
    """The merged ``state_dict`` in the template's key order: merged floating entries, copies of
    the others (never a tensor of the inputs, so nothing returned aliases them)."""
    return {key: merged[key] if key in merged else t.detach().clone() for key, t in template.items()}


def opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
