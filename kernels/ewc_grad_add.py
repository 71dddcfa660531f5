"""``ewc_grad_add_``: g += lam_t * A * (p - mu) (A, mu fp32), one lambda per tensor."""

from __future__ import annotations

import triton
import triton.language as tl

from ._elementwise import chunk_of, load_tensor, store_tensor
from ._pointer_table import BLOCK, Contiguous, per_tensor, pointer_table
from ._types import triton_dtype


@triton.jit
def _ewc_grad_add_kernel(addresses, n_tensors, sizes, chunk_tensor, chunk_start, lams,
                         P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # Lists: 0 grad (written), 1 param, 2 precision, 3 anchor.
    t, offsets, mask = chunk_of(chunk_tensor, chunk_start, sizes, BLOCK)
    g = load_tensor(addresses, 0, n_tensors, t, offsets, mask, P_DTYPE)
    p = load_tensor(addresses, 1, n_tensors, t, offsets, mask, P_DTYPE)
    a = load_tensor(addresses, 2, n_tensors, t, offsets, mask, tl.float32)
    mu = load_tensor(addresses, 3, n_tensors, t, offsets, mask, tl.float32)
    lam = tl.load(lams + t)
    store_tensor(addresses, 0, n_tensors, t, offsets, mask, g + lam * a * (p - mu), P_DTYPE)


def ewc_grad_add_(grads, params, precision, anchor, lam) -> None:
    if not grads:
        return
    views = Contiguous(params)
    table = pointer_table([views(grads, written=True), views(params), views(precision), views(anchor)])
    if table.num_chunks:
        _ewc_grad_add_kernel[(table.num_chunks,)](
            table.addresses, table.num_tensors, table.sizes, table.chunk_tensor, table.chunk_start,
            per_tensor(lam, grads[0].device), P_DTYPE=triton_dtype(grads[0].dtype), BLOCK=BLOCK,
        )  # fmt: skip
    views.finish()
