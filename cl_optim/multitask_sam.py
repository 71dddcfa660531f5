r"""F-MTL: sharpness-aware minimisation for multi-task learning, one SAM step per task.

Phan et al., "Improving Multi-task Learning via Seeking Task-based Flat Regions" (arXiv 2211.13723;
ICCV 2025 as "Beyond Losses Reweighting"). With shared parameters ``θ_s``, task-specific ones
``θ_t`` (the parameters only task t's loss reaches, e.g. its head) and T task losses, one step is

    stage 1   one forward: L_1..L_T;  g_t = ∇_{θ_s} L_t(w),  gh_t = ∇_{θ_t} L_t(w)
              e_t  = rho * T_w² g_t  / (||T_w g_t||  + eps)     norm over the shared parameters
              eh_t = rho * T_w² gh_t / (||T_w gh_t|| + eps)     (norm_scope="separate": the head's own
                                                                norm; "joint": one norm over both)
    stage 2   for each t: forward at w + (e_t, eh_t) (normalisation statistics frozen):
              ĝ_t = ∇_{θ_s} L_t,  ĝh_t = ∇_{θ_t} L_t;  h_t = ĝ_t - g_t
    update    ∇θ_s <- Agg(g_1..g_T) + Agg(h_1..h_T)          (aggregate="split", the paper's rule)
                      Agg(ĝ_1..ĝ_T)                           (aggregate="sam_then_agg", its ablation)
              ∇θ_t <- ĝh_t;  restore w;  base optimizer step

``T_w`` is SAM's weight (``T_w = 1``: SAM; ``adaptive=`` as in :class:`cl_optim.SAM`: ASAM or
Fisher-SAM). ``Agg`` is :func:`cl_optim.multitask.combine`'s ``aggregator`` in coefficient space:
one fused Gram pass over the T task buffers, the T x T problem on the device, one fused pass that
writes ``sum_t a_t g_t`` into ``.grad`` (stage 1) and adds ``sum_t b_t h_t`` to it (stage 2).

Passes: 1 + T forwards (the closure is called 1 + T times), 2T backwards. Memory: the T task
gradients (``h_t`` replaces ``g_t`` in place of its buffer), one restore buffer, the ``.grad``
being written; no ``T x |W|`` flat copy (the official code and INFTY keep about ``3T + 1``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._backend import resolve
from ._distributed import any_dtensor
from ._optimizer import fisher_buffer
from ._sam_settings import sam_weights
from .multitask.aggregators import METHODS, GradVac, coefficients, gram, weighted_sum
from .multitask.running_stats import frozen_running_stats
from .sam import SAM
from .sam_ops import FISHER_RUNNING, _fisher_ema_where_, grad_sq_norm, sam_perturb_

__all__ = ["MultiTaskSAM"]

AGGREGATE_MODES = ("split", "sam_then_agg")
NORM_SCOPES = ("separate", "joint")


class MultiTaskSAM(SAM):
    r"""F-MTL around any ``torch.optim.Optimizer`` class: every task takes its own SAM step.

    Args:
        params: parameters (or ``named_parameters()``, or groups); groups may set ``rho``,
            ``adaptive`` and ``eta`` as in :class:`cl_optim.SAM`.
        base_optimizer: the optimizer class that makes the update (``cl_optim.SGD``/``AdamW``
            restore and update in one fused call).
        rho: radius of each task's neighbourhood.
        adaptive: SAM's weight ``T_w`` (``False``, ``True``, ``"official"``, ``"fisher"``,
            ``"fisher_ema"``), as in :class:`cl_optim.SAM`.
        aggregator: a :data:`cl_optim.multitask.METHODS` name: ``"sum"``, ``"mean"``, ``"pcgrad"``,
            ``"cagrad"``, ``"mgda"``, ``"imtl"``, ``"gradvac"`` (its EMA targets, one set for the
            ``g`` and one for the ``h``, are saved in ``state_dict``) or ``"agem"`` (two tasks:
            the second is the memory).
        shared: the shared parameters (tensors, or names when ``params`` came from
            ``named_parameters()``). ``None``: every parameter that more than one task's loss
            reaches. A parameter outside ``shared`` belongs to the one task whose loss reaches it
            (reached by several: an error); reached by none, it gets no gradient this step.
        aggregate: ``"split"`` (``Agg(g) + Agg(h)``) or ``"sam_then_agg"`` (``Agg(ĝ)``).
        aggregator_options: options of the aggregator (``c``, ``shuffle``, ``generator``, ``beta``...).
        norm_scope: ``"separate"`` (shared and task-specific perturbations normalised apart, the
            official NYUv2 script) or ``"joint"`` (one norm over the shared parameters and the
            task's own, its Multi-MNIST script).
        eta, perturb_eps, backend, ewc, fisher_ema, **base_kwargs: as in :class:`cl_optim.SAM`.
            The running Fisher of ``fisher_ema`` takes the square of the stage-1 gradient of the
            summed loss, ``sum_t ∇L_t(w)``; ``adaptive="fisher_ema"`` perturbs with the Fisher as
            it was before this step, as SAM does.

    ``step(closure)``: ``closure()`` runs one forward and returns the list of the T task losses
    (no ``backward``, no ``zero_grad``: the task gradients are taken with ``torch.autograd.grad``);
    ``step`` returns the first call's losses, detached. Normalisation layers (``torch.nn``'s
    BatchNorm/InstanceNorm) keep the statistics of the first forward only. A non-finite task
    gradient (either stage) skips the step without a host read when the base optimizer is a
    cl_optim one (``last_step_skipped``); a ``torch.optim`` base decides with one host read, as in
    SAM. ``GradScaler`` is not supported (a closure step); autocast inside the closure is.

    Example:
        >>> import torch, cl_optim
        >>> trunk, heads = torch.nn.Linear(4, 8), torch.nn.ModuleList([torch.nn.Linear(8, 3) for _ in range(2)])
        >>> x, ys = torch.randn(16, 4), [torch.randint(0, 3, (16,)) for _ in range(2)]
        >>> params = [*trunk.parameters(), *heads.parameters()]
        >>> opt = cl_optim.MultiTaskSAM(params, torch.optim.SGD, rho=0.05, aggregator="pcgrad", lr=0.1)
        >>> def closure():
        ...     features = torch.relu(trunk(x))
        ...     return [torch.nn.functional.cross_entropy(h(features), y) for h, y in zip(heads, ys)]
        >>> losses = opt.step(closure)  # 1 + 2 forwards, 4 backwards
        >>> len(losses)
        2
    """

    _step_supports_amp_scaling = False  # a closure step: GradScaler cannot hand over

    def __init__(
        self,
        params,
        base_optimizer: type,
        rho: float = 0.05,
        adaptive=False,
        aggregator: str = "sum",
        shared=None,
        *,
        aggregate: str = "split",
        aggregator_options: Optional[dict] = None,
        norm_scope: str = "separate",
        eta: Optional[float] = None,
        perturb_eps: float = 1e-12,
        backend: str = "auto",
        ewc=None,
        fisher_ema: Optional[float] = None,
        **base_kwargs,
    ):
        if aggregator not in METHODS:
            raise ValueError(f"unknown aggregator {aggregator!r}; expected one of {METHODS}")
        if aggregate not in AGGREGATE_MODES:
            raise ValueError(f"unknown aggregate {aggregate!r}; expected one of {AGGREGATE_MODES}")
        if norm_scope not in NORM_SCOPES:
            raise ValueError(f"unknown norm_scope {norm_scope!r}; expected one of {NORM_SCOPES}")
        options = dict(aggregator_options or {})
        if aggregator == "gradvac":
            gradvac = {"g": GradVac(**options), "h": GradVac(**options)}
        else:
            coefficients(torch.eye(2, dtype=torch.float64), aggregator, **options)  # refuses unknown options
            gradvac = {}
        super().__init__(
            params, base_optimizer, rho, adaptive, eta=eta, perturb_eps=perturb_eps, skip_nonfinite=False,
            backend=backend, ewc=ewc, fisher_ema=fisher_ema, **base_kwargs,
        )  # fmt: skip
        self.aggregator, self.aggregate, self.norm_scope = aggregator, aggregate, norm_scope
        self.aggregator_options = options
        self._gradvac = gradvac
        self._shared_spec = None if shared is None else list(shared)
        self._shared_ids()  # unknown names or tensors fail here, not at the first step

    # ------------------------------------------------------------------------------ interface

    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        raise RuntimeError("MultiTaskSAM has no first_step()/second_step(): call step(closure), where "
                           "closure() returns the list of task losses")  # fmt: skip

    def second_step(self, zero_grad: bool = False) -> None:
        self.first_step()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["multitask"] = {which: vac.state_dict() for which, vac in self._gradvac.items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        multitask = state_dict.pop("multitask", {})
        super().load_state_dict(state_dict)
        for which, vac in self._gradvac.items():
            if which in multitask:
                vac.load_state_dict(multitask[which])

    # ----------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """One F-MTL step; ``closure()`` returns the T task losses. Returns them (first call)."""
        if closure is None or not callable(closure):
            raise RuntimeError("MultiTaskSAM.step() needs a closure that runs the forward and returns the "
                               "list of task losses")  # fmt: skip
        self._check_groups()
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if any_dtensor(params):
            raise NotImplementedError(
                "MultiTaskSAM does not take DTensor (FSDP2, tensor-parallel) parameters yet: its Gram matrix "
                "would be of each rank's shard; nothing was changed"
            )
        with torch.enable_grad():
            losses = _task_losses(closure(), None)
            num_tasks = len(losses)
            if self.aggregator == "agem" and num_tasks != 2:
                raise ValueError(f"aggregator 'agem' takes two task losses (the task's and the memory's), got "
                                 f"{num_tasks}; nothing was changed")  # fmt: skip
            grads = [
                list(torch.autograd.grad(loss, params, retain_graph=t < num_tasks - 1, allow_unused=True))
                for t, loss in enumerate(losses)
            ]
        split = _Split(params, grads, self._shared_ids(), self._names())
        if not split.shared and not any(split.heads):
            raise RuntimeError("no task loss reaches a parameter of this optimizer; nothing was changed")
        home = (split.shared or next(h for h in split.heads if h))[0].device
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}

        # Stage 1: the Gram matrix of the g_t, the T x T problem, Agg(g) into .grad.
        g_gram = gram(split.shared_grads, backend=self.backend) if split.shared else None
        sq_shared = self._task_sq_norms(split.shared, split.shared_grads, group_of, g_gram, home)
        sq_heads = [
            self._task_sq_norms(split.heads[t], [split.head_grads[t]], group_of, None, home)[0]
            if split.heads[t] else torch.zeros((), dtype=torch.float64, device=home)
            for t in range(num_tasks)
        ]  # fmt: skip
        finite = torch.isfinite(torch.stack([*sq_shared, *sq_heads]).sum())
        out = [_grad_buffer(p) for p in split.shared]
        for p in params:  # off .grad until the update: a zero_grad() in the closure cannot touch them
            p.grad = None
        head_grads: dict = {}
        deferred_fisher = self._update_fisher(split, out, group_of, finite)
        if split.shared and self.aggregate == "split":
            weighted_sum(
                split.shared_grads, self._coefficients(g_gram, finite, "g"), out=out, backend=self.backend
            )
        if self.norm_scope == "joint":
            sq_shared = sq_heads = [s + h for s, h in zip(sq_shared, sq_heads)]

        # Stage 2: one SAM step per task, h_t = ĝ_t - g_t in the buffer of ĝ_t.
        perturbed: dict = {}
        self._run["pending"] = []  # state_dict() and copies refuse while the weights move
        try:
            for t in range(num_tasks):
                for p in perturbed.values():
                    p.copy_(self._saved[id(p)])
                moved = self._perturb(split.shared, split.shared_grads[t], sq_shared[t], group_of, finite)
                moved += self._perturb(split.heads[t], split.head_grads[t], sq_heads[t], group_of, finite)
                perturbed.update((id(p), p) for p in moved)
                targets = split.shared + split.heads[t]
                with torch.enable_grad(), frozen_running_stats():
                    loss_t = _task_losses(closure(), num_tasks)[t]
                    hat = torch.autograd.grad(loss_t, targets, allow_unused=True)
                hat = [torch.zeros_like(p) if g is None else g for p, g in zip(targets, hat)]
                shared_hat = hat[: len(split.shared)]
                if self.aggregate == "split" and shared_hat:
                    torch._foreach_sub_(shared_hat, split.shared_grads[t])
                split.shared_grads[t] = shared_hat  # h_t (or ĝ_t); g_t's buffer is released
                head_grads.update((id(p), g) for p, g in zip(split.heads[t], hat[len(split.shared) :]))
        except BaseException:
            for p in perturbed.values():
                p.copy_(self._saved[id(p)])
            self._run["pending"] = None
            raise

        # The second aggregation, the skip flag, the base step (restore fused into it).
        if split.shared:
            second_gram = gram(split.shared_grads, backend=self.backend)
            finite = finite & torch.isfinite(second_gram.diagonal().sum())
            which = "h" if self.aggregate == "split" else "g"
            weighted_sum(split.shared_grads, self._coefficients(second_gram, finite, which), out=out,
                         accumulate=self.aggregate == "split", backend=self.backend)  # fmt: skip
        head_params = [p for heads in split.heads for p in heads]
        if head_params:
            final = [head_grads[id(p)] for p in head_params]
            finite = finite & torch.isfinite(
                self._task_sq_norms(head_params, [final], group_of, None, home)[0]
            )
            for p, g in zip(head_params, final):
                p.grad = g
        for p, g in zip(split.shared, out):
            p.grad = g
        for fisher, new in deferred_fisher:
            fisher.copy_(new)
        self._run["pending"] = list(perturbed.values())
        self._run["pass1_nonfinite"] = ~finite
        self._second_step(zero_grad=False)
        return [loss.detach() for loss in losses]

    # -------------------------------------------------------------------------------- helpers

    def _check_groups(self) -> None:
        for index, group in enumerate(self.param_groups):
            self._check_group(index, group)

    def _names(self) -> dict:
        return {
            id(p): name
            for group in self.param_groups
            for p, name in zip(group["params"], group.get("param_names", [None] * len(group["params"])))
        }

    def _shared_ids(self) -> Optional[set]:
        if self._shared_spec is None:
            return None
        by_name = {name: p_id for p_id, name in self._names().items() if name is not None}
        known = {id(p) for group in self.param_groups for p in group["params"]}
        ids = set()
        for item in self._shared_spec:
            if isinstance(item, str):
                if item not in by_name:
                    raise ValueError(
                        f"shared= names {item!r}, which is not a parameter name of this optimizer (names come "
                        "from params=model.named_parameters())"
                    )
                ids.add(by_name[item])
            elif isinstance(item, Tensor):
                if id(item) not in known:
                    raise ValueError(f"shared= holds a tensor of shape {list(item.shape)} that is not a parameter "
                                     "of this optimizer")  # fmt: skip
                ids.add(id(item))
            else:
                raise TypeError(f"shared= takes parameters or their names, got {type(item).__name__}")
        return ids

    def _coefficients(self, g: Tensor, finite: Tensor, which: str) -> Tensor:
        # A non-finite Gram matrix (the step will be skipped) is replaced by the identity, so that
        # the T x T solvers (eigvalsh, solve) never see an inf or a NaN; no host read decides it.
        g = torch.where(finite, g, torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
        if self.aggregator == "gradvac":
            return self._gradvac[which].coefficients(g)
        return coefficients(g, self.aggregator, **self.aggregator_options)

    def _buckets(self, params: list, group_of: dict) -> list:
        """``(group, device, dtype, indices)`` per (group, device, dtype) of ``params``, in order."""
        buckets: dict = {}
        for i, p in enumerate(params):
            group = group_of[id(p)]
            buckets.setdefault((id(group), p.device, p.dtype), (group, p.device, p.dtype, []))[3].append(i)
        return list(buckets.values())

    def _fishers(self, bucket: list) -> Optional[list]:
        return None if self.fisher_ema is None else [fisher_buffer(self._fisher_home(p), p) for p in bucket]

    def _task_sq_norms(self, params, task_grads, group_of, g_gram, home) -> list:
        """``||T_w g_t||^2`` over ``params`` for each task, fp64 on ``home``: the Gram diagonal
        when every tensor is plain SAM's, else one fused norm pass per task and bucket."""
        if not params:
            return [torch.zeros((), dtype=torch.float64, device=home) for _ in task_grads]
        buckets = self._buckets(params, group_of)
        weights = [sam_weights(group, [params[i] for i in index]) for group, _, _, index in buckets]
        if g_gram is not None and all(w is None for w, _ in weights):
            return list(g_gram.diagonal().to(home).unbind())
        out = []
        for grads in task_grads:
            total = torch.zeros((), dtype=torch.float64, device=home)
            for (_, device, dtype, index), (weighted, eta) in zip(buckets, weights):
                bucket = [params[i] for i in index]
                fisher = (
                    self._fishers(bucket) if weighted is not None and FISHER_RUNNING in weighted else None
                )
                total = total + grad_sq_norm(
                    [grads[i] for i in index], bucket, weighted, eta, fisher=fisher,
                    backend=resolve(self.backend, device, dtype),
                ).to(home)  # fmt: skip
            out.append(total)
        return out

    def _perturb(self, params, task_grads, sq_norm, group_of, finite) -> list:
        """``p <- p + rho * T_w^2 g / (||T_w g|| + eps)`` for one task, saving ``p`` first."""
        if not params:
            return []
        norm = sq_norm.sqrt()
        for group, device, dtype, index in self._buckets(params, group_of):
            bucket = [params[i] for i in index]
            weighted, eta = sam_weights(group, bucket)
            scale = torch.where(finite, group["rho"] / (norm + self.perturb_eps), torch.zeros_like(norm))
            fisher = self._fishers(bucket) if weighted is not None and FISHER_RUNNING in weighted else None
            sam_perturb_(
                bucket,
                [task_grads[i] for i in index],
                self._save_buffers(bucket, device, dtype),
                scale.to(device),
                weighted,
                eta,
                backend=resolve(self.backend, device, dtype),
                fisher=fisher,
                finite=None if fisher is None else torch.zeros((), dtype=torch.bool, device=device),
            )  # fmt: skip  (finite=False: the running Fisher is read here, updated in _update_fisher)
        return list(params)

    def _update_fisher(self, split, out, group_of, finite) -> list:
        """``F <- beta F + (1 - beta) (sum_t g_t)^2`` where the stage-1 gradients are finite; in
        place, or returned as ``(F, new F)`` pairs when a group perturbs along ``F`` (it must read
        the Fisher as it was before this step)."""
        if self.fisher_ema is None:
            return []
        params, totals = list(split.shared), list(out)
        if split.shared:
            weighted_sum(split.shared_grads, torch.ones(len(split.shared_grads), dtype=torch.float64,
                         device=out[0].device), out=out, backend=self.backend)  # fmt: skip
        for heads, head_grads in zip(split.heads, split.head_grads):
            params += heads
            totals += head_grads
        reads = any(group_of[id(p)]["adaptive"] == "fisher_ema" for p in params)
        pairs = []
        for p, total in zip(params, totals):
            fisher = fisher_buffer(self._fisher_home(p), p)
            target = fisher.clone() if reads else fisher
            _fisher_ema_where_([target], [total], self.fisher_ema, None, finite.to(p.device))
            if reads:
                pairs.append((fisher, target))
        return pairs


class _Split:
    """The parameters of one step, sorted by the task losses that reach them: shared ones (with
    each task's gradient, zeros where a task does not reach), each task's own, unreached ones."""

    def __init__(self, params: list, grads: list, shared_ids: Optional[set], names: dict):
        num_tasks = len(grads)
        self.shared: list = []
        self.shared_grads: list = [[] for _ in range(num_tasks)]
        self.heads: list = [[] for _ in range(num_tasks)]
        self.head_grads: list = [[] for _ in range(num_tasks)]
        self.unreached: list = []
        for k, p in enumerate(params):
            reaching = [t for t in range(num_tasks) if grads[t][k] is not None]
            for t in reaching:
                if grads[t][k].is_sparse:
                    raise RuntimeError(f"MultiTaskSAM does not support sparse gradients ({_name(p, names)})")
            if not reaching:
                self.unreached.append(p)
                continue
            is_shared = (id(p) in shared_ids) if shared_ids is not None else len(reaching) > 1
            if is_shared:
                self.shared.append(p)
                for t in range(num_tasks):
                    self.shared_grads[t].append(
                        grads[t][k] if grads[t][k] is not None else torch.zeros_like(p)
                    )
                continue
            if len(reaching) > 1:
                raise ValueError(
                    f"{_name(p, names)} is not in shared= but the losses of tasks {reaching} reach it: a "
                    "task-specific parameter belongs to one task (add it to shared=); nothing was changed"
                )
            self.heads[reaching[0]].append(p)
            self.head_grads[reaching[0]].append(grads[reaching[0]][k])


def _name(p: Tensor, names: dict) -> str:
    name = names.get(id(p))
    return f"parameter {name!r}" if name else f"a parameter of shape {list(p.shape)}"


def _task_losses(value, num_tasks: Optional[int]) -> list:
    """The closure's losses, checked: a list (or tuple) of one-element tensors that need grad."""
    if isinstance(value, Tensor) or not isinstance(value, (list, tuple)):
        got = f"a tensor of shape {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"MultiTaskSAM's closure must return the list of the T task losses, got {got}; "
                        "nothing was changed")  # fmt: skip
    if not value:
        raise ValueError("MultiTaskSAM's closure returned an empty list of task losses; nothing was changed")
    if num_tasks is not None and len(value) != num_tasks:
        raise ValueError(f"the closure returned {len(value)} task losses, {num_tasks} at the first call of "
                         "this step; the weights were restored and nothing was changed")  # fmt: skip
    for t, loss in enumerate(value):
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"task loss {t} must be a one-element tensor, got "
                            f"{list(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")  # fmt: skip
        if not loss.requires_grad:
            raise ValueError(f"task loss {t} does not depend on any parameter that requires grad")
    return [loss.reshape(()) for loss in value]


def _grad_buffer(p: Tensor) -> Tensor:
    """``p.grad`` to be overwritten, or a new one in ``p``'s layout."""
    grad = p.grad
    if (
        grad is None
        or grad.shape != p.shape
        or grad.dtype != p.dtype
        or grad.device != p.device
        or grad.is_sparse
    ):
        grad = p.grad = torch.empty_like(p, memory_format=torch.preserve_format)
    return grad
