"""Tensor lists held on the C++ side from step to step (``csrc/cpu/held_lists.cpp``).

Handing an op a Python list of tensors converts it element by element: an AdamW step over 2000
small tensors hands over six lists, 2.4 ms on the AMD EPYC of ``bench/results`` before its kernel
starts, as long as the update of 2000 x 4096 fp32 elements. A planned bucket
(:class:`cl_optim._plan.Bucket`) whose step is trusted to its op keeps a :class:`Held` per op:
each list (parameters, optimizer state, SAM's saves, Fisher, EWC) is converted once and handed
over again only when it is no longer, element for element, the list held (an identity check at C
speed); a call hands over only the gradients (new tensors after every ``zero_grad()``) and the
scalars.

A held call runs the same C++ function, with the same input checks, as the dispatcher would, so
it gives the same numbers and refuses the same input with the same words (a refusal then sends
the step back through the Python checks, as for any trusted step). It is used only where that
call is what the dispatcher would make: the ``cpp`` backend, parameters of the plain tensor types
on the CPU, outside ``torch.compile`` and with no ``__torch_function__`` or
``__torch_dispatch__`` mode active. A tensor that the dispatcher would handle before the kernel
(a negative or conjugate view, a zero tensor, a subclass or wrapper) makes the held call decline,
having touched nothing, and the caller makes the list call (:meth:`Held.adamw_step` and the others
return False or None).

The held lists keep their tensors alive as long as the plan that owns them: a plan is dropped when
its group changes, when an op refuses its input, and on ``load_state_dict``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn import Parameter

from ._plan import same_objects

# The slots of csrc/cpu/held_lists.cpp.
PARAMS, EXP_AVGS, EXP_AVG_SQS, MAX_EXP_AVG_SQS, STEPS, RESTORE_FROM, COMBINE_FROM, FISHER, SAVES, MOMENTUM_BUFFERS = range(10)  # fmt: skip
_SLOTS = MOMENTUM_BUFFERS + 1
_PLAIN = (Tensor, Parameter)
_INELIGIBLE = False  # kept in a bucket's buffers: its parameters cannot be held


def _same(held: Optional[list], given: list) -> bool:
    return held is given or (held is not None and same_objects(held, given))


def held(bucket, op: str, backend: str) -> Optional[Held]:
    """The :class:`Held` of ``op`` for ``bucket``, made on first use and kept in the bucket's
    ``buffers`` (as long as its plan), or None where the call cannot be held: another backend, an
    unplanned or sharded bucket, parameters that are not plain CPU tensors (decided once per
    bucket; a parameter's type does not change), ``torch.compile``, a torch function or dispatch
    mode (decided at each call)."""
    from ._plan import Bucket

    if (
        backend != "cpp"
        or not isinstance(bucket, Bucket)
        or bucket.sharded
        or torch._C._len_torch_dispatch_stack() != 0
        or torch._C._len_torch_function_stack() != 0
        or torch.compiler.is_compiling()
    ):
        return None
    key = ("held", op)
    found = bucket.buffers.get(key)
    if found is None:
        found = _INELIGIBLE
        if bucket and all(type(p) in _PLAIN and p.device.type == "cpu" for p in bucket):
            candidate = Held(bucket[0])
            if candidate.hold(PARAMS, bucket):  # (declines a parameter that is a view the dispatcher unfolds)
                found = candidate
        bucket.buffers[key] = found
    return found or None


class Held:
    """One op's lists for one bucket, held in C++ (``torch.classes.cl_optim.HeldLists``)."""

    __slots__ = ("lists", "ewc", "ready", "calls", "states", "state_keys", "state_dicts")

    def __init__(self, like: Tensor):
        from ._backend import resolve

        resolve("cpp", like.device, like.dtype)  # builds or loads the extension, which holds the class
        self.calls = torch.classes.cl_optim.HeldLists()
        self.lists: list = [None] * _SLOTS
        self.ewc: Optional[tuple] = None
        self.ready: Optional[list] = None
        self.states: Optional[list] = None
        self.state_keys: Optional[list] = None
        self.state_dicts: Optional[list] = None

    def states_of(self, state: dict) -> list[dict]:
        """The optimizer's per-parameter state dicts of the held parameters, ``[state[p] for p in
        params]``: looked up again only when ``state``'s keys or values are not the same objects,
        in the same order, as at the last lookup (a replaced or added entry, a new state from
        ``load_state_dict``), so that a step over thousands of tensors does not hash each (a
        Python call per tensor)."""
        keys, values = list(state), list(state.values())
        if self.states is None or not (_same(self.state_keys, keys) and _same(self.state_dicts, values)):
            self.states = [state[p] for p in self.lists[PARAMS]]  # (a defaultdict adds missing entries)
            self.state_keys, self.state_dicts = list(state), list(state.values())
        return self.states

    def hold(self, slot: int, tensors: Optional[list[Tensor]]) -> bool:
        """Hold ``tensors`` (``None``: an empty list) in ``slot`` unless they are held already;
        False (nothing held) where one is not a plain CPU tensor."""
        tensors = [] if tensors is None else tensors
        if _same(self.lists[slot], tensors):
            return True
        if not self.calls.hold(slot, tensors):
            return False
        self.lists[slot] = list(tensors)  # a copy: the caller may change its list later
        return True

    def _hold_ewc(self, precision: list, anchor: list, lam: list[float]) -> bool:
        held = self.ewc
        if held is not None and _same(held[0], precision) and _same(held[1], anchor) and held[2] == lam:
            return True
        if not self.calls.hold_ewc(precision, anchor, lam):
            self.ewc = None
            return False
        self.ewc = (list(precision), list(anchor), list(lam))
        return True

    def _hold_terms(self, terms: dict) -> bool:
        """The list terms of :func:`cl_optim._terms.kernel_terms`."""
        return (
            self.hold(RESTORE_FROM, terms["restore_from"])
            and self.hold(COMBINE_FROM, terms["combine_from"])
            and self.hold(FISHER, terms["fisher"])
            and self._hold_ewc(terms["ewc_precision"], terms["ewc_anchor"], terms["ewc_lam"])
        )

    # Each call returns False (None for the norm), having written nothing, where a tensor is not
    # one the held call takes: the caller then makes the list call.

    def adamw_step(self, grads, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, terms: dict, *, maximize, lr,
                   beta1, beta2, eps, weight_decay) -> bool:  # fmt: skip
        """``adamw_step_`` (:mod:`cl_optim.ops`) with ``terms`` from :func:`cl_optim._terms.kernel_terms`."""
        if not (
            self.hold(STEPS, steps)
            and self.hold(EXP_AVGS, exp_avgs)
            and self.hold(EXP_AVG_SQS, exp_avg_sqs)
            and self.hold(MAX_EXP_AVG_SQS, max_exp_avg_sqs)
            and self._hold_terms(terms)
        ):
            return False
        return self.calls.adamw_step(
            grads, terms["combine_coef"], terms["grad_scale"], terms["found_inf"], terms["clip_coef"],
            terms["fisher_beta"], maximize, lr, beta1, beta2, eps, weight_decay,
        )  # fmt: skip

    def sgd_step(self, grads, momentum_buffers, terms: dict, *, maximize, lr, momentum, dampening, weight_decay,
                 nesterov) -> bool:  # fmt: skip
        """``sgd_step_`` with every momentum buffer made already (a first step makes its buffers
        through the list call)."""
        if not (self.hold(MOMENTUM_BUFFERS, momentum_buffers) and self._hold_terms(terms)):
            return False
        ready = [1] * len(grads) if momentum != 0 else []
        if self.ready != ready:
            self.calls.hold_buffer_ready(ready)
            self.ready = ready
        return self.calls.sgd_step(
            grads, terms["combine_coef"], terms["grad_scale"], terms["found_inf"], terms["clip_coef"],
            terms["fisher_beta"], maximize, lr, momentum, dampening, weight_decay, nesterov,
        )  # fmt: skip

    def grad_sq_norm(self, grads, kinds: list[int], eta: float, fisher: Optional[list]) -> Optional[Tensor]:
        """``grad_sq_norm`` of the held parameters' gradients; ``fisher`` as ``sam_perturb_`` takes it
        next (its EMA; the norm reads it for the running-Fisher weight only)."""
        if not self.hold(FISHER, fisher):
            return None
        return self.calls.grad_sq_norm(grads, kinds, eta)

    def sam_perturb(self, grads, saves, scale, kinds: list[int], eta: float, fisher: Optional[list], fisher_beta,
                    grad_scale, finite) -> bool:  # fmt: skip
        if not (self.hold(SAVES, saves) and self.hold(FISHER, fisher)):
            return False
        return self.calls.sam_perturb(grads, scale, kinds, eta, fisher_beta, grad_scale, finite)
