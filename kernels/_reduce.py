"""Stage 2 of the two-stage reductions: fixed-order sums of per-chunk partials, on the device."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024


@triton.jit
def _segment_sum_kernel(partials, begins, ends, out, longest, BLOCK: tl.constexpr):
    """out[s] = sum of partials[begins[s] : ends[s]], in a fixed order; ``longest`` (the longest
    segment, known on the host) bounds the loop."""
    segment = tl.program_id(0)
    begin = tl.load(begins + segment)
    end = tl.load(ends + segment)
    acc = tl.zeros((BLOCK,), dtype=partials.dtype.element_ty)
    for start in range(0, longest, BLOCK):
        offsets = begin + start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offsets, mask=offsets < end, other=0.0)
    tl.store(out + segment, tl.sum(acc, axis=0))


def segment_sums(partials: Tensor, lengths: list[int]) -> Tensor:
    """Per-segment sums of ``partials``, cut into consecutive segments of ``lengths`` (host ints)."""
    out = torch.zeros(len(lengths), dtype=partials.dtype, device=partials.device)
    if lengths and max(lengths) > 0:
        ends = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
        begins = ends - torch.tensor(lengths, dtype=torch.int64)
        _segment_sum_kernel[(len(lengths),)](
            partials, begins.to(partials.device), ends.to(partials.device), out, max(lengths), BLOCK=_BLOCK
        )
    return out


def total(partials: Tensor, count: int) -> Tensor:
    """The sum of the first ``count`` partials as a 0-dim tensor on their device (deterministic)."""
    return segment_sums(partials, [count]).reshape(())
