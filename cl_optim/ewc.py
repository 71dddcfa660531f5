r"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017) in two fp32 buffers per parameter.

Kirkpatrick's penalty after tasks ``1..T`` is a sum of quadratics, one per task ``k`` with Fisher
``F_k`` and anchor ``theta*_k``::

    R(theta) = lam/2 * sum_k sum_i F_k,i * (theta_i - theta*_k,i)**2

A sum of quadratics is one quadratic: with ``A = sum_k F_k`` (the precision) and
``mu = sum_k F_k * theta*_k / A`` (the Fisher-weighted anchor),
``R = lam/2 * sum_i A_i * (theta_i - mu_i)**2 + const``. So ``mode="separate"`` keeps only
``(A, mu)`` and the constant, whatever the number of tasks, and folds a finished task in with

    A'  = a * A + b * F
    mu' = (a*A*mu + b*F*theta) / A'        (mu' = theta where A' = 0)

(``a = b = 1`` for Kirkpatrick's sum). ``mode="online"`` is Schwarz et al.'s online EWC (ICML
2018, §4): ``A' = gamma*A + F``, the anchor moves to the latest weights (``mu' = theta``), and the
penalty weighs ``A`` by ``gamma`` once more, ``R = lam/2 * sum gamma*A*(theta - mu)**2``.

Lambda convention: ``lam`` multiplies ``1/2 * sum A d**2``, so the gradient is ``lam*A*d``
(FACIL, PyCIL, van de Ven's code). Libraries without the 1/2 (Avalanche, Mammoth, GT-RIPL) use
``lam_theirs = lam_ours / 2``.

Other libraries' accumulation rules are ``consolidate(F, decay=a, weight=b)`` in online mode
with ``gamma=1`` (anchor at the latest weights, no extra decay at penalty time):

=====================  ===========================================  =========================
library                their rule                                   here
=====================  ===========================================  =========================
Avalanche (online)     I <- decay_factor*I + I_new                  ``decay=decay_factor``
Mammoth ``ewc_on``     F <- gamma*F + F_new                         ``decay=gamma``
FACIL                  F <- alpha*F + (1-alpha)*F_new               ``decay=alpha, weight=1-alpha``
PyCIL                  F <- alpha*F + (1-alpha)*F_new, alpha=known/total  as FACIL
=====================  ===========================================  =========================

Example:
    >>> import torch, cl_optim
    >>> model = torch.nn.Linear(3, 2)
    >>> ewc = cl_optim.EWC(model, lam=100.0)
    >>> ewc.consolidate({name: torch.ones_like(p) for name, p in model.named_parameters()})
    >>> float(ewc.penalty())
    0.0
"""

from __future__ import annotations

import fnmatch
import math
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

import torch
from torch import Tensor, nn

from ._distributed import is_dtensor
from ._ewc_checkpoint import EWCCheckpoints
from .ewc_ops import ewc_consolidate_, ewc_grad_add_, ewc_penalty, fisher_accumulate_

__all__ = ["EWC", "fisher_accumulate_", "ewc_grad_add_", "ewc_penalty", "ewc_consolidate_"]

Selector = Union[str, nn.Module, Tensor]


@dataclass
class _Entry:
    name: str
    param: Tensor
    lam: float
    precision: Optional[Tensor] = None  # A, fp32; None until the first consolidation (A = 0)
    anchor: Optional[Tensor] = None  # mu, fp32
    constant: float = 0.0  # sum_i of the collapse constant (separate mode), fp64 on the host

    # Assignments to any entry's fields, counted: EWC.step_terms keeps its lists while none was
    # made (an in-place update of A or mu keeps the tensors the lists hold).
    changes: ClassVar[int] = 0

    def __setattr__(self, key, value) -> None:
        _Entry.changes += 1
        object.__setattr__(self, key, value)


class EWC(EWCCheckpoints):
    """Consolidated EWC penalty over a model's parameters (see the module docstring for the math).

    Args:
        model_or_named_params: an ``nn.Module`` or an iterable of ``(name, parameter)``.
        lam: lambda, in the ``lam/2 * sum A d**2`` convention.
        mode: ``"separate"`` (exact collapse of one penalty per task) or ``"online"`` (Schwarz).
        gamma: online decay (``0 < gamma <= 1``); must be 1 in separate mode.
        include / exclude: parameters to cover / leave out, each a name pattern (``fnmatch``
            style: ``"head.*"``; a plain prefix such as ``"head"`` also matches ``"head.weight"``),
            a module, or a parameter. Default: every parameter.
        lam_overrides: ``{selector: lam}`` for per-group lambda; the first match wins.
        backend: backend of ``add_grad_``, ``consolidate`` and ``penalty_value`` (the fused ops
            ``ewc_grad_add_``, ``ewc_consolidate_``, ``ewc_penalty``), as for the optimizers.

    Parameters with a gradient but no consolidated task yet carry no penalty (``A = 0``); a
    parameter added later starts there too (``track``). cl_optim's optimizers add the pull to
    the parameters they step, i.e. those with a gradient, like any torch optimizer. A parameter whose shape changed (a grown
    head) must be re-bound with ``pad_`` before use: a silent broadcast would corrupt ``A``.
    """

    def __init__(
        self,
        model_or_named_params,
        lam: float = 1.0,
        mode: str = "separate",
        gamma: float = 1.0,
        *,
        include: Optional[Iterable[Selector]] = None,
        exclude: Optional[Iterable[Selector]] = None,
        lam_overrides: Optional[Mapping] = None,
        backend: str = "auto",
    ):
        from ._backend import check_backend_name

        self.backend = check_backend_name(backend)
        if mode not in ("separate", "online"):
            raise ValueError(f"Invalid mode {mode!r}: expected 'separate' or 'online'")
        if not 0.0 <= lam < math.inf:
            raise ValueError(f"Invalid lam: {lam} (must be finite and >= 0)")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"Invalid gamma: {gamma} (must be in (0, 1])")
        if mode == "separate" and gamma != 1.0:
            raise ValueError(
                "mode='separate' is the exact sum of per-task penalties: gamma must be 1 (use 'online')"
            )
        self.lam = float(lam)
        self.mode = mode
        self.gamma = float(gamma)
        self.tasks = 0
        self.history: list[dict] = []  # metadata of each consolidation (estimator, samples, ...)
        self._include = _selectors(include, "include") if include is not None else None
        self._exclude = _selectors(exclude, "exclude") if exclude is not None else []
        self._lam_overrides = dict(lam_overrides or {})
        for selector, value in self._lam_overrides.items():
            if not 0.0 <= value < math.inf:
                raise ValueError(
                    f"Invalid lam override {value} for {_describe(selector)} (must be finite and >= 0)"
                )
        self._modules = model_or_named_params if isinstance(model_or_named_params, nn.Module) else None
        self._entries: dict[str, _Entry] = {}
        self._by_param: dict[int, _Entry] = {}
        # id(param) -> weakref of a parameter an optimizer steps that EWC does not cover (excluded,
        # or added after tracking), so that step_terms looks each one up in the model only once.
        self._uncovered: dict[int, weakref.ref] = {}
        self._terms_cache: Optional[tuple] = None  # step_terms' last trusted lists (step_terms)
        named = _named_parameters(model_or_named_params)
        self._check_selectors_match(named)
        self.track(named)

    # ------------------------------------------------------------------------------- coverage

    def track(self, model_or_named_params) -> list[str]:
        """Cover parameters not seen before (they start with ``A = 0``); returns their names."""
        named = _named_parameters(model_or_named_params)
        self._uncovered.clear()
        added = []
        for name, param in named:
            if name in self._entries or not self._selected(name, param):
                continue
            if is_dtensor(param):
                raise NotImplementedError(
                    f"EWC on sharded (DTensor, FSDP2) parameters is not supported yet ({name!r}); exclude "
                    "them or keep the model unsharded for EWC"
                )
            entry = _Entry(name=name, param=param, lam=self._lam_for(name, param))
            self._entries[name] = entry
            self._by_param[id(param)] = entry
            added.append(name)
        return added

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def _matches(self, selector: Selector, name: str, param: Tensor) -> bool:
        if isinstance(selector, str):
            return fnmatch.fnmatchcase(name, selector) or name == selector or name.startswith(selector + ".")
        if isinstance(selector, nn.Module):
            return any(param is q for q in selector.parameters())
        if isinstance(selector, Tensor):
            return param is selector
        raise TypeError(f"a selector must be a name pattern, a module or a parameter, got {type(selector)}")

    def _check_selectors_match(self, named: list) -> None:
        """A pattern, module or parameter of include/exclude/lam_overrides that matches nothing is
        a typo that would silently cover (or leave out) the wrong parameters: refused."""
        for what, selectors in (("include", self._include or []), ("exclude", self._exclude),
                                ("lam_overrides", list(self._lam_overrides))):  # fmt: skip
            unmatched = [s for s in selectors if not any(self._matches(s, n, p) for n, p in named)]
            if unmatched:
                names = [n for n, _ in named]
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(
                    f"EWC {what}: {[_describe(s) for s in unmatched]} matches no parameter of the model "
                    f"(its parameters: {shown})"
                )

    def _check_bound(self) -> None:
        """Every tracked parameter is still the model's parameter of that name: a module replaced
        after tracking (``model.head = nn.Linear(...)``) would otherwise leave EWC pulling on, and
        measuring, a parameter that is no longer trained."""
        if self._modules is None:
            return
        current = dict(self._modules.named_parameters())
        for name, entry in self._entries.items():
            if current.get(name) is not entry.param:
                raise _replaced_error(name, name in current)

    def _selected(self, name: str, param: Tensor) -> bool:
        if self._include is not None and not any(self._matches(s, name, param) for s in self._include):
            return False
        return not any(self._matches(s, name, param) for s in self._exclude)

    def _lam_for(self, name: str, param: Tensor) -> float:
        for selector, lam in self._lam_overrides.items():
            if self._matches(selector, name, param):
                return float(lam)
        return self.lam

    def _checked(self, entry: _Entry) -> _Entry:
        if entry.precision is not None and entry.precision.shape != entry.param.shape:
            raise RuntimeError(
                f"EWC: parameter {entry.name!r} changed shape from {tuple(entry.precision.shape)} to "
                f"{tuple(entry.param.shape)}; call ewc.pad_({entry.name!r}, new_param) to keep its "
                "importance (new entries get A = 0)"
            )
        return entry

    # -------------------------------------------------------------------------- consolidation

    @torch.no_grad()
    def consolidate(self, fisher: Mapping, *, decay: Optional[float] = None, weight: float = 1.0) -> None:
        """Fold a finished task in: ``A' = decay*A + weight*F`` and the anchor rule of the mode.

        ``fisher`` maps names (or the parameters themselves, as ``optimizer.running_fisher()``
        does) to fp32-able tensors of the parameters' shapes, evaluated at the current weights.
        ``decay`` defaults to 1 (separate) or ``gamma`` (online). Covered parameters missing
        from ``fisher`` get no new importance (one warning names them). Nothing is written
        unless every tensor is valid.
        """
        decay = (1.0 if self.mode == "separate" else self.gamma) if decay is None else float(decay)
        if not (0.0 <= decay < math.inf and 0.0 <= weight < math.inf):
            raise ValueError(f"decay and weight must be finite and >= 0, got {decay} and {weight}")
        self._check_bound()
        by_name = self._fisher_by_name(fisher)
        missing = [name for name in self._entries if name not in by_name]
        if missing:
            warnings.warn(
                f"EWC.consolidate: no Fisher for {missing}; they get no new importance", stacklevel=2
            )
        plan = []
        for name, entry in self._entries.items():
            self._checked(entry)
            f = by_name.get(name)
            if f is None:
                continue
            if f.shape != entry.param.shape:
                raise ValueError(
                    f"Fisher for {name!r} has shape {tuple(f.shape)}, the parameter {tuple(entry.param.shape)}"
                )
            f = f.detach().to(device=entry.param.device, dtype=torch.float32)
            if not bool(torch.isfinite(f).all()) or bool((f < 0).any()):
                raise ValueError(f"Fisher for {name!r} has negative or non-finite entries")
            plan.append((entry, f))
        # First importance: A = 0, mu = the current weights. Every pair made before any is assigned:
        # a failed allocation leaves no entry half made.
        first = [entry for entry, _ in plan if entry.precision is None]
        made = [
            (torch.zeros(e.param.shape, dtype=torch.float32, device=e.param.device),
             e.param.detach().to(torch.float32, copy=True))
            for e in first
        ]  # fmt: skip
        for entry, (precision, anchor) in zip(first, made):
            entry.precision, entry.anchor = precision, anchor
        fisher_of = {id(entry): f for entry, f in plan}
        for backend, bucket in self._buckets([entry for entry, _ in plan]):
            fishers = [fisher_of[id(e)] for e in bucket]
            gaps = ewc_consolidate_(
                [e.precision for e in bucket], [e.anchor for e in bucket], fishers,
                [e.param.detach() for e in bucket], decay, weight, self.mode == "separate", backend=backend,
            ).tolist()  # fmt: skip
            for entry, gap in zip(bucket, gaps):
                entry.constant = decay * entry.constant + gap if self.mode == "separate" else 0.0
        self.tasks += 1
        self.history.append({"decay": decay, "weight": weight, **getattr(fisher, "meta", {})})

    def _fisher_by_name(self, fisher: Mapping) -> dict[str, Tensor]:
        """The Fisher by tracked name. Keys of parameters EWC leaves out are passed over; keys that
        are no parameter of the model (another model's, a DDP ``module.`` prefix) and a Fisher for
        none of the tracked parameters are errors, before anything is written."""
        if not isinstance(fisher, Mapping):
            raise TypeError(
                f"consolidate takes a mapping of names (or parameters) to tensors, got {type(fisher)}"
            )
        model_names = {n for n, _ in self._modules.named_parameters()} if self._modules is not None else None
        model_ids = {id(p) for p in self._modules.parameters()} if self._modules is not None else None
        out, foreign = {}, []
        for key, value in fisher.items():
            if isinstance(key, Tensor):
                entry = self._by_param.get(id(key))
                if entry is not None:
                    out[entry.name] = value
                elif model_ids is not None and id(key) not in model_ids:
                    foreign.append(f"a tensor of shape {list(key.shape)}")
            elif key in self._entries:
                out[key] = value
            elif model_names is not None and key not in model_names:
                foreign.append(key)
        if foreign:
            hint = ""
            if any(isinstance(k, str) and k.startswith("module.") for k in foreign):
                hint = " (a DDP/DataParallel 'module.' prefix? estimate the Fisher on the inner model)"
            raise ValueError(
                f"EWC.consolidate: {foreign[:5]} are no parameters of the model{hint}; nothing was changed"
            )
        if self._entries and not out:
            raise ValueError(
                "EWC.consolidate: the Fisher has no entry for any parameter EWC covers "
                f"({len(fisher)} keys given); nothing was changed and the task count stays {self.tasks}"
            )
        return out

    def _buckets(self, entries: list) -> list:
        """[(backend, entries)] per (device, dtype) of the parameters, in a fixed order."""
        from ._backend import resolve

        groups: dict = {}
        for entry in entries:
            groups.setdefault((entry.param.device, entry.param.dtype), []).append(entry)
        return [(resolve(self.backend, device, dtype), group) for (device, dtype), group in groups.items()]

    # ------------------------------------------------------------------------------ penalty

    def _scale(self) -> float:
        # Schwarz et al. weigh the accumulated precision by gamma once more at penalty time.
        return self.gamma if self.mode == "online" else 1.0

    def penalty(self) -> Tensor:
        """``sum over parameters of lam/2 * (sum A*(p - mu)**2 + const)``, differentiable in ``p``.

        The constant makes the value equal to the explicit sum of per-task penalties.
        """
        self._check_bound()
        total = None
        for entry in self._entries.values():
            self._checked(entry)
            if entry.precision is None:
                continue
            diff = entry.param.to(torch.float32) - entry.anchor
            term = 0.5 * entry.lam * self._scale() * ((entry.precision * diff * diff).sum() + entry.constant)
            total = term if total is None else total + term
        if total is None:
            device = next((e.param.device for e in self._entries.values()), torch.device("cpu"))
            return torch.zeros((), device=device)
        return total

    @torch.no_grad()
    def add_grad_(self) -> None:
        """``p.grad += lam * A * (p - mu)`` for every covered parameter with importance.

        For optimizers that are not cl_optim's; cl_optim's take ``ewc=`` and fuse this term.
        A parameter without ``.grad`` gets one, as back-propagating ``penalty()`` would give it;
        frozen parameters (``requires_grad=False``) are left alone.
        """
        self._check_bound()
        entries = []
        for entry in self._entries.values():
            self._checked(entry)
            if entry.precision is not None and entry.param.requires_grad:
                entries.append(entry)
                if entry.param.grad is None:
                    entry.param.grad = torch.zeros_like(entry.param)
        for backend, bucket in self._buckets(entries):
            ewc_grad_add_(
                [e.param.grad for e in bucket], [e.param.detach() for e in bucket], [e.precision for e in bucket],
                [e.anchor for e in bucket], [e.lam * self._scale() for e in bucket], backend=backend,
            )  # fmt: skip

    @torch.no_grad()
    def penalty_value(self) -> Tensor:
        """The value of :meth:`penalty` without an autograd graph, from the fused ``ewc_penalty`` op
        (fp64 accumulation), for logging."""
        self._check_bound()
        entries = []
        for entry in self._entries.values():
            self._checked(entry)
            if entry.precision is not None:
                entries.append(entry)
        total = torch.zeros((), dtype=torch.float64)
        for backend, bucket in self._buckets(entries):
            lams = [e.lam * self._scale() for e in bucket]
            value = ewc_penalty(
                [e.param.detach() for e in bucket], [e.precision for e in bucket], [e.anchor for e in bucket], lams,
                backend=backend,
            )  # fmt: skip
            total = total + value.cpu() + sum(0.5 * lam * e.constant for lam, e in zip(lams, bucket))
        return total

    def step_terms(self, params: list[Tensor], trusted: bool = False):
        """``(precisions, anchors, lams)`` aligned with ``params`` for the fused EWC term.

        Entries are None (and lam 0) for parameters without importance. ``trusted`` (an optimizer
        step whose op checks the buffers' shapes itself, and asks again untrusted when it refuses:
        ``_plan.py``): when every parameter is covered, the lists without the per-parameter check,
        kept for the same bucket (the plan's list object) while no entry was assigned to and the
        scale is the same: a step over 2000 tensors then costs no lookup per tensor (0.6 ms).
        """
        if trusted:
            scale = self._scale()
            cached = self._terms_cache
            if (
                cached is not None
                and cached[0] is params
                and cached[1] == _Entry.changes
                and cached[2] == scale
            ):
                return tuple(map(list, cached[3]))  # copies: a caller may change its lists
            entries = list(map(self._by_param.get, map(id, params)))
            if all(entries):  # entries have no __bool__: False only for a missing one (None)
                precisions = [e.precision for e in entries]
                anchors = [e.anchor if e.precision is not None else None for e in entries]
                lams = [e.lam * scale if e.precision is not None else 0.0 for e in entries]
                self._terms_cache = (params, _Entry.changes, scale, (precisions, anchors, lams))
                return list(precisions), list(anchors), list(lams)
        precisions, anchors, lams = [], [], []
        for p in params:
            entry = self._by_param.get(id(p))
            if entry is not None:
                self._checked(entry)
            else:
                self._check_uncovered(p)
            if entry is None or entry.precision is None:
                precisions.append(None)
                anchors.append(None)
                lams.append(0.0)
            else:
                precisions.append(entry.precision)
                anchors.append(entry.anchor)
                lams.append(entry.lam * self._scale())
        return precisions, anchors, lams

    def _check_uncovered(self, param: Tensor) -> None:
        """A parameter an optimizer steps that EWC has no entry for: fine when it is left out or
        new (A = 0), an error when it took the place of a tracked one (a replaced module). Looked up
        in the model once per parameter."""
        ref = self._uncovered.get(id(param))
        if ref is not None and ref() is param:
            return
        if self._modules is not None:
            for name, p in self._modules.named_parameters():
                if p is param:
                    if name in self._entries:
                        raise _replaced_error(name, True)
                    break
        self._uncovered[id(param)] = weakref.ref(param)

    # -------------------------------------------------------------------------- model changes

    @torch.no_grad()
    def pad_(self, name: str, param: Optional[Tensor] = None) -> None:
        """Re-bind ``name`` to a grown parameter: old entries keep (A, mu), new ones get A = 0, mu = p.

        Every dimension must be at least as large as before; the old block is the leading slice.
        """
        entry = self._entries[name]
        if param is None:
            param = entry.param
        old_shape = entry.precision.shape if entry.precision is not None else param.shape
        if len(old_shape) != param.dim() or any(n < o for n, o in zip(param.shape, old_shape)):
            raise ValueError(
                f"pad_: {name!r} cannot go from {tuple(old_shape)} to {tuple(param.shape)} by padding"
            )
        del self._by_param[id(entry.param)]
        entry.param = param
        self._by_param[id(param)] = entry
        self._uncovered.pop(id(param), None)
        if entry.precision is None:
            return
        block = tuple(slice(0, n) for n in old_shape)
        precision = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
        anchor = param.detach().to(torch.float32).clone()
        precision[block] = entry.precision
        anchor[block] = entry.anchor
        entry.precision, entry.anchor = precision, anchor


def _named_parameters(model_or_named_params) -> list[tuple[str, Tensor]]:
    if isinstance(model_or_named_params, nn.Module):
        return list(model_or_named_params.named_parameters())
    named = list(model_or_named_params)
    if any(isinstance(item, Tensor) for item in named):
        raise TypeError(
            "EWC takes a model (nn.Module) or (name, parameter) pairs, got parameters without names: "
            "pass the model itself, EWC(model), or model.named_parameters()"
        )
    return named


def _selectors(value, what: str) -> list:
    """include=/exclude= as a list: one pattern, module or parameter is a list of one (a bare
    string is one pattern, not a list of one-letter patterns)."""
    if isinstance(value, (str, nn.Module, Tensor)):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise TypeError(
            f"EWC {what}= takes name patterns, modules or parameters, got {type(value)}"
        ) from None


def _describe(selector) -> str:
    if isinstance(selector, str):
        return selector
    if isinstance(selector, nn.Module):
        return f"a {type(selector).__name__} module"
    return f"a parameter of shape {list(selector.shape)}"


def _replaced_error(name: str, still_named: bool) -> RuntimeError:
    if still_named:
        return RuntimeError(
            f"EWC: the model's parameter {name!r} is not the one EWC tracks (was its module replaced?); "
            f"call ewc.pad_({name!r}, model.get_parameter({name!r})) to re-bind it (its importance is "
            "kept), or build a new EWC"
        )
    return RuntimeError(
        f"EWC: the model has no parameter {name!r} any more (was its module removed or renamed?)"
    )
