"""Multi-tensor launches through device pointer tables, shared by every Triton op.

A launch covers a whole (device, dtype) group: ``addresses[l, t]`` is the address of tensor ``t``
of list ``l`` (0 where a list has no tensor there), ``sizes[t]`` its element count, and each
program ``c`` of the grid works on ``BLOCK`` elements of tensor ``chunk_tensor[c]`` starting at
``chunk_start[c]`` (64-bit). The tables are built once and cached by the addresses and sizes they
describe, so a step whose tensors did not move (the usual case) reuses them; re-allocated
parameters, gradients or state (``load_state_dict``, ``add_param_group``, a new ``.grad``) give
new addresses and hence new tables.

The kernels walk each tensor from its data pointer; :class:`Contiguous` hands out the tensors in
the layout of their entry's lead tensor (dense layouts in place, others copied) and writes the
results of copied ones back.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

BLOCK = 1024  # elements per program
_CACHE_SIZE = 64
_cache: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()  # steps of optimizers in several threads share the cache


class PointerTable:
    """The device tables of one launch (see the module docstring)."""

    def __init__(self, lists: Sequence[Sequence[Optional[Tensor]]], device: torch.device, block: int):
        n = len(lists[0]) if lists else 0
        self.num_tensors = n
        address_rows = [[0 if t is None else t.data_ptr() for t in tensors] for tensors in lists]
        sizes = [t.numel() for t in lists[0]]
        chunk_tensor, chunk_start = [], []
        for index, size in enumerate(sizes):
            for start in range(0, size, block):
                chunk_tensor.append(index)
                chunk_start.append(start)
        self.num_chunks = len(chunk_tensor)
        # Built on the host, moved once: the step itself reads nothing back.
        self.addresses = torch.tensor(address_rows, dtype=torch.int64).reshape(len(lists), n).to(device)
        self.sizes = torch.tensor(sizes, dtype=torch.int64).to(device)
        self.chunk_tensor = torch.tensor(chunk_tensor, dtype=torch.int32).to(device)
        self.chunk_start = torch.tensor(chunk_start, dtype=torch.int64).to(device)


def pointer_table(lists: Sequence[Sequence[Optional[Tensor]]], block: int = BLOCK) -> PointerTable:
    """The (cached) table of ``lists``; every list is aligned with the first, None = absent."""
    device = lists[0][0].device
    key = (
        device,
        block,
        tuple(tuple(0 if t is None else t.data_ptr() for t in tensors) for tensors in lists),
        tuple(t.numel() for t in lists[0]),
    )
    with _cache_lock:
        table = _cache.get(key)
        if table is None:
            table = _cache[key] = PointerTable(lists, device, block)
            if len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
        else:
            _cache.move_to_end(key)
    return table


def is_dense(t: Tensor) -> bool:
    """Non-overlapping and dense: the elements fill a block of memory without gaps (contiguous,
    channels_last, any permutation), so the kernels can walk it from its data pointer."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class Contiguous:
    """The tensors of a launch as the kernels walk them (as ``Workspace`` in csrc/cpu/multi_tensor.h):
    entry ``i`` of every list in the layout of ``lead[i]`` when that is dense, else contiguous. A
    tensor already in that layout is used in place (channels_last state next to a channels_last
    weight costs no copy); any other is worked on in a copy of that layout, which ``finish()``
    writes back when the launch writes it."""

    def __init__(self, lead: Sequence[Tensor]):
        self._lead = list(lead)
        self._dense = [is_dense(t) for t in self._lead]
        self._writes: list[tuple[Tensor, Tensor]] = []
        self._copies: list[Tensor] = []  # alive until the kernels that read them have run

    def _walks_as_lead(self, t: Tensor, i: int) -> bool:
        return t.stride() == self._lead[i].stride() if self._dense[i] else t.is_contiguous()

    def __call__(self, tensors: Optional[Sequence[Optional[Tensor]]], written: bool = False):
        if tensors is None:
            return None
        out = []
        for i, t in enumerate(tensors):
            if t is None or self._walks_as_lead(t, i):
                out.append(t)
                continue
            if self._dense[i]:
                copy = torch.empty_like(self._lead[i], dtype=t.dtype).copy_(t)
            else:
                copy = t.contiguous()
            self._copies.append(copy)
            if written:
                self._writes.append((t, copy))
            out.append(copy)
        return out

    def finish(self) -> None:
        for dst, src in self._writes:
            dst.copy_(src)


def per_tensor(values: Sequence[float], device: torch.device, dtype=torch.float32) -> Tensor:
    """Per-tensor scalars (e.g. the EWC lambdas) as a device vector the kernels index by tensor."""
    return torch.tensor(list(values) if values else [0.0], dtype=dtype).to(device)
