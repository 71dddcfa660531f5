"""Sharpness-aware minimisation (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021).

SAM minimises ``max_{||T^-1 e|| <= rho} L(w + e)`` with one ascent step: at the weights ``w``
with gradient ``g``,

    s = rho / (||T g||_2 + eps)          one norm over every parameter of every group
    e = s * T**2 * g                     per group: each group may have its own rho
    w <- w + e, then the gradient at w + e drives the base optimizer's update of w.

``T = 1`` is SAM. ASAM comes in two conventions (both per group):

* ``adaptive=True``: ``T = |w| + eta`` with ``eta = 0`` on every tensor, as davda54/sam and
  ``pytorch_optimizer.SAM`` do, so their users get the same numbers;
* ``adaptive="official"``: ``T = |w| + eta`` with ``eta = 0.01`` on weight tensors only, the rule
  of Kwon et al.'s code; tensors with at most one dimension (biases, norm-layer scales and shifts)
  keep ``T = 1``.

Fisher-SAM (Kim et al., ICML 2022) measures the neighbourhood in the Fisher metric:
``T**2 = 1 / (1 + eta * F)`` element-wise (every tensor), so ``e = s * g / (1 + eta * F)`` and the
norm is ``sqrt(sum g**2 / (1 + eta * F))``. Two sources of ``F``, per group:

* ``adaptive="fisher"``: ``F = g**2`` of the current batch, the paper's form (``eta = 1``);
* ``adaptive="fisher_ema"``: ``F`` is the running Fisher that ``fisher_ema=beta`` keeps in the
  optimizer state (as it was before this step updates it), so curvature estimated over many
  steps, or carried over from earlier tasks, shapes the perturbation.
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from itertools import repeat
from operator import is_, is_not
from typing import Callable, Optional

import torch
from torch import Tensor

from ._backend import check_backend_name, prepare, resolve
from ._distributed import all_reduce_over_shards_, kernel_grads, local_list
from ._held import held
from ._optimizer import (
    FISHER_KEY,
    FusedOptimizer,
    _check_param,
    _merge_found_inf,
    bucket_indices,
    check_fisher_ema,
    fisher_buffer,
    keep_fp32_state,
    pad_state_,
)
from ._plan import Bucket, BucketPlans, PlanRefused, bucket_grads, refused_input
from .sam_ops import ASAM, FISHER_BATCH, FISHER_RUNNING, PLAIN, _fisher_ema_where_, grad_sq_norm, sam_perturb_
from .sam_select import fisher_keep_mask, norm_layer_parameters, unpack_mask

__all__ = ["SAM", "grad_sq_norm", "sam_perturb_", "PLAIN", "ASAM", "FISHER_BATCH", "FISHER_RUNNING"]

_ADAPTIVE_MODES = (False, True, "official", "fisher", "fisher_ema")
MASK_KEY = "ssam_mask"  # SSAM-F: the packed mask of a parameter, in the optimizer state
# Group keys of SAM and its variants that a plain base optimizer's state dict lacks.
_GROUP_KEYS = ("rho", "adaptive", "eta", "perturb", "grad_norm_rho", "rho_max", "lr_max")
_DEFAULT_ETA = {False: 0.0, True: 0.0, "official": 0.01, "fisher": 1.0, "fisher_ema": 1.0}


class SAM(torch.optim.Optimizer):
    r"""Sharpness-aware minimisation around any ``torch.optim.Optimizer`` class.

    The signature is davda54/sam's and ``pytorch_optimizer.SAM``'s, so switching is one line.

    Args:
        params: parameters or parameter groups; groups may set ``rho``, ``adaptive`` and ``eta``.
        base_optimizer: the optimizer *class* that makes the update, built on the same
            ``param_groups`` (so LR schedulers and ``add_param_group`` work on the SAM object).
            With ``cl_optim.SGD``/``cl_optim.AdamW`` the restore and the update are one call.
        rho: radius of the neighbourhood (``>= 0``).
        adaptive: ``False`` (SAM), ``True`` (ASAM as davda54: ``T = |w|``, all tensors),
            ``"official"`` (ASAM as Kwon et al.: ``T = |w| + 0.01``, tensors of 2+ dimensions),
            ``"fisher"`` (Fisher-SAM, ``T**2 = 1/(1 + eta*g**2)``) or ``"fisher_ema"``
            (Fisher-SAM on the running Fisher of ``fisher_ema``, ``T**2 = 1/(1 + eta*F)``).
        eta: overrides the offset of the chosen convention (ASAM: 0 or 0.01; Fisher-SAM: 1).
        perturb_eps: ``eps`` of the scale ``rho / (||T g|| + eps)``; 1e-12 as davda54.
        skip_nonfinite: skip the step when the second-pass gradient has an inf or a NaN, as when
            the first-pass one has (default). Without a GradScaler (which checks it already) this
            reads the second-pass gradient once more (4 bytes per fp32 parameter);
            ``skip_nonfinite=False`` saves that read and lets a non-finite second pass reach the
            update, as davda54/sam and torch's optimizers do.
        backend: backend of the perturbation (and of a cl_optim base optimizer).
        **base_kwargs: hyper-parameters of the base optimizer.

    A step is ``first_step`` (save ``w`` into a buffer allocated once, perturb), a second
    forward/backward at ``w + e``, then ``second_step`` (restore ``w`` in place, base update).
    If the first-pass (or second-pass) gradient is not finite, nothing is perturbed (or the
    weights are restored) and the whole step is skipped without a host synchronisation;
    ``last_step_skipped`` holds the flag on the device. A large finite gradient (1e20) is not
    skipped: the norm is accumulated in fp64.

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)
        >>> opt = cl_optim.SAM(model.parameters(), cl_optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> loss_fn().backward(); opt.first_step(zero_grad=True)
        >>> loss_fn().backward(); opt.second_step(zero_grad=True)
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        base_optimizer: type,
        rho: float = 0.05,
        adaptive=False,
        *,
        eta: Optional[float] = None,
        perturb_eps: float = 1e-12,
        skip_nonfinite: bool = True,
        backend: str = "auto",
        ewc=None,
        fisher_ema: Optional[float] = None,
        only_norm_layers=False,
        interval: int = 1,
        start_step: int = 0,
        mask: Optional[str] = None,
        sparsity: float = 0.5,
        mask_every: Optional[int] = None,
        **base_kwargs,
    ):
        for name, value, low in (("interval", interval, 1), ("start_step", start_step, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Invalid {name}: {value!r} (an int >= {low})")
        if mask not in (None, "fisher"):
            raise ValueError(f'Invalid mask: {mask!r}; expected None or "fisher" (SSAM-F)')
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(
                f"Invalid sparsity: {sparsity} (the fraction of elements not perturbed, in [0, 1])"
            )
        if mask_every is not None and (
            isinstance(mask_every, bool) or not isinstance(mask_every, int) or mask_every < 1
        ):
            raise ValueError(f"Invalid mask_every: {mask_every!r} (None or an int >= 1)")
        if mask == "fisher" and fisher_ema is None and ewc is None:
            raise ValueError(
                'mask="fisher" (SSAM-F) scores elements by a Fisher: set fisher_ema=beta (the running '
                "Fisher) or ewc= (the EWC precision)"
            )
        if isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("SAM takes the base optimizer class (e.g. torch.optim.SGD), not an instance")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer subclass, got {base_optimizer!r}"
            )
        if not 0.0 <= perturb_eps < math.inf:
            raise ValueError(f"Invalid perturb_eps: {perturb_eps} (must be finite and >= 0)")
        check_fisher_ema(fisher_ema)
        self.backend = check_backend_name(backend)
        self.perturb_eps = perturb_eps
        self.skip_nonfinite = bool(skip_nonfinite)
        self.fisher_ema = fisher_ema
        self.ewc = ewc
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        super().__init__(params, defaults)
        if issubclass(base_optimizer, FusedOptimizer):
            base_kwargs = dict(base_kwargs, backend=backend, ewc=ewc)
        elif ewc is not None:
            from .ewc import EWC

            if not isinstance(ewc, EWC):
                raise TypeError(f"ewc= takes a cl_optim.EWC, got {type(ewc).__name__}")
        for group in self.param_groups:
            self._check_fisher_source(group)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One list of groups and one state for both: schedulers, add_param_group and state_dict
        # see the base optimizer's hyper-parameters and moments through the SAM object.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.defaults.update(rho=rho, adaptive=adaptive, eta=eta)
        # id(param) -> restore buffer, allocated once, never serialised
        self._saved: dict[int, Tensor] = {}
        # Per-parameter tensors of SAM and its variants (SSAM-F mask, LookSAM's g_v, F-SAM's mean,
        # the running Fisher beside a torch.optim base), kept out of the base optimizer's state:
        # torch's Adam initialises a parameter's state only while it is empty. Saved in state_dict.
        self.sam_state: defaultdict = defaultdict(dict)
        self._micro_sums: dict[int, Tensor] = {}  # id(param) -> accumulated micro-batch gradient
        self._constants: dict = {}  # (device, values) -> fp64 tensor: made once, no copy per step
        self._plans = BucketPlans()  # the ascent's buckets of each group, kept between steps (_plan.py)
        # What changes from step to step lives in one dict, changed item by item: torch.compile
        # keeps item writes of a compiled first_step/second_step, where it drops rebinding an
        # attribute of an Optimizer subclass (seen with torch 2.13). The step count is a tensor
        # (an int would be specialised: one recompilation per step), and the two methods take
        # no_grad as a block, so that each has a code object of its own (one shared decorator
        # wrapper made them evict each other from torch.compile's cache).
        self._run: dict = {
            "pending": None,  # parameters perturbed by a pending first_step
            "pass1_nonfinite": None,  # device flag: the first-pass gradient was not finite
            "grad_scaler": None,  # the GradScaler given to first_step, told about a pass-1 overflow
            "last_step_skipped": None,
            "steps": torch.zeros((), dtype=torch.int64),
            "ascent_norms": [],  # this step's ascent norms (SAM._ascend), reset by first_step
            "ascent_saves": None,  # (store, moved, their save buffers) of the last ascent (_pending_saves)
        }
        self.perturb_backends_used: dict[str, str] = {}
        self.interval, self.start_step = interval, start_step
        self.mask, self.sparsity, self.mask_every = mask, float(sparsity), mask_every
        # SAM-ON: the selection is each group's "perturb" entry (a bool per parameter), so it is
        # saved with the groups and survives copies; the module (by type) is kept weakly, for
        # groups added later.
        self.only_norm_layers = only_norm_layers is not False and only_norm_layers is not None
        self._norm_module = (
            weakref.ref(only_norm_layers) if isinstance(only_norm_layers, torch.nn.Module) else None
        )
        for group in self.param_groups:
            self._select_norm_layers(group, only_norm_layers)
            _check_perturb(group)
        self._masks_from_step: Optional[int] = None  # SSAM-F: the step the masks were built at

    def __getstate__(self) -> dict:
        """A copy or pickle keeps the base optimizer, the options and the counters (torch's
        Optimizer keeps only defaults, state and groups); the restore buffers are transient."""
        if self._run["pending"] is not None:
            raise RuntimeError(
                "cannot copy or pickle SAM between first_step() and second_step(): the weights are perturbed"
            )
        self._refuse_mid_accumulation("copy or pickle")
        state = dict(self.__dict__)
        for hooks in [key for key in state if key.startswith("_optimizer_") and key.endswith("_hooks")]:
            del state[hooks]  # as torch.optim.Optimizer: hooks are not part of a copy
        state["_saved"] = {}
        state["_micro_sums"] = {}
        state["_norm_module"] = None  # a weak reference: the copy selects new groups by name
        state["_constants"] = {}
        state["_plans"] = BucketPlans()
        state["_run"] = {**self._run, "grad_scaler": None, "ascent_norms": [], "ascent_saves": None}
        return state

    @property
    def steps(self) -> int:
        """Completed SAM steps (skipped ones included), saved in ``state_dict``."""
        return int(self._run["steps"])

    @property
    def is_sam_step(self) -> bool:
        """Whether the coming step perturbs (``interval``/``start_step``: late-phase and interval
        SAM); on the other steps ``step()`` makes the base update with the gradient already there,
        without calling the closure. A host value: the step count lives on the CPU."""
        steps = self.steps
        return steps >= self.start_step and (steps - self.start_step) % self.interval == 0

    @property
    def last_step_skipped(self) -> Optional[Tensor]:
        """Device flag of the last ``second_step``: True when AMP or a non-finite pass skipped it."""
        return self._run["last_step_skipped"]

    def add_param_group(self, param_group: dict) -> None:
        # Validate rho/adaptive/eta before the group joins the (shared) list of groups.
        settings = {key: param_group.get(key, self.defaults[key]) for key in ("rho", "adaptive", "eta")}
        _check_sam_group(settings)
        self._check_fisher_source(settings)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if getattr(self, "only_norm_layers", False) and "perturb" not in param_group:
            module = self._norm_module() if self._norm_module is not None else None
            self._select_norm_layers(group, module if module is not None else True)
        _check_perturb(group)
        if getattr(self, "mask", None) is not None:
            self._masks_from_step = None  # SSAM-F: the new parameters need masks too
        prepare(self.backend, group["params"])

    @staticmethod
    def _select_norm_layers(group: dict, only_norm_layers) -> None:
        """Set SAM-ON's per-parameter ``perturb`` of a group (a group's own ``perturb`` wins)."""
        if only_norm_layers is False or only_norm_layers is None or "perturb" in group:
            return
        selected = norm_layer_parameters(only_norm_layers, [group])
        group["perturb"] = [id(p) in selected for p in group["params"]]

    def _check_fisher_source(self, group: dict) -> None:
        if group["adaptive"] == "fisher_ema" and self.fisher_ema is None:
            raise ValueError(
                'adaptive="fisher_ema" perturbs along the running Fisher: set fisher_ema=beta '
                '(or use adaptive="fisher", the batch-gradient form)'
            )

    # ----------------------------------------------------------------------------------- steps

    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        """Save the weights and move them to ``w + e`` (the ascent step of the current gradient).

        ``grad_scaler``: the ``GradScaler`` of an AMP loop, needed with ``fisher_ema`` (the running
        Fisher is of the unscaled gradient) and with ``adaptive="fisher"`` (its weight
        ``1/(1 + eta*g**2)`` is of the unscaled gradient: ``eta`` is divided by the squared scale,
        one host read of the scale). SAM's and ASAM's perturbations do not depend on the scale.
        """
        with torch.no_grad():  # a block, not @torch.no_grad(): see _run
            self._run["ascent_norms"] = []  # this step's (every variant's first step comes here)
            self._first_step(zero_grad, grad_scaler)

    def _first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        if self._run["pending"] is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(): the weights are still perturbed; "
                "call second_step() (or step()) first"
            )
        if not self.is_sam_step:
            raise RuntimeError(
                f"step {self.steps} is not a SAM step (interval={self.interval}, start_step={self.start_step}): "
                "call step() for the base update (check is_sam_step first); nothing was changed"
            )
        plan, trusted, grads = self._plan_ascent(selected_only=True, trust=True)
        if self.mask is not None:
            self._refresh_masks(plan)
        try:
            perturbed, finite = self._ascend(
                plan, self._saved, grad_scaler=grad_scaler, trusted=trusted, grads=grads
            )
        except PlanRefused:
            # An op refused what the plan left unchecked, before anything moved: the Python checks
            # name the problem now, or a parameter that changed gets new buckets.
            self._plans.clear()
            self._run["ascent_norms"] = []
            perturbed, finite = self._ascend(self._ascent_plan(), self._saved, grad_scaler=grad_scaler)
        self._perturbed(perturbed, ~finite, grad_scaler, zero_grad)

    def _perturbed(self, params: list, nonfinite: Tensor, grad_scaler, zero_grad: bool) -> None:
        """Record a first step: what moved, the skip flag, the GradScaler; then ``zero_grad``."""
        self._run["pass1_nonfinite"] = nonfinite
        self._run["pending"] = params
        self._run["grad_scaler"] = grad_scaler
        if zero_grad:
            self.zero_grad()

    def _second_pass_params(self) -> list:
        """The parameters a variant combines in ``second_step``: those kept at the first step
        (``_run["first_pass"]``) that have a second-pass gradient; none outside a SAM step."""
        first_pass = self._run.get("first_pass") or []
        return [p for p in first_pass if p.grad is not None] if self._run["pending"] is not None else []

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
                    _check_sam_param(bucket[0])
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
                (index, selected_only), group, _check_sam_params, select, fresh=fresh
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
            weights = [_sam_weights(group, bucket) for group, _, _, bucket, _, _ in plan]
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
            shards = [local_list if layout is not None else _same for *_, layout in plan]
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
                    _sq_norm(calls, direction, on(bucket), weighted, eta, on(fisher), backend), bucket[0]
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
                    direction, saves, scale.to(device), _kinds(weighted), eta, fisher, self.fisher_ema or 0.0,
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

    def second_step(self, zero_grad: bool = False, accumulate: bool = False) -> None:
        """Restore the weights in place and make the base optimizer's update with the new gradient.

        ``accumulate=True`` (gradient accumulation with a perturbation per micro-batch, the
        m-sharpness of the SAM paper): restore the weights, add this micro-batch's gradient to a
        running sum (one buffer per parameter, allocated once) and clear ``.grad``, without an
        update; the next ``second_step()`` without it adds the sum and makes the one update.
        Scale each micro-batch's loss by ``1/k`` as in any accumulation.
        """
        if accumulate and not self._LOCAL_ACCUMULATION:
            raise NotImplementedError(
                f"{type(self).__name__} has no per-micro-batch accumulation (its state moves once per "
                "step): accumulate the gradients of both passes over the micro-batches instead (the "
                "global form; README, gradient accumulation)"
            )
        if accumulate and self.fisher_ema is not None:
            raise NotImplementedError(
                "second_step(accumulate=True) with fisher_ema: each micro-batch's first pass would update "
                "the running Fisher (k times a step, with 1/k-scaled gradients); accumulate in both "
                "passes instead (the global form)"
            )
        with torch.no_grad():  # a block, not @torch.no_grad(): see _run
            self._run["accumulate"] = bool(accumulate)
            try:
                self._second_step(zero_grad)
            finally:
                self._run["accumulate"] = False

    # Whether second_step(accumulate=True) applies: variants whose state moves once per step
    # (LookSAM's g_v, F-SAM's mean, WSAM's decoupled descent) set False.
    _LOCAL_ACCUMULATION = True

    # False: a variant's final combination is always written into .grad (bench/bench_sam_family.py
    # sets it on an instance to measure what the COMBINE term saves).
    _FUSE_COMBINATION = True

    def _combine_into_update(self, params: list[Tensor], sources: list[list[Tensor]], coefficients: Tensor,
                             source_norms: Optional[Tensor] = None, grad_norm: Optional[Tensor] = None) -> None:  # fmt: skip
        """A variant's final combination ``.grad <- c_0 .grad + c_1 x_1 + ... + c_K x_K`` for
        ``params`` (``sources``: K lists aligned with them, ``coefficients``: K + 1 on the device).

        With a fused cl_optim base, fp32/fp64 parameters and ``source_norms`` (fp64 upper bounds
        of the norm of each source: a reduction the variant made anyway, or the ascent norms it
        had), the update reads the sources itself (the COMBINE term: the combination is never
        written, 8 bytes per parameter fewer). The check of the combined gradient that the written
        form has (``skip_nonfinite``) becomes a bound: the step is skipped unless
        ``sum_k |c_k| ||x_k||`` — a bound of every partial sum of every element — is at most half
        the dtype's largest value, so the combination cannot overflow. ``grad_norm`` is the norm of
        ``.grad`` where the variant has it; otherwise the update takes it in the pass that checks
        the last gradient for infs anyway (one more read only where a GradScaler made that check).
        Otherwise (a torch.optim base, low precision, no norms, accumulation) it is written into
        ``.grad`` now."""
        if not self._fuses_combination(params, source_norms):
            if coefficients.dim() != 1:
                raise ValueError(
                    "a DESCENT row (2-D coefficients) needs the fused update (_fuses_combination)"
                )
            from .multitask.aggregators import weighted_sum_unchecked

            grads = [p.grad for p in params]
            weighted_sum_unchecked([grads, *sources], coefficients, out=grads, backend=self.backend)
            return
        self._run["combine"] = (params, sources, coefficients, source_norms, grad_norm)

    def _fuses_combination(self, params: list[Tensor], source_norms: Optional[Tensor]) -> bool:
        """Whether :meth:`_combine_into_update` hands the combination to the update (COMBINE, and
        DESCENT with 2-D coefficients) rather than writing it into ``.grad``."""
        return (
            self._FUSE_COMBINATION
            and source_norms is not None
            and isinstance(self.base_optimizer, FusedOptimizer)
            and not self._run.get("accumulate")
            and not self._run.get("micro_summed")  # earlier micro-batches are added to .grad unscaled
            and {p.dtype for p in params} <= {torch.float32, torch.float64}
        )

    def _ascent_norm(self, index: int) -> Optional[Tensor]:
        """The fp64 norm of this step's ascent ``index`` (0: the first), where it is a plain norm
        (no ASAM or Fisher weights) and the first ascent moved every parameter of the first pass
        (not SAM-ON's subset; SSAM-F's mask is fine: its norm is the whole gradient's), so it
        bounds the norm of the direction over any parameters a variant combines; else None."""
        norms = self._run.get("ascent_norms") or []
        pending, first_pass = self._run.get("pending") or [], self._run.get("first_pass") or []
        if index >= len(norms) or norms[index] is None or len(pending) != len(first_pass):
            return None
        return norms[index]

    def _combination_bound(self, combine: tuple, check_last_pass: bool) -> tuple[Tensor, bool]:
        """``(unbounded, check_last_pass)``: the device flag "the combination may overflow" (NaN
        norms included), and whether the update must still check the last gradient for infs.
        Without the variant's norm of ``.grad`` the bound takes the norm of every gradient — the
        pass the check would make, and a bound over more parameters is still a bound — and the
        check is its finiteness; with it, the check is made where gradients outside the
        combination exist (a parameter that got its first gradient in the last pass)."""
        params, _, coefficients, source_norms, grad_norm = combine
        if coefficients.dim() == 2:
            # The bound is COMBINE's (what the update reads). The DESCENT row enters the kernel
            # times lr/S, and the written form (task_combine_ after the step) bounds none of it:
            # bounding the raw row skipped steps the written form takes (review of 5337db7).
            coefficients = coefficients[0]
        if grad_norm is None:
            try:
                grad_norm = self._gradient_sq_norm().sqrt()
            except (RuntimeError, NotImplementedError):
                for group in self.param_groups:  # the update's own message for a gradient it refuses
                    for p in group["params"]:
                        if p.grad is not None:
                            _check_param(p)
                raise
            check_last_pass = False
        elif check_last_pass:
            graded = sum(p.grad is not None for group in self.param_groups for p in group["params"])
            check_last_pass = graded != len(params)
        norms = torch.cat([grad_norm.reshape(1).to(source_norms), source_norms.reshape(-1)])
        largest = min(torch.finfo(dtype).max for dtype in {p.dtype for p in params})
        magnitudes = coefficients.abs().to(norms.dtype)
        bound = (magnitudes * norms).sum()
        # The kernel takes each coefficient in the parameters' opmath (fp32 for fp32): one past its
        # range would be inf there, and inf * 0 = NaN, which the bound alone does not see.
        in_range = (magnitudes <= largest).all()
        return ~((bound <= largest / 2) & in_range), check_last_pass

    def _second_step(self, zero_grad: bool = False) -> None:
        combine = self._run.pop("combine", None)  # from _combine_into_update, for this update only
        if self._run["pending"] is None:
            raise RuntimeError("second_step() called without a pending first_step(); nothing was changed")
        grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step (AMP hand-over)
        found_inf = getattr(self, "found_inf", None)
        restore = (self._run["pending"], self._pending_saves())
        if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
            self._abort()
            raise RuntimeError(
                "no gradient at the perturbed weights: call backward() between first_step() and "
                "second_step(); the weights were restored and no update was made"
            )
        if self._run.get("accumulate"):
            return self._accumulate_micro_batch()
        self._add_accumulated()
        skip = self._run["pass1_nonfinite"]
        # No GradScaler checked the second pass: one more read of it, on the device.
        check_second_pass = found_inf is None and self.skip_nonfinite
        if combine is not None and self.skip_nonfinite:  # the combination's check, as a bound
            try:  # its norm pass reads every gradient: a refused one must not leave w + e behind
                unbounded, check_second_pass = self._combination_bound(combine, check_second_pass)
            except BaseException:
                self._abort()
                raise
            skip = unbounded if skip is None else skip | unbounded.to(skip.device)
        if found_inf is not None and self._run["grad_scaler"] is not None:
            _report_overflow(self._run["grad_scaler"], self, skip)
        if isinstance(self.base_optimizer, FusedOptimizer):
            try:
                flag = self.base_optimizer._fused_step(
                    restore=restore,
                    skip=skip,
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                    skip_nonfinite=check_second_pass,
                    combine=combine[:3] if combine is not None else None,
                )
            except BaseException:
                # Refused before anything was written (every bucket is checked first): put the
                # weights back, so that a failed step never leaves them perturbed.
                self._abort()
                raise
        else:
            if check_second_pass:
                nonfinite = self._nonfinite_gradient()
                skip = nonfinite if skip is None else skip | nonfinite
            self._restore()
            self._foreign_update(skip, grad_scale, found_inf)
            flag = _merge_found_inf(found_inf, skip)
        self._run["last_step_skipped"] = flag != 0
        self._run["pending"] = None
        self._run["first_pass"] = None
        self._run["steps"].add_(1)
        # What an LR scheduler's wrapper of step() records: first_step/second_step users get no
        # "lr_scheduler.step() before optimizer.step()" warning. Not inside torch.compile, which
        # cannot set an optimizer attribute (torch 2.6 breaks the graph on it).
        if not torch.compiler.is_compiling():
            self._opt_called = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """``first_step``, ``closure()`` at the perturbed weights, ``second_step``; returns its loss.

        The gradient at the current weights must exist (run the first forward/backward before),
        and the closure must run the forward and ``backward()``, as in davda54/sam. After a
        ``first_step`` of your own, ``step(closure)`` runs the closure and completes the step
        (``second_step``), and ``step()`` completes it with the second-pass gradient already there:
        that is how ``GradScaler.step`` and Lightning's optimizer wrappers reach ``second_step``.
        """
        if self._run["pending"] is None:
            if not self.is_sam_step:  # interval / late-phase SAM: the base update, no closure call
                self._base_step()
                return None
            if closure is None:
                raise RuntimeError(
                    "SAM.step() needs a closure that re-evaluates the loss and calls backward(), "
                    "or use first_step() / second_step()"
                )
            self.first_step(zero_grad=True)
        loss = None
        if closure is not None:
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                self._abort()
                raise
        if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
            self._abort()
            raise RuntimeError(
                "the closure did not call backward(): SAM needs the gradient at the perturbed weights; "
                "the weights were restored and no update was made"
            )
        self.second_step()
        return loss

    def _constant(self, values: tuple, device: torch.device) -> Tensor:
        """Fixed coefficients as an fp64 tensor on ``device``, made once: a host-to-device copy
        per step would synchronise with the device."""
        key = (device, values)
        found = self._constants.get(key)
        if found is None:
            found = self._constants[key] = torch.tensor(values, dtype=torch.float64).to(device)
        return found

    def _refuse_mid_accumulation(self, what: str) -> None:
        if self._run.get("micro_summed"):
            raise RuntimeError(
                f"{what} between micro-batches of second_step(accumulate=True): the summed gradient "
                "is not part of a copy or a checkpoint; finish the step first"
            )

    def _accumulate_micro_batch(self) -> None:
        """``sum <- sum + .grad`` (a micro-batch's perturbed gradient), restore, clear ``.grad``."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        flags = [self._run["pass1_nonfinite"], self._nonfinite_gradient()]  # GradScaler sees only the last
        if self._run.get("micro_skip") is not None:
            flags.append(self._run["micro_skip"])
        home = flags[1].device
        self._run["micro_skip"] = torch.stack([f.to(home) for f in flags]).any()
        summed = self._run.setdefault("micro_summed", set())
        for (device, dtype, _), bucket in _buckets(params).items():
            sums = kept_buffers(self._micro_sums, bucket, device, dtype)
            fresh = [i for i, p in enumerate(bucket) if id(p) not in summed]
            seen = [i for i, p in enumerate(bucket) if id(p) in summed]
            if fresh:
                torch._foreach_copy_([sums[i] for i in fresh], [bucket[i].grad for i in fresh])
            if seen:
                torch._foreach_add_([sums[i] for i in seen], [bucket[i].grad for i in seen])
            summed.update(id(p) for p in bucket)
        self._restore()
        self._run["pending"] = None
        self.zero_grad()

    def _add_accumulated(self) -> None:
        """The last micro-batch: ``.grad <- .grad + sum`` of the earlier ones, and their skip flag."""
        summed = self._run.pop("micro_summed", None)
        micro_skip = self._run.pop("micro_skip", None)
        if not summed:
            return
        params = [p for group in self.param_groups for p in group["params"] if id(p) in summed]
        for p in params:
            if p.grad is None:  # reached by earlier micro-batches only
                p.grad = torch.zeros_like(p)
        for (device, dtype, _), bucket in _buckets(params).items():
            torch._foreach_add_(
                [p.grad for p in bucket], kept_buffers(self._micro_sums, bucket, device, dtype)
            )
        skip = self._run["pass1_nonfinite"]
        self._run["pass1_nonfinite"] = micro_skip if skip is None else skip | micro_skip.to(skip.device)

    def _base_step(self, update_fisher: bool = True) -> None:
        """The base optimizer's update with the gradient there now, nothing perturbed or restored
        (the non-SAM steps of interval SAM, LookSAM's reuse steps); AMP and the non-finite skip as
        in ``second_step``. ``update_fisher=False``: the caller moved the running Fisher already."""
        with torch.no_grad():
            if update_fisher:
                self._running_fisher_from_grads()
            self._run["pending"] = []
            self._run["first_pass"] = None  # a variant's first-pass gradients belong to a SAM step
            self._run["pass1_nonfinite"] = None
            self._run["grad_scaler"] = None
            self._second_step()

    def _running_fisher_from_grads(self) -> None:
        """The running Fisher moves every step, as a cl_optim base's: on a step without an ascent,
        from the batch gradient there now."""
        if self.fisher_ema is not None:
            plan = self._ascent_plan(selected_only=False)
            self._fisher_from_grads(plan, getattr(self, "grad_scale", None))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The base optimizer's state (momentum, Adam moments, ...) and SAM's own counters.

        The restore buffers are transient and never saved; asking between ``first_step`` and
        ``second_step`` (perturbed weights) is an error.
        """
        if self._run["pending"] is not None:
            raise RuntimeError(
                "state_dict() between first_step() and second_step(): the weights are perturbed"
            )
        self._refuse_mid_accumulation("state_dict()")
        state = super().state_dict()
        state["sam"] = {"steps": self.steps}
        if self.mask is not None:
            state["sam"]["masks_from_step"] = self._masks_from_step
        params = [p for group in self.param_groups for p in group["params"]]
        per_param = {i: dict(self.sam_state[p]) for i, p in enumerate(params) if self.sam_state.get(p)}
        if per_param:
            state["sam"]["param_state"] = per_param
        return state

    def running_fisher(self) -> dict:
        """The running Fisher of ``fisher_ema`` (fp32), keyed by parameter, for ``EWC.consolidate``."""
        homes = (self.state, self.sam_state)
        return {p: s[FISHER_KEY] for home in homes for p, s in home.items() if FISHER_KEY in s}

    def _fisher_home(self, p: Tensor) -> dict:
        """Where ``p``'s running Fisher lives: the state of a cl_optim base (its fused step updates
        it), else SAM's own per-parameter store."""
        return self.state[p] if isinstance(self.base_optimizer, FusedOptimizer) else self.sam_state[p]

    def pad_state_(self, param: Tensor, new_param: Optional[Tensor] = None) -> None:
        """Carry a grown parameter's state over (``cl_optim.pad_state_``); not while perturbed."""
        if self._run["pending"] is not None:
            raise RuntimeError("pad_state_() between first_step() and second_step()")
        pad_state_(self, param, new_param)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a SAM state dict, or a plain one of the base optimizer class."""
        if self._run["pending"] is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        state_dict = dict(state_dict)
        sam_state = state_dict.pop("sam", {})
        # A plain base optimizer's state dict has none of SAM's group keys: keep the current ones.
        kept = [{k: v for k, v in group.items() if k in _GROUP_KEYS} for group in self.param_groups]
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        keep_fp32_state(self, state_dict)
        for group, own in zip(self.param_groups, kept):
            for key, value in own.items():
                group.setdefault(key, value)
            for key in ("rho", "adaptive", "eta"):
                group.setdefault(key, self.defaults[key])
            _check_sam_group(group)
            _check_perturb(group)
            self._check_fisher_source(group)
        self._run["steps"].fill_(int(sam_state.get("steps", 0)))
        self._masks_from_step = sam_state.get("masks_from_step")
        # SAM's per-parameter tensors as saved (no cast to the parameter dtype: 1-bit masks, fp32
        # Fisher), on each parameter's device; a running Fisher a torch.optim base kept in its own
        # state (checkpoints before the store existed) moves to the store.
        params = [p for group in self.param_groups for p in group["params"]]
        self.sam_state = defaultdict(dict)
        for index, entries in sam_state.get("param_state", {}).items():
            p = params[int(index)]
            for key, value in entries.items():
                if value.shape != p.shape and key != MASK_KEY:
                    raise ValueError(f"sam param_state[{index}][{key!r}] of shape {tuple(value.shape)} "
                                     f"for a parameter of shape {tuple(p.shape)}; nothing usable was loaded")  # fmt: skip
                self.sam_state[p][key] = value.to(p.device).clone()
        if not isinstance(self.base_optimizer, FusedOptimizer):
            for p in params:
                if FISHER_KEY in self.state.get(p, {}):
                    self.sam_state[p][FISHER_KEY] = self.state[p].pop(FISHER_KEY)

    # --------------------------------------------------------------------------------- helpers

    def _check_group(self, index: int, group: dict) -> None:
        """SAM's and the base optimizer's hyper-parameters of one group, before anything moves
        (values may have been changed in ``param_groups`` since they were checked)."""
        try:
            _check_sam_group(group)
            if isinstance(self.base_optimizer, FusedOptimizer):
                self.base_optimizer.check_hyperparameters(group, on_device_too=False)
        except (ValueError, TypeError) as error:
            raise type(error)(f"param_groups[{index}]: {error}; nothing was changed") from None

    def _save_buffers(self, bucket: list[Tensor], device: torch.device, dtype: torch.dtype) -> list[Tensor]:
        """The restore buffer of each parameter of a (device, dtype) bucket, allocated once."""
        return kept_buffers(self._saved, bucket, device, dtype)

    def _nonfinite_gradient(self) -> Tensor:
        """Device flag: some gradient has an inf or a NaN (a foreign base optimizer's second pass)."""
        return ~torch.isfinite(self._gradient_sq_norm())

    def _gradient_sq_norm(self) -> Tensor:
        """fp64 squared norm of every ``.grad`` (:func:`gradient_sq_norm`), on the first one's device."""
        buckets = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for (device, dtype, _), bucket in _buckets(params).items():
                buckets.append((bucket, resolve(self.backend, device, dtype)))
        return gradient_sq_norm(buckets, buckets[0][0][0].device)

    def _pending_saves(self) -> list[Tensor]:
        """The save buffer of each parameter of the pending perturbation, aligned with it: the list
        the ascent wrote when the pending weights are what it moved into ``_saved``, else one
        lookup each."""
        pending = self._run["pending"]
        store, moved, saved = self._run.get("ascent_saves") or (None, None, None)
        if store is self._saved and moved is pending:
            return saved
        return list(map(self._saved.__getitem__, map(id, pending)))

    def _restore(self) -> None:
        """The perturbed weights back from their copies, exactly: one foreach copy per (device,
        dtype) (a copy per tensor cost 3.7 us each, 7 ms a pass over 2000 small tensors)."""
        saved = self._saved
        for (_, _, layout), bucket in _buckets(self._run["pending"]).items():
            if layout is None:
                torch._foreach_copy_(bucket, [saved[id(p)] for p in bucket])
            else:  # DTensor (FSDP2) parameters: foreach copies have no sharding rule
                for p in bucket:
                    p.copy_(saved[id(p)])

    def _abort(self) -> None:
        """Put the weights back after a failed second pass; no update is made. Under no_grad
        whoever calls it (the integrations call it from an except block with grad enabled)."""
        self._run.pop("combine", None)  # a combination of this step must not reach a later update
        if self._run["pending"] is not None:
            with torch.no_grad():
                self._restore()
            self._run["pending"] = None

    def _foreign_update(self, skip, grad_scale, found_inf) -> None:
        # A torch.optim base cannot skip on a device flag: one host read decides (documented).
        flag = _merge_found_inf(found_inf, skip)
        if flag is not None and bool(flag.item() != 0):
            return
        if grad_scale is not None:
            inv_scale = grad_scale.double().reciprocal().float()
            grads = defaultdict(list)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grads[p.grad.device].append(p.grad)
            for device, device_grads in grads.items():
                torch._foreach_mul_(device_grads, inv_scale.to(device))
        if self.ewc is not None:
            self.ewc.add_grad_()  # at the restored weights, after the unscale
        self.base_optimizer.step()


def _kinds(weighted: Optional[list]) -> list[int]:
    return [int(w) for w in weighted] if weighted is not None else []


def _sq_norm(calls, direction, params, weighted: Optional[list], eta: float, fisher, backend: str) -> Tensor:
    """:func:`grad_sq_norm` of a bucket, through its held lists (``_held.py``) where it has them and
    they take the call."""
    if calls is not None:
        norm = calls.grad_sq_norm(direction, _kinds(weighted), eta, fisher)
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


def _same(tensors):
    return tensors


def gradient_sq_norm(buckets: list, home: torch.device) -> Tensor:
    """The squared norm of the gradients of ``buckets`` (``(parameters, backend)`` pairs, or
    ``(parameters, backend, gradients)`` with the gradients fetched already) on
    ``home``: one fp64-accumulated pass per bucket (summed across ranks for DTensor shards), no host
    read. Non-finite exactly where some gradient has an inf or a NaN (fp64 squares of fp32 values
    cannot overflow)."""
    sq_norms = [
        all_reduce_over_shards_(
            _sq_norm(held(bucket, "grad_sq_norm", backend), grads[0] if grads else kernel_grads(bucket), None,
                     None, 0.0, None, backend),
            bucket[0],
        ).to(home)
        for bucket, backend, *grads in buckets
    ]  # fmt: skip
    return torch.stack(sq_norms).sum()


def nonfinite_gradient(buckets: list, home: torch.device) -> Tensor:
    """Device flag: some gradient of ``buckets`` has an inf or a NaN (:func:`gradient_sq_norm`)."""
    return ~torch.isfinite(gradient_sq_norm(buckets, home))


def _report_overflow(grad_scaler, optimizer, flag: Tensor) -> None:
    """Let ``grad_scaler.update()`` see an overflow of SAM's first pass, as it sees one of the
    second: the flag is added, on the device, to the ``found_inf`` that ``GradScaler.step``
    recorded for this optimizer (the per-optimizer state GradScaler has kept since torch 1.6)."""
    state = getattr(grad_scaler, "_per_optimizer_states", {}).get(id(optimizer))
    found = state.get("found_inf_per_device") if state else None
    if found:
        first = next(iter(found.values()))
        first.add_(flag.to(device=first.device, dtype=first.dtype))


def _check_sam_group(group: dict) -> None:
    if not 0.0 <= group["rho"] < math.inf:
        raise ValueError(f"Invalid rho: {group['rho']} (must be finite and >= 0)")
    if group["adaptive"] not in _ADAPTIVE_MODES:
        raise ValueError(
            f"Invalid adaptive: {group['adaptive']!r}; expected False, True, 'official', 'fisher' or 'fisher_ema'"
        )
    if group["eta"] is not None and not 0.0 <= group["eta"] < math.inf:
        raise ValueError(f"Invalid eta: {group['eta']} (must be >= 0)")


def _check_perturb(group: dict) -> None:
    """A group's ``perturb``: a bool, or one bool per parameter (SAM-ON's selection)."""
    perturb = group.get("perturb", True)
    if isinstance(perturb, bool):
        return
    if (
        not isinstance(perturb, (list, tuple))
        or len(perturb) != len(group["params"])
        or not all(isinstance(flag, bool) for flag in perturb)
    ):
        raise ValueError(
            f"Invalid perturb: {perturb!r}; a bool or one bool per parameter of the group "
            f"({len(group['params'])})"
        )


def _check_sam_params(params: list[Tensor]) -> None:
    """Raise, naming the problem, for a parameter whose gradient SAM refuses."""
    for p in params:
        grad = p.grad
        if grad.is_sparse or grad.shape != p.shape or grad.dtype != p.dtype:
            _check_sam_param(p)  # raises, naming the problem


def _check_sam_param(p: Tensor) -> None:
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


def _buckets(params: list[Tensor]) -> dict:
    return {key: [params[i] for i in index] for key, index in bucket_indices(params).items()}


def _sam_weights(group: dict, params: list[Tensor]) -> tuple[Optional[list[int]], float]:
    """The weight kind of each tensor (PLAIN, ASAM, FISHER_*) and ``eta``; ``(None, 0)`` for SAM."""
    mode = group["adaptive"]
    if mode is False:
        return None, 0.0
    eta = float(_DEFAULT_ETA[mode] if group["eta"] is None else group["eta"])
    if mode == "fisher":
        return [FISHER_BATCH] * len(params), eta
    if mode == "fisher_ema":
        return [FISHER_RUNNING] * len(params), eta
    return [PLAIN if (mode == "official" and p.dim() <= 1) else ASAM for p in params], eta
