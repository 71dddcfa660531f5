"""Training-loop helpers for two-pass optimizers: BatchNorm statistics and DDP gradient sync.

Both are context managers around the pass that must not leave a trace:

* ``preserve_bn_stats(model)`` around SAM's *second* forward: BatchNorm running statistics are
  updated by the first pass only (the statistics of the perturbed weights are not the model's).
* ``skip_grad_sync(model)`` around SAM's *first* forward and backward: under DDP the pass-1
  gradient stays local to each rank (m-sharpness with m = the per-rank batch), saving one
  all-reduce per step; only the pass-2 gradient is averaged.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["preserve_bn_stats", "skip_grad_sync"]

_warned_fsdp: list = []


@contextlib.contextmanager
def preserve_bn_stats(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm's ``running_mean``, ``running_var`` and ``num_batches_tracked`` on exit.

    Exact (a copy, not an inverse momentum update), so it also holds for ``momentum=None``
    (cumulative averages) and for SyncBatchNorm.

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> before = model[1].running_mean.clone()
        >>> with cl_optim.preserve_bn_stats(model):
        ...     _ = model(torch.randn(8, 3))
        >>> torch.equal(model[1].running_mean, before)
        True
    """
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(module, name, None)
                if buffer is not None:
                    saved.append((buffer, buffer.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, copy in saved:
                buffer.copy_(copy)


@contextlib.contextmanager
def skip_grad_sync(model: nn.Module) -> Iterator[None]:
    """Run the enclosed forward *and* backward without gradient synchronisation.

    For ``DistributedDataParallel`` this is ``model.no_sync()``; the forward must be inside it,
    because DDP decides in the forward whether the backward will all-reduce (davda54/sam#78).
    For any other module it does nothing, so the same training loop runs on one process.

    FSDP2 (``fully_shard``) is left synchronised, with a warning: its parameters are sharded, so
    each rank needs the reduce-scattered gradient of its shard anyway, and FSDP2 keeps an unsynced
    gradient to add it into the *next* backward — SAM's second pass would then see the sum of
    both passes.

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(3, 1)
        >>> with cl_optim.skip_grad_sync(model):
        ...     model(torch.randn(4, 3)).sum().backward()
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        if hasattr(model, "set_requires_gradient_sync") and not _warned_fsdp:
            _warned_fsdp.append(True)
            warnings.warn(
                "cl_optim.skip_grad_sync: an FSDP2 module keeps gradient sync on (its unsynced gradient "
                "would be added into SAM's second pass); pass 1 is reduce-scattered as usual",
                UserWarning,
                stacklevel=3,
            )
        yield
