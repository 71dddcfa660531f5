r"""The sum over samples of squared per-sample weight gradients of a layer that is a matrix
product per sample: a sequence ``Linear`` or attention projection (rows = positions), a recurrent
weight (rows = time steps); a convolution's im2col form would be one too (rows = output positions,
inputs = patches), but the conv rule takes a grouped convolution backward instead, which was faster.

For ``deltas`` ``(B, R, M)`` (the gradients at the layer's outputs, sample-major) and ``inputs``
``(B, R, N)``, sample ``b``'s weight gradient is ``G_b = deltas[b]^T inputs[b]`` ``(M, N)`` and

.. math::  out \mathrel{+}= \sum_b G_b \odot G_b .

Materialising every ``G_b`` costs ``B x M x N`` memory and three passes over it (write, square,
sum). The op ``per_sample_sq_accumulate_`` forms them tile by tile instead: a tile of ``out``'s
rows (C++: a cache-sized chunk of samples through one batched GEMM, then squared into the tile;
Triton and CUDA: one output tile per program, each sample's product kept in registers and
squared there), so the memory is ``O(M x N)`` plus a bounded scratch. The GEMM work is that of the
batched weight gradient; only the per-sample squaring is added. The oracle
(:func:`per_sample_sq_accumulate_` with ``backend="forloop"``) is the plain chunked ``bmm``.

>>> out = torch.zeros(2, 3)
>>> d, x = torch.ones(4, 5, 2), torch.ones(4, 5, 3)  # 4 samples of 5 rows: every G_b entry is 5
>>> per_sample_sq_accumulate_(out, d, x, backend="forloop"); out
tensor([[100., 100., 100.],
        [100., 100., 100.]])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import kernel_op, resolve
from .._checks import KERNEL_DTYPES, check_per_sample_sq_accumulate_

__all__ = ["per_sample_sq_accumulate_", "backend_for"]

# The oracle's chunk: B x M x N products in blocks of at most this many bytes.
ORACLE_CHUNK_BYTES = 64 * 2**20


def backend_for(out: Tensor, deltas: Tensor) -> str:
    """The backend ``"auto"`` runs for these tensors: ``cpp`` on CPU tensors, else the ``forloop``
    oracle. The CUDA and Triton kernels are chosen by name only until a GPU run has timed them
    against the oracle's cuBLAS ``bmm`` (they spread a layer over its output tiles only, which a
    small layer fills few SMs with)."""
    if not isinstance(out, Tensor) or not isinstance(deltas, Tensor) or deltas.dtype not in KERNEL_DTYPES:
        return "forloop"  # whose checks name what is wrong
    if out.device.type != "cpu":
        return "forloop"
    try:
        found = resolve("auto", out.device, deltas.dtype)
    except RuntimeError:
        return "forloop"
    return found if found in ("cuda", "triton", "cpp") else "forloop"


def per_sample_sq_accumulate_(
    out: Tensor, deltas: Tensor, inputs: Tensor, *, backend: str = "auto", cap: int = ORACLE_CHUNK_BYTES
) -> None:
    """``out += sum_b (deltas[b]^T @ inputs[b])**2`` (see the module docstring).

    ``out``: a dense fp32 ``(M, N)`` matrix (contiguous or transposed) that shares no memory with
    the others; ``deltas`` ``(B, R, M)``, ``inputs`` ``(B, R, N)``: one dtype (fp32, fp16 or
    bf16; fp64 also on ``cpp`` and ``forloop``), any strides, on ``out``'s device. The products
    are computed in fp32 (fp64 for fp64 inputs). ``cap``: bytes of per-sample products the
    ``forloop`` oracle holds at once (the compiled backends hold a fixed, smaller scratch).
    """
    if backend == "auto":
        backend = backend_for(out, deltas)
    if backend in ("cpp", "cuda", "triton"):
        if not all(isinstance(t, Tensor) for t in (out, deltas, inputs)) or deltas.dtype not in (
            *KERNEL_DTYPES,
            torch.float64,
        ):  # the op's own checks would only see that no backend takes them: name the problem
            check_per_sample_sq_accumulate_(out, deltas, inputs)
        kernel_op(backend, "per_sample_sq_accumulate_", deltas)(out, deltas, inputs)
        return
    if backend not in ("forloop", "foreach"):
        raise ValueError(f"per_sample_sq_accumulate_ has no {backend!r} implementation")
    check_per_sample_sq_accumulate_(out, deltas, inputs, dtypes=(*KERNEL_DTYPES, torch.float64))
    batch, _, m = deltas.shape
    n = inputs.shape[2]
    if batch == 0 or out.numel() == 0:
        return
    compute = torch.float64 if deltas.dtype == torch.float64 else torch.float32
    step = max(1, cap // max(1, m * n * 4))
    for start in range(0, batch, step):
        part = slice(start, min(batch, start + step))
        left, right = deltas[part].detach().transpose(1, 2), inputs[part].detach()  # not recorded
        grads = torch.bmm(left.to(compute), right.to(compute))  # (b, M, N)
        out.add_(grads.square_().sum(0).to(out.dtype))
