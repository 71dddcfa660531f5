"""Multi-tensor launches through device pointer tables, shared by every Triton op.

A launch covers a whole (device, dtype) group: ``addresses[l, t]`` is the address of tensor ``t``
of list ``l`` (0 where a list has no tensor there), ``sizes[t]`` its element count, and each
program ``c`` of the grid works on ``BLOCK`` elements of tensor ``chunk_tensor[c]`` starting at
``chunk_start[c]`` (64-bit).

Two caches, each bounded in bytes: the chunk map depends on the sizes only, so it is built once
per list of sizes — with tensor ops on the device, not a Python loop per chunk (a 7e9-element
group has 6.8 million chunks) — and survives any re-allocation; the address table (8 bytes per
tensor and list) is keyed by the addresses, so re-allocated parameters, gradients or state
(``load_state_dict``, ``add_param_group``, a new ``.grad`` after ``zero_grad(set_to_none=True)``)
cost one small table, copied from pinned memory without blocking the host.

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

from cl_optim._checks import is_dense

BLOCK = 1024  # elements per program
CHUNK_MAP_BYTES = 256 * 2**20  # bound of the chunk-map cache
ADDRESS_TABLE_BYTES = 64 * 2**20  # bound of the address-table cache
_lock = threading.Lock()  # steps of optimizers in several threads share the caches


class _BoundedCache:
    """An LRU dict whose values have ``nbytes``, evicting the oldest above ``limit`` bytes (the
    newest entry is always kept, however large)."""

    def __init__(self, limit: int):
        self.limit, self.total, self.entries = limit, 0, OrderedDict()

    def get(self, key, build):
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
            return value
        value = self.entries[key] = build()
        self.total += value.nbytes
        while self.total > self.limit and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.total -= old.nbytes
        return value

    def clear(self) -> None:
        self.entries.clear()
        self.total = 0

    def __len__(self) -> int:
        return len(self.entries)


class ChunkMap:
    """Program -> (tensor, first element) for a list of sizes, built on the device."""

    def __init__(self, sizes: tuple[int, ...], device: torch.device, block: int):
        counts = [(size + block - 1) // block for size in sizes]
        self.num_tensors = len(sizes)
        self.num_chunks = sum(counts)
        self.sizes = torch.tensor(sizes, dtype=torch.int64).to(device)
        per_tensor = torch.tensor(counts, dtype=torch.int64).to(device)
        self.chunk_tensor = torch.repeat_interleave(
            torch.arange(self.num_tensors, dtype=torch.int32, device=device),
            per_tensor,
            output_size=self.num_chunks,
        )
        first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
        index = torch.arange(self.num_chunks, dtype=torch.int64, device=device)
        self.chunk_start = (index - first_chunk[self.chunk_tensor.long()]) * block
        self.nbytes = self.num_chunks * 12 + self.num_tensors * 16


class AddressTable:
    """``addresses[l, t]`` on the device, copied from pinned host memory without blocking."""

    def __init__(self, rows: tuple[tuple[int, ...], ...], device: torch.device):
        host = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(rows[0]) if rows else 0)
        if device.type == "cuda":
            self._host = host.pin_memory()  # alive until the asynchronous copy has landed
            self.addresses = self._host.to(device, non_blocking=True)
        else:
            self.addresses = host.to(device)
        self.nbytes = host.numel() * 8


_chunk_maps = _BoundedCache(CHUNK_MAP_BYTES)
_address_tables = _BoundedCache(ADDRESS_TABLE_BYTES)


class PointerTable:
    """The tables of one launch: the addresses and the chunk map (see the module docstring)."""

    def __init__(self, addresses: AddressTable, chunks: ChunkMap):
        self.addresses = addresses.addresses
        self.num_tensors = chunks.num_tensors
        self.num_chunks = chunks.num_chunks
        self.sizes = chunks.sizes
        self.chunk_tensor = chunks.chunk_tensor
        self.chunk_start = chunks.chunk_start


def pointer_table(lists: Sequence[Sequence[Optional[Tensor]]], block: int = BLOCK) -> PointerTable:
    """The (cached) tables of ``lists``; every list is aligned with the first, None = absent."""
    device = lists[0][0].device
    sizes = tuple(t.numel() for t in lists[0])
    rows = tuple(tuple(0 if t is None else t.data_ptr() for t in tensors) for tensors in lists)
    with _lock:
        chunks = _chunk_maps.get((device, block, sizes), lambda: ChunkMap(sizes, device, block))
        addresses = _address_tables.get((device, rows), lambda: AddressTable(rows, device))
    return PointerTable(addresses, chunks)


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


class _Vector:
    def __init__(self, values: tuple, dtype: torch.dtype, device: torch.device):
        self.tensor = torch.tensor(values if values else (0,), dtype=dtype).to(device)
        self.nbytes = self.tensor.numel() * self.tensor.element_size()


_vectors = _BoundedCache(16 * 2**20)


def per_tensor(values: Sequence, device: torch.device, dtype=torch.float32) -> Tensor:
    """Per-tensor values (the EWC lambdas, a launch's tensor indices) as a device vector the
    kernels index by tensor; cached by value, so a step whose values did not change uploads
    nothing."""
    key = (device, dtype, tuple(values))
    with _lock:
        return _vectors.get(key, lambda: _Vector(key[2], dtype, device)).tensor
