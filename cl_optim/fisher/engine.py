"""Which way each layer's per-sample squares are computed, decided once and checked.

On the first batch of two or more samples the engine

1. probes where each layer call keeps its samples (:func:`~cl_optim.fisher.capture.probe_layouts`);
   a layer run once for the whole batch (a position table) is expanded to the batch and the
   forward run again, kept only if the model's output does not change;
2. routes every layer to the fastest way that is exact for it: its rule
   (:mod:`~cl_optim.fisher.rules`), else ``torch.func`` on the layer, a loop over samples of the
   layer, ``torch.func`` on the whole model, a loop over samples of the model
   (:mod:`~cl_optim.fisher.fallback`). Layers called twice, parameters shared by layers and
   parameters with gradient from outside their layer's calls (the coverage check) go to the
   model level;
3. with ``verify``, compares the routed computation on the first few samples with the model run
   one sample at a time, and moves a layer that differs one step down, with a warning.

A way that raises (``vmap`` cannot trace GRU) moves its layer one step down too.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from .batch import Batch, logits
from .capture import BATCH_MAJOR, Capture, Layout, expansion_for, probe_layouts
from .fallback import (
    layer_looped_squares_,
    layer_vmapped_squares_,
    model_looped_squares_,
    model_vmapped_squares_,
)
from .rules import absorbed_children, rule_for

RULE, LAYER_FUNC, LAYER_LOOP, MODEL_FUNC, MODEL_LOOP = range(5)
LEVELS = (
    "rule",
    "torch.func (layer)",
    "loop over samples (layer)",
    "torch.func (model)",
    "loop over samples (model)",
)
# Samples the probe plans on: enough to see samples mix, and a prime, so that a shared tensor
# (position ids (T,)) seldom has a dimension of the same size, which would stop its expansion.
PROBE_SAMPLES = 13


@dataclass
class Route:
    level: int
    layouts: list = field(default_factory=list)  # per output tensor of the layer's call
    reason: str = ""
    rule: str = ""  # the rule's name, at level RULE
    inputs: Optional[list] = field(default_factory=list)  # sample axis of each flattened input
    # (None in the list: shared by the samples; None for the whole: the inputs' samples mix)
    proven: Optional[list] = None  # per output: a gradient reached it when probed (else its layout
    # is a guess, and a gradient reaching it later moves the layer to the model level)

    def axes(self) -> Optional[list]:
        """The sample axis of each output, if every output holds the samples along one axis."""
        if self.layouts and all(x is not None and x.kind == "axis" for x in self.layouts):
            return [x.dim for x in self.layouts]
        return None


class Engine:
    def __init__(self, model: nn.Module, named: list, cap: int, verify: bool):
        self.model, self.cap, self.verify = model, cap, verify
        self.params = dict(named)
        self.layers, self.owners = _layers(model, self.params)
        self.qualified = {m: name for name, m in model.named_modules()}
        self.names = {m: name or type(m).__name__ for m, name in self.qualified.items()}
        # Parameters shared by two layers: one gradient from two places, so the model level.
        self.model_level = {full: MODEL_FUNC for full, owners in self.owners.items() if len(owners) > 1}
        self.routes: dict = {}
        self.expand: dict = {}
        self.planned = False
        self.warned: set = set()
        self.generator = torch.Generator().manual_seed(0)
        self.verify_seconds = 0.0
        self.plan_seconds = 0.0
        self.verified_samples = 0
        self.alone: set = set()  # layers seen only in batches of one sample
        for module in model.modules():  # a BatchNorm without parameters would slip past _layers
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                rule_for(module)

    def unrouted(self, capture: Capture) -> bool:
        """Whether a layer ran that the plan has not seen (another head, a conditional branch)."""
        return any(module not in self.routes for module in capture.calls)

    # ------------------------------------------------------------------------------ forward

    def forward(
        self, batch: Batch, expand: Optional[dict] = None, cut: bool = True
    ) -> tuple[Tensor, Capture]:
        """The model on ``batch`` under a capture. ``cut``: recurrent layers on their analytic rule
        take the rule's recurrence as their backward (:func:`~cl_optim.fisher.recurrent.cut_recurrent`);
        planning forwards are not cut, since the probe's coverage check needs the layers' own
        graph to reach their weights."""
        cut_layers = self._cut_layers() if cut else frozenset()
        capture = Capture(self.layers, batch.size, self.expand if expand is None else expand, cut_layers)
        with torch.enable_grad(), capture:
            output = logits(self.model(*batch.args, **batch.kwargs))
        if output.dim() == 0 or output.shape[0] != batch.size:
            raise ValueError(
                f"the model's output has shape {list(output.shape)} for a batch of {batch.size} samples: "
                "fisher.estimate needs one row of outputs per sample (dim 0)"
            )
        return output, capture

    def _cut_layers(self) -> frozenset:
        """The layers a forward cuts: recurrent layers on their rule (its analytic form decides
        per call, :func:`~cl_optim.fisher.recurrent.cut_recurrent`)."""
        return frozenset(m for m, r in self.routes.items() if r.level == RULE and r.rule == "recurrent")

    # ------------------------------------------------------------------------------ planning

    def plan(self, batch: Batch, scratch: Optional[dict] = None) -> None:
        """Routes every layer (see the module docstring) on the first samples of ``batch``, then
        (with ``verify``) checks the routes on the same forward.

        The probe reads values, not shapes (a sequence length equal to the probe's sample count
        cannot fool it), so a slice of the batch serves as well as the whole and costs a fraction.
        ``scratch``: zeroed fp32 accumulators by parameter name that the check may work in and
        leaves zeroed (the estimate lends its totals before its first batch).
        """
        start = time.perf_counter()
        try:
            part = batch.take(min(batch.size, PROBE_SAMPLES))
            output, capture = self.forward(part, cut=False)
            output, capture = self._plan(part, output, capture)
        finally:
            self.plan_seconds += time.perf_counter() - start
        if self.verify:
            if self._cut_layers():
                output, capture = self.forward(part)  # the check runs the cut layers as estimated
            self.check(part, output, capture, scratch)

    def recheck(self, batch: Batch, scratch: Optional[dict] = None) -> bool:
        """The self-check alone, on the first samples of ``batch``, for a kept plan
        (:mod:`~cl_optim.fisher.plans`): whether it left every route as it was (its warnings are
        held back; a plan it changes is made afresh, which gives them). ``scratch`` as for
        :meth:`plan`."""
        before = ({m: r.level for m, r in self.routes.items()}, dict(self.model_level))
        part = batch.take(min(batch.size, PROBE_SAMPLES))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output, capture = self.forward(part)
            self.check(part, output, capture, scratch)
        return before == ({m: r.level for m, r in self.routes.items()}, dict(self.model_level))

    def _plan(self, batch: Batch, output: Tensor, capture: Capture) -> tuple[Tensor, Capture]:
        # Layers that look run once for the batch (no dimension of the planning batch's size, a
        # prime when the batch allows) are tried expanded before the probe; a layer the probe
        # finds shared that the shapes hid (a sequence as long as the batch) is tried after it,
        # and probed again. The probe proves every layout, expanded or not.
        tried: set = set()
        for attempt in range(2):
            candidates = {}
            for module, calls in capture.calls.items():
                if len(calls) != 1 or module in tried or module in self.expand:
                    continue
                looks_shared = all(batch.size not in t.shape for t in calls[0].outputs)
                mixed = attempt == 1 and any(x is None for x in self.routes[module].layouts)
                how = expansion_for(calls[0], batch.size) if looks_shared or mixed else None
                if how is not None:
                    candidates[module] = how
            tried |= set(candidates)
            if candidates and batch.size > 1:
                output, capture = self._expand(batch, output, capture, candidates)
            elif attempt == 1:
                break
            self._route_all(batch, output, capture)
        self.planned = True
        return output, capture

    def _route_all(self, batch: Batch, output: Tensor, capture: Capture) -> None:
        for module, calls in capture.calls.items():
            if len(calls) > 1:
                self.routes[module] = Route(MODEL_FUNC, reason=f"called {len(calls)} times in one forward")
        single = [m for m, calls in capture.calls.items() if len(calls) == 1]
        for module in single:  # routed afresh: earlier coverage flags and demotions are redone
            for full_name in self.layers[module].values():
                if len(self.owners[full_name]) == 1:
                    self.model_level.pop(full_name, None)
        names = self._coverage_names(single)
        # Parameters of layers this forward did not call: a gradient reaching one comes from a use
        # outside its layer (``F.linear(h, self.head.weight)``), which only the model level sees.
        uncalled = [
            n for n in self.params
            if n not in self.model_level and not any(o in capture.calls for o in self.owners[n])
        ]  # fmt: skip
        probes, deltas, full = probe_layouts(
            output, [capture.calls[m][0] for m in single], self.generator,
            [self.params[n] for n in names + uncalled],
        )  # fmt: skip
        for module, found in zip(single, probes):
            self.routes[module] = _route(module, capture.calls[module][0], found, batch.size)
        for name, grad in zip(uncalled, full[len(names) :]):
            if grad is not None:
                self.model_level[name] = MODEL_FUNC
        self._check_coverage(capture, dict(zip(single, deltas)), dict(zip(names, full)))

    def _expand(self, batch, output, capture, candidates: dict):
        """Expand layers run once for the batch; keep those the model's output does not see."""
        for trial in ([candidates], [{m: h} for m, h in candidates.items()]):
            accepted, kept = {}, None
            # The first trial expands every candidate at once and usually passes: its forward (with
            # its graph, as every capture forward) is then the planning forward itself, one forward
            # fewer. After one-at-a-time trials the accepted set is run again.
            whole = len(trial) == 1
            for extra in trial:
                try:
                    again, again_capture = self.forward(
                        batch, {**self.expand, **accepted, **extra}, cut=False
                    )
                except Exception:  # the forward breaks under the expansion: not expanded
                    continue
                if again.shape == output.shape and torch.allclose(
                    again.detach().float(), output.detach().float(), rtol=_tolerance(output), atol=1e-6
                ):
                    accepted.update(extra)
                    kept = (again, again_capture) if whole else None
            if accepted:
                self.expand.update(accepted)
                return kept if kept is not None else self.forward(batch, cut=False)
        return output, capture

    def _coverage_names(self, modules: list) -> list:
        """The parameters the coverage check looks at: those of layers called once, not tied."""
        return [full for m in modules for full in self.layers[m].values() if full not in self.model_level]

    def _check_coverage(self, capture, deltas: dict, full: dict) -> None:
        """Parameters whose batch gradient (for the probe's seed, ``full``) is not the sum of what
        their layer's calls pass on are used elsewhere too (``h @ embed.weight.t()``): model level.

        Layer by layer, each gradient compared as soon as it is made and then freed: the whole
        model's local gradients held at once were a fresh |W|-sized buffer (page faults of the
        first estimate). The difference is taken out of place: autograd may hand one tensor to
        two parameters (``x * (a + b)``) or an expanded one (``bank.sum(0)``)."""
        names, errors, norms = [], [], []
        for module in (m for m in deltas if self.routes[m].level < MODEL_FUNC):
            own = {k: f for k, f in self.layers[module].items() if f in full}
            if not own:  # every parameter of the layer is tied to another: already model level
                continue
            call = capture.calls[module][0]
            ds = [torch.zeros_like(t) if d is None else d for t, d in zip(call.outputs, deltas[module])]
            grads = torch.autograd.grad(
                call.outputs, [self.params[f] for f in own.values()], ds, retain_graph=True, allow_unused=True
            )
            for name, got in zip(own.values(), grads):
                want = full[name]
                want = torch.zeros_like(self.params[name]) if want is None else want.float()
                errors.append(want.norm() if got is None else (got.float() - want).norm())
                norms.append(want.norm())
                names.append(name)
            grads = got = None  # freed before the next layer's are made
        if not names:
            return
        errors, norms = torch.stack(errors).tolist(), torch.stack(norms).tolist()  # one sync
        for name, error, norm in zip(names, errors, norms):
            if not error <= 1e-3 * norm + 1e-12:
                self.model_level[name] = MODEL_FUNC

    # ------------------------------------------------------------------------------ accumulation

    def accumulate(self, batch: Batch, output: Tensor, capture: Capture, seeds: list, totals: dict) -> None:
        model_params = dict(self.model_level)
        by_layer = []
        for module, calls in capture.calls.items():
            route = self.routes.get(module)
            if (
                route is not None
                and route.level < MODEL_FUNC
                and self._fits(module, route, calls, batch.size)
            ):
                by_layer.append(module)
                continue
            level = route.level if route is not None and route.level >= MODEL_FUNC else MODEL_FUNC
            for full in self.layers[module].values():
                model_params[full] = max(model_params.get(full, MODEL_FUNC), level)
        by_layer = [m for m in by_layer if any(f not in model_params for f in self.layers[m].values())]
        if by_layer:
            for module in self._by_layer(batch, output, capture, by_layer, seeds, totals, model_params):
                for full in self.layers[module].values():  # a gradient reached an unproven layout
                    model_params[full] = MODEL_FUNC
        for level in (MODEL_FUNC, MODEL_LOOP):
            names = [n for n, lv in model_params.items() if lv == level]
            if names:
                self._by_model(batch, seeds, totals, names, level)

    def _fits(self, module, route: Route, calls: list, batch: int) -> bool:
        """Whether this batch's call of a layer is shaped as the one the route was planned on."""
        if len(calls) != 1 or len(route.layouts) != len(calls[0].outputs):
            return False
        call = calls[0]
        if (module in self.expand) != call.expanded:
            return False
        if not all(x.fits(t.shape, batch) for x, t in zip(route.layouts, call.outputs)):
            return False
        if route.level in (LAYER_FUNC, LAYER_LOOP):
            if len(route.inputs) != len(call.inputs):
                return False
            for t, d in zip(call.inputs, route.inputs):
                if d is not None and not (isinstance(t, Tensor) and t.dim() > d and t.shape[d] == batch):
                    return False
        return True

    def accumulate_one(self, batch: Batch, seeds: list, totals: dict) -> None:
        """A batch of one sample before any plan: its batch gradient is its per-sample gradient."""
        model_looped_squares_(self.model, self.params, batch, seeds, totals)

    def _accumulators(self, module, totals, model_params) -> dict:
        return {
            local: totals[full] for local, full in self.layers[module].items() if full not in model_params
        }

    def _by_layer(self, batch, output, capture, modules, seeds, totals, model_params) -> set:
        """Per-layer ways; returns the layers with an unproven layout that a gradient reached in
        this batch (they go to the model level instead, for every seed)."""
        for module in modules:
            capture.calls[module][0].check_unchanged(self.names[module])
        # Inner products (attention's projections) only for layers on their rule: the other ways
        # take the layer's outputs alone.
        inner = {m: self.routes[m].level == RULE for m in modules}
        outputs = [
            t
            for m in modules
            for t in (capture.calls[m][0].differentiated() if inner[m] else capture.calls[m][0].outputs)
        ]
        looped = {m: [] for m in modules if self.routes[m].level == LAYER_LOOP}
        escalated: set = set()
        for seed in seeds:
            grads = torch.autograd.grad(
                output, outputs, seed.to(output.dtype), retain_graph=True, allow_unused=True
            )
            at = 0
            for module in modules:
                call, route = capture.calls[module][0], self.routes[module]
                count = len(call.outputs) + (len(call.inner) if inner[module] else 0)
                deltas = list(grads[at : at + count])  # the outputs', then the inner outputs'
                at += count
                if module in escalated:
                    continue
                if route.proven is not None and not all(route.proven):
                    reached = [
                        not ok and d is not None and bool(d.any()) for ok, d in zip(route.proven, deltas)
                    ]
                    if any(reached):  # a gradient where the probe saw none: the layout was a guess
                        escalated.add(module)
                        continue
                acc = self._accumulators(module, totals, model_params)
                if route.level == RULE:
                    rule_for(module).apply(module, call, deltas, acc, self.cap, route.layouts[0], batch.size)
                elif route.level == LAYER_FUNC:
                    part = {k: torch.zeros_like(t) for k, t in acc.items()}
                    try:  # into a scratch copy: a failure part-way must not leave half a batch added
                        layer_vmapped_squares_(
                            module, call, deltas, part, self.cap, route.axes(), route.inputs
                        )
                    except Exception as error:
                        self._demote(module, f"torch.func failed: {_first_line(error)}")
                        looped[module] = [deltas]
                        continue
                    for k, t in part.items():
                        acc[k].add_(t)
                elif route.level == LAYER_LOOP:
                    looped[module].append(deltas)
        for module, delta_sets in looped.items():
            call = capture.calls[module][0]
            acc = self._accumulators(module, totals, model_params)
            layer_looped_squares_(
                module, call, delta_sets, acc, self.routes[module].axes(), self.routes[module].inputs
            )
        for module in escalated:
            route = self.routes[module]
            route.level, route.reason = (
                MODEL_FUNC,
                "no gradient reached it when probed, so its layout was not proven",
            )
            for full in self.layers[module].values():
                self.model_level[full] = MODEL_FUNC
        return escalated

    def _by_model(self, batch, seeds, totals, names, level) -> None:
        acc = {n: totals[n] for n in names}
        active = torch.stack([s.reshape(s.shape[0], -1).ne(0).any(1) for s in seeds]).any(0).nonzero()
        last = int(active.max()) + 1 if active.numel() else 0
        if last < batch.size:  # the self-check's seeds are zero past its samples: skip those
            if last == 0:
                return
            batch, seeds = batch.take(last), [s[:last] for s in seeds]
        if level == MODEL_FUNC:
            part = {n: torch.zeros_like(totals[n]) for n in names}
            try:  # into a scratch copy: a failure on a later seed or chunk must not count twice
                model_vmapped_squares_(
                    self.model, {n: self.params[n].detach() for n in names}, batch, seeds, part, self.cap
                )
                for n in names:
                    acc[n].add_(part[n])
                return
            except Exception as error:
                for name in names:
                    self.model_level[name] = MODEL_LOOP
                for module in {m for n in names for m in self.owners[n]}:
                    if self.routes.get(module) is not None and self.routes[module].level == MODEL_FUNC:
                        self.routes[module].level = MODEL_LOOP
                self._warn(f"torch.func on the whole model failed ({_first_line(error)}); the parameters "
                           f"{names[:4]}{'...' if len(names) > 4 else ''} go through a loop over samples")  # fmt: skip
        model_looped_squares_(self.model, {n: self.params[n] for n in names}, batch, seeds, acc)

    # ------------------------------------------------------------------------------ demotion and checks

    def _demote(self, module, reason: str) -> None:
        route = self.routes[module]
        old = route.level
        if old == RULE and route.axes() is None:
            route.level = MODEL_FUNC
        else:
            route.level = min(old + 1, MODEL_LOOP)
        if route.level >= MODEL_FUNC:
            for full in self.layers[module].values():
                self.model_level[full] = max(self.model_level.get(full, MODEL_FUNC), route.level)
        route.reason = reason
        self._warn(
            f"`{self.names[module]}` ({type(module).__name__}): {reason}; it goes from {LEVELS[old]} to "
            f"{LEVELS[route.level]}"
        )

    def _warn(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            warnings.warn(f"fisher.estimate: {message}", UserWarning, stacklevel=_caller_level())

    def check(self, batch: Batch, output: Tensor, capture: Capture, scratch: Optional[dict] = None) -> None:
        """The self-check on the planning forward (:func:`~cl_optim.fisher.selfcheck.check`)."""
        from .selfcheck import check

        start = time.perf_counter()
        self.verified_samples = check(self, batch, output, capture, scratch)
        self.verify_seconds += time.perf_counter() - start

    def describe(self) -> dict:
        out = {}
        for module, layer in self.layers.items():
            name = self.names[module]
            route = self.routes.get(module)
            at_model = [f for f in layer.values() if f in self.model_level]
            if route is None and not at_model:
                out[name] = (
                    "loop over samples (model): batches of one sample"
                    if module in self.alone
                    else "not called"
                )
                continue
            if route is None or route.level >= MODEL_FUNC or len(at_model) == len(layer):
                level = (
                    max(self.model_level.get(f, MODEL_FUNC) for f in layer.values())
                    if at_model
                    else route.level
                )
                why = (
                    route.reason
                    if route is not None and route.reason
                    else "parameters shared or used outside the layer"
                )
                out[name] = f"{LEVELS[level]}: {why}"
                continue
            what = route.rule if route.level == RULE else LEVELS[route.level]
            layout = route.layouts[0] if route.layouts else None
            detail = [] if layout is None or layout == BATCH_MAJOR else [str(layout)]
            if module in self.expand:
                detail.append("expanded: run once for the whole batch")
            if at_model:
                detail.append(f"{at_model} by torch.func (model)")
            if route.reason:
                detail.append(route.reason)
            out[name] = what + (f" ({'; '.join(detail)})" if detail else "")
        return out


def _route(module, call, probe, batch: int) -> Route:
    if isinstance(module, nn.RNNBase):
        _rnn_states_on_dim_1(call, probe, batch)
    layouts, proven, inputs = probe.outputs, list(probe.proven), _input_axes(call, probe, batch)
    rule = rule_for(module)
    if rule is not None and rule.accepts(module, call, layouts):
        return Route(RULE, layouts, rule=rule.name, proven=proven, inputs=inputs)
    route = Route(LAYER_FUNC, layouts, proven=proven, inputs=inputs)
    if route.axes() is not None and route.inputs is not None:
        if isinstance(module, nn.RNNBase):  # vmap has no batching rule for the fused RNN kernels:
            route.level = LAYER_LOOP  # it loops inside, slower than the plain loop (0.8x measured)
        return route
    return Route(MODEL_FUNC, layouts, "its samples cannot be separated at its inputs and outputs")


def _rnn_states_on_dim_1(call, probe, batch: int) -> None:
    """Torch keeps an RNN's states ``(layers * directions, B, H)`` whatever ``batch_first``: where
    no gradient reached a final state the probe's guess was its first candidate, dim 0 when
    ``layers * directions == B``, which refused the rule and put ``hx``'s samples on dim 0 too (a
    crash in the per-sample loop). Unproven states and unprobed ``hx`` take dim 1."""
    on_1 = Layout("axis", 1)
    for k, t in enumerate(call.outputs):
        if k and not probe.proven[k] and t.dim() > 1 and t.shape[1] == batch:
            probe.outputs[k] = on_1
    tensors = [i for i, t in enumerate(call.inputs) if isinstance(t, Tensor)]
    if not tensors or call.inputs[tensors[0]].dim() != 3:
        return  # a packed sequence: its leaves are not the states
    for i in tensors[1:]:  # after the input sequence: h0 (and c0)
        t = call.inputs[i]
        if probe.inputs[i] is None and t.dim() > 1 and t.shape[1] == batch:
            probe.inputs[i] = on_1


def _input_axes(call, probe, batch: int) -> Optional[list]:
    """The sample axis of each flattened input of a call, for running the layer per sample: the
    probed layout where a gradient reached it, else read from the shapes of the planning batch
    (a prime number of samples): the first output axis of that size, else any dimension of that
    size, else shared. None if an input's samples mix."""
    out_dims = [x.dim for x in probe.outputs if x is not None and x.kind == "axis"]
    axes = []
    for t, found in zip(call.inputs, probe.inputs):
        if isinstance(found, Layout):
            if found.kind != "axis":
                return None
            axes.append(found.dim)
        elif found == "mixed":
            return None
        elif isinstance(t, Tensor):
            dims = out_dims + list(range(t.dim()))
            axes.append(next((d for d in dims if d < t.dim() and t.shape[d] == batch), None))
        else:
            axes.append(None)
    return axes


def _layers(model: nn.Module, params: dict) -> tuple[dict, dict]:
    """module -> {parameter name within the layer: full name}, and full name -> owning layers."""
    canonical = {id(p): name for name, p in params.items()}
    absorbed = {
        id(child)
        for m in model.modules()
        for n in absorbed_children(m)
        for child in [getattr(m, n, None)]
        if child is not None
    }
    layers, owners = {}, {}
    for module in model.modules():
        if id(module) in absorbed:
            continue
        own = {}
        members = [("", module)] + [(n + ".", getattr(module, n)) for n in absorbed_children(module)]
        for prefix, holder in members:
            for name, p in holder._parameters.items():
                if p is not None and id(p) in canonical:
                    own[prefix + name] = canonical[id(p)]
                    owners.setdefault(canonical[id(p)], []).append(module)
        if own:
            rule_for(module)  # refuses train-mode BatchNorm before any work
            layers[module] = own
    return layers, owners


def _caller_level() -> int:
    """The stacklevel of the first frame outside cl_optim.fisher: the warning points at the
    user's call of ``estimate``, however deep in the engine it was raised."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _tolerance(t: Tensor) -> float:
    return 1e-3 if t.dtype in (torch.float32, torch.float64) else 0.1


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


__all__ = ["Engine", "LEVELS"]
