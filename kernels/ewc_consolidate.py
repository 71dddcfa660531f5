"""``ewc_consolidate_``: A' = decay*A + weight*F; mu' the Fisher-weighted anchor (p where A' = 0)
or p; returns per tensor, as fp64 on the device, sum decay*A * weight*F / A' * (mu - p)**2 — the
increment of the collapse constant (two deterministic stages: chunk partials, then per-tensor
fixed-order sums)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._elementwise import chunk_of, div_rn, load_tensor, store_tensor
from ._pointer_table import BLOCK, Contiguous, pointer_table
from ._reduce import segment_sums
from ._types import triton_dtype


@triton.jit
def _ewc_consolidate_kernel(addresses, n_tensors, sizes, chunk_tensor, chunk_start, partials, decay, weight,
                            P_DTYPE: tl.constexpr, WEIGHTED_ANCHOR: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # Lists: 0 precision, 1 anchor, 2 fisher, 3 param.
    t, offsets, mask = chunk_of(chunk_tensor, chunk_start, sizes, BLOCK)
    chunk = tl.program_id(0)
    a = load_tensor(addresses, 0, n_tensors, t, offsets, mask, tl.float32)
    mu = load_tensor(addresses, 1, n_tensors, t, offsets, mask, tl.float32)
    f = load_tensor(addresses, 2, n_tensors, t, offsets, mask, tl.float32)
    theta = load_tensor(addresses, 3, n_tensors, t, offsets, mask, P_DTYPE)
    old = decay * a
    fresh = weight * f
    total = old + fresh
    if WEIGHTED_ANCHOR:
        diff = mu - theta
        positive = total > 0.0
        safe = tl.where(positive, total, 1.0)
        gap = tl.where(positive & mask, div_rn(old * fresh, safe) * diff * diff, 0.0)
        new_anchor = tl.where(positive, div_rn(old * mu + fresh * theta, safe), theta)
    else:
        gap = tl.zeros((BLOCK,), dtype=tl.float32)
        new_anchor = theta
    store_tensor(addresses, 0, n_tensors, t, offsets, mask, total, tl.float32)
    store_tensor(addresses, 1, n_tensors, t, offsets, mask, new_anchor, tl.float32)
    tl.store(partials + chunk, tl.sum(gap.to(tl.float64), axis=0))  # summed in fp64, as the C++ loops


def ewc_consolidate_(precision, anchor, fisher, params, decay, weight, weighted_anchor):
    device = precision[0].device
    views = Contiguous(params)
    table = pointer_table(
        [views(precision, written=True), views(anchor, written=True), views(fisher), views(params)]
    )
    partials = torch.zeros(max(table.num_chunks, 1), dtype=torch.float64, device=device)
    if table.num_chunks:
        _ewc_consolidate_kernel[(table.num_chunks,)](
            table.addresses, table.num_tensors, table.sizes, table.chunk_tensor, table.chunk_start, partials,
            float(decay), float(weight), P_DTYPE=triton_dtype(params[0].dtype),
            WEIGHTED_ANCHOR=bool(weighted_anchor), BLOCK=BLOCK,
        )  # fmt: skip
    views.finish()
    # Each tensor's chunks are consecutive: its partials end at the running chunk count.
    return segment_sums(partials, [(p.numel() + BLOCK - 1) // BLOCK for p in precision])
