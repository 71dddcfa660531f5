r"""The step loops of the LSTM rule (:mod:`.recurrent`): a forward that keeps its gates, and the
backward recurrence of the gate gradients.

**Forward** (:func:`forward_steps_`), one layer and direction, time first. ``gates`` ``(T, B, 4H)``
comes in holding the input projection ``x W_ih^T + b_ih + b_hh`` of the whole sequence (one GEMM);
step ``t`` adds ``h_{t-1} W_hh^T`` to its rows, and

.. math::  i, f, o = \sigma(\cdot),\quad g = \tanh(\cdot),\quad c_t = f c_{t-1} + i g,\quad
           h_t = o \tanh(c_t)

(gate order ``i, f, g, o`` as torch's). ``gates`` is left with ``i, f, o`` after their sigmoid
(the ``g`` quarter is not defined), ``states`` ``(T + 1, B, H)`` holds the cells with ``c_0`` at
the end the direction starts from (``states[t]`` is ``c_{t-1}`` going forward), ``h_t`` goes to
``output[t]``, and what the backward needs of each step (:func:`step_factors_`): ``factors``
``[(1-i) i g, (1-f) f c_{t-1}, (1-g^2) i, (1-o) o tanh(c_t)]`` and ``through``
``o (1 - tanh^2 c_t)``.

**Backward** (:func:`backward_steps_`), against the direction of travel:

.. math::  dh_t = d_t + dz_{t+1} W_{hh},\quad dc_t = dh_t\,through_t + dc_{t+1} f_{t+1},\quad
           dz_t = factors_t \odot [dc_t, dc_t, dc_t, dh_t]

(``dh`` at the last step is ``d_T + dh_last``, ``dc_{T+1} f_{T+1}`` is ``dc_last``), written to
``dz``; ``factors`` is only read, so several backward passes (one per seed of ``exact``) share one
forward.

``backend="cpp"`` runs each as one op (``csrc/cpu/lstm_steps.cpp``): per step one GEMM and one
pass over the step's units; the ``forloop`` oracle is the same loop in torch ops, eight to ten a
step. On bench_fisher's LSTM (B 128, T 32, H 128) the forward in torch ops cost more than torch's
fused kernel plus making the gates again (its CPU tanh: about 2 ns an element), so the rule takes
this forward only where the op runs (:func:`keeps_gates`).

>>> import torch
>>> T, B, H = 3, 2, 4
>>> gen = torch.Generator().manual_seed(0)
>>> lstm = torch.nn.LSTM(5, H).eval()
>>> x = torch.randn(T, B, 5, generator=gen)
>>> (out, (h, c)), _, _ = lstm_forward_keeping_gates(lstm, x, None, backend="forloop")
>>> with torch.no_grad():
...     ref, (h_ref, c_ref) = lstm(x)
>>> torch.allclose(out, ref, atol=1e-6), torch.allclose(c, c_ref, atol=1e-6)
(True, True)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .._backend import kernel_op, resolve
from . import workspace

__all__ = [
    "Gates",
    "backend_for",
    "backward_steps_",
    "forward_steps_",
    "keeps_gates",
    "lstm_forward_keeping_gates",
    "step_factors_",
]


def backend_for(t: Tensor) -> str:
    """``cpp`` for fp32/fp64 CPU tensors where the extension builds, else the ``forloop`` oracle
    (a GPU keeps torch ops: no kernel of these loops has been timed on one)."""
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
        return "forloop"
    try:
        return "cpp" if resolve("auto", t.device, torch.float32) == "cpp" else "forloop"
    except RuntimeError:
        return "forloop"


def _ran_the_op(op: str, backend: str, lead: Tensor, *args) -> bool:
    """Runs ``op`` on ``backend`` (``"auto"``: :func:`backend_for` ``lead``) if it is ``cpp`` and
    says so; False for the ``forloop`` oracle, which the caller then runs."""
    if backend == "auto":
        backend = backend_for(lead)
    if backend == "cpp":
        kernel_op("cpp", op, lead)(*args)
        return True
    if backend != "forloop":
        raise ValueError(f"{op} has no {backend!r} implementation")
    return False


def step_factors_(
    factors: Tensor,
    through: Tensor,
    i: Tensor,
    f: Tensor,
    g: Tensor,
    o: Tensor,
    before: Tensor,
    tanh_c: Tensor,
) -> None:
    """``factors = [(1-i) i g, (1-f) f c_{t-1}, (1-g^2) i, (1-o) o tanh(c_t)]`` (its last dim the
    four quarters) and ``through = o (1 - tanh^2 c_t)``, for any leading dims; ``before`` is
    ``c_{t-1}``. The order of operations is the C++ op's, so both round alike."""
    hidden = i.shape[-1]
    quarter = lambda k: factors[..., k * hidden : (k + 1) * hidden]  # noqa: E731
    torch.mul(i, -1, out=quarter(0)).add_(1).mul_(i).mul_(g)  # (1 - i) i g
    torch.mul(f, -1, out=quarter(1)).add_(1).mul_(f).mul_(before)  # (1 - f) f c_{t-1}
    torch.mul(g, g, out=quarter(2)).neg_().add_(1).mul_(i)  # (1 - g^2) i
    torch.mul(o, -1, out=quarter(3)).add_(1).mul_(o).mul_(tanh_c)  # (1 - o) o tanh(c)
    torch.mul(tanh_c, tanh_c, out=through).neg_().add_(1).mul_(o)  # o (1 - tanh^2 c)


def forward_steps_(
    gates: Tensor,
    output: Tensor,
    states: Tensor,
    factors: Tensor,
    through: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    reverse: bool,
    backend: str = "auto",
) -> None:
    """The forward steps of one layer and direction (module docstring), in place."""
    if _ran_the_op(
        "lstm_forward_steps_", backend, gates, gates, output, states, factors, through, w_hh, h0, c0, reverse
    ):
        return
    steps, hidden = gates.shape[0], gates.shape[2] // 4
    with torch.no_grad():
        (states[steps] if reverse else states[0]).copy_(c0)
        cell_gate, tanh_cells = torch.empty_like(through), torch.empty_like(through)
        h, w_hh_t = h0, w_hh.detach().t()
        for t in range(steps - 1, -1, -1) if reverse else range(steps):
            z = gates[t].addmm_(h, w_hh_t)
            z[:, : 2 * hidden].sigmoid_()  # i, f
            z[:, 3 * hidden :].sigmoid_()  # o
            g = torch.tanh(z[:, 2 * hidden : 3 * hidden], out=cell_gate[t])
            c_before, c = (states[t + 1], states[t]) if reverse else (states[t], states[t + 1])
            torch.mul(z[:, :hidden], g, out=c).addcmul_(z[:, hidden : 2 * hidden], c_before)
            h = torch.mul(z[:, 3 * hidden :], torch.tanh(c, out=tanh_cells[t]), out=output[t])
        before = states[1:] if reverse else states[:-1]
        step_factors_(
            factors, through, gates[..., :hidden], gates[..., hidden : 2 * hidden], cell_gate,
            gates[..., 3 * hidden :], before, tanh_cells,
        )  # fmt: skip


def backward_steps_(
    dz: Tensor,
    factors: Tensor,
    through: Tensor,
    gates: Tensor,
    d_own: Tensor,
    w_hh: Tensor,
    dh_last: Tensor,
    dc_last: Tensor,
    reverse: bool,
    backend: str = "auto",
) -> None:
    """The backward recurrence of one layer and direction (module docstring) into ``dz``."""
    args = (dz, factors, through, gates, d_own, w_hh, dh_last, dc_last, reverse)
    if _ran_the_op("lstm_backward_steps_", backend, dz, *args):
        return
    steps, hidden = dz.shape[0], dz.shape[2] // 4
    f, w_hh = gates[..., hidden : 2 * hidden], w_hh.detach()
    dz.copy_(factors)
    dz_cell, dz_out = dz.view(steps, dz.shape[1], 4, hidden)[:, :, :3], dz[..., 3 * hidden :]
    backward = list(range(steps)) if reverse else list(range(steps - 1, -1, -1))
    with torch.no_grad():
        dh, dc_next = d_own[backward[0]] + dh_last, dc_last
        for k, t in enumerate(backward):  # one op per step, in place
            dc = torch.addcmul(dc_next, dh, through[t])
            dz_cell[t].mul_(dc.unsqueeze(1))  # the i, f, g gates: dc * factors
            dz_out[t].mul_(dh)  # the o gate: dh * factors
            if k + 1 < len(backward):
                dh, dc_next = torch.addmm(d_own[backward[k + 1]], dz[t], w_hh), dc * f[t]


class Gates:
    """One layer and direction's forward, time first, as :func:`forward_steps_` leaves it:
    ``gates`` (i, f, o after their sigmoid), ``states`` the cells (``c_0`` at the starting end),
    ``factors`` and ``through`` for the backward."""

    __slots__ = ("gates", "states", "factors", "through")

    def __init__(self, gates: Tensor, states: Tensor, factors: Tensor, through: Tensor):
        self.gates, self.states, self.factors, self.through = gates, states, factors, through


def keeps_gates(module: nn.Module, x: Tensor) -> bool:
    """Whether a cut layer's forward is :func:`lstm_forward_keeping_gates`: an ``nn.LSTM``
    without projections whose input and weights are fp32 or fp64 CPU tensors of one dtype, where
    the ``cpp`` op runs."""
    if not isinstance(module, nn.LSTM) or module.proj_size or not isinstance(x, Tensor):
        return False
    if not all(w.dtype == x.dtype and w.device == x.device for w in module._flat_weights):
        return False
    return backend_for(x) == "cpp"


def lstm_forward_keeping_gates(
    module: nn.LSTM, x: Tensor, hx: Optional[tuple], call: int = 0, backend: str = "auto"
) -> tuple[tuple[Tensor, tuple[Tensor, Tensor]], list[Tensor], dict]:
    """``module(x, hx)`` without a graph, as ``(output, (h_n, c_n))`` in torch's layout (eval
    mode: no dropout between layers), plus each layer's input (time first) and the
    :class:`Gates` of each ``(layer, direction)``, kept in the estimate's buffers
    (:mod:`.workspace`) under the module, ``call`` (which call of it in the current forward),
    layer, direction and role until the same call of the next forward."""
    dirs, hidden = (2 if module.bidirectional else 1), module.hidden_size
    time_first = (x.transpose(0, 1) if module.batch_first else x).detach()
    steps, batch = time_first.shape[0], time_first.shape[1]
    states_count = module.num_layers * dirs
    if hx is None:
        h0 = c0 = time_first.new_zeros(states_count, batch, hidden)
    else:
        h0, c0 = hx[0].detach(), hx[1].detach()
    h_n, c_n = (
        time_first.new_empty(states_count, batch, hidden),
        time_first.new_empty(states_count, batch, hidden),
    )
    inputs, kept = [time_first], {}
    with torch.no_grad():
        for layer in range(module.num_layers):
            if layer == module.num_layers - 1 and module.batch_first:  # torch's (B, T, dirs H)
                output = time_first.new_empty(batch, steps, dirs * hidden)
                out = output.transpose(0, 1)
            else:
                out = output = time_first.new_empty(steps, batch, dirs * hidden)
            for direction in range(dirs):
                state, own = layer * dirs + direction, slice(direction * hidden, (direction + 1) * hidden)
                key = ("lstm_forward", id(module), call, layer, direction)
                gates = _direction(
                    module, inputs[-1], out[..., own], h0[state], c0[state], layer, direction, key, backend
                )
                kept[(layer, direction)] = gates
                h_n[state].copy_(out[0 if direction else -1, :, own])
                c_n[state].copy_(gates.states[0 if direction else -1])
            inputs.append(out)
    return (output, (h_n, c_n)), inputs, kept


def _direction(module, layer_in, out, h_first, c_first, layer, direction, key, backend) -> Gates:
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    w_ih, w_hh = getattr(module, "weight_ih" + sfx).detach(), getattr(module, "weight_hh" + sfx).detach()
    steps, batch, hidden = out.shape

    def take(role, shape):
        return workspace.take((*key, role), shape, out)

    gates = take("gates", (steps, batch, 4 * hidden))
    flat, inputs = gates.view(steps * batch, 4 * hidden), layer_in.reshape(steps * batch, layer_in.shape[-1])
    if module.bias:
        bias = getattr(module, "bias_ih" + sfx).detach() + getattr(module, "bias_hh" + sfx).detach()
        torch.addmm(bias, inputs, w_ih.t(), out=flat)
    else:
        torch.mm(inputs, w_ih.t(), out=flat)
    kept = Gates(
        gates, take("states", (steps + 1, batch, hidden)), take("factors", (steps, batch, 4 * hidden)),
        take("through", (steps, batch, hidden)),
    )  # fmt: skip
    forward_steps_(
        gates, out, kept.states, kept.factors, kept.through, w_hh, h_first, c_first, direction == 1, backend
    )
    return kept
