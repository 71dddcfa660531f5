"""``per_sample_sq_accumulate_``: out (M, N) fp32 += sum_b (deltas[b]^T inputs[b])**2 for
deltas (B, R, M) and inputs (B, R, N), any strides (the math and the oracle:
``cl_optim/fisher/squares.py``).

One program per ``BLOCK_M x BLOCK_N`` tile of out. For each sample in order it forms that
sample's tile of ``G_b = deltas[b]^T inputs[b]`` in registers (``tl.dot`` over ``BLOCK_R`` rows at
a time) and squares it into a second register tile; out is read and written once at the end. No
per-sample product ever reaches memory, so the memory is out's and the work is the batched weight
gradient's GEMM plus one multiply-add per product. Each element adds its samples in order: the
result does not depend on the launch. Every input is taken to fp32 and multiplied in IEEE fp32
(no TF32, whose 10-bit mantissa would put a 1e-3 error on every product; fp16/bf16 inputs
could use the tensor cores exactly, but the Fisher rules hand fp32 and it keeps one path).

The parallelism is over tiles of out: a layer with fewer tiles than the GPU has SMs (a first
convolution's 32 x 27) runs on few of them. Splitting the samples between programs would need a
second, deterministic summation pass; not done.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 32
BLOCK_N = 32
BLOCK_R = 16


@triton.jit
def _per_sample_sq_kernel(out, deltas, inputs, batch, rows, m, n, d_sb, d_sr, d_sm, x_sb, x_sr, x_sn,
                          o_sm, o_sn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_R: tl.constexpr):  # fmt: skip
    # out's columns on the grid's first axis (2**31 - 1 programs), its rows on the second (65535:
    # 2097120 rows, checked before the launch, as the CUDA kernel's grid).
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rm = (tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    in_m, in_n = rm < m, rn < n
    squares = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    d_base, x_base = deltas, inputs  # advanced one sample at a time: 64-bit pointer arithmetic
    for _ in range(0, batch):
        product = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rows, BLOCK_R):
            r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            in_r = r < rows
            d_tile = tl.load(
                d_base + rm[:, None] * d_sm + r[None, :] * d_sr, mask=in_m[:, None] & in_r[None, :], other=0.0
            )  # (BLOCK_M, BLOCK_R): deltas[b]^T
            x_tile = tl.load(
                x_base + r[:, None] * x_sr + rn[None, :] * x_sn, mask=in_r[:, None] & in_n[None, :], other=0.0
            )  # (BLOCK_R, BLOCK_N)
            product = tl.dot(d_tile.to(tl.float32), x_tile.to(tl.float32), product, input_precision="ieee")
        squares += product * product
        d_base += d_sb
        x_base += x_sb
    mask = in_m[:, None] & in_n[None, :]
    target = out + rm[:, None] * o_sm + rn[None, :] * o_sn
    tl.store(target, tl.load(target, mask=mask, other=0.0) + squares, mask=mask)


def per_sample_sq_accumulate_(out: torch.Tensor, deltas: torch.Tensor, inputs: torch.Tensor) -> None:
    batch, rows, m = deltas.shape
    n = inputs.shape[2]
    if batch == 0 or rows == 0 or m == 0 or n == 0:
        return
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(m, BLOCK_M))
    _per_sample_sq_kernel[grid](
        out, deltas, inputs, batch, rows, m, n, *deltas.stride(), *inputs.stride(), *out.stride(),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
    )  # fmt: skip
