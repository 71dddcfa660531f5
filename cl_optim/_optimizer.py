"""What cl_optim.SGD and cl_optim.AdamW share: bucketing, backend dispatch, AMP hand-over, RESTORE."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional

import torch
from torch import Tensor

from ._backend import check_backend_name, prepare, resolve
from ._distributed import any_dtensor, is_dtensor, kernel_grads, layout_key
from ._plan import Bucket, BucketPlans, bucket_grads, refused_input, same_objects
from ._terms import StepTerms


def backend_from_torch_flags(backend: str, foreach: Optional[bool], fused: Optional[bool]) -> str:
    """Map torch.optim's ``foreach=`` / ``fused=`` keywords onto ``backend=``, for drop-in use."""
    check_backend_name(backend)
    if foreach is None and not fused:
        return backend
    if backend != "auto":
        raise ValueError("pass either backend= or torch's foreach=/fused=, not both")
    if foreach and fused:
        raise ValueError("`foreach` and `fused` cannot both be True")
    if fused:
        return "fused"  # resolved per (device, dtype) bucket to the fastest compiled backend
    return "foreach" if foreach else "forloop"


FISHER_KEY = "fisher_ema"  # optimizer-state key of the running Fisher, always fp32


def refuse_differentiable(differentiable: bool, name: str) -> None:
    if differentiable:
        raise ValueError(
            f"cl_optim.{name} does not take differentiable=True (a step that autograd differentiates "
            f"through, for meta-learning); use torch.optim.{name}(differentiable=True) there"
        )


def check_fisher_ema(beta: Optional[float]) -> None:
    if beta is not None and not 0.0 <= beta < 1.0:
        raise ValueError(f"Invalid fisher_ema: {beta} (the EMA factor beta must be in [0, 1))")


def fisher_buffer(state: dict, p: Tensor) -> Tensor:
    """The running Fisher of ``p`` in its optimizer state, created as fp32 zeros (a DTensor laid
    out like ``p`` when it is one); one of another shape (a grown parameter, a state dict of another
    model) is an error, not a broadcast."""
    fisher = state.get(FISHER_KEY)
    if fisher is None:
        fisher = state[FISHER_KEY] = torch.zeros_like(
            p, dtype=torch.float32, memory_format=torch.contiguous_format
        )
    elif fisher.shape != p.shape:
        raise state_shape_error(FISHER_KEY, fisher, p)
    return fisher


def state_shape_error(key: str, value: Tensor, p: Tensor) -> RuntimeError:
    return RuntimeError(
        f"optimizer state {key!r} has shape {list(value.shape)} for a parameter of shape {list(p.shape)}: the "
        "parameter changed shape after its state was created (a grown layer), or the state dict is another "
        "model's; nothing was changed. Keep the state of a grown layer with optimizer.pad_state_(param), "
        "drop it with optimizer.state.pop(param), or load a matching state dict."
    )


def keep_fp32_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Undo torch's cast of floating state to the parameter dtype for the running Fisher.

    ``Optimizer.load_state_dict`` turns every floating state tensor into the parameter's dtype;
    a bf16 model would silently get a bf16 Fisher (an EMA that stalls at half its target).
    """
    saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for saved_id, p in zip(saved_ids, params):
        saved = state_dict["state"].get(saved_id, {})
        if FISHER_KEY in saved:
            optimizer.state[p][FISHER_KEY] = (
                saved[FISHER_KEY].to(device=p.device, dtype=torch.float32).clone()
            )


def check_state_dict_shapes(
    optimizer: torch.optim.Optimizer, state_dict: dict, keys: tuple[str, ...]
) -> None:
    """Refuse a state dict whose per-element state does not fit the parameters, before loading it.

    torch loads such a state silently (its step then fails, or broadcasts a larger state into a
    smaller parameter without a word); here nothing is loaded and the error names the entry.
    """
    groups, saved_groups = optimizer.param_groups, state_dict.get("param_groups", [])
    if len(groups) != len(saved_groups) or any(
        len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
    ):
        return  # torch's own load_state_dict raises its error about the group sizes
    saved_state = state_dict.get("state", {})
    for index, (group, saved_group) in enumerate(zip(groups, saved_groups)):
        for position, (p, saved_id) in enumerate(zip(group["params"], saved_group["params"])):
            for key in keys:
                value = saved_state.get(saved_id, {}).get(key)
                if isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(
                        f"load_state_dict: state {key!r} of parameter {position} of group {index} has shape "
                        f"{list(value.shape)}, the parameter {list(p.shape)}: the state dict is of another "
                        "model (or of this one before a layer grew); nothing was loaded"
                    )


@torch.no_grad()
def pad_state_(optimizer: torch.optim.Optimizer, param: Tensor, new_param: Optional[Tensor] = None) -> None:
    """Carry the optimizer state of a parameter that grew (new classes of a head) over to its new shape.

    Each per-element state tensor (momentum, Adam moments, the running Fisher) keeps its old values
    in the leading block and gets zeros in the new entries, as a parameter that joins the run
    fresh would; counters (``step``) are kept. ``param`` is the parameter as the optimizer holds
    it; when the layer was replaced by a new ``nn.Parameter``, pass it as ``new_param``: it takes
    ``param``'s place in its group. Works on any ``torch.optim`` optimizer and on ``cl_optim.SAM``.
    The EWC side of the same growth is ``EWC.pad_``.

    >>> import torch, cl_optim
    >>> head = torch.nn.Linear(4, 3)
    >>> opt = cl_optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    >>> head(torch.randn(2, 4)).sum().backward(); opt.step()
    >>> head.weight.data = torch.cat([head.weight.data, torch.zeros(1, 4)])  # a fourth class
    >>> head.bias.data = torch.cat([head.bias.data, torch.zeros(1)])
    >>> opt.pad_state_(head.weight); opt.pad_state_(head.bias)
    >>> opt.state[head.weight]["momentum_buffer"].shape
    torch.Size([4, 4])
    """
    target = param if new_param is None else new_param
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise ValueError("pad_state_: the parameter is not in this optimizer's param_groups")
    state = optimizer.state.get(param, {})
    padded = {}
    for key, value in state.items():
        if not isinstance(value, Tensor) or value.dim() == 0:
            padded[key] = value  # a counter such as `step`
            continue
        if value.dim() != target.dim() or any(new < old for new, old in zip(target.shape, value.shape)):
            raise ValueError(
                f"pad_state_: state {key!r} of shape {list(value.shape)} cannot grow to {list(target.shape)} "
                "(every dimension must stay or grow); nothing was changed"
            )
        grown = value.new_zeros(target.shape)
        grown[tuple(slice(0, n) for n in value.shape)] = value
        padded[key] = grown
    if new_param is not None:
        group["params"][[i for i, p in enumerate(group["params"]) if p is param][0]] = new_param
        optimizer.state.pop(param, None)
    if padded:
        optimizer.state[target] = padded


def check_lr(lr, on_device_too: bool = True) -> None:
    """torch.optim's checks of ``lr`` (a float or a 1-element tensor, not negative), and finite.

    ``on_device_too=False`` (the checks at each step) leaves a tensor's value unread: reading it
    would be a host synchronisation per step, and a graph break under torch.compile.
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not on_device_too:
            return
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}")


def _merge_found_inf(found_inf: Optional[Tensor], skip: Optional[Tensor]) -> Optional[Tensor]:
    if skip is None:
        return found_inf
    skip = skip.to(torch.float32)
    if found_inf is None:
        return skip
    return torch.maximum(found_inf.to(skip.device, torch.float32), skip)


class FusedOptimizer(torch.optim.Optimizer):
    """Base of the cl_optim base optimizers. Subclasses implement :meth:`_update_bucket`.

    It collects the parameters that have a gradient, validates them all before anything is
    written, splits them into (device, dtype) buckets, picks the backend of each bucket (recorded
    in ``backends_used``) and passes the optional terms of ``_terms.py`` down to the update.
    """

    # GradScaler hands grad_scale / found_inf to step() as attributes instead of unscaling and
    # syncing itself: the update unscales, and skips itself when found_inf is set.
    _step_supports_amp_scaling = True

    # The per-element state entries of the subclass (each of its parameter's shape).
    STATE_KEYS: tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, backend: str, ewc=None, fisher_ema: Optional[float] = None):
        from .ewc import EWC

        if ewc is not None and not isinstance(ewc, EWC):
            raise TypeError(f"ewc= takes a cl_optim.EWC, got {type(ewc).__name__}")
        check_fisher_ema(fisher_ema)
        self.backend = check_backend_name(backend)
        self.ewc = ewc
        self.fisher_ema = fisher_ema
        # "(device)/(dtype)" -> backend name, for every bucket stepped so far.
        self.backends_used: dict[str, str] = {}
        self._plans = BucketPlans()  # the buckets of each group, kept between steps (_plan.py)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # The group's own values are checked as the constructor checks the defaults, before it joins.
        self.check_hyperparameters({**self.defaults, **param_group})
        super().add_param_group(param_group)
        prepare(self.backend, self.param_groups[-1]["params"])

    @staticmethod
    def check_hyperparameters(group: dict, on_device_too: bool = True) -> None:  # pragma: no cover
        raise NotImplementedError

    # What a copy or a pickle of the optimizer keeps besides torch's defaults, state and groups.
    _PICKLED = ("backend", "ewc", "fisher_ema", "backends_used")

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer keeps defaults, state and param_groups only: a copy.deepcopy or
        # torch.save of a cl_optim optimizer lost its backend and failed at the next step.
        return {**super().__getstate__(), **{key: self.__dict__[key] for key in self._PICKLED}}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._plans = BucketPlans()
        # Groups loaded from a torch.optim state_dict lack cl_optim-only keys: fill them in.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict) -> None:
        check_state_dict_shapes(self, state_dict, self.STATE_KEYS + (FISHER_KEY,))
        super().load_state_dict(state_dict)
        keep_fp32_state(self, state_dict)

    def running_fisher(self) -> dict:
        """The running Fisher of ``fisher_ema`` (fp32), keyed by parameter, for ``EWC.consolidate``."""
        return {p: s[FISHER_KEY] for p, s in self.state.items() if FISHER_KEY in s}

    def pad_state_(self, param: Tensor, new_param: Optional[Tensor] = None) -> None:
        """Carry a grown parameter's state over; see :func:`pad_state_`."""
        pad_state_(self, param, new_param)

    def __repr__(self) -> str:
        return super().__repr__().rstrip(")") + f"backend: {self.backend}\n)"

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step; ``closure`` re-evaluates the loss, as in torch.optim."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fused_step(
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None)
        )
        return loss

    @torch.no_grad()
    def _fused_step(
        self,
        restore: Optional[tuple[list[Tensor], list[Tensor]]] = None,
        skip: Optional[Tensor] = None,
        grad_scale: Optional[Tensor] = None,
        found_inf: Optional[Tensor] = None,
        skip_nonfinite: bool = False,
        combine: Optional[tuple[list, list, Tensor]] = None,
        *,
        trust_plan: bool = True,
    ) -> Optional[Tensor]:
        """One step with the RESTORE term, AMP and a skip flag; returns the skip flag it used.

        ``restore``: ``(params, saves)``, the save buffer of each parameter to restore (SAM's
        perturbed ones). Those without a gradient are restored by a plain copy, so no perturbed
        weight is ever left behind, skipped or not; a parameter with a gradient but no save buffer
        (it was not perturbed) is updated from its own value.

        ``combine``: ``(params, sources, coefficients)``, the COMBINE term (a SAM variant's final
        combination, read by the update instead of written into ``.grad`` first): ``sources`` holds
        ``K`` lists aligned with ``params``, ``coefficients`` ``K + 1`` values on the device, the
        first for ``.grad``; a parameter not in ``params`` is updated with its ``.grad`` as it is.

        ``grad_scale``/``found_inf`` follow GradScaler's hand-over; ``skip`` (a device flag, e.g.
        SAM's non-finite first pass) skips the update like ``found_inf``. ``skip_nonfinite``: skip
        too when a gradient has an inf or a NaN (SAM's second pass without a GradScaler): one
        fp64-accumulated norm per bucket, on the device, with the buckets planned here anyway.

        A step that is one op call on a plan used again trusts the op's checks of its input
        (``_plan.py``); ``trust_plan=False``, the step made again after the op refused, checks
        every parameter first.
        """
        # Plan every bucket (and fail on bad input or an unavailable backend) before writing anything.
        restoring = None if restore is None else _Aligned(restore[0], [restore[1]])
        combination = None if combine is None else _Combination(*combine)
        planned, reused, calls = self._plan_calls(restoring, combination, fresh=not trust_plan)
        # One call on plain tensors (a DTensor's gradient may be redistributed: collectives are not retried).
        trusted = trust_plan and all(reused) and len(calls) == 1 and not is_dtensor(calls[0][1][0])
        if any(reused) and not trusted:  # several calls: every gradient checked, buckets made anew
            planned, reused, calls = self._plan_calls(restoring, combination, fresh=True)
        # Each op checks every tensor of its bucket before it writes anything; the state of the
        # buckets after the first is checked here too, so that no bucket is stepped before a later
        # one is found wrong.
        for _, bucket, _, _ in planned[1:]:
            self._check_state_shapes(bucket)
        given_skip, given_found_inf = skip, found_inf
        if skip_nonfinite and planned:
            from ._sam_passes import nonfinite_gradient

            home = planned[0][1][0].device
            nonfinite = nonfinite_gradient(
                [(bucket, backend, grads) for _, bucket, backend, grads in planned], home
            )
            skip = nonfinite if skip is None else skip | nonfinite
        found_inf = _merge_found_inf(found_inf, skip)

        # Every call's terms before the first is made: the EWC buffers (which refuse a grown or
        # replaced parameter) and the running Fisher (which refuses one of another shape).
        prepared = []
        for group, bucket, backend, saves, combined, grads in calls:
            terms = self._terms_of(bucket, saves, grad_scale, found_inf, bucket[0].device, trusted)
            if combined:
                terms.combine_from = combination.lists_of(bucket)
                terms.combine_coef = combination.coefficients.to(bucket[0].device)
            prepared.append((group, bucket, backend, terms, grads))
        try:
            for group, bucket, backend, terms, grads in prepared:
                self.backends_used[f"{bucket[0].device}/{bucket[0].dtype}"] = backend
                sharded = is_dtensor(bucket[0])  # DTensors: the same element-wise step on each rank's shards
                terms = terms.local() if sharded else terms
                self._update_bucket(group, bucket, grads, terms, backend, sharded=sharded, trusted=trusted)
        except Exception as error:
            if not (trusted and refused_input(error)):
                raise
            # The one call refused its input before writing anything: what the plan did not check
            # is checked now (the error named, or a changed parameter stepped with new buckets).
            self._plans.clear()
            return self._fused_step(restore, given_skip, grad_scale, given_found_inf, skip_nonfinite, combine,
                                    trust_plan=False)  # fmt: skip

        restored = sum(0 if saves is None else len(saves) for _, _, _, saves, _, _ in calls)
        if restore is not None and restored != len(restore[0]):
            stepped = {id(p) for _, bucket, _, _ in planned for p in bucket}
            for param, save in zip(*restore):
                if id(param) not in stepped:
                    param.copy_(save)
        return found_inf

    def _plan_calls(self, restoring, combination, fresh: bool) -> tuple[list, list, list]:
        """``(planned, reused, calls)``: ``(group, bucket, backend, gradients)`` per bucket, whether
        each group's plan was used again, and the op calls (a bucket whose parameters differ in
        their terms is stepped as several)."""
        planned, reused = [], []
        for index, group in enumerate(self.param_groups):
            try:  # values may have been changed in param_groups since they were checked
                self.check_hyperparameters(group, on_device_too=False)
            except (ValueError, TypeError) as error:
                raise type(error)(f"param_groups[{index}]: {error}; nothing was changed") from None
            buckets, group_reused, group_grads = self._plans.group_buckets(
                index, group, _check_params, fresh=fresh
            )
            reused.append(group_reused)
            for (device, dtype, _), bucket in buckets:
                backend = resolve(self.backend, device, dtype)
                planned.append((group, bucket, backend, bucket_grads(bucket, group_grads)))
        calls = [
            (group, bucket, backend, saves, combined, grads if bucket is whole else kernel_grads(bucket))
            for group, whole, backend, grads in planned
            for bucket, saves, combined in _split_by_terms(whole, restoring, combination)
        ]
        return planned, reused, calls

    def _terms_of(self, bucket, saves, grad_scale, found_inf, device, trusted: bool = False) -> StepTerms:
        terms = StepTerms(restore_from=saves, grad_scale=grad_scale, found_inf=found_inf).to(device)
        if self.fisher_ema is not None:
            terms.fisher = [fisher_buffer(self.state[p], p) for p in bucket]
            terms.fisher_beta = self.fisher_ema
        if self.ewc is not None:
            terms.ewc_precision, terms.ewc_anchor, terms.ewc_lam = self.ewc.step_terms(bucket, trusted)
        return terms

    def _update_bucket(
        self, group, params, grads, terms, backend, sharded=False, trusted=False
    ):  # pragma: no cover
        """Step one bucket; ``sharded``: ``params`` are DTensors, ``grads`` and ``terms`` their local
        shards already, and the state lists go down as local shards too. ``trusted``: the step is
        this one call on a plan used again, and the op's checks of the state stand in for Python's
        (a refusal is retried untrusted: ``_fused_step``)."""
        raise NotImplementedError

    def _check_state_shapes(self, params: list[Tensor]) -> None:
        keys = self.STATE_KEYS + (FISHER_KEY,)
        for p in params:
            state = self.state.get(p)
            if not state:
                continue
            for key in keys:
                value = state.get(key)
                if value is not None and value.shape != p.shape:
                    raise state_shape_error(key, value, p)


class _Aligned:
    """Tensor lists aligned with a list of parameters (RESTORE's save buffers, COMBINE's sources),
    looked up for a bucket. The usual bucket is the parameter list itself, in order: its lists are
    the given ones, found by comparing the tensors' identities at C speed, with no per-parameter
    lookup."""

    def __init__(self, params: list[Tensor], lists: list[list[Tensor]]):
        self.params = params
        self.lists = lists
        self._position: Optional[dict] = None

    def same(self, bucket: list[Tensor]) -> bool:
        """``bucket`` is the parameter list, in order."""
        return bucket is self.params or same_objects(self.params, bucket)

    def position(self) -> dict:
        if self._position is None:
            self._position = {key: i for i, key in enumerate(map(id, self.params))}
        return self._position

    def covers(self, bucket: list[Tensor]) -> list[bool]:
        """Whether each parameter of ``bucket`` has entries."""
        if self.same(bucket):
            return [True] * len(bucket)
        position = self.position()
        return [key in position for key in _ids(bucket)]

    def lists_of(self, bucket: list[Tensor]) -> list[list[Tensor]]:
        """The lists for the parameters of ``bucket``, every one of which has entries."""
        if self.same(bucket):
            return self.lists
        index = [self.position()[key] for key in _ids(bucket)]
        return [[entries[i] for i in index] for entries in self.lists]


class _Combination(_Aligned):
    """The COMBINE term of one step: ``params``, ``sources`` (K lists aligned with them) and the
    ``K + 1`` coefficients."""

    def __init__(self, params: list[Tensor], sources: list[list[Tensor]], coefficients: Tensor):
        super().__init__(params, sources)
        self.coefficients = coefficients


def _ids(bucket: list[Tensor]) -> list[int]:
    return bucket.ids if isinstance(bucket, Bucket) else list(map(id, bucket))


def _split_by_terms(
    bucket: list[Tensor], restore: Optional[_Aligned], combination: Optional[_Combination]
) -> list[tuple]:
    """``(parameters, their save buffers or None, combined)``: a bucket whose parameters all have
    a save buffer (or none does, or there is no restore at all), and all or none COMBINE sources,
    stays whole; a mixed one (SAM-ON, SSAM, LookSAM's layers, a parameter without a first-pass
    gradient) is stepped as up to four calls rather than with a copy of each unperturbed parameter
    as its own save."""
    if (restore is None or restore.same(bucket)) and (combination is None or combination.same(bucket)):
        return [
            (bucket, None if restore is None else restore.lists[0], combination is not None)
        ]  # the usual case
    if restore is None:
        saves = [None] * len(bucket)
    else:
        position, restore_saves = restore.position(), restore.lists[0]
        saves = [None if i is None else restore_saves[i] for i in map(position.get, _ids(bucket))]
    combined = [False] * len(bucket) if combination is None else combination.covers(bucket)
    keys = list(zip((save is not None for save in saves), combined))
    if all(key == keys[0] for key in keys):
        has_save, is_combined = keys[0]
        return [(bucket, saves if has_save else None, is_combined)]
    out = []
    for key in dict.fromkeys(keys):
        index = [i for i, k in enumerate(keys) if k == key]
        out.append(([bucket[i] for i in index], [saves[i] for i in index] if key[0] else None, key[1]))
    return out


def _check_params(params: list[Tensor]) -> None:
    """Raise, naming the problem, for a parameter whose gradient the fused steps refuse."""
    for p in params:
        grad = p.grad
        if grad.is_sparse or grad.shape != p.shape or grad.dtype != p.dtype or p.is_complex():
            _check_param(p)


def _check_param(p: Tensor) -> None:
    if p.grad.is_sparse:
        raise RuntimeError(
            "cl_optim optimizers do not support sparse gradients (a parameter of shape "
            f"{tuple(p.shape)} has one); use torch.optim.SparseAdam or a dense embedding"
        )
    if p.is_complex():
        raise RuntimeError(
            f"cl_optim optimizers support real floating-point parameters only, got {p.dtype} "
            f"(shape {tuple(p.shape)})"
        )
    if p.grad.shape != p.shape:
        raise RuntimeError(
            f"gradient of shape {tuple(p.grad.shape)} for a parameter of shape {tuple(p.shape)}"
        )
    if p.grad.dtype != p.dtype:
        raise RuntimeError(f"gradient of dtype {p.grad.dtype} for a parameter of dtype {p.dtype}")


def bucket_indices(params: list[Tensor]) -> dict:
    """``(device, dtype, layout) -> indices`` of ``params``; ``layout`` is None for plain tensors
    and the mesh and placements of DTensors (one bucket's shards are reduced over one set of
    ranks). One (device, dtype), the usual case, is found without building a torch.device per
    tensor (``is_cpu`` and ``get_device()`` are plain values)."""
    if not params:
        return {}
    if any_dtensor(params):
        sharded: dict = defaultdict(list)
        for i, p in enumerate(params):
            sharded[(p.device, p.dtype, layout_key(p))].append(i)
        return sharded
    first = params[0]
    dtype = first.dtype
    if first.is_cpu:
        same_device = all(p.is_cpu for p in params)
    else:
        index = first.get_device()
        same_device = all(p.get_device() == index and not p.is_cpu for p in params)
    if same_device and all(p.dtype is dtype for p in params):
        return {(first.device, dtype, None): list(range(len(params)))}
    buckets: dict = defaultdict(list)
    for i, p in enumerate(params):
        buckets[(p.device, p.dtype, None)].append(i)
    return buckets
