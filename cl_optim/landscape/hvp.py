"""Hessian-vector products of the data loss.

Example:
    >>> import torch, cl_optim
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    >>> n = sum(p.numel() for p in model.parameters())
    >>> cl_optim.landscape.hvp(model, data, torch.randn(5, n)).shape  # a block of 5 vectors
    torch.Size([5, 26])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .objective import Objective, flatten, unflatten

__all__ = ["hvp"]


def hvp(
    model: nn.Module,
    data: Iterable,
    vectors,
    loss_fn: Optional[Callable] = None,
    *,
    mode: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
):
    r"""``H v`` with ``H`` the Hessian of the data loss (see :mod:`cl_optim.landscape.objective`)
    with respect to the parameters that require grad.

    Args:
        vectors: one flat vector ``(n,)``, a block ``(k, n)`` (one double backward per batch for the
            whole block), or tensors shaped like the parameters (a list, as ``model.parameters()``
            with ``requires_grad``).
        mode: ``"eval"``, ``"train"`` or None (keep the model's; a model in train mode with
            BatchNorm is refused).
        dtype: accumulation dtype, fp32 or fp64.

    Returns:
        The products in the same form as ``vectors``. The model's modes, parameters and buffers
        are restored bit for bit.
    """
    with Objective(model, data, loss_fn, mode=mode, dtype=dtype) as objective:
        as_list = isinstance(vectors, (list, tuple))
        flat = flatten(vectors) if as_list else vectors
        if not isinstance(flat, Tensor) or flat.dim() not in (1, 2) or flat.shape[-1] != objective.size:
            raise ValueError(
                f"vectors must be (n,) or (k, n) with n = {objective.size} (the elements of the parameters "
                "that require grad), or tensors shaped like those parameters"
            )
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("vectors contain inf or nan")
        block = flat.reshape(-1, objective.size).to(dtype)
        out = objective.hvp(block)
    out = out if flat.dim() == 2 else out[0]
    return unflatten(out, objective.params) if as_list else out
