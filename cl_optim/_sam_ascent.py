"""The ascent of :class:`cl_optim.SAM` (``w <- w + e``) and what goes with it: planning the buckets
it moves (kept between steps, ``_plan.py``; each gradient checked against its parameter), the
global norm and the perturbation of each bucket (through the lists held in C++ where the plan is
trusted, ``_held.py``), the running Fisher's update from the first-pass gradient, and SSAM-F's
masks."""

from __future__ import annotations

from itertools import repeat
from operator import is_not
from typing import Optional

import torch
from torch import Tensor

from ._backend import resolve
from ._distributed import all_reduce_over_shards_, kernel_grads, local_list
from ._held import held
from ._optimizer import fisher_buffer
from ._plan import PlanRefused, bucket_grads, refused_input
from ._sam_passes import as_is, bucket_sq_norm, kept_buffers, weight_kinds
from ._sam_settings import sam_weights
from .sam_ops import FISHER_BATCH, _fisher_ema_where_, grad_sq_norm, sam_perturb_
from .sam_select import MASK_KEY, fisher_keep_mask, unpack_mask


class SAMAscent:
    """The ascent's methods of :class:`cl_optim.SAM` (a mixin: the state is SAM's). They use SAM's
    ``_run``, ``_plans``, ``sam_state`` and options, and its ``_check_group`` and ``_fisher_home``."""

    def _ascent_plan(self, selected_only: bool = True) -> list:
        """Check every group and gradient, then bucket the parameters that the ascent moves
        (``selected_only=False``: every parameter with a gradient):
        ``(group, device, dtype, bucket, backend, layout)`` per (group, device, dtype)."""
        return self._plan_ascent(selected_only, trust=False)[0]

    def _plan_ascent(self, selected_only: bool, trust: bool) -> tuple[list, bool, list]:
        """``(plan, trusted, grads)``: :meth:`_ascent_plan`'s plan, from the kept bucket plans,
        whether the per-gradient checks were left to the ops (``trust``, plans used again, one
        bucket of plain tensors holding every graded parameter: ``_plan.py``; an op refusing then
        raises :class:`PlanRefused` from :meth:`_ascend`), and each bucket's gradients as the
        planning read them (``.grad`` read once a pass: 0.09 us a tensor)."""
        groups, graded = self._ascent_groups(selected_only, fresh=not trust)
        if not graded:
            raise RuntimeError("first_step() found no gradient: call backward() before first_step()")
        # One bucket of plain tensors holding every graded parameter (the op sees every gradient; a
        # DTensor's may be redistributed: collectives are not retried).
        only = [bucket for _, buckets, _, _ in groups for bucket in buckets]
        trusted = (
            trust and all(reused for _, _, reused, _ in groups) and len(only) == 1 and only[0][0][2] is None
            and len(only[0][1]) == graded
        )  # fmt: skip
        if not trusted and any(reused for _, _, reused, _ in groups):  # every gradient checked, buckets anew
            groups, graded = self._ascent_groups(selected_only, fresh=True)
        plan, grads = [], []
        for group, buckets, _, group_grads in groups:
            for (device, dtype, layout), bucket in buckets:
                if dtype.is_complex:
                    check_sam_param(bucket[0])
                plan.append((group, device, dtype, bucket, resolve(self.backend, device, dtype), layout))
                grads.append(bucket_grads(bucket, group_grads))
        return plan, trusted, grads

    def _ascent_groups(self, selected_only: bool, fresh: bool) -> tuple[list, int]:
        """``([(group, buckets, reused, grads)], parameters with a gradient)`` from the kept bucket
        plans (``fresh``: planned and checked anew); ``grads``: the group's ``.grad`` list."""
        groups, graded = [], 0
        for index, group in enumerate(self.param_groups):
            self._check_group(index, group)
            perturb = group.get("perturb", True) if selected_only else True
            n = len(group["params"])
            select = None if perturb is True else [False] * n if perturb is False else list(perturb)
            buckets, reused, grads = self._plans.group_buckets(
                (index, selected_only), group, check_sam_params, select, fresh=fresh
            )
            graded += sum(map(is_not, grads, repeat(None)))  # (at C speed: a generator costs 30 us per 1000)
            groups.append((group, buckets, reused, grads))
        return groups, graded

    def _ascend(
        self,
        plan: list,
        store: dict,
        *,
        radius: str = "rho",
        grad_scaler=None,
        update_fisher: bool = True,
        directions: Optional[dict] = None,
        trusted: bool = False,
        grads: Optional[list] = None,
    ) -> tuple:
        """``w <- w + rho * T**2 g / (||T g|| + eps)`` for the buckets of ``plan``, ``g`` the current
        ``.grad`` (or ``directions[id(p)]``), ``rho`` the group's value under the key ``radius``;
        the weights before it are copied into the buffers of ``store``. Returns the moved
        parameters and the device flag "the norm was finite" (when it is not, nothing moves).
        ``update_fisher``: the running Fisher of ``fisher_ema`` takes this step's ``.grad`` (the
        first ascent only). The step's ``_run["ascent_norms"]`` gets the fp64 norm of the direction
        where it is a plain one (no ASAM or Fisher weights), else None: a variant's bound on the
        norms of what it combines. ``trusted``: a plan from :meth:`_plan_ascent` whose checks were
        left to the ops; their refusal, before anything moved, raises :class:`PlanRefused`.
        ``grads``: each bucket's ``.grad`` list, read when the plan was made (:meth:`_plan_ascent`),
        where nothing ran in between."""
        if not plan:
            return [], torch.ones((), dtype=torch.bool)
        if directions is not None:
            grads_of = lambda bucket: [directions[id(p)] for p in bucket]  # noqa: E731
            if update_fisher and self.fisher_ema is not None:
                self._fisher_from_grads(plan, grad_scaler)
            update_fisher = False
        else:
            grads_of = kernel_grads
        perturbed, saved = [], []
        try:
            # One global norm over every group and device, accumulated in fp64 (davda54's convention:
            # the norm is global, rho is per group).
            home = plan[0][3][0].device
            grad_scale = getattr(grad_scaler, "_scale", None) if grad_scaler is not None else None
            weights = [sam_weights(group, bucket) for group, _, _, bucket, _, _ in plan]
            if grad_scale is not None and any(w is not None and FISHER_BATCH in w for w, _ in weights):
                # 1/(1 + eta*(g/S)**2) = 1/(1 + (eta/S**2)*g**2): the batch Fisher of the unscaled gradient.
                inv_scale_sq = float(grad_scale.double().reciprocal().square())
                weights = [
                    (w, eta * inv_scale_sq if w is not None and FISHER_BATCH in w else eta)
                    for w, eta in weights
                ]
            fishers = [
                [fisher_buffer(self._fisher_home(p), p) for p in bucket]
                if self.fisher_ema is not None
                else None
                for _, _, _, bucket, _, _ in plan
            ]
            # DTensor parameters (FSDP2): each rank's local shards, the sums added across the ranks.
            shards = [local_list if layout is not None else as_is for *_, layout in plan]
            directions_of = (
                grads if grads is not None and directions is None
                else [grads_of(bucket) for _, _, _, bucket, _, _ in plan]
            )  # read once for both ops  # fmt: skip
            # A trusted plan's lists held in C++ between steps (_held.py).
            helds = [
                held(bucket, "sam", backend) if trusted else None for _, _, _, bucket, backend, _ in plan
            ]
            sq_norms = [
                all_reduce_over_shards_(
                    bucket_sq_norm(calls, direction, on(bucket), weighted, eta, on(fisher), backend), bucket[0]
                ).to(home)
                for (_, _, _, bucket, backend, _), direction, (weighted, eta), fisher, on, calls
                in zip(plan, directions_of, weights, fishers, shards, helds)
            ]  # fmt: skip
            # fp64 (grad_sq_norm's dtype): a large finite gradient has a finite norm.
            norm = torch.stack(sq_norms).sum().sqrt()
            finite = torch.isfinite(norm)
            plain = all(weighted is None for weighted, _ in weights)
            self._run["ascent_norms"].append(norm if plain else None)
            fisher_flag = finite if update_fisher else torch.zeros_like(finite)

            for (group, device, dtype, bucket, backend, _), direction, weight, fisher, on, calls in zip(
                plan, directions_of, weights, fishers, shards, helds
            ):
                weighted, eta = weight
                self.perturb_backends_used[f"{device}/{dtype}"] = backend
                # A non-finite gradient gives scale 0: no perturbation, and no host sync to decide it.
                scale = torch.where(finite, group[radius] / (norm + self.perturb_eps), torch.zeros_like(norm))
                saves = kept_buffers(store, bucket, device, dtype, trusted)
                step_scale = None if grad_scale is None else grad_scale.to(device)
                if calls is None or not calls.sam_perturb(
                    direction, saves, scale.to(device), weight_kinds(weighted), eta, fisher, self.fisher_ema or 0.0,
                    step_scale, fisher_flag.to(device),
                ):  # fmt: skip
                    sam_perturb_(
                        on(bucket),
                        direction,
                        on(saves),
                        scale.to(device),
                        weighted,
                        eta,
                        backend=backend,
                        fisher=on(fisher),
                        fisher_beta=self.fisher_ema or 0.0,
                        grad_scale=step_scale,
                        finite=fisher_flag.to(device),
                    )
                perturbed.extend(bucket)
                saved.extend(saves)
                self._after_ascent(group, bucket, saves)
        except BaseException as error:
            # Each op checks its inputs before it writes, and (unless trusted) the inputs of every
            # bucket were checked before: a failure here is unexpected. The weights of the buckets
            # perturbed before it are put back (their running Fisher, with fisher_ema, has taken
            # this step's update).
            for p in perturbed:
                p.copy_(store[id(p)])
            if trusted and not perturbed and refused_input(error):
                raise PlanRefused() from error
            raise
        # What the restore reads back: second_step's list when these weights are the pending ones
        # (not kept by a compiled step, whose lists are not the ones second_step is given).
        if not torch.compiler.is_compiling():
            self._run["ascent_saves"] = (store, perturbed, saved)
        return perturbed, finite

    def _fisher_from_grads(self, plan: list, grad_scale) -> None:
        """The running Fisher's update from ``.grad`` where no ascent makes it (an ascent along
        another direction, a step without one): per bucket, where the gradient is finite.
        ``grad_scale``: the loss scale (a tensor) or a GradScaler."""
        if grad_scale is not None and not isinstance(grad_scale, Tensor):
            grad_scale = getattr(grad_scale, "_scale", None)
        for _, _, _, bucket, _, _ in plan:
            grads = [p.grad for p in bucket]
            finite = torch.isfinite(grad_sq_norm(grads, backend="foreach"))
            fisher = [fisher_buffer(self._fisher_home(p), p) for p in bucket]
            _fisher_ema_where_(fisher, grads, self.fisher_ema, grad_scale, finite)

    def _after_ascent(self, group: dict, bucket: list, saves: list) -> None:
        """After each bucket's ascent: SSAM-F puts the elements outside its mask back (exactly: the
        saved value), so only the kept elements are perturbed; the norm was the whole gradient's."""
        if self.mask is None or self._masks_from_step is None:
            return
        for p, save in zip(bucket, saves):
            packed = self.sam_state[p].get(MASK_KEY)
            if packed is not None:
                torch.where(unpack_mask(packed, p.shape), p, save, out=p)

    def update_mask(self) -> bool:
        """Rebuild the SSAM-F masks now from the Fisher (``fisher_ema``'s running one, else the EWC
        precision) of the parameters that have a gradient. Returns False, leaving the ascent
        unmasked, while the scores are all zero (no Fisher yet). Host reads: one per histogram."""
        return self._build_masks(self._ascent_plan())

    def _refresh_masks(self, plan: list) -> None:
        built = self._masks_from_step
        if built is None or (self.mask_every is not None and self.steps - built >= self.mask_every):
            self._build_masks(plan)

    def _build_masks(self, plan: list) -> bool:
        params = [p for _, _, _, bucket, _, _ in plan for p in bucket]
        if self.fisher_ema is not None:
            scores = [fisher_buffer(self._fisher_home(p), p) for p in params]
        else:
            precisions = self.ewc.step_terms(params)[0]
            scores = [torch.zeros_like(p) if f is None else f for p, f in zip(params, precisions)]
        if not params or not any(bool(s.any()) for s in scores):
            return False
        for p, packed in zip(params, fisher_keep_mask(scores, self.sparsity)):
            self.sam_state[p][MASK_KEY] = packed
        self._masks_from_step = self.steps
        return True


def check_sam_params(params: list[Tensor]) -> None:
    """Raise, naming the problem, for a parameter whose gradient SAM refuses."""
    for p in params:
        grad = p.grad
        if grad.is_sparse or grad.shape != p.shape or grad.dtype != p.dtype:
            check_sam_param(p)  # raises, naming the problem


def check_sam_param(p: Tensor) -> None:
    """Raise, naming the problem, for a parameter whose gradient SAM refuses (sparse, complex, or of
    another shape or dtype)."""
    if p.grad.is_sparse:
        raise RuntimeError(f"SAM does not support sparse gradients (parameter of shape {tuple(p.shape)})")
    if p.is_complex():
        raise RuntimeError(f"SAM supports real floating-point parameters only, got {p.dtype}")
    if p.grad.shape != p.shape or p.grad.dtype != p.dtype:
        raise RuntimeError(
            f"SAM: a gradient of shape {list(p.grad.shape)} ({p.grad.dtype}) for a parameter of shape "
            f"{list(p.shape)} ({p.dtype}): a layer changed after backward(), or a gradient was set by hand; "
            "nothing was changed"
        )
