"""``task_gram``: G_ij = sum_k <g_i[k], g_j[k]> over the T task lists of a multi-tensor group, a
``(T, T)`` fp64 tensor on the device. Every product and sum in fp64 (a large finite gradient gives
a finite entry; an inf or a NaN gives a non-finite one), in two deterministic stages: each program
leaves the sum of every task pair's products over its chunk (pair-major, the pairs i <= j packed
row by row), then each pair's partials are summed in a fixed order; G_ji is G_ij's value.

A program's chunk is ``CHUNK`` elements (16384, as the CUDA kernels: T(T+1)/2 partials per chunk
stay a small fraction of the gradients); it reads the chunk's T slices as ``(T_PAD, SUB)`` tiles
(T_PAD: T rounded up to a power of two, rows past T masked) and adds each tile's
``(T_PAD, T_PAD)`` products: every element is read once. SUB shrinks as T grows so that the
``T_PAD x T_PAD x SUB`` products stay in registers (4096 of them up to T = 32; beyond, more, spilled
and slower, but correct).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._pointer_table import BLOCK, Contiguous, per_tensor, pointer_table
from ._reduce import segment_sums
from ._types import triton_dtype

CHUNK = 16384  # elements per program


def sub_block(t_pad: int) -> int:
    """Elements per tile of a program's chunk for ``t_pad`` task rows (a power of two)."""
    return min(BLOCK, max(4, 4096 // (t_pad * t_pad)))


def _packed_index(num_tasks: int) -> list[int]:
    """Entry (i, j) of G -> its pair's index in the packed upper triangle (row major)."""
    pair = lambda i, j: i * num_tasks - i * (i - 1) // 2 + (j - i)  # noqa: E731
    return [pair(min(i, j), max(i, j)) for i in range(num_tasks) for j in range(num_tasks)]


@triton.jit
def _task_gram_partials(addresses, n_tensors, sizes, chunk_tensor, chunk_start, partials, num_tasks,
                        num_chunks, G_DTYPE: tl.constexpr, T_PAD: tl.constexpr, SUB: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    # Lists: task t's tensors are list t (addresses[t, k]). BLOCK: the chunk (CHUNK elements).
    chunk = tl.program_id(0)
    t = tl.load(chunk_tensor + chunk)
    start = tl.load(chunk_start + chunk)
    length = tl.minimum(tl.load(sizes + t) - start, BLOCK)
    rows = tl.arange(0, T_PAD)
    row_mask = rows < num_tasks
    bases = tl.load(addresses + rows * n_tensors + t, mask=row_mask, other=0).to(tl.pointer_type(G_DTYPE))
    acc = tl.zeros((T_PAD, T_PAD), dtype=tl.float64)
    for sub in range(0, length, SUB):  # the chunk's own length: a short tensor costs few tiles
        offsets = sub + tl.arange(0, SUB)
        mask = row_mask[:, None] & (offsets < length)[None, :]
        x = tl.load(bases[:, None] + (start + offsets)[None, :], mask=mask, other=0.0).to(tl.float64)
        acc += tl.sum(x[:, None, :] * x[None, :, :], axis=2)  # (T_PAD, T_PAD): every pair of this tile
    i = rows[:, None]
    j = rows[None, :]
    pair = (i * num_tasks - i * (i - 1) // 2 + (j - i)).to(tl.int64)  # packed row by row, i <= j
    tl.store(partials + pair * num_chunks + chunk, acc, mask=(i <= j) & (j < num_tasks))


def task_gram(grads, num_tasks):
    num_tasks = int(num_tasks)
    n = len(grads) // num_tasks
    if n == 0:  # as the C++ op
        return torch.zeros((num_tasks, num_tasks), dtype=torch.float64)
    device = grads[0].device
    views = Contiguous(grads[:n])  # every task's tensor k walked as task 0's tensor k
    table = pointer_table([views(grads[t * n : (t + 1) * n]) for t in range(num_tasks)], block=CHUNK)
    chunks, pairs = table.num_chunks, num_tasks * (num_tasks + 1) // 2
    partials = torch.empty(max(pairs * chunks, 1), dtype=torch.float64, device=device)  # each written once
    if chunks:
        t_pad = triton.next_power_of_2(num_tasks)
        _task_gram_partials[(chunks,)](
            table.addresses, table.num_tensors, table.sizes, table.chunk_tensor, table.chunk_start, partials,
            num_tasks, chunks, G_DTYPE=triton_dtype(grads[0].dtype), T_PAD=t_pad, SUB=sub_block(t_pad),
            BLOCK=CHUNK,
        )  # fmt: skip
    packed = segment_sums(partials, [chunks] * pairs)
    return packed[per_tensor(_packed_index(num_tasks), device, torch.int64)].reshape(num_tasks, num_tasks)
