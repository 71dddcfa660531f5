"""Reference model merging, written from the papers' rules. Tests compare the library with it.

It is written for correctness, not speed, and does not use ``cl_optim``.

* Task arithmetic: G. Ilharco, M. T. Ribeiro, M. Wortsman, S. Gururangan, L. Schmidt, H. Hajishirzi,
  A. Farhadi, "Editing Models with Task Arithmetic", ICLR 2023.
* TIES-Merging: P. Yadav, D. Tam, L. Choshen, C. Raffel, M. Bansal, "TIES-Merging: Resolving Interference
  When Merging Models", NeurIPS 2023.
* Fisher merging: M. Matena, C. Raffel, "Merging Models with Fisher Weighting", NeurIPS 2022.

Conventions (every function):

* Models are state_dicts (``str -> Tensor``). Every expert must have the same keys as the reference dict
  (``base``, or ``experts[0]`` for Fisher merging), and the same shapes for the floating entries.
* Only floating-point tensors are merged. Any other entry (an integer buffer such as BatchNorm's
  ``num_batches_tracked``, a bool mask, a non-tensor value) is copied from the reference dict.
* Arithmetic is done in float64; each merged tensor is cast back once, at the end, to the dtype of the
  reference dict's tensor. Outputs are new tensors (never views of the inputs), and the inputs are never
  modified.
* Output keys come in the reference dict's order. ``experts`` must not be empty.
"""

from __future__ import annotations

import copy
from numbers import Real

import torch
from torch import Tensor

__all__ = ["fisher_merge_ref", "task_arithmetic_ref", "ties_ref"]

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _is_float(v) -> bool:
    return isinstance(v, Tensor) and v.is_floating_point()


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(F64)


def _copy(v):
    """A copy of a non-merged entry, so that the output never shares storage with the inputs."""
    return v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)


def _check_experts(ref: dict, experts: list[dict]) -> None:
    if len(experts) == 0:
        raise ValueError("experts must not be empty")
    for i, expert in enumerate(experts):
        if set(expert) != set(ref):
            raise KeyError(f"expert {i} keys differ from the reference: {sorted(set(expert) ^ set(ref))}")
        for key, v in ref.items():
            if _is_float(v) and expert[key].shape != v.shape:
                raise ValueError(f"expert {i}, {key!r}: shape {tuple(expert[key].shape)} != {tuple(v.shape)}")


def _assemble(ref: dict, merged: dict) -> dict:
    """Merged floating entries cast back to the reference dtype; every other entry copied from ``ref``."""
    return {key: merged[key].to(v.dtype) if key in merged else _copy(v) for key, v in ref.items()}


# ----------------------------------------------------------------------------------------------------------
# Task arithmetic


def task_arithmetic_ref(base: dict, experts: list[dict], scale) -> dict:
    """Task arithmetic (Ilharco et al., 2023, "Editing Models with Task Arithmetic").

    Each expert's task vector is ``tau_k = theta_k - theta0``; the merged model is
    ``theta = theta0 + sum_k scale_k * tau_k``.

    ``scale``: one number used for every expert, or a sequence with one number per expert.
    """
    _check_experts(base, experts)
    scales = [float(scale)] * len(experts) if isinstance(scale, Real) else [float(s) for s in scale]
    if len(scales) != len(experts):
        raise ValueError(f"{len(scales)} scales for {len(experts)} experts")
    merged = {}
    for key, v0 in base.items():
        if not _is_float(v0):
            continue
        theta0 = _f64(v0)
        theta = theta0.clone()
        for lam, expert in zip(scales, experts):
            theta = theta + lam * (_f64(expert[key]) - theta0)
        merged[key] = theta
    return _assemble(base, merged)


# ----------------------------------------------------------------------------------------------------------
# TIES-Merging


def _trim(tau: dict, m: int) -> dict:
    """TRIM: keep the entries of ``tau`` whose magnitude is at least the m-th largest over the whole model.

    All tensors are flattened together, so the threshold is one number for the model. Entries equal to the
    threshold are all kept (so more than ``m`` entries may survive); the others become 0."""
    magnitudes = torch.cat([t.abs().flatten() for t in tau.values()])
    threshold = torch.sort(magnitudes, descending=True).values[m - 1]
    return {k: torch.where(t.abs() >= threshold, t, torch.zeros_like(t)) for k, t in tau.items()}


def ties_ref(base: dict, experts: list[dict], density: float, scale: float) -> dict:
    """TIES-Merging (Yadav et al., 2023, "TIES-Merging: Resolving Interference When Merging Models").

    1. Task vectors ``tau_k = theta_k - theta0`` over all floating entries.
    2. TRIM (per expert, over the whole model): with ``P`` the number of floating elements and
       ``m = max(1, round(density * P))`` (Python's ``round``: halves go to the even integer; ``m`` is also
       capped at ``P``), keep the entries with ``|tau_k| >=`` the m-th largest ``|tau_k|``; zero the rest.
    3. ELECT: ``s = sign(sum_k trimmed_k)`` per element. With ``majority = sign(sum of s over the whole
       model)``, or +1 when that is 0, every element with ``s == 0`` gets ``s = majority``.
    4. DISJOINT MEAN: per element, the mean of the trimmed ``tau_k`` that are non-zero and have the sign
       ``s``; 0 where there is none.
    5. ``theta = theta0 + scale * merged``.

    ``density`` must be in (0, 1]; ``scale`` is one number.
    """
    _check_experts(base, experts)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    keys = [k for k, v in base.items() if _is_float(v)]
    theta0 = {k: _f64(base[k]) for k in keys}
    n_elements = sum(t.numel() for t in theta0.values())
    if n_elements == 0:
        return _assemble(base, {k: t.clone() for k, t in theta0.items()})

    # (1) task vectors, (2) TRIM
    m = min(n_elements, max(1, round(density * n_elements)))
    trimmed = [_trim({k: _f64(e[k]) - theta0[k] for k in keys}, m) for e in experts]

    # (3) ELECT
    sign = {k: torch.sign(sum(t[k] for t in trimmed)) for k in keys}
    majority = torch.sign(sum(s.sum() for s in sign.values())).item()
    if majority == 0:
        majority = 1.0
    sign = {k: torch.where(s == 0, torch.full_like(s, majority), s) for k, s in sign.items()}

    # (4) DISJOINT MEAN, (5) add back to the base
    merged = {}
    for k in keys:
        total = torch.zeros_like(theta0[k])
        count = torch.zeros_like(theta0[k])
        for t in trimmed:
            agree = (t[k] != 0) & (torch.sign(t[k]) == sign[k])
            total = total + torch.where(agree, t[k], torch.zeros_like(t[k]))
            count = count + agree.to(F64)
        mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
        merged[k] = theta0[k] + scale * mean
    return _assemble(base, merged)


# ----------------------------------------------------------------------------------------------------------
# Fisher merging


def fisher_merge_ref(experts: list[dict], fishers: list[dict], weights=None) -> dict:
    """Fisher merging (Matena & Raffel, 2022, "Merging Models with Fisher Weighting").

    Per element, ``theta = sum_k w_k F_k theta_k / sum_k w_k F_k``, with ``F_k = fishers[k][key]`` (a diagonal
    Fisher of the same shape as the parameter) and ``w_k = weights[k]`` (default: all 1).

    * Where ``sum_k w_k F_k == 0`` for an element, that element is the weighted plain average
      ``sum_k w_k theta_k / sum_k w_k``.
    * A floating key absent from every Fisher dict is merged with that weighted plain average. A key must be
      in all Fisher dicts or in none; a Fisher key must name a floating entry of the experts.
    * Non-floating entries are copied from ``experts[0]``, and dtypes follow ``experts[0]``.
    """
    _check_experts(experts[0] if experts else {}, experts)
    if len(fishers) != len(experts):
        raise ValueError(f"{len(fishers)} Fisher dicts for {len(experts)} experts")
    weights = [1.0] * len(experts) if weights is None else [float(w) for w in weights]
    if len(weights) != len(experts):
        raise ValueError(f"{len(weights)} weights for {len(experts)} experts")
    if sum(weights) == 0:
        raise ValueError("the weights sum to 0")
    ref = experts[0]
    float_keys = {k for k, v in ref.items() if _is_float(v)}
    for i, fisher in enumerate(fishers):
        if not set(fisher) <= float_keys:
            extra = set(fisher) - float_keys
            raise KeyError(f"Fisher {i} keys not among the floating expert entries: {extra}")

    merged = {}
    for key, v in ref.items():
        if not _is_float(v):
            continue
        thetas = [_f64(e[key]) for e in experts]
        plain = sum(w * t for w, t in zip(weights, thetas)) / sum(weights)
        present = [key in f for f in fishers]
        if not any(present):
            merged[key] = plain
            continue
        if not all(present):
            raise KeyError(f"{key!r} is in some Fisher dicts but not all")
        fs = [_f64(f[key]) for f in fishers]
        for i, f in enumerate(fs):
            if f.shape != v.shape:
                raise ValueError(f"Fisher {i}, {key!r}: shape {tuple(f.shape)} != {tuple(v.shape)}")
        num = sum(w * f * t for w, f, t in zip(weights, fs, thetas))
        den = sum(w * f for w, f in zip(weights, fs))
        nonzero = den != 0
        merged[key] = torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), plain)
    return _assemble(ref, merged)
