"""``task_combine_``: out <- (out if ACCUMULATE else 0) + sum_t a_t g_t over a multi-tensor group, in
fp32 registers with the tasks added in order 0..T-1 and one rounding to out's dtype; the T
coefficients are read from device memory (fp32), so a T x T solve on the device needs no host read.
Each program reads all of an element's values before it writes it: ``out`` may be one of the task
lists.

On a GPU, Triton contracts ``acc + a * g`` into one fused multiply-add (as in every kernel of this
package: ``TRITON_DEFAULT_FP_FUSION``), one rounding where the oracle and the CUDA kernel round
twice; under the interpreter the two roundings are the oracle's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._elementwise import chunk_of, load_tensor, store_tensor
from ._pointer_table import BLOCK, Contiguous, pointer_table
from ._types import triton_dtype


@triton.jit
def _task_combine_kernel(addresses, n_tensors, sizes, chunk_tensor, chunk_start, coefficients, num_tasks,
                         OUT_DTYPE: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # Lists: 0 out, 1 + t task t.
    t, offsets, mask = chunk_of(chunk_tensor, chunk_start, sizes, BLOCK)
    if ACCUMULATE:
        acc = load_tensor(addresses, 0, n_tensors, t, offsets, mask, OUT_DTYPE)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)  # 0 + a*g, as the oracle (-0 becomes +0)
    for task in range(num_tasks):
        g = load_tensor(addresses, 1 + task, n_tensors, t, offsets, mask, OUT_DTYPE)
        acc = acc + tl.load(coefficients + task) * g
    store_tensor(addresses, 0, n_tensors, t, offsets, mask, acc, OUT_DTYPE)


def task_combine_(out, grads, coefficients, accumulate) -> None:
    n = len(out)
    if n == 0:
        return
    num_tasks = coefficients.numel()
    views = Contiguous(out)
    o = views(out, written=True)
    # After out's: a task tensor that is out[k] itself is read in place (each element before it
    # is written) or, in another layout, copied before anything is written.
    tasks = [views(grads[t * n : (t + 1) * n]) for t in range(num_tasks)]
    a = coefficients.to(device=out[0].device, dtype=torch.float32).contiguous()
    table = pointer_table([o, *tasks])
    if table.num_chunks:
        _task_combine_kernel[(table.num_chunks,)](
            table.addresses, table.num_tensors, table.sizes, table.chunk_tensor, table.chunk_start, a,
            num_tasks, OUT_DTYPE=triton_dtype(out[0].dtype), ACCUMULATE=bool(accumulate), BLOCK=BLOCK,
        )  # fmt: skip
    views.finish()
