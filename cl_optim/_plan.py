"""Bucket plans kept from step to step: the Python cost of a step over many small tensors.

Each step needs, for each param group, the parameters that have a gradient, checked (a dense,
real gradient of the parameter's shape and dtype) and split into (device, dtype, layout)
buckets. Done parameter by parameter in Python, with the restore buffers and the optimizer state
looked up the same way, a SAM+AdamW iteration over 2000 tensors of 4096 elements (the
``many_small`` set) spent about 34 ms in Python against 31 ms in its kernels. A plan keeps one
group's buckets and is used again while the group holds the same parameter objects and the same
of them have a gradient: a check at C speed (``map`` over the tensors, one list comparison).

What a plan used again does not check in Python is each gradient against its parameter (shape,
dtype, device, layout) and a parameter whose ``.data`` was replaced (a grown layer, another
dtype). The ops check exactly that before they write anything (``csrc/op_checks.h``,
``_checks.py``). So a pass whose writes are one op call covering every parameter with a gradient
*trusts* its plan: it leaves those checks to the op and, when the op refuses its input
(:func:`refused_input`), forgets its plans and runs again through the Python checks, which name
the problem or, for a parameter that changed, make the step with new buckets. A pass of several
calls plans afresh, checking every parameter in Python before the first call: a refusal half-way
would leave some buckets stepped, and a parameter whose dtype changed would sit in a stale
bucket.
"""

from __future__ import annotations

from operator import is_
from typing import Callable, Optional

import torch
from torch import Tensor


class Bucket(list):
    """The parameters of one (device, dtype, layout) bucket, a list handed to the ops as it is,
    with their ids, their positions in the group (``index``; ``whole``: the group itself, in
    order), and the per-parameter buffers made for them (``buffers``: store id ->
    ``(store, buffers)``, :func:`cl_optim._sam_passes.kept_buffers`), which live as long as
    the plan."""

    __slots__ = ("buffers", "ids", "index", "whole", "sharded")

    def __init__(self, params: list[Tensor], index: list[int], group_size: int, sharded: bool):
        super().__init__(params)
        self.ids = list(map(id, params))
        self.index = index
        self.whole = len(index) == group_size  # positions are increasing: all of them, in order
        self.sharded = sharded
        self.buffers: dict = {}


def bucket_grads(bucket: list[Tensor], group_grads: Optional[list]) -> list[Tensor]:
    """The gradients of a bucket for its op: from the group's ``.grad`` list fetched once this
    pass (:meth:`BucketPlans.group_buckets`), or, for an unplanned list or DTensor shards,
    :func:`cl_optim._distributed.kernel_grads`."""
    if group_grads is None or not isinstance(bucket, Bucket) or bucket.sharded:
        from ._distributed import kernel_grads

        return kernel_grads(bucket)
    return group_grads if bucket.whole else [group_grads[i] for i in bucket.index]


class _GroupPlan:
    __slots__ = ("group", "params", "graded", "select", "buckets")

    def __init__(self, group: dict, params: list, graded: list, select: Optional[list], buckets: list):
        self.group, self.params, self.graded = group, params, graded
        self.select, self.buckets = select, buckets


def same_objects(kept: list, given: list) -> bool:
    """``given`` holds the very objects of ``kept``, in order (identity at C speed: 20 ns a tensor,
    against 45 ns for comparing their ids)."""
    return len(kept) == len(given) and all(map(is_, kept, given))


class BucketPlans:
    """The bucket plans of one optimizer, one per (param group position, purpose)."""

    def __init__(self) -> None:
        self._plans: dict = {}

    def clear(self) -> None:
        """Forget every plan (an op refused a trusted step's input, or the groups changed)."""
        self._plans.clear()

    def group_buckets(
        self,
        key,
        group: dict,
        check: Callable[[list[Tensor]], None],
        select: Optional[list[bool]] = None,
        fresh: bool = False,
    ) -> tuple[list[tuple[tuple, Bucket]], bool, list]:
        """``([((device, dtype, layout), bucket), ...], reused, grads)`` for the parameters of
        ``group`` that have a gradient and, with ``select`` (one bool per parameter), are
        selected; ``grads`` is the group's ``.grad`` list, fetched once for this pass
        (:func:`bucket_grads`: each bucket's; a ``.grad`` read per tensor costs about as much as
        the rest of the planning).

        A new plan runs ``check`` on every parameter with a gradient (selected or not) first;
        ``reused=True`` says the plan was used again and ``check`` was not run: the caller runs
        it on the buckets unless it trusts the plan (see the module docstring). ``fresh``: plan
        (and check) anew whatever is kept. Under ``torch.compile`` nothing is kept or looked up
        (the traced step is planned once, when it compiles).
        """
        from ._distributed import any_dtensor
        from ._optimizer import bucket_indices

        params = group["params"]
        grads = [p.grad for p in params]
        graded = [g is not None for g in grads]
        compiling = torch.compiler.is_compiling()
        plan = None if compiling or fresh else self._plans.get(key)
        if (
            plan is not None
            and plan.group is group
            and same_objects(plan.params, params)
            and plan.graded == graded
            and plan.select == select
        ):
            return plan.buckets, True, grads
        positions = [i for i, has in enumerate(graded) if has]
        check([params[i] for i in positions])
        if select is not None:
            positions = [i for i in positions if select[i]]
        chosen = [params[i] for i in positions]
        if compiling:  # dynamo traces plain lists, not list subclasses
            buckets = [(bucket_key, [chosen[i] for i in index]) for bucket_key, index in bucket_indices(chosen).items()]  # fmt: skip
            return buckets, False, grads
        sharded = any_dtensor(chosen)
        buckets = [
            (bucket_key, Bucket([chosen[i] for i in index], [positions[i] for i in index], len(params), sharded))
            for bucket_key, index in bucket_indices(chosen).items()
        ]  # fmt: skip
        self._plans[key] = _GroupPlan(
            group, list(params), graded, None if select is None else list(select), buckets
        )
        return buckets, False, grads


# The ops whose input checks (csrc/op_checks.h, cl_optim/_checks.py) word every refusal
# "<op>: ...", before anything is written: the one failure a trusted pass makes again.
_OPS = ("sgd_step_", "adamw_step_", "grad_sq_norm", "sam_perturb_", "fisher_accumulate_", "ewc_grad_add_",
        "ewc_penalty", "ewc_consolidate_", "task_gram", "task_combine_")  # fmt: skip


def refused_input(error: BaseException) -> bool:
    """Whether ``error`` is an op refusing its input before it wrote anything: an input check's
    ``RuntimeError`` (``"<op>: ..."``; not a subclass such as an out-of-memory error), or the
    dispatcher finding no kernel for the tensors (a sparse gradient). Anything else may have come
    after a write, and is raised as it is rather than made again."""
    message = str(error)
    if isinstance(error, NotImplementedError):
        return "Could not run 'cl_optim::" in message
    return type(error) is RuntimeError and message.split(":", 1)[0].strip() in _OPS


class PlanRefused(Exception):
    """A trusted step's op refused its input before anything was written: the caller forgets its
    plans and makes the step again through the Python checks (raised from the op's error)."""
