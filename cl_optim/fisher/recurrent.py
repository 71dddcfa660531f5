r"""The per-sample rule for ``nn.LSTM`` and ``nn.GRU``: gate gradients, then Linear rules on them.

An LSTM without projections and a GRU take their gate gradients from their backward recurrence
written out (:func:`_analytic_squares_`: the hidden states from torch's fused kernel, the gates
in two GEMMs over the sequence, a few ops per step, no autograd graph; 0.67x the estimate's time
of the unrolled rule on bench_fisher's LSTM, paired). An LSTM with ``proj_size`` takes the
unrolled recurrence below, which is also the reference the analytic one is tested against.

Where a layer below needs its delta (an embedding under the LSTM), the estimate's forwards cut the
layer's outputs from torch's fused graph (:func:`cut_recurrent`): the backward through them is
the analytic recurrence, which returns the input's gradient and leaves the gate gradients for the
rule. Torch's fused backward, which would run the same recurrence again and form the weights'
gradients the estimate never uses, does not run (bench_fisher's LSTM: its estimate from 2.2x to
1.6x the batched forward+backward, with the in-place step loops below; measured alternating, kept
plans). Planning forwards are not cut (the probe's coverage check needs the layer's own graph to
reach its weights); the self-check runs the cut layers as the estimate does.

The fused RNN kernels hide their gate pre-activations. The unrolled rule runs the recurrence again, one
time step at a time, with the same gate math and the layer's own weights (as constants), keeping
as graph nodes the input projection of the whole sequence ``ih = x W_ih^T + b_ih`` and the
hidden projection of each step ``hh_t = h_{t-1} W_hh^T + b_hh`` (and LSTM's output projection
``h_t = m_t W_hr^T``). One backward of the call's output gradients through it gives ``delta`` at
every projection; each weight is then a ``Linear`` over time steps, whose per-sample gradient is
``G_n = sum_t delta_{n,t} x_{n,t}^T`` (:func:`~cl_optim.fisher.rules.add_linear_squares_`).
Gate order as torch documents it: LSTM ``i, f, g, o``; GRU ``r, z, n`` with
``n = tanh(ih_n + r * hh_n)``. Layers and directions are stacked as torch stacks them; eval mode
only (no dropout between layers). The self-check compares it with the layer run per sample.
"""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import workspace
from .capture import BATCH_MAJOR, Call, Layout
from .lstm_steps import backward_steps_, keeps_gates, lstm_forward_keeping_gates, step_factors_

__all__ = [
    "recurrent_squares_",
    "accepts_recurrent",
    "cut_recurrent",
    "cuttable",
    "forward_without_graph",
    "without_graph",
]

SEQUENCE_FIRST = Layout("axis", 1)
ANALYTIC = True  # LSTM (no projections) and GRU by their backward recurrence (_analytic_squares_)


def _bound(module: nn.RNNBase, args: tuple, kwargs: dict) -> tuple[Tensor, object]:
    """The call's ``input`` and ``hx``, however they were passed (bound to the class's forward:
    a capture may have set its own on the instance, :func:`forward_without_graph`)."""
    bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
    return bound.arguments["input"], bound.arguments.get("hx")


def accepts_recurrent(module, call: Call, layouts) -> bool:
    """A batched tensor input, eval mode (or no dropout), and the samples where torch keeps them:
    the output on dim 0 (``batch_first``) or 1, the final states on dim 1."""
    x, _ = _bound(module, call.args, call.kwargs)
    if not isinstance(x, Tensor) or x.dim() != 3 or (module.training and module.dropout > 0):
        return False
    output_layout = BATCH_MAJOR if module.batch_first else SEQUENCE_FIRST
    return bool(layouts) and layouts[0] == output_layout and all(x == SEQUENCE_FIRST for x in layouts[1:])


def _initial_states(module, x: Tensor, hx, batch: int, lstm: bool, out_width: int):
    states = module.num_layers * (2 if module.bidirectional else 1)
    if hx is None:
        return x.new_zeros(states, batch, out_width), x.new_zeros(states, batch, module.hidden_size)
    if lstm:
        return hx[0].detach(), hx[1].detach()
    return hx.detach(), None


def _leaf(t: Tensor) -> Tensor:
    """A node the backward can reach: itself if it already depends on one, else a leaf."""
    return t if t.requires_grad else t.detach().requires_grad_()


def _lstm_direction(
    layer_in, previous, w_ih, w_hh, b_ih, b_hh, d_own, dh_last, dc_last, c_first, order, key, kept=None
):
    """The gate gradients of one LSTM layer and direction (order i, f, g, o): the gates of every
    step in two GEMMs, ``z_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh``, the cells by
    ``c_t = f c_{t-1} + i g``; then against the direction of travel ``dh = dout_t + dz_{t+1} W_hh``,
    ``dc_t = dh o (1 - tanh^2 c_t) + dc_{t+1} f_{t+1}``, ``dz_t = [dc g i(1-i), dc c_{t-1}
    f(1-f), dc i (1-g^2), dh tanh(c_t) o(1-o)]``. Returns the gradients at the input and at the
    hidden projections (the same for an LSTM).

    Written in place into buffers kept from batch to batch (:mod:`~cl_optim.fisher.workspace`;
    about twenty fresh temporaries of a batch's gates cost the estimate of bench_fisher's LSTM
    more in page faults than in arithmetic): the scratch (gates, cells, the step factors) by its
    shape alone, shared by every layer, direction and module (each is done with it when this
    returns); the returned ``dz`` under ``key``, one per layer and direction, since the records
    are squared after the whole backward. ``kept``: what the rule's own forward kept
    (:class:`~cl_optim.fisher.lstm_steps.Gates`: the gates, step factors and ``through``, read
    only), which then is not made again. The step loop is
    :func:`~cl_optim.fisher.lstm_steps.backward_steps_` (one op on the CPU)."""
    steps, batch, hidden = previous.shape
    rows = steps * batch
    inputs = layer_in.reshape(rows, layer_in.shape[-1])
    bias = b_ih if b_hh is None else (b_hh if b_ih is None else b_ih + b_hh)

    def scratch(role, shape, like):  # one buffer per role, shape, dtype and device
        return workspace.take(("lstm", role, tuple(shape), like.dtype, like.device), shape, like)

    forward = order[0] == 0
    if kept is None:
        z = scratch("gates", (rows, 4 * hidden), previous)
        if bias is None:
            torch.mm(inputs, w_ih.t(), out=z)
        else:
            torch.addmm(bias, inputs, w_ih.t(), out=z)
        z = z.addmm_(previous.reshape(rows, hidden), w_hh.t()).view(steps, batch, 4 * hidden)
        i, f, o = z[..., :hidden], z[..., hidden : 2 * hidden], z[..., 3 * hidden :]
        z[..., : 2 * hidden].sigmoid_()
        o.sigmoid_()
        # tanh on a contiguous copy: on the strided slice torch's CPU tanh ran 3-4x slower in our
        # runs (torch 2.13, 2 threads, AMD EPYC VM: 2.6-4.5 against 0.8-1.1 ms a batch of
        # bench_fisher's LSTM; a reviewer's run read 1.3x); sigmoid does not slow down.
        g = scratch("cell_gate", (steps, batch, hidden), z).copy_(z[..., 2 * hidden : 3 * hidden]).tanh_()
        # c_{t-1} of every step next to c_t: the state before the first step at the end it starts from.
        states = scratch("cells", (steps + 1, batch, hidden), z)
        cells, before = (states[1:], states[:-1]) if forward else (states[:-1], states[1:])
        (states[0] if forward else states[steps]).copy_(c_first)
        torch.mul(i, g, out=cells)
        c = c_first
        for t in order:  # one op per step, in place (the step loops are the rule's Python cost)
            c = torch.addcmul(cells[t], f[t], c, out=cells[t])
        tanh_c = torch.tanh(cells, out=scratch("tanh_c", cells.shape, z))
        factors, through = scratch("factors", z.shape, z), scratch("through", cells.shape, z)
        step_factors_(factors, through, i, f, g, o, before, tanh_c)
    else:  # the forward's own (lstm_steps.lstm_forward_keeping_gates): nothing made again
        z, factors, through = kept.gates, kept.factors, kept.through
    dz = workspace.take((*key, "dz"), z.shape, z)  # kept: squared after the whole backward
    backward_steps_(dz, factors, through, z, d_own, w_hh, dh_last, dc_last, not forward)
    return dz, dz


def _gru_direction(layer_in, previous, w_ih, w_hh, b_ih, b_hh, d_own, dh_last, dc_last, c_first, order, key):
    """The gate gradients of one GRU layer and direction (order r, z, n; torch's
    ``n = tanh(ih_n + r * hh_n)``, ``h' = (1 - z) n + z h``). With ``ih``, ``hh`` of every step in
    two GEMMs, each step's gradients are its ``dh`` times step-local factors: ``dz_pre = dh (h -
    n) z(1-z)``, ``dn_pre = dh (1-z)(1-n^2)``, ``dr_pre = dn_pre hh_n r(1-r)``; at the input
    projection ``[dr_pre, dz_pre, dn_pre]``, at the hidden one ``[dr_pre, dz_pre, dn_pre r]``; and
    ``dh_{t-1} = dh z + d_hh W_hh``. ``key`` is unused (the LSTM's signature): its temporaries
    are made fresh, not kept (:mod:`~cl_optim.fisher.workspace`)."""
    ih, hh = F.linear(layer_in, w_ih, b_ih), F.linear(previous, w_hh, b_hh)  # (T, B, 3H)
    ih_r, ih_z, ih_n = ih.chunk(3, 2)
    hh_r, hh_z, hh_n = hh.chunk(3, 2)
    r, z = torch.sigmoid(ih_r + hh_r), torch.sigmoid(ih_z + hh_z)
    n = torch.tanh(ih_n + r * hh_n)
    k_n = (1 - z) * (1 - n * n)
    k_ih = torch.cat([k_n * hh_n * r * (1 - r), (previous - n) * z * (1 - z), k_n], 2)
    k_hh = torch.cat([k_ih[..., : 2 * r.shape[2]], k_n * r], 2)
    d_ih, d_hh = torch.empty_like(ih), torch.empty_like(hh)
    steps, batch, hidden = ih.shape[0], ih.shape[1], ih.shape[2] // 3
    gates = lambda t: t.view(steps, batch, 3, hidden)  # noqa: E731  (dh times each gate's factor)
    d_ih3, d_hh3, k_ih3, k_hh3 = gates(d_ih), gates(d_hh), gates(k_ih), gates(k_hh)
    dh_next = dh_last
    for t in reversed(order):
        dh = d_own[t] + dh_next
        wide = dh.unsqueeze(1)
        torch.mul(wide, k_ih3[t], out=d_ih3[t])
        torch.mul(wide, k_hh3[t], out=d_hh3[t])
        dh_next = torch.addmm(dh * z[t], d_hh[t], w_hh)
    return d_ih, d_hh


def _analytic_gates(
    module: nn.RNNBase, x: Tensor, hx, call_output: Tensor, deltas, batch: int, want_input: bool, forward=None
):
    """The gate gradients of an LSTM without projections or a GRU by its backward recurrence
    written out, layer by layer from the top and direction by direction (:func:`_lstm_direction`,
    :func:`_gru_direction`). Returns ``(records, d_x)``: per layer and direction ``(suffix, layer
    input, gradient at the input projection, previous hidden states, gradient at the hidden
    projection)``, all time first, and the gradient at ``x`` (time first) if ``want_input``.

    Each layer's hidden states come from torch's fused kernel without a graph (the last layer's
    are the call's own output), so the previous hidden state of every step is known and the gate
    pre-activations are two GEMMs over the sequence; the step loop is one small GEMM and a few
    elementwise ops, no autograd. A layer's output gradient is the next layer's input-projection
    gradient times ``W_ih`` (both directions). ``forward``: ``(inputs, gates)`` of
    :func:`~cl_optim.fisher.lstm_steps.lstm_forward_keeping_gates` where the call ran it (each
    layer's input, and its gates, step factors and ``through``: nothing is made again)."""
    lstm = isinstance(module, nn.LSTM)
    dirs, hidden = (2 if module.bidirectional else 1), module.hidden_size
    h0, c0 = _initial_states(module, x, hx, batch, lstm, hidden)
    steps, direction_of = x.shape[0], (_lstm_direction if lstm else _gru_direction)
    fused = torch._VF.lstm if lstm else torch._VF.gru

    def weights(layer, direction):
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        get = lambda name: None if getattr(module, name, None) is None else getattr(module, name).detach()  # noqa: E731
        return sfx, get("weight_ih" + sfx), get("weight_hh" + sfx), get("bias_ih" + sfx), get("bias_hh" + sfx)

    inputs, kept_gates = [x], {}  # each layer's input (T, B, in); one layer runs no forward here
    if forward is not None:
        inputs, kept_gates = forward
    with torch.no_grad():
        for layer in range(module.num_layers - 1 if forward is None else 0):
            flat = [t for d in range(dirs) for t in weights(layer, d)[1:] if t is not None]
            states = slice(layer * dirs, (layer + 1) * dirs)
            start = (h0[states], c0[states]) if lstm else h0[states]
            # On CUDA a layer past the first is not at the start of the module's weight buffer:
            # cuDNN copies it and warns to flatten_parameters(), which cannot help here.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="RNN module weights are not part")
                result = fused(
                    inputs[-1], start, flat, module.bias, 1, 0.0, False, module.bidirectional, False
                )
            inputs.append(result[0])
        if forward is None:
            last = call_output.detach()
            inputs.append(last.transpose(0, 1) if module.batch_first else last)

    def delta(k, like):
        d = deltas[k] if k < len(deltas) else None
        if d is None:
            return torch.zeros_like(like)
        return d.transpose(0, 1) if k == 0 and module.batch_first else d

    d_out = delta(0, inputs[-1]).to(x.dtype)  # (T, B, dirs * H)
    d_hn = delta(1, h0).to(x.dtype)
    d_cn = delta(2, c0).to(x.dtype) if lstm else None
    records = []
    with torch.no_grad():
        for layer in range(module.num_layers - 1, -1, -1):
            layer_in, layer_out = inputs[layer], inputs[layer + 1]
            d_in = (
                torch.zeros(layer_in.shape, dtype=layer_in.dtype, device=layer_in.device)
                if layer or want_input
                else None
            )
            for direction in range(dirs):
                sfx, w_ih, w_hh, b_ih, b_hh = weights(layer, direction)
                state = layer * dirs + direction
                own = layer_out[..., direction * hidden : (direction + 1) * hidden]
                first = h0[state].unsqueeze(0)
                # The hidden state each step's gates saw: the step before in the direction of travel.
                key = (id(module), layer, direction)  # kept while the records are read
                previous = workspace.take((*key, "previous"), own.shape, own)
                torch.cat([first, own[:-1]] if direction == 0 else [own[1:], first], out=previous)
                order = list(range(steps)) if direction == 0 else list(range(steps - 1, -1, -1))
                d_ih, d_hh = direction_of(
                    layer_in, previous, w_ih, w_hh, b_ih, b_hh, d_out[..., direction * hidden : (direction + 1) * hidden],
                    d_hn[state], None if d_cn is None else d_cn[state], None if c0 is None else c0[state], order, key,
                    **({"kept": kept_gates[(layer, direction)]} if kept_gates else {}),
                )  # fmt: skip
                if d_in is not None:  # into the input's gradient in place, no (T, B, in) product
                    d_in.view(-1, d_in.shape[-1]).addmm_(d_ih.reshape(-1, d_ih.shape[-1]), w_ih)
                records.append((sfx, layer_in, d_ih, previous, d_hh))
            d_out = d_in
    return records, d_out


def _square_gates_(records, acc, cap) -> None:
    """``W_ih`` is a ``Linear`` over each layer's inputs and ``W_hh`` one over the previous hidden
    states: their per-sample squares from the gate gradients of :func:`_analytic_gates`."""
    from .rules import add_linear_squares_

    for sfx, layer_in, d_ih, previous, d_hh in records:
        add_linear_squares_(
            layer_in.transpose(0, 1).to(torch.float32), d_ih.transpose(0, 1).to(torch.float32),
            acc.get("weight_ih" + sfx), acc.get("bias_ih" + sfx), cap,
        )  # fmt: skip
        add_linear_squares_(
            previous.transpose(0, 1).to(torch.float32), d_hh.transpose(0, 1).to(torch.float32),
            acc.get("weight_hh" + sfx), acc.get("bias_hh" + sfx), cap,
        )  # fmt: skip


def _analytic_squares_(module: nn.RNNBase, x: Tensor, hx, call_output: Tensor, deltas, acc, cap, batch: int):
    """An LSTM without projections or a GRU by its backward recurrence written out
    (:func:`_analytic_gates`), squared (:func:`_square_gates_`)."""
    records, _ = _analytic_gates(module, x, hx, call_output, deltas, batch, want_input=False)
    _square_gates_(records, acc, cap)


class Cut:
    """What an estimate's backward through a cut recurrent layer left for its rule: the gate
    gradients of the last backward (taken once)."""

    def __init__(self, module, x: Tensor, hx, output: Tensor, batch: int):
        self.module, self.x, self.hx, self.output, self.batch = module, x, hx, output, batch
        self.records = None
        self.forward = None  # (inputs, gates) where the forward kept them (lstm_steps.py)
        # The estimate's kept buffers: a CUDA backward runs on autograd's own thread.
        self.buffers = workspace.current()

    def take(self):
        records, self.records = self.records, None
        return records


class _ThroughTheRule(torch.autograd.Function):
    """The outputs of a recurrent layer, cut from torch's fused RNN graph: the backward through
    them is the rule's recurrence, which gives both the gate gradients the rule squares and the
    gradient at the layer's input. Without the cut the estimate's backward runs torch's fused
    RNN backward to reach the layers below (an embedding) and the rule runs the recurrence
    again; the fused backward also forms the weights' gradients, which the estimate never uses
    (bench_fisher's LSTM: 21 ms of a batch of 128)."""

    @staticmethod
    def forward(ctx, cut: Cut, x_raw: Tensor, *outputs: Tensor):
        ctx.cut = cut
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        cut = ctx.cut
        with workspace.using(cut.buffers):
            records, d_x = _analytic_gates(
                cut.module, cut.x, cut.hx, cut.output, list(grads), cut.batch, True, cut.forward
            )
        cut.records = records
        return (None, d_x.transpose(0, 1) if cut.module.batch_first else d_x) + (None,) * len(grads)


def cuttable(module, args: tuple, kwargs: dict) -> bool:
    """Whether :func:`cut_recurrent` takes this call: the analytic rule's layer (an LSTM without
    projections or a GRU, eval mode or no dropout) on a plain tensor input that needs a gradient,
    with no initial state that needs one."""
    if not ANALYTIC or not isinstance(module, (nn.LSTM, nn.GRU)) or getattr(module, "proj_size", 0):
        return False
    try:
        x, hx = _bound(module, args, kwargs)
    except TypeError:
        return False
    states = [] if hx is None else (list(hx) if isinstance(hx, (tuple, list)) else [hx])
    return (
        isinstance(x, Tensor)
        and x.dim() == 3
        and x.requires_grad
        and all(isinstance(h, Tensor) and not h.requires_grad for h in states)
        and not (module.training and module.dropout > 0)
    )


def without_graph(module) -> bool:
    """Whether a capture may run this layer's forward without a graph where it is cut
    (:func:`forward_without_graph`): torch's own LSTM or GRU forward, with no hook of anyone
    else's to see its outputs (they could not reach a graph through them)."""
    return (
        ANALYTIC
        and type(module).forward in (nn.LSTM.forward, nn.GRU.forward)
        and "forward" not in vars(module)
        and not module._forward_hooks
        and not module._forward_pre_hooks
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def forward_without_graph(module, cuts: dict):
    """The layer's forward for a capture: where the call is :func:`cuttable`, torch's forward
    under ``no_grad`` and the outputs cut (:func:`cut_recurrent`; the :class:`Cut` left in
    ``cuts[module]`` for the capture's hook). The cut's outputs reach the graph through the
    rule's recurrence (:class:`_ThroughTheRule`), so torch's own graph of them would never be
    used, and building it costs: the fused CPU kernel in its training form keeps a workspace for
    its backward."""
    forward = type(module).forward
    calls = [0]  # the module's calls in this forward so far: the key of a call's kept gates

    def run(*args, **kwargs):
        if (
            not torch.is_grad_enabled()
            # Saved-tensor hooks (a non-reentrant checkpoint) match what a forward saves with what
            # its recomputation in the backward saves, which runs torch's forward with its graph.
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
            or not cuttable(module, args, kwargs)
        ):
            return forward(module, *args, **kwargs)
        x, hx = _bound(module, args, kwargs)
        kept = None
        if keeps_gates(module, x):  # the forward as one op a step, keeping the gates for the rule
            output, inputs, gates = lstm_forward_keeping_gates(module, x, hx, calls[0])
            kept, calls[0] = (inputs, gates), calls[0] + 1
        else:
            with torch.no_grad():
                output = forward(module, *args, **kwargs)
        output, cut = cut_recurrent(module, args, kwargs, output)
        if cut is None:  # declined after all (torch's forward returns what it takes; a stand-in
            return forward(module, *args, **kwargs)  # cut_recurrent may not): with its graph
        cut.forward = kept
        cuts[module] = cut
        return output

    return run


def cut_recurrent(module, args: tuple, kwargs: dict, output):
    """``(output, Cut)`` with the layer's output tensors replaced by ones whose backward is the
    rule's recurrence (:class:`_ThroughTheRule`), where the call is :func:`cuttable`. Else
    ``(output, None)``."""
    if not cuttable(module, args, kwargs):
        return output, None
    x, hx = _bound(module, args, kwargs)
    # A subclass's forward may return something else; torch's own, the only one run without a
    # graph (forward_without_graph), always returns these.
    if not isinstance(output, tuple) or len(output) != 2:
        return output, None
    sequence, finals = output
    leaves = [sequence, *(finals if isinstance(finals, tuple) else (finals,))]
    if not all(isinstance(t, Tensor) for t in leaves):
        return output, None
    batch = x.shape[0] if module.batch_first else x.shape[1]
    time_first = x.detach().transpose(0, 1) if module.batch_first else x.detach()
    cut = Cut(module, time_first, hx, sequence.detach(), batch)
    new = _ThroughTheRule.apply(cut, x, *(t.detach() for t in leaves))
    return (new[0], tuple(new[1:]) if isinstance(finals, tuple) else new[1]), cut


def recurrent_squares_(module, call: Call, deltas, acc, cap, layout, batch) -> None:
    from .rules import add_linear_squares_

    lstm = isinstance(module, nn.LSTM)
    x, hx = _bound(module, call.args, call.kwargs)
    # The deltas in the order of the call's output leaves (output, h_n[, c_n]): those of leaves
    # that needed no gradient are None.
    placed = [None] * (max(call.output_index, default=-1) + 1)
    for position, d in zip(call.output_index, deltas):
        placed[position] = d
    deltas = placed
    projected = lstm and module.proj_size > 0
    x = x.detach()
    if module.batch_first:
        x = x.transpose(0, 1)  # (T, B, in): time first, as the recurrence walks
    if ANALYTIC and not projected and call.output_index[:1] == [0]:
        records = call.cut.take() if call.cut is not None else None
        if records is not None:  # the estimate's backward ran the recurrence (cut_recurrent)
            _square_gates_(records, acc, cap)
        else:
            _analytic_squares_(module, x, hx, call.outputs[0], deltas, acc, cap, batch)
        return
    steps, dirs = x.shape[0], 2 if module.bidirectional else 1
    hidden = module.hidden_size
    out_width = module.proj_size if projected else hidden
    h0, c0 = _initial_states(module, x, hx, batch, lstm, out_width)

    def weight(name):
        p = getattr(module, name, None)
        return None if p is None else p.detach()

    linears = []  # (weight name, bias name or None, input (T', B, in), node (T', B, out))
    finals_h, finals_c = [], []
    layer_input = x
    with torch.enable_grad():
        for layer in range(module.num_layers):
            outputs = []
            for direction in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                w_hh, b_hh, w_hr = (
                    weight("weight_hh" + sfx),
                    weight("bias_hh" + sfx),
                    weight("weight_hr" + sfx),
                )
                ih = _leaf(F.linear(layer_input, weight("weight_ih" + sfx), weight("bias_ih" + sfx)))
                linears.append(("weight_ih" + sfx, "bias_ih" + sfx, layer_input, ih))
                h = h0[layer * dirs + direction]
                c = c0[layer * dirs + direction] if lstm else None
                h_prev, hh_nodes, cells, projected = [], [], [], []
                per_step = [None] * steps
                for t in range(steps) if direction == 0 else range(steps - 1, -1, -1):
                    hh = _leaf(F.linear(h, w_hh, b_hh))
                    h_prev.append(h)
                    hh_nodes.append(hh)
                    if lstm:
                        i, f, g, o = (ih[t] + hh).chunk(4, 1)
                        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                        h = torch.sigmoid(o) * torch.tanh(c)
                        if w_hr is not None:
                            cells.append(h)
                            h = F.linear(h, w_hr)
                            projected.append(h)
                    else:
                        r_i, z_i, n_i = ih[t].chunk(3, 1)
                        r_h, z_h, n_h = hh.chunk(3, 1)
                        r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
                        n = torch.tanh(n_i + r * n_h)
                        h = (1 - z) * n + z * h
                    per_step[t] = h
                linears.append(("weight_hh" + sfx, "bias_hh" + sfx, h_prev, hh_nodes))
                if projected:
                    linears.append(("weight_hr" + sfx, None, cells, projected))
                outputs.append(torch.stack(per_step))
                finals_h.append(h)
                finals_c.append(c)
            layer_input = torch.cat(outputs, -1) if dirs == 2 else outputs[0]
    results = [layer_input, torch.stack(finals_h)] + ([torch.stack(finals_c)] if lstm else [])
    grads = []
    for k, result in enumerate(results):
        d = deltas[k] if k < len(deltas) else None
        if d is not None and k == 0 and module.batch_first:
            d = d.transpose(0, 1)
        grads.append(torch.zeros_like(result) if d is None else d.to(result.dtype))
    nodes = [n for _, _, _, node in linears for n in (node if isinstance(node, list) else [node])]
    node_grads = iter(torch.autograd.grad(results, nodes, grads, allow_unused=True))
    for w_name, b_name, inputs, node in linears:
        if isinstance(node, list):
            d = [next(node_grads) for _ in node]
            d = torch.stack([torch.zeros_like(n) if g is None else g for n, g in zip(node, d)])
            inputs = torch.stack([t.detach() for t in inputs])
        else:
            d = next(node_grads)
            d = torch.zeros_like(node) if d is None else d
            inputs = inputs.detach()
        add_linear_squares_(
            inputs.transpose(0, 1).to(torch.float32), d.transpose(0, 1).to(torch.float32),
            acc.get(w_name), acc.get(b_name) if b_name else None, cap,
        )  # fmt: skip
