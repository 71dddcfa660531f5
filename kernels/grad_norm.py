"""``grad_sq_norm``: sum_i ||T_i g_i||^2 over a multi-tensor group, a 0-dim fp64 tensor on the
device (accumulated in fp64: a large finite gradient has a finite norm), with SAM's weight kinds (0 SAM, 1 ASAM, 2 Fisher-SAM on g**2, 3 on a running Fisher).
Two deterministic stages (chunk partials, then a fixed-order sum); a non-finite gradient gives a
non-finite result, which is how SAM detects it without a host read."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._elementwise import chunk_of, load_tensor, sam_norm_term
from ._pointer_table import BLOCK, Contiguous, pointer_table
from ._reduce import total
from ._step_terms import pick, split_by
from ._types import triton_dtype


@triton.jit
def _grad_sq_norm_partials(addresses, n_tensors, sizes, chunk_tensor, chunk_start, partials, partial_offset, eta,
                           G_DTYPE: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # Lists: 0 grad, 1 param (ASAM), 2 running Fisher (kind 3).
    t, offsets, mask = chunk_of(chunk_tensor, chunk_start, sizes, BLOCK)
    chunk = tl.program_id(0)
    g = load_tensor(addresses, 0, n_tensors, t, offsets, mask, G_DTYPE)
    p = tl.zeros((BLOCK,), dtype=tl.float32)
    f = tl.zeros((BLOCK,), dtype=tl.float32)
    if KIND == 1:
        p = load_tensor(addresses, 1, n_tensors, t, offsets, mask, G_DTYPE)
    if KIND == 3:
        f = load_tensor(addresses, 2, n_tensors, t, offsets, mask, tl.float32)
    term = tl.where(mask, sam_norm_term(p, g, f, eta, KIND), 0.0)
    tl.store(partials + partial_offset + chunk, tl.sum(term, axis=0))


def grad_sq_norm(grads, params, fisher, weighted, eta):
    n = len(grads)
    device = grads[0].device
    kinds = [int(k) for k in weighted] if weighted else [0] * n
    views = Contiguous(grads)
    g = views(grads)
    p = views(params) if params else [None] * n
    f = views(fisher) if fisher else [None] * n
    groups = split_by(kinds)
    tables = {
        kind: pointer_table(
            [
                pick(g, index),
                [p[i] if kind == 1 else None for i in index],
                [f[i] if kind == 3 else None for i in index],
            ]
        )  # fmt: skip
        for kind, index in groups.items()
    }
    count = sum(table.num_chunks for table in tables.values())
    partials = torch.zeros(max(count, 1), dtype=torch.float64, device=device)
    offset = 0
    for kind, table in tables.items():  # one launch per weight kind present, partials side by side
        if table.num_chunks:
            _grad_sq_norm_partials[(table.num_chunks,)](
                table.addresses, table.num_tensors, table.sizes, table.chunk_tensor, table.chunk_start, partials,
                offset, float(eta), G_DTYPE=triton_dtype(grads[0].dtype), KIND=kind, BLOCK=BLOCK,
            )  # fmt: skip
        offset += table.num_chunks
    return total(partials, count)
