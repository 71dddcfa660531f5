r"""The two multi-tensor ops of multi-task optimisation, on every backend.

``task_gram``      ``G_ij = sum_k <g_i[k], g_j[k]>`` over a (device, dtype) bucket of n tensors
                   and T tasks: one read of the T task buffers, each product and the whole sum in
                   fp64 (a large finite gradient gives a finite entry; only an inf/NaN gives a
                   non-finite one), in a fixed order (deterministic for any thread count), a
                   ``(T, T)`` fp64 tensor on the bucket's device.
``task_combine_``  ``out[k] <- (out[k] if accumulate else 0) + sum_t a_t g_t[k]``: per element in
                   opmath (fp32 for fp16/bf16/fp32, fp64 for fp64), tasks added in order
                   0..T-1, one rounding to ``out``'s dtype. ``a`` is a device tensor, so the
                   coefficients a T x T solve produced on the device are used without a host read.

Per-element math, for the compiled backends (``csrc/cpu/multitask.cpp``,
``csrc/cuda/multitask.cu``, ``kernels/task_gram.py``, ``kernels/task_combine.py``)::

    gram:     for i <= j: acc_ij += double(g_i[e]) * double(g_j[e])      (G_ji = G_ij)
    combine:  acc = accumulate ? float(out[e]) : 0;  for t: acc += float(a_t) * float(g_t[e]);
              out[e] = round(acc)

Bytes moved: gram reads ``T * |W| * s`` (s the element size); combine reads ``T * |W| * s``
(plus ``|W| * s`` with ``accumulate``) and writes ``|W| * s``. The ``torch.cat`` form of the
official F-MTL code and INFTY writes a flat copy of every task gradient first (``T * |W|`` more
written and read again).

The task lists travel to the ops task-major (``T * n`` tensors in one list): a schema has no list
of lists. ``forloop`` (one tensor and one task pair at a time) is the oracle; ``foreach`` stacks
each tensor's T slices (``T x |w_k|``, never ``T x |W|``) and uses one matrix product.

Example:
    >>> import torch
    >>> from cl_optim.multitask.fused import task_gram, task_combine_
    >>> g1, g2 = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -1.0])]
    >>> task_gram([g1, g2])
    tensor([[ 5.,  1.],
            [ 1., 10.]], dtype=torch.float64)
    >>> out = [torch.empty(2)]
    >>> task_combine_(out, [g1, g2], torch.tensor([1.0, 0.5])); out
    [tensor([2.5000, 1.5000])]
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._backend import kernel_op
from .._checks import check_task_combine_, check_task_gram
from .._terms import opmath_dtype

__all__ = ["task_gram", "task_combine_"]

_PYTHON = ("forloop", "foreach")
_COMPILED = ("cpp", "cuda", "triton")


def _task_major(task_grads) -> list:
    return [g for grads in task_grads for g in grads]


def task_gram(task_grads, *, backend: str = "forloop") -> Tensor:
    """The ``(T, T)`` fp64 Gram matrix of T aligned gradient lists (one bucket), on their device.

    >>> task_gram([[torch.tensor([3.0, 4.0])]])
    tensor([[25.]], dtype=torch.float64)
    """
    num_tasks = len(task_grads)
    flat = _task_major(task_grads)
    if backend in _COMPILED:
        if not flat:  # nothing to launch: the Python checks give the same errors as the kernels
            check_task_gram(flat, num_tasks)
            return torch.zeros((num_tasks, num_tasks), dtype=torch.float64)
        return kernel_op(backend, "task_gram", flat[0])(flat, num_tasks)
    if backend not in _PYTHON:
        raise ValueError(f"task_gram has no {backend!r} implementation")
    check_task_gram(flat, num_tasks)
    n = len(flat) // num_tasks if num_tasks else 0
    device = flat[0].device if flat else torch.device("cpu")
    gram = torch.zeros((num_tasks, num_tasks), dtype=torch.float64, device=device)
    for k in range(n):
        if backend == "forloop":
            for i in range(num_tasks):
                for j in range(i, num_tasks):
                    gi, gj = task_grads[i][k].double(), task_grads[j][k].double()
                    gram[i, j] += (gi * gj).sum()
        else:
            rows = torch.stack([grads[k].reshape(-1) for grads in task_grads]).double()  # (T, |w_k|)
            gram += rows @ rows.t()
    # One triangle, mirrored: a matrix product may round G_ij and G_ji differently.
    return gram.triu() + gram.triu(1).t()


def task_combine_(out: list, task_grads, coefficients: Tensor, *, accumulate: bool = False,
                  backend: str = "forloop") -> None:  # fmt: skip
    """``out[k] <- (out[k] if accumulate else 0) + sum_t coefficients[t] * task_grads[t][k]``.

    ``coefficients`` is a 1-D tensor of T entries on ``out``'s device (any float dtype; the math
    runs in opmath). ``out`` may be one of the task lists (each element is read before it is
    written), in eager mode; the schema does not declare that aliasing, so not under
    ``torch.compile``.

    >>> out = [torch.ones(2)]
    >>> task_combine_(out, [[torch.tensor([1.0, 2.0])]], torch.tensor([2.0]), accumulate=True); out
    [tensor([3., 5.])]
    """
    flat = _task_major(task_grads)
    if backend in _COMPILED:
        if not out:
            check_task_combine_(out, flat, coefficients)
            return
        kernel_op(backend, "task_combine_", out[0])(list(out), flat, coefficients.detach(), bool(accumulate))
        return
    if backend not in _PYTHON:
        raise ValueError(f"task_combine_ has no {backend!r} implementation")
    check_task_combine_(out, flat, coefficients)
    if not out:
        return
    opmath = opmath_dtype(out[0].dtype)
    a = coefficients.detach().to(opmath)
    if backend == "forloop":
        for k, target in enumerate(out):
            acc = target.to(opmath) if accumulate else torch.zeros_like(target, dtype=opmath)
            for t in range(len(task_grads)):
                acc = acc + a[t] * task_grads[t][k].to(opmath)
            target.copy_(acc)
        return
    # Copies: `out` may be one of the task lists, read below after the first additions.
    acc = [o.to(opmath, copy=True) for o in out] if accumulate else None
    for t, grads in enumerate(task_grads):
        term = torch._foreach_mul([g.to(opmath) for g in grads], a[t])
        if acc is None:
            acc = term
        else:
            torch._foreach_add_(acc, term)
    torch._foreach_copy_(list(out), acc)
