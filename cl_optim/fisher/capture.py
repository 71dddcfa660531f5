"""What each layer saw in one forward, and where its samples lie.

:class:`Capture` puts forward hooks on the layers that own parameters and keeps, per call, the
inputs and every tensor of the output (tuples such as LSTM's ``(output, (h, c))`` included). The
rest of the model is handed clones, so later in-place ops (``ReLU(inplace=True)``) cannot change
the tensors the rules differentiate at.

:class:`Layout` says which rows of a tensor belong to which sample: ``axis d`` (sample ``n`` is
index ``n`` of dimension ``d``: ``(B, T, D)`` on ``d = 0``, sequence-first ``(T, B, D)`` on
``d = 1``), ``blocks`` (dimension 0 holds ``B`` consecutive blocks of rows: tokens flattened to
``(B*T, D)``) or ``interleaved`` (``(T*B, D)``). It is found by a probe, never assumed from the
shapes: :func:`probe_layouts` back-propagates a random output cotangent ``v`` and ``c_n v_n``
with distinct ``c_n`` per sample; a row that only sample ``n`` depends on receives exactly
``c_n`` times its first gradient, and a row that several samples share receives a mixture that
matches no layout.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["Call", "Capture", "Layout", "Probe", "probe_layouts"]


@dataclass(frozen=True)
class Layout:
    kind: str  # "axis", "blocks" or "interleaved"
    dim: int = 0

    def fits(self, shape, batch: int) -> bool:
        if self.kind == "axis":
            return len(shape) > self.dim and shape[self.dim] == batch
        return len(shape) > 0 and shape[0] % batch == 0

    def sample_major(self, t: Tensor, batch: int) -> Tensor:
        """``t`` with sample ``n``'s rows at index ``n`` of dimension 0."""
        if self.kind == "axis":
            return t.movedim(self.dim, 0)
        if self.kind == "blocks":
            return t.reshape(batch, t.shape[0] // batch, *t.shape[1:])
        return t.reshape(t.shape[0] // batch, batch, *t.shape[1:]).transpose(0, 1)

    def per_row(self, values: Tensor, shape) -> Tensor:
        """Per-sample ``values`` (B,) broadcast to a tensor of ``shape`` laid out this way."""
        batch = values.shape[0]
        if self.kind == "axis":
            view = [1] * len(shape)
            view[self.dim] = batch
            return values.view(view)
        rows = (
            values.repeat_interleave(shape[0] // batch)
            if self.kind == "blocks"
            else values.repeat(shape[0] // batch)
        )
        return rows.view(-1, *([1] * (len(shape) - 1)))

    def __str__(self) -> str:
        if self.kind == "axis":
            return "samples on dim 0" if self.dim == 0 else f"samples on dim {self.dim}"
        return f"samples as {self.kind} rows of dim 0"


BATCH_MAJOR = Layout("axis", 0)


@dataclass
class Call:
    """One call of a layer: its (detached) inputs and their flattened tensors, the versions of
    those (pairs of tensor and version), the inputs as the layer got them (for the probe), and
    its output tensors."""

    module: nn.Module
    args: tuple
    kwargs: dict
    versions: list
    outputs: list  # the output's tensor leaves that require grad, in tree order
    output_index: list  # their positions among the output's leaves
    inputs: list  # the flattened (args, kwargs) leaves, detached
    raw_inputs: list  # the same leaves as the layer got them (requiring grad where they did)
    expanded: bool = False
    # Matrix products inside the layer's forward, as (input, weight, bias, output) in call order:
    # attention's projections (see `Capture`), differentiated in the same backward as `outputs`.
    inner: list = field(default_factory=list)
    # A recurrent layer on its analytic rule whose outputs were cut from torch's fused graph
    # (recurrent.cut_recurrent): the estimate's backward leaves the gate gradients here.
    cut: object = None

    def differentiated(self) -> list:
        """The tensors whose gradients the per-layer pass asks for: outputs, then inner outputs."""
        return self.outputs + [output for *_, output in self.inner]

    def pick_outputs(self, output) -> list:
        """The leaves of another call's output at the positions of :attr:`outputs`."""
        leaves, _ = tree_flatten(output)
        return [leaves[i] for i in self.output_index]

    def check_unchanged(self, name: str) -> None:
        for t, version in self.versions:
            if t._version != version:
                raise RuntimeError(f"the input of {name} was modified in place after the layer ran")

    def main_input(self):
        """The layer's first input, positional or by keyword (``self.lin(input=x)``)."""
        if self.args:
            return self.args[0]
        import inspect

        first = next(iter(inspect.signature(self.module.forward).parameters))
        return self.kwargs[first]


class Capture:
    """Forward hooks on ``layers`` that record every :class:`Call`.

    ``expand`` maps layers that run once for the whole batch (a position table looked up with
    ``arange(T)`` or ids of shape ``(1, T)``) to ``(how, rank of the output)``: their output and
    inputs are expanded to the batch (``(1, ...)`` to ``(B, ...)``, or ``(...)`` to
    ``(B, ...)``), which broadcasting makes invisible to the rest of the model, so that each
    sample's gradient reaches them apart. A call of another rank (ids that are per sample in a
    later batch) is left as it is and marked not expanded.
    """

    def __init__(self, layers, size: int, expand: Optional[dict] = None, cut: frozenset = frozenset()):
        self.layers = list(layers)
        self.size = size
        self.expand = expand or {}
        self.cut = cut  # recurrent layers whose backward is their rule's (recurrent.cut_recurrent)
        self.calls: dict = {}
        self.handles = []

    def __enter__(self):
        from .recurrent import forward_without_graph, without_graph
        from .rules import rule_for

        self.wrapped, self.recorded, self.cuts = [], {}, {}
        try:
            for module in self.layers:
                if module in self.cut and without_graph(module):  # before our hook is on it
                    module.forward = forward_without_graph(module, self.cuts)
                    self.wrapped.append(module)
                self.handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
                if "forward" in vars(module) or not isinstance(module, nn.MultiheadAttention):
                    continue
                rule = rule_for(module)  # only where the attention rule takes the call
                if rule is not None and rule.name == "attention":
                    module.forward = _recording_projections(module, self)
                    self.wrapped.append(module)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for module in self.wrapped:
            del module.forward  # the class's forward again
        self.wrapped = []

    def _hook(self, module, args, kwargs, output):
        cut = self.cuts.pop(module, None)  # cut in its forward (recurrent.forward_without_graph)
        if cut is None and module in self.cut:
            from .recurrent import cut_recurrent

            output, cut = cut_recurrent(module, args, kwargs, output)
        planned = self.expand.get(module)
        how = None
        if planned is not None:  # expand only a call shaped as the one the plan expanded
            first = next((t for t in tree_flatten(output)[0] if isinstance(t, Tensor)), None)
            rank_ok = first is not None and first.dim() == planned[1]
            if rank_ok and (planned[0] == "new" or first.shape[0] == 1):
                how = planned[0]
        simple = (
            how is None
            and isinstance(output, Tensor)
            and not kwargs
            and all(isinstance(a, Tensor) for a in args)
        )
        if simple:  # the common case, without torch's pytree (it costs more than a small layer)
            leaves, spec = [output], None
            raw = list(args)
            args = tuple(a.detach() for a in args)
            inputs = list(args)
        else:
            leaves, spec = tree_flatten(output)
            if how is not None:
                grow = _expander(how, self.size)
                leaves = [grow(t) if isinstance(t, Tensor) else t for t in leaves]
                args, kwargs = tree_map(
                    lambda t: grow(t) if isinstance(t, Tensor) and t.dim() else t, (args, kwargs)
                )
            raw = tree_flatten((args, kwargs))[0]
            args, kwargs = tree_map(_detach, (args, kwargs))
            inputs = tree_flatten((args, kwargs))[0]
        versions = [(t, t._version) for t in inputs if isinstance(t, Tensor)]
        index = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad]
        call = Call(
            module,
            args,
            kwargs,
            versions,
            [leaves[i] for i in index],
            index,
            inputs,
            raw,
            how is not None,
            self.recorded.pop(module, []),
            cut,
        )
        self.calls.setdefault(module, []).append(call)
        handed = [t.clone() if isinstance(t, Tensor) and t.requires_grad else t for t in leaves]
        return handed[0] if spec is None else tree_unflatten(handed, spec)


class _LinearRecorder:
    """One process-wide stand-in for ``torch.nn.functional.linear`` while any capture runs an
    attention forward: it records ``(input, weight, bias, output)`` into the list this thread has
    set (none: it only passes the call through). Installed on the first use and the true original
    put back after the last (reference-counted under a lock), so overlapping threads cannot leave
    a recorder behind."""

    def __init__(self):
        self.lock, self.users, self.original = threading.Lock(), 0, None
        self.local = threading.local()

    def _linear(self, input, weight, bias=None):
        output = self.original(input, weight, bias)
        records = getattr(self.local, "records", None)
        if records is not None:
            records.append((input, weight, bias, output))
        return output

    def __enter__(self):
        with self.lock:
            if self.users == 0:
                self.original = F.linear
                F.linear = self._linear
            self.users += 1

    def __exit__(self, *exc):
        with self.lock:
            self.users -= 1
            if self.users == 0:
                F.linear, self.original = self.original, None


_RECORDER = _LinearRecorder()


def _recording_projections(module: nn.MultiheadAttention, capture: Capture):
    """``module.forward`` recording every ``F.linear`` that ``F.multi_head_attention_forward`` makes
    on this thread (the q/k/v projections and the output projection) into
    ``capture.recorded[module]``, those whose output requires grad.

    Their outputs are in the model's graph, so the backward that reaches the layer's output also
    gives the projections' output gradients, and the attention rule needs no second run of the
    attention core. ``multi_head_attention_forward`` looks ``linear`` up as a global of
    ``torch.nn.functional``, where :class:`_LinearRecorder` stands in for the call's duration. If
    torch's attention stops going through it, nothing is recorded and the rule runs the core
    again. Under ``torch.compile`` the plain forward runs (the recorder is Python state).
    """
    original = type(module).forward

    def forward(*args, **kwargs):
        if torch.compiler.is_compiling():
            return original(module, *args, **kwargs)
        records, local = [], _RECORDER.local
        outer = getattr(local, "records", None)  # an attention inside another's forward
        with _RECORDER:
            local.records = records
            try:
                result = original(module, *args, **kwargs)
            finally:
                local.records = outer
        capture.recorded[module] = [r for r in records if r[3].requires_grad]
        return result

    return forward


def _detach(value):
    return value.detach() if isinstance(value, Tensor) else value


def _expander(how: str, size: int):
    if how == "lead":  # (1, ...) -> (B, ...)
        return lambda t: t.expand(size, *t.shape[1:]) if t.dim() and t.shape[0] == 1 else t
    return lambda t: t.unsqueeze(0).expand(size, *t.shape)  # (...) -> (B, ...)


def expansion_for(call: Call, size: int) -> Optional[tuple]:
    """How a layer call that no sample owns could be expanded to the batch: every tensor it saw and
    made has leading dimension 1 ("lead": ``(1, T)`` ids), or it is taken as shared whole ("new":
    ``arange(T)`` ids). Only a guess: the expansion is kept only if the model's output does not
    change and the probe then finds the samples on dimension 0."""
    if not call.outputs:
        return None
    leaves = [t for t in call.inputs if isinstance(t, Tensor) and t.dim()]
    rank = call.outputs[0].dim()
    if all(t.shape[0] == 1 for t in leaves + call.outputs):
        return ("lead", rank)
    return ("new", rank)


def _tolerance(t: Tensor) -> float:
    # The per-sample scales are powers of two: c_n * (J^T v_n) is computed exactly in any float
    # format (barring underflow), so an owned row matches to rounding-free precision.
    return 1e-4 if t.dtype in (torch.float32, torch.float64) else 1e-2


@dataclass
class Probe:
    """What the probe found for one call: the layout of each output (None: samples mix), whether
    a gradient reached each output (else its layout is only a guess), and the layout of each
    flattened input that required grad (None for the others)."""

    outputs: list
    proven: list
    inputs: list


def probe_layouts(output: Tensor, calls: list, generator: torch.Generator, params=()) -> tuple:
    """Where every output (and every input that requires grad) of every call keeps its samples.

    Returns ``(Probe per call, output deltas per call, gradients of params)`` for the random seed
    ``v``; the deltas and the parameters' gradients serve the coverage check (taken in the same
    backward).
    """
    batch = output.shape[0]
    v = torch.randn(output.shape, generator=generator).to(output)
    exponents = torch.randperm(batch, generator=generator) - batch // 2
    c = torch.pow(2.0, exponents.to(torch.float64)).to(torch.float32)
    scaled = (c.to(output.device).view(-1, *([1] * (output.dim() - 1))) * v.float()).to(output.dtype)
    targets, where = [], []
    for call in calls:
        inputs = [(i, t) for i, t in enumerate(call.raw_inputs) if isinstance(t, Tensor) and t.requires_grad]
        where.append((len(targets), len(call.outputs), inputs))
        targets += call.outputs + [t for _, t in inputs]
    first = torch.autograd.grad(output, targets + list(params), v, retain_graph=True, allow_unused=True)
    full = first[len(targets) :]
    second = torch.autograd.grad(output, targets, scaled, retain_graph=True, allow_unused=True)
    probes, deltas = [], []
    for call, (at, n_out, inputs) in zip(calls, where):
        outs, proven = [], []
        for k, t in enumerate(call.outputs):
            a, b = first[at + k], second[at + k]
            peak = _peak(a)
            fits = _layouts_of(t.shape, a, b, c.to(t.device), batch, peak)
            # Proven: a gradient reached it (NaN counts) and it fits one candidate layout only. Rows
            # that tell no two candidates apart (gradient on the diagonal of a (T, B) output with
            # T = B) prove nothing: the layer goes to the model level once a gradient reaches it.
            proven.append(peak != 0 and len(fits) <= 1)
            outs.append(fits[0] if fits else None)
        ins = [None] * len(call.raw_inputs)
        for k, (i, t) in enumerate(inputs):
            a, b = first[at + n_out + k], second[at + n_out + k]
            peak = _peak(a)
            if peak != 0:
                fits = _layouts_of(t.shape, a, b, c.to(t.device), batch, peak)
                ins[i] = fits[0] if fits else "mixed"
        probes.append(Probe(outs, proven, ins))
        deltas.append(list(first[at : at + n_out]))
    return probes, deltas, list(full)


def _candidates(shape, batch: int):
    out = [Layout("axis", d) for d in range(len(shape)) if shape[d] == batch]
    if len(shape) and shape[0] != batch and shape[0] % batch == 0:
        out += [Layout("blocks"), Layout("interleaved")]
    return out


def _peak(t: Optional[Tensor]) -> float:
    """``max |t|``: 0 for None or no element, NaN where ``t`` holds one (one pass and one read
    of the host, where ``any()`` and ``abs().max()`` took two)."""
    return 0.0 if t is None or t.numel() == 0 else float(t.detach().abs().max())


def _layouts_of(shape, first: Optional[Tensor], second: Optional[Tensor], c: Tensor, batch: int, peak: float):
    """The candidate layouts whose per-row scales ``c`` turn ``first`` into ``second``: every
    element within ``tol |expected| + tol 1e-3 peak`` (``peak = max |first|``). Where no gradient
    reaches it, the first candidate alone: a guess (not proven)."""
    candidates = _candidates(shape, batch)
    if first is None or second is None or peak == 0:
        return candidates[:1]
    a, b = first.float(), second.float()
    tol = _tolerance(first)
    atol = tol * 1e-3 * peak
    fits = []
    for layout in candidates:
        expected = layout.per_row(c, shape) * a
        # |b - expected| - tol |expected| <= atol everywhere, in place (a NaN fails, as before).
        excess = (b - expected).abs_()
        excess.sub_(expected.abs_().mul_(tol))
        if float(excess.max()) <= atol:
            fits.append(layout)
    return fits
