"""``ewc_penalty``: sum_t lam_t / 2 * sum A (p - mu)**2, an fp64 scalar on the device.

Two deterministic stages: each program writes its chunk's partial (the fp64 sum of the chunk's
terms, times lam_t / 2), then one fixed-order sum (``_reduce.total``). No host read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._elementwise import chunk_of, load_tensor
from ._pointer_table import BLOCK, Contiguous, per_tensor, pointer_table
from ._reduce import total
from ._types import triton_dtype


@triton.jit
def _ewc_penalty_partials(addresses, n_tensors, sizes, chunk_tensor, chunk_start, lams, partials,
                          P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # Lists: 0 param, 1 precision, 2 anchor.
    t, offsets, mask = chunk_of(chunk_tensor, chunk_start, sizes, BLOCK)
    chunk = tl.program_id(0)
    p = load_tensor(addresses, 0, n_tensors, t, offsets, mask, P_DTYPE).to(tl.float64)
    a = load_tensor(addresses, 1, n_tensors, t, offsets, mask, tl.float32).to(tl.float64)
    mu = load_tensor(addresses, 2, n_tensors, t, offsets, mask, tl.float32).to(tl.float64)
    # In fp64 from the loads on, as the C++ kernels and the oracle: A (p - mu)^2 overflows fp32
    # for a precision of 1e30 and a distance of 1e5.
    d = p - mu
    chunk_sum = tl.sum(a * d * d, axis=0)
    tl.store(partials + chunk, 0.5 * tl.load(lams + t) * chunk_sum)


def ewc_penalty(params, precision, anchor, lam):
    device = params[0].device
    views = Contiguous(params)
    table = pointer_table([views(params), views(precision), views(anchor)])
    partials = torch.zeros(max(table.num_chunks, 1), dtype=torch.float64, device=device)
    if table.num_chunks:
        _ewc_penalty_partials[(table.num_chunks,)](
            table.addresses, table.num_tensors, table.sizes, table.chunk_tensor, table.chunk_start,
            per_tensor(lam, device, torch.float64), partials, P_DTYPE=triton_dtype(params[0].dtype), BLOCK=BLOCK,
        )  # fmt: skip
    return total(partials, table.num_chunks)
