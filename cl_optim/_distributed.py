"""DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): the optimizers work on each
rank's local shard, and reductions over the parameters (SAM's norm) are summed across the ranks
that hold different shards.

The fused steps are element-wise, so a sharded parameter is updated by running the same kernels on
its local shard with the local shards of its gradient and state: no collective, and the state
stays a DTensor with the parameter's mesh and placements (as torch's optimizers keep it, so
distributed checkpoints see sharded state). A norm over all parameters is a sum of squares: each
rank sums its shards, then one all-reduce over the mesh dimensions on which the parameters are
sharded (replicated dimensions hold copies and are not summed again).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_dtensor_type: list = []


def _dtensor():
    """``torch.distributed.tensor.DTensor``, imported on first use (None without distributed)."""
    if not _dtensor_type:
        cls = None
        if torch.distributed.is_available():
            try:
                from torch.distributed.tensor import DTensor as cls
            except ImportError:  # pragma: no cover - torch builds without the DTensor package
                cls = None
        _dtensor_type.append(cls)
    return _dtensor_type[0]


def is_dtensor(t) -> bool:
    cls = _dtensor()
    return cls is not None and isinstance(t, cls)


def any_dtensor(tensors) -> bool:
    cls = _dtensor()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local(t):
    """The local shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def local_list(tensors):
    return None if tensors is None else [local(t) for t in tensors]


def local_grads(params) -> list:
    """The local shards of the parameters' gradients, laid out as their parameters: a gradient
    with other placements (tensor parallelism leaves a replicated parameter a Partial gradient,
    a per-rank partial sum) is redistributed first, so that each rank steps its shard with the
    whole gradient of it and replicas stay equal."""
    out = []
    for p in params:
        g = p.grad
        if is_dtensor(g) and (g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements)):
            g = g.redistribute(p.device_mesh, p.placements)
        out.append(local(g))
    return out


def kernel_grads(params) -> list:
    """The gradients a kernel takes for one bucket: as they are, or, for DTensor parameters, their
    local shards laid out as the parameters (:func:`local_grads`)."""
    if params and is_dtensor(params[0]):
        return local_grads(params)
    return [p.grad for p in params]


def like_param(value: Tensor, param) -> Tensor:
    """``value``, a local tensor of ``param``'s local shape, as a DTensor laid out like ``param``."""
    if not is_dtensor(param) or is_dtensor(value):
        return value
    return _dtensor().from_local(value, param.device_mesh, param.placements, shape=param.shape,
                                 stride=param.stride(), run_check=False)  # fmt: skip


def layout_key(t) -> Optional[tuple]:
    """What must match for DTensors to share one bucket: mesh and placements (None: a plain tensor)."""
    if not is_dtensor(t):
        return None
    return (id(t.device_mesh), tuple(t.placements))


def all_reduce_over_shards_(value: Tensor, like) -> Tensor:
    """Sum ``value`` (a per-rank partial sum over the local shards of ``like``'s layout, the
    gradients laid out as their parameters by :func:`local_grads`) across the mesh dimensions on
    which ``like`` is sharded; a no-op for plain tensors."""
    if not is_dtensor(like):
        return value
    from torch.distributed.tensor import Replicate, Shard

    for dim, placement in enumerate(like.placements):
        if isinstance(placement, Shard):
            torch.distributed.all_reduce(
                value, op=torch.distributed.ReduceOp.SUM, group=like.device_mesh.get_group(dim)
            )
        elif not isinstance(placement, Replicate):  # a parameter is Shard or Replicate; anything else is news
            raise RuntimeError(f"cl_optim: a parameter with DTensor placement {placement} is not supported")
    return value
