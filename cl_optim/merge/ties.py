"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ._state import assemble, check_models, opmath


def ties(
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    density: float = 0.2,
    scale: float = 1.0,
) -> dict:
    r"""Trim, elect, disjoint mean, over the task vectors ``tau_k = theta_k - theta0``:

    1. trim: in each ``tau_k``, over the whole model (every floating entry together), keep the
       elements whose ``|tau_k|`` is at least the ``m``-th largest, ``m = max(1, round(density P))``
       of the ``P`` elements (ties at the threshold kept), zero the others;
    2. elect: ``s = sign(sum_k trimmed tau_k)`` per element; where that sum is 0, the sign of
       ``sum s`` over the model (+1 when that is 0 too);
    3. disjoint mean: the mean of the trimmed ``tau_k`` that are non-zero and of sign ``s`` (0
       where none is);
    4. ``theta = theta0 + scale * merged``.

    The paper's defaults: top 20% and ``scale`` about 1 (searched in [0.8, 2.5]). The official
    code keeps one element more than ``density P`` (its threshold is the
    ``(P - int(density P))``-th smallest value) — one element in ``P``. FusionBench's default is
    another rule: ``merge_func="sum"`` (the agreeing values summed, not averaged) with scale 0.5.

    Memory: one task vector at a time (its ``|tau_k|`` flattened for the threshold, a
    ``kthvalue`` selection), plus three running accumulators of the model's size; never ``K x P``.
    The arithmetic runs in opmath (fp32 for fp16/bf16 entries), one rounding at the end.

    Example:
        >>> import torch
        >>> from cl_optim.merge import ties
        >>> base = {"w": torch.zeros(4)}
        >>> a = {"w": torch.tensor([3.0, -1.0, 0.1, 2.0])}
        >>> b = {"w": torch.tensor([1.0, 2.0, -0.1, -4.0])}
        >>> ties(base, [a, b], density=0.5)["w"]
        tensor([ 3.,  2.,  0., -4.])
    """
    experts = list(experts)
    keys = check_models([base, *experts], ["base"] + [f"experts[{k}]" for k in range(len(experts))])
    if not experts:
        raise ValueError("ties needs at least one expert")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not torch.isfinite(torch.tensor(float(scale))):
        raise ValueError(f"scale must be finite, got {scale}")
    if not keys:
        return assemble(base, {})
    total = sum(base[key].numel() for key in keys)
    keep = max(1, round(float(density) * total))

    theta0 = [base[key].detach().to(opmath(base[key].dtype)) for key in keys]

    def task_vector(k: int) -> list[Tensor]:
        return [experts[k][key].detach().to(t0.dtype) - t0 for key, t0 in zip(keys, theta0)]

    # Trim: each task vector's threshold (its keep-th largest magnitude over the whole model).
    thresholds = []
    for k in range(len(experts)):
        magnitudes = torch.cat([t.abs().reshape(-1).to(theta0[0].device) for t in task_vector(k)])
        thresholds.append(torch.kthvalue(magnitudes, total - keep + 1).values.item())
        del magnitudes

    def trimmed(k: int) -> list[Tensor]:
        return [torch.where(t.abs() >= thresholds[k], t, torch.zeros_like(t)) for t in task_vector(k)]

    # Elect: the sign of the summed trimmed vectors, zeros resolved by the model-wide majority.
    summed = trimmed(0)
    for k in range(1, len(experts)):
        for acc, t in zip(summed, trimmed(k)):
            acc.add_(t)
    signs = [torch.sign(s) for s in summed]
    majority = torch.sign(sum(s.sum() for s in signs))
    majority = torch.where(majority == 0, torch.ones_like(majority), majority)
    signs = [torch.where(s == 0, majority.to(s.device), s) for s in signs]
    # Disjoint mean: the agreeing non-zero values, averaged.
    agreeing_sum = [torch.zeros_like(s) for s in signs]
    agreeing_count = [torch.zeros_like(s) for s in signs]
    for k in range(len(experts)):
        for acc, count, s, t in zip(agreeing_sum, agreeing_count, signs, trimmed(k)):
            agree = (t != 0) & (torch.sign(t) == s)
            acc.add_(torch.where(agree, t, torch.zeros_like(t)))
            count.add_(agree.to(count.dtype))
    merged = {}
    for key, t0, acc, count in zip(keys, theta0, agreeing_sum, agreeing_count):
        merged[key] = (t0 + float(scale) * (acc / count.clamp_min(1))).to(base[key].dtype)
    return assemble(base, merged)
