"""Fisher merging (Matena & Raffel, "Merging Models with Fisher Weighting", NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from .._backend import resolve
from ..ewc import ewc_consolidate_
from ..multitask.aggregators import weighted_sum_unchecked
from ._state import assemble, check_models, per_model


def fisher_merge(
    experts: Sequence[Mapping[str, Tensor]],
    fishers: Sequence[Mapping[str, Tensor]],
    weights: Optional[Union[float, Sequence[float]]] = None,
    *,
    backend: str = "auto",
) -> dict:
    r"""``theta = sum_k w_k F_k theta_k / sum_k w_k F_k`` per element, ``F_k`` a diagonal Fisher.

    This is the anchor of a separate-mode EWC that consolidated the experts one after the other
    (``A <- A + w F``, ``mu <- (A mu + w F theta) / (A + w F)``), so it runs on the fused
    ``ewc_consolidate_`` op, in fp32 as EWC's buffers (the result cast to each entry's dtype).
    Where every ``F_k`` is 0 the weighted plain average ``sum_k w_k theta_k / sum_k w_k`` is
    taken (the official code adds a floor of 1e-6 to every Fisher, which is that limit).

    ``fishers[k]`` maps entry names of ``experts[k]`` to non-negative tensors of their shapes (any
    float dtype; e.g. ``cl_optim.fisher.estimate(..., estimator="exact")``, keyed by name, as the
    paper's exact per-example Fisher); an entry no Fisher covers is averaged with the weights.
    ``weights`` (default 1 each) are the paper's per-model coefficients.

    Example:
        >>> import torch
        >>> from cl_optim.merge import fisher_merge
        >>> experts = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 3.0])}]
        >>> fishers = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 0.0])}]
        >>> fisher_merge(experts, fishers)["w"]
        tensor([2.5000, 2.0000])
    """
    experts, fishers = list(experts), list(fishers)
    keys = check_models(experts, [f"experts[{k}]" for k in range(len(experts))])
    if len(fishers) != len(experts):
        raise ValueError(f"{len(fishers)} Fisher dicts for {len(experts)} experts")
    w = per_model(1.0 if weights is None else weights, len(experts), "weights")
    if any(v < 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {w}")
    covered = [key for key in keys if any(key in f for f in fishers)]
    for k, fisher in enumerate(fishers):
        for key, f in fisher.items():
            if key not in experts[k] or key not in keys:
                raise ValueError(f"fishers[{k}][{key!r}] names no floating entry of experts[{k}]")
            if not isinstance(f, Tensor) or f.shape != experts[k][key].shape:
                shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(
                    f"fishers[{k}][{key!r}] has shape {shape}, the entry {tuple(experts[k][key].shape)}"
                )
            if bool((f < 0).any()) or not bool(torch.isfinite(f).all()):
                raise ValueError(f"fishers[{k}][{key!r}] has negative or non-finite values")
    merged = {}
    # The weighted plain average: the entries no Fisher covers, and the elements with F = 0.
    average_coefficients = torch.tensor([v / sum(w) for v in w], dtype=torch.float64)
    averages = dict(zip(keys, weighted_sum_unchecked(
        [[e[key].detach() for key in keys] for e in experts], average_coefficients, backend=backend
    )))  # fmt: skip
    if covered:
        like = experts[0][covered[0]]
        op_backend = resolve(backend, like.device, torch.float32)
        precision = [torch.zeros_like(experts[0][key], dtype=torch.float32) for key in covered]
        anchor = [torch.zeros_like(experts[0][key], dtype=torch.float32) for key in covered]
        for k, (expert, fisher) in enumerate(zip(experts, fishers)):
            f = [
                fisher[key].detach().to(device=expert[key].device, dtype=torch.float32)
                if key in fisher
                else torch.zeros_like(precision[i])
                for i, key in enumerate(covered)
            ]
            params = [expert[key].detach() for key in covered]
            ewc_consolidate_(precision, anchor, f, params, 1.0, w[k], True, backend=op_backend)
        for key, a, mu in zip(covered, precision, anchor):
            value = torch.where(a > 0, mu, averages[key].to(torch.float32))
            merged[key] = value.to(experts[0][key].dtype)
    for key in keys:
        merged.setdefault(key, averages[key])
    return assemble(experts[0], merged)
