"""The passes of :class:`cl_optim.SAM` over the gradients, bucket by bucket: the buckets of a list of
parameters, the restore (and scratch) buffers kept for them, and the fp64 squared norm of the
gradients (through the lists held in C++ where a plan has them) and its non-finite flag.
"""

from __future__ import annotations

from operator import is_
from typing import Optional

import torch
from torch import Tensor

from ._distributed import all_reduce_over_shards_, kernel_grads
from ._held import held
from ._optimizer import bucket_indices
from ._plan import Bucket
from .sam_ops import grad_sq_norm


def weight_kinds(weighted: Optional[list]) -> list[int]:
    """The weight kinds as the held calls take them (ints; none for plain SAM)."""
    return [int(w) for w in weighted] if weighted is not None else []


def bucket_sq_norm(
    calls, direction, params, weighted: Optional[list], eta: float, fisher, backend: str
) -> Tensor:
    """:func:`grad_sq_norm` of a bucket, through its held lists (``_held.py``) where it has them and
    they take the call."""
    if calls is not None:
        norm = calls.grad_sq_norm(direction, weight_kinds(weighted), eta, fisher)
        if norm is not None:
            return norm
    return grad_sq_norm(direction, params, weighted, eta, fisher=fisher, backend=backend)


def kept_buffers(store: dict, bucket: list[Tensor], device: torch.device, dtype: torch.dtype,
                 trusted: bool = False) -> list[Tensor]:  # fmt: skip
    """One buffer shaped as each parameter of a (device, dtype) bucket, kept in ``store`` by
    ``id(param)`` and allocated again only when the parameter changed shape, dtype or device.

    ``trusted`` (a planned :class:`Bucket` whose step leaves the checks to its op): the buffers
    found for this bucket last time, while they are still the store's, without a per-parameter
    check; one that no longer fits its parameter makes the op refuse, and the step is made again
    untrusted."""
    if trusted and isinstance(bucket, Bucket):
        kept = bucket.buffers.get(id(store))
        if kept is not None and kept[0] is store and all(map(is_, map(store.get, bucket.ids), kept[1])):
            return kept[1]
    index = -1 if device.type == "cpu" else device.index  # get_device(): an int, no device object
    buffers = []
    for p in bucket:
        buf = store.get(id(p))
        if buf is None or buf.shape != p.shape or buf.dtype is not dtype or buf.get_device() != index:
            buf = store[id(p)] = torch.empty_like(p, memory_format=torch.preserve_format)
        buffers.append(buf)
    if isinstance(bucket, Bucket):
        bucket.buffers[id(store)] = (store, buffers)
    return buffers


def as_is(tensors):
    """A plain tensor list as the ops take it (a DTensor list takes ``local_list``)."""
    return tensors


def gradient_sq_norm(buckets: list, home: torch.device) -> Tensor:
    """The squared norm of the gradients of ``buckets`` (``(parameters, backend)`` pairs, or
    ``(parameters, backend, gradients)`` with the gradients fetched already) on
    ``home``: one fp64-accumulated pass per bucket (summed across ranks for DTensor shards), no host
    read. Non-finite exactly where some gradient has an inf or a NaN (fp64 squares of fp32 values
    cannot overflow)."""
    sq_norms = [
        all_reduce_over_shards_(
            bucket_sq_norm(held(bucket, "grad_sq_norm", backend), grads[0] if grads else kernel_grads(bucket), None,
                     None, 0.0, None, backend),
            bucket[0],
        ).to(home)
        for bucket, backend, *grads in buckets
    ]  # fmt: skip
    return torch.stack(sq_norms).sum()


def nonfinite_gradient(buckets: list, home: torch.device) -> Tensor:
    """Device flag: some gradient of ``buckets`` has an inf or a NaN (:func:`gradient_sq_norm`)."""
    return ~torch.isfinite(gradient_sq_norm(buckets, home))


def param_buckets(params: list[Tensor]) -> dict:
    """``(device, dtype, layout) -> parameters`` of ``params``, in their order."""
    return {key: [params[i] for i in index] for key, index in bucket_indices(params).items()}
