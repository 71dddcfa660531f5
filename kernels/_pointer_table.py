"""Multi-tensor launches through device pointer tables, shared by every Triton op.

A launch covers a whole (device, dtype) group: ``addresses[l, t]`` is the address of tensor ``t``
of list ``l`` (0 where a list has no tensor there), ``sizes[t]`` its element count, and each
program ``c`` of the grid works on ``BLOCK`` elements of tensor ``chunk_tensor[c]`` starting at
``chunk_start[c]`` (64-bit). The tables are built once and cached by the addresses and sizes they
describe, so a step whose tensors did not move (the usual case) reuses them; re-allocated
parameters, gradients or state (``load_state_dict``, ``add_param_group``, a new ``.grad``) give
new addresses and hence new tables.

Tensors must be contiguous for the kernels; :class:`Contiguous` hands out contiguous views and
writes the results of copied (non-contiguous) ones back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

BLOCK = 1024  # elements per program
_CACHE_SIZE = 64
_cache: OrderedDict = OrderedDict()


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
    table = _cache.get(key)
    if table is None:
        table = _cache[key] = PointerTable(lists, device, block)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return table


class Contiguous:
    """Contiguous views of an op's tensors; ``finish()`` copies back the written, copied ones."""

    def __init__(self):
        self._writes: list[tuple[Tensor, Tensor]] = []
        self._copies: list[Tensor] = []  # alive until the kernels that read them have run

    def __call__(self, tensors: Optional[Sequence[Optional[Tensor]]], written: bool = False):
        if tensors is None:
            return None
        out = []
        for t in tensors:
            if t is None or t.is_contiguous():
                out.append(t)
                continue
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
