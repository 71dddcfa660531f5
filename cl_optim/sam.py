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
from typing import Callable, Optional

import torch
from torch import Tensor

from ._backend import check_backend_name, prepare, resolve
from ._optimizer import FISHER_KEY, FusedOptimizer, _merge_found_inf, check_fisher_ema
from ._plan import BucketPlans, PlanRefused
from ._sam_accumulate import SAMAccumulation
from ._sam_ascent import SAMAscent
from ._sam_checkpoint import SAMCheckpoints
from ._sam_combine import SAMCombination
from ._sam_passes import gradient_sq_norm, kept_buffers, nonfinite_gradient, param_buckets
from ._sam_settings import check_perturb, check_sam_group
from .sam_ops import ASAM, FISHER_BATCH, FISHER_RUNNING, PLAIN, grad_sq_norm, sam_perturb_
from .sam_select import MASK_KEY, norm_layer_parameters

# The public names of this module before its parts moved out (2e8d5e8) stay importable from it;
# the helpers themselves live in _sam_passes.py, so a patch must target that module.
__all__ = [
    "SAM",
    "grad_sq_norm",
    "sam_perturb_",
    "PLAIN",
    "ASAM",
    "FISHER_BATCH",
    "FISHER_RUNNING",
    "FISHER_KEY",
    "MASK_KEY",
    "gradient_sq_norm",
    "nonfinite_gradient",
    "kept_buffers",
]


class SAM(SAMAscent, SAMCombination, SAMAccumulation, SAMCheckpoints, torch.optim.Optimizer):
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
            check_perturb(group)
        self._masks_from_step: Optional[int] = None  # SSAM-F: the step the masks were built at

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
        check_sam_group(settings)
        self._check_fisher_source(settings)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if getattr(self, "only_norm_layers", False) and "perturb" not in param_group:
            module = self._norm_module() if self._norm_module is not None else None
            self._select_norm_layers(group, module if module is not None else True)
        check_perturb(group)
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

    def running_fisher(self) -> dict:
        """The running Fisher of ``fisher_ema`` (fp32), keyed by parameter, for ``EWC.consolidate``."""
        homes = (self.state, self.sam_state)
        return {p: s[FISHER_KEY] for home in homes for p, s in home.items() if FISHER_KEY in s}

    def _fisher_home(self, p: Tensor) -> dict:
        """Where ``p``'s running Fisher lives: the state of a cl_optim base (its fused step updates
        it), else SAM's own per-parameter store."""
        return self.state[p] if isinstance(self.base_optimizer, FusedOptimizer) else self.sam_state[p]

    # --------------------------------------------------------------------------------- helpers

    def _check_group(self, index: int, group: dict) -> None:
        """SAM's and the base optimizer's hyper-parameters of one group, before anything moves
        (values may have been changed in ``param_groups`` since they were checked)."""
        try:
            check_sam_group(group)
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
            for (device, dtype, _), bucket in param_buckets(params).items():
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
        for (_, _, layout), bucket in param_buckets(self._run["pending"]).items():
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


def _report_overflow(grad_scaler, optimizer, flag: Tensor) -> None:
    """Let ``grad_scaler.update()`` see an overflow of SAM's first pass, as it sees one of the
    second: the flag is added, on the device, to the ``found_inf`` that ``GradScaler.step``
    recorded for this optimizer (the per-optimizer state GradScaler has kept since torch 1.6)."""
    state = getattr(grad_scaler, "_per_optimizer_states", {}).get(id(optimizer))
    found = state.get("found_inf_per_device") if state else None
    if found:
        first = next(iter(found.values()))
        first.add_(flag.to(device=first.device, dtype=first.dtype))
