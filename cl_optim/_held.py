"""Tensor lists held on the C++ side from step to step (``csrc/cpu/held_lists.cpp``).

Handing an op a Python list of tensors converts it element by element, about 0.24 us per tensor
and list on the AMD EPYC of ``bench/results``: an AdamW step over 2000 small tensors hands over six
lists, 2.4 ms before its kernel starts, as long as the update of 2000 x 4096 fp32 elements. A
planned bucket (:class:`cl_optim._plan.Bucket`) whose step is trusted to its op keeps a
:class:`Held` per op: each list is converted once and handed over again only when it is no longer,
element for element, the list held (an identity check at C speed, about 0.03 us per tensor); the
gradients are read from the held parameters' ``.grad`` inside the call.

A held call runs the same C++ function, with the same input checks, as the dispatcher would, so
it gives the same numbers and refuses the same input with the same words (a refusal then sends
the step back through the Python checks, as for any trusted step). It is used only where that
call is exactly what the dispatcher would make: the ``cpp`` backend, plain CPU tensors, outside
``torch.compile`` and with no ``__torch_function__`` or ``__torch_dispatch__`` mode active; and
only where the caller's gradients are the parameters' ``.grad`` (a trusted plan's).

The held lists keep their tensors alive as long as the plan that owns them: a plan is dropped when
its group changes, when an op refuses its input, and on ``load_state_dict``.
"""

from __future__ import annotations

from operator import is_
from typing import Optional

import torch
from torch import Tensor
from torch.nn import Parameter

# The slots of csrc/cpu/held_lists.cpp.
PARAMS, EXP_AVGS, EXP_AVG_SQS, MAX_EXP_AVG_SQS, STEPS, RESTORE_FROM, COMBINE_FROM, FISHER, SAVES, MOMENTUM_BUFFERS = range(10)  # fmt: skip
_SLOTS = 10
_PLAIN = (Tensor, Parameter)


def usable(backend: str, bucket) -> bool:
    """Whether ``bucket``'s op call may be held: see the module docstring."""
    from ._plan import Bucket

    return (
        backend == "cpp"
        and isinstance(bucket, Bucket)
        and not bucket.sharded
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._len_torch_function_stack() == 0
        and not torch.compiler.is_compiling()
    )


def _same(held: Optional[list], given: list) -> bool:
    return held is given or (held is not None and len(held) == len(given) and all(map(is_, held, given)))


class Held:
    """One op's lists for one bucket, held in C++ (``torch.classes.cl_optim.HeldLists``)."""

    __slots__ = ("lists", "ewc", "ready", "calls", "states", "state_dicts")

    def __init__(self, params: list[Tensor]):
        if not all(type(p) in _PLAIN and p.device.type == "cpu" for p in params):
            raise ValueError("held lists take plain CPU tensors")
        from ._backend import resolve

        if params:
            resolve(
                "cpp", params[0].device, params[0].dtype
            )  # builds or loads the extension, which holds the class
        self.calls = torch.classes.cl_optim.HeldLists()
        self.lists: list = [None] * _SLOTS
        self.ewc: Optional[tuple] = None
        self.ready: Optional[list] = None
        self.states: Optional[list] = None
        self.state_dicts: Optional[list] = None
        self.hold(PARAMS, params)

    def states_of(self, state: dict) -> list[dict]:
        """The optimizer's per-parameter state dicts of the held parameters, ``[state[p] for p in
        params]``: looked up again only when ``state``'s values are not the same dict objects as
        at the last lookup (a replaced or added entry, a new state from ``load_state_dict``), so a
        step over thousands of tensors does not hash each (a Python call per tensor)."""
        values = list(state.values())
        if self.states is None or not _same(self.state_dicts, values):
            params = self.lists[PARAMS]
            self.states = [state[p] for p in params]  # (a defaultdict adds missing entries: values again)
            self.state_dicts = list(state.values())
        return self.states

    def hold(self, slot: int, tensors: Optional[list[Tensor]]) -> None:
        """Hold ``tensors`` (``None``: an empty list) in ``slot`` unless they are held already."""
        tensors = [] if tensors is None else tensors
        if not _same(self.lists[slot], tensors):
            self.calls.hold(slot, tensors)
            self.lists[slot] = list(tensors)  # a copy: the caller may change its list later

    def hold_ewc(self, precision: list, anchor: list, lam: list[float]) -> None:
        held = self.ewc
        if held is None or not (_same(held[0], precision) and _same(held[1], anchor) and held[2] == lam):
            self.calls.hold_ewc(precision, anchor, lam)
            self.ewc = (list(precision), list(anchor), list(lam))

    def hold_buffer_ready(self, ready: list[int]) -> None:
        if self.ready != ready:
            self.calls.hold_buffer_ready(ready)
            self.ready = list(ready)

    def hold_terms(self, terms: dict) -> None:
        """The list terms of :func:`cl_optim._terms.kernel_terms`."""
        self.hold(RESTORE_FROM, terms["restore_from"])
        self.hold(COMBINE_FROM, terms["combine_from"])
        self.hold(FISHER, terms["fisher"])
        self.hold_ewc(terms["ewc_precision"], terms["ewc_anchor"], terms["ewc_lam"])


def held(bucket, op: str) -> Held:
    """The :class:`Held` of ``op`` for a planned ``bucket``, made on first use (it lives in the
    bucket's ``buffers``, as long as the plan)."""
    key = ("held", op)
    found = bucket.buffers.get(key)
    if found is None:
        found = bucket.buffers[key] = Held(bucket)
    return found
