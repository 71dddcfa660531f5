"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import torch
from torch import Tensor

from ..multitask.aggregators import weighted_sum_unchecked
from ._state import assemble, check_models, per_model


def task_arithmetic(
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    scale: Union[float, Sequence[float]] = 0.3,
    *,
    backend: str = "auto",
) -> dict:
    r"""``theta = theta0 + sum_k scale_k (theta_k - theta0)`` for every floating entry.

    Written as ``(1 - sum_k scale_k) theta0 + sum_k scale_k theta_k``: one fused pass per
    (device, dtype) group (``task_combine_``, opmath, one rounding to the entry's dtype), no task
    vector materialised. ``scale`` is one value or one per expert; the paper searches it on
    validation data in [0, 1] (FusionBench's config uses 0.5, its tables 0.3, the default here).

    Example:
        >>> import torch
        >>> from cl_optim.merge import task_arithmetic
        >>> base = {"w": torch.zeros(2)}
        >>> experts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 2.0])}]
        >>> task_arithmetic(base, experts, scale=0.5)["w"]
        tensor([0.5000, 1.0000])
    """
    experts = list(experts)
    keys = check_models([base, *experts], ["base"] + [f"experts[{k}]" for k in range(len(experts))])
    if not experts:
        raise ValueError("task_arithmetic needs at least one expert")
    scales = per_model(scale, len(experts), "scale")
    merged = {}
    if keys:
        coefficients = torch.tensor([1.0 - sum(scales), *scales], dtype=torch.float64)
        lists = [[model[key].detach() for key in keys] for model in (base, *experts)]
        merged = dict(zip(keys, weighted_sum_unchecked(lists, coefficients, backend=backend)))
    return assemble(base, merged)
