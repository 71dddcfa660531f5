r"""The per-sample rule for ``nn.LSTM`` and ``nn.GRU``: the recurrence unrolled, Linear rules on it.

The fused RNN kernels hide their gate pre-activations. The rule runs the recurrence again, one
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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import BATCH_MAJOR, Call, Layout

__all__ = ["recurrent_squares_", "accepts_recurrent"]

SEQUENCE_FIRST = Layout("axis", 1)


def _arguments(module: nn.RNNBase, call: Call) -> tuple[Tensor, object]:
    bound = inspect.signature(module.forward).bind(*call.args, **call.kwargs)
    return bound.arguments["input"], bound.arguments.get("hx")


def accepts_recurrent(module, call: Call, layouts) -> bool:
    """A batched tensor input, eval mode (or no dropout), and the samples where torch keeps them:
    the output on dim 0 (``batch_first``) or 1, the final states on dim 1."""
    x, _ = _arguments(module, call)
    if not isinstance(x, Tensor) or x.dim() != 3 or (module.training and module.dropout > 0):
        return False
    output_layout = BATCH_MAJOR if module.batch_first else SEQUENCE_FIRST
    return bool(layouts) and layouts[0] == output_layout and all(x == SEQUENCE_FIRST for x in layouts[1:])


def _leaf(t: Tensor) -> Tensor:
    """A node the backward can reach: itself if it already depends on one, else a leaf."""
    return t if t.requires_grad else t.detach().requires_grad_()


def recurrent_squares_(module, call: Call, deltas, acc, cap, layout, batch) -> None:
    from .rules import add_linear_squares_

    lstm = isinstance(module, nn.LSTM)
    x, hx = _arguments(module, call)
    x = x.detach()
    if module.batch_first:
        x = x.transpose(0, 1)  # (T, B, in): time first, as the recurrence walks
    steps, dirs = x.shape[0], 2 if module.bidirectional else 1
    hidden = module.hidden_size
    out_width = module.proj_size if lstm and module.proj_size > 0 else hidden
    states = module.num_layers * dirs
    if hx is None:
        h0 = x.new_zeros(states, batch, out_width)
        c0 = x.new_zeros(states, batch, hidden)
    elif lstm:
        h0, c0 = hx[0].detach(), hx[1].detach()
    else:
        h0, c0 = hx.detach(), None

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
