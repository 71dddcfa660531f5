"""Buffers kept from batch to batch of one estimate.

A layer rule that needs large temporaries of a batch's size (an LSTM's gates and step factors:
``T x B x 4H`` each) made them fresh for every batch. Freed at the end of each, they go back to
the operating system (glibc returns the top of its heap past a threshold), and the next batch
maps them again, one page fault per 4 KiB: on bench_fisher's LSTM about 1100 faults a batch,
which cost as much as a tenth of the estimate. Inside :func:`kept` (the estimate's batch loop),
:func:`take` hands out the same buffer for the same key while its shape, dtype and device stay the
same; everything is freed when the estimate returns.

A key must name one use that is over before the next call with the same key begins: scratch
that a rule is done with when it returns is keyed by its role and shape (one set for every layer
of that shape), what it leaves for later (gate gradients squared after the whole backward) by
module, layer, direction and role. Nothing handed to autograd comes from here. Autograd runs a
CUDA backward on a thread of its own: a rule running there takes the estimate's buffers through
:func:`using` (a cut recurrent layer carries them from its forward, :func:`current`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor

__all__ = ["kept", "take", "current", "using"]

_LOCAL = threading.local()


@contextmanager
def kept() -> Iterator[None]:
    """Within it, :func:`take` reuses buffers (per thread); they are freed when it ends."""
    outer = getattr(_LOCAL, "buffers", None)
    _LOCAL.buffers = {}
    try:
        yield
    finally:
        _LOCAL.buffers = outer


def current() -> Optional[dict]:
    """This thread's buffers (inside :func:`kept`), or None."""
    return getattr(_LOCAL, "buffers", None)


@contextmanager
def using(buffers: Optional[dict]) -> Iterator[None]:
    """Within it, :func:`take` on this thread uses ``buffers`` (from :func:`current` on the
    estimate's thread); None leaves this thread as it is."""
    if buffers is None:
        yield
        return
    outer = getattr(_LOCAL, "buffers", None)
    _LOCAL.buffers = buffers
    try:
        yield
    finally:
        _LOCAL.buffers = outer


def take(key: tuple, shape: tuple, like: Tensor) -> Tensor:
    """An uninitialised buffer of ``shape`` with ``like``'s dtype and device: the one this key had
    the last time, where it fits, inside :func:`kept`; else a new one."""
    shape = tuple(shape)
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    found = buffers.get(key)
    if found is None or found.shape != shape or found.dtype != like.dtype or found.device != like.device:
        buffers.pop(key, None)  # the old one freed before the new one is made
        found = buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return found
