"""Which elements a SAM ascent moves: SAM-ON's normalisation layers and SSAM-F's Fisher mask.

* SAM-ON (Mueller et al., NeurIPS 2023) perturbs only the affine parameters of normalisation
  layers (about 0.1% of a ResNet's parameters), the ascent's norm taken over those alone.
* SSAM-F (Mi et al., NeurIPS 2022) perturbs the elements of largest Fisher score: a fraction
  ``1 - sparsity`` of all of them, chosen globally. The norm stays that of the whole gradient (as
  the official code). The mask is one bit per element; its threshold is found by a radix select
  on the fp32 bit patterns (four 256-bin histograms, each one pass over the scores), not by a
  global sort (which would need ``N`` extra words and ``O(N log N)`` work).

Example:
    >>> import torch
    >>> packed = fisher_keep_mask([torch.tensor([0.1, 3.0, 2.0, 0.5])], sparsity=0.5)
    >>> unpack_mask(packed[0], torch.Size([4]))
    tensor([False,  True,  True, False])
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["norm_layer_parameters", "fisher_keep_mask", "unpack_mask"]

_NORM_TYPES = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
    )
    if t is not None
)
MASK_KEY = "ssam_mask"  # SSAM-F: the packed mask of a parameter, in SAM's per-parameter state
_BIT_WEIGHTS = {torch.device("cpu"): torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)}


def _bit_weights(device: torch.device) -> Tensor:
    """The 8 bit weights on ``device``, copied there once (a copy per call would synchronise)."""
    found = _BIT_WEIGHTS.get(device)
    if found is None:
        found = _BIT_WEIGHTS[device] = _BIT_WEIGHTS[torch.device("cpu")].to(device)
    return found


def norm_layer_parameters(
    only_norm_layers: Union[bool, nn.Module], param_groups: list[dict]
) -> Optional[set]:
    """``id``s of the parameters SAM-ON perturbs, or None (every parameter).

    ``only_norm_layers``: a module (its normalisation layers, by type: batch/instance norm,
    LayerNorm, GroupNorm, RMSNorm) or ``True`` with named parameters (``model.named_parameters()``),
    selecting the names the official SAM-ON code selects (containing ``norm`` or ``bn``).
    """
    if only_norm_layers is False or only_norm_layers is None:
        return None
    if isinstance(only_norm_layers, nn.Module):
        return {
            id(p)
            for module in only_norm_layers.modules()
            if isinstance(module, _NORM_TYPES)
            for p in module.parameters(recurse=False)
        }
    if only_norm_layers is not True:
        raise TypeError(
            f"only_norm_layers takes True (with named parameters) or the model, got {only_norm_layers!r}"
        )
    selected = set()
    for group in param_groups:
        names = group.get("param_names")
        if names is None:
            raise ValueError(
                "only_norm_layers=True selects parameters by name: pass model.named_parameters() "
                "(or only_norm_layers=model, which selects the normalisation layers by type)"
            )
        selected.update(id(p) for p, name in zip(group["params"], names) if "norm" in name or "bn" in name)
    return selected


def fisher_keep_mask(scores: list[Tensor], sparsity: float) -> list[Tensor]:
    """Packed masks (``uint8``, 8 elements per byte) keeping the ``round((1 - sparsity) * N)``
    elements of largest score over all ``N`` elements of ``scores``; ties at the threshold are
    kept in order (tensor by tensor, flattened), so exactly that many are kept."""
    total = sum(s.numel() for s in scores)
    keep = int(round((1.0 - sparsity) * total))
    flat = [_sortable_bits(s) for s in scores]
    if keep <= 0 or keep >= total:
        return [_pack(torch.full_like(f, keep > 0, dtype=torch.bool)) for f in flat]
    threshold = _kth_largest_bits(flat, keep)
    above = [f > threshold for f in flat]
    ties_needed = keep - int(sum(int(a.sum()) for a in above))
    masks = []
    for f, a in zip(flat, above):
        tie = f == threshold
        order = torch.cumsum(tie.to(torch.int64), 0)  # 1-based rank among this tensor's ties
        masks.append(_pack(a | (tie & (order <= ties_needed))))
        ties_needed = max(0, ties_needed - int(tie.sum()))
    return masks


def unpack_mask(packed: Tensor, shape: torch.Size) -> Tensor:
    """The boolean mask of ``shape`` from its packed bytes."""
    numel = shape.numel()
    bits = packed.to(torch.uint8).unsqueeze(1).bitwise_and(_bit_weights(packed.device)) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def _sortable_bits(score: Tensor) -> Tensor:
    """The fp32 bit pattern of ``|score|`` (NaN as 0) as int64: ordered as the values are."""
    value = torch.nan_to_num(score.detach().reshape(-1).to(torch.float32).abs(), nan=0.0, posinf=float("inf"))
    return value.view(torch.int32).to(torch.int64)


def _kth_largest_bits(flat: list[Tensor], k: int) -> int:
    """The bit pattern of the ``k``-th largest value: four 8-bit digits, most significant first,
    each picked from a 256-bin histogram of the candidates that share the digits found so far."""
    prefix, mask, remaining = 0, 0, k
    for shift in (24, 16, 8, 0):
        counts = torch.zeros(256, dtype=torch.int64)
        for f in flat:
            candidates = f[(f & mask) == prefix] if mask else f
            counts += torch.bincount((candidates >> shift) & 0xFF, minlength=256).cpu()
        # Walk the digits from the top until the k-th largest is inside one of them.
        above = torch.flip(torch.cumsum(torch.flip(counts, [0]), 0), [0])  # count of digit >= d
        digit = int(torch.nonzero(above >= remaining).max())
        remaining -= int(above[digit + 1]) if digit < 255 else 0
        prefix |= digit << shift
        mask |= 0xFF << shift
    return prefix


def _pack(mask: Tensor) -> Tensor:
    padded = torch.zeros((mask.numel() + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[: mask.numel()] = mask.reshape(-1)
    return (padded.view(-1, 8) * _bit_weights(mask.device)).sum(1, dtype=torch.uint8)
