"""``fisher_accumulate_``: F += weight * g**2 over a multi-tensor group (F fp32, g any float type)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._elementwise import chunk_of, load_tensor, store_tensor
from ._pointer_table import BLOCK, Contiguous, pointer_table
from ._types import triton_dtype


@triton.jit
def _fisher_accumulate_kernel(addresses, n_tensors, sizes, chunk_tensor, chunk_start, weight,
                              G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # Lists: 0 fisher (fp32), 1 grad.
    t, offsets, mask = chunk_of(chunk_tensor, chunk_start, sizes, BLOCK)
    f = load_tensor(addresses, 0, n_tensors, t, offsets, mask, tl.float32)
    g = load_tensor(addresses, 1, n_tensors, t, offsets, mask, G_DTYPE)
    store_tensor(addresses, 0, n_tensors, t, offsets, mask, f + weight * g * g, tl.float32)


def fisher_accumulate_(fisher, grads, weight: float) -> None:
    if not fisher:
        return
    views = Contiguous(grads)
    f, g = views(fisher, written=True), views(grads)
    table = pointer_table([f, g])
    if table.num_chunks:
        _fisher_accumulate_kernel[(table.num_chunks,)](
            table.addresses, table.num_tensors, table.sizes, table.chunk_tensor, table.chunk_start, weight,
            G_DTYPE=triton_dtype(grads[0].dtype), BLOCK=BLOCK,
        )  # fmt: skip
    views.finish()
