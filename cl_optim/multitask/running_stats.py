"""Forwards that leave normalisation statistics alone: SAM's extra passes must not count twice.

A SAM step runs the model more than once per batch; in train mode every BatchNorm (and
InstanceNorm with ``track_running_stats=True``) forward moves ``running_mean``/``running_var``
and ``num_batches_tracked``. F-MTL's official scripts set the BN momentum to 0 before the
perturbed forwards; :func:`frozen_running_stats` does the same for every module of any model,
without being given the model: a global forward pre-hook snapshots the statistics of each
``torch.nn`` normalisation module (``_NormBase``) that is about to run in train mode, and they
are written back when the block ends. Normalisation still uses the batch statistics (train
mode is unchanged), so the gradient is that of a train-mode forward.

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> with frozen_running_stats():
    ...     _ = bn(torch.randn(8, 3))
    >>> bn.running_mean, int(bn.num_batches_tracked)
    (tensor([0., 0., 0.]), 0)
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["frozen_running_stats"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def frozen_running_stats():
    """Within the block, train-mode forwards of normalisation modules leave their running
    statistics as they were on entry: each module's are copied before its first forward in the
    block and written back on exit (also when the block raises). Not after each forward: the
    backward of a train-mode batch norm checks that its running buffers were not modified since
    the forward (they are among its saved tensors), so the block must hold the backward too."""
    saved: dict = {}

    def before(module, args):
        tracked = isinstance(module, _NormBase) and module.training and module.track_running_stats
        if tracked and id(module) not in saved:  # the first forward's entry state
            buffers = [getattr(module, name, None) for name in _STATS]
            saved[id(module)] = (module, buffers, [_copy(b) for b in buffers])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(before)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for _, buffers, copies in saved.values():
                for buffer, copy in zip(buffers, copies):
                    if buffer is not None:
                        buffer.copy_(copy)


def _copy(buffer):
    return None if buffer is None else buffer.detach().clone()
