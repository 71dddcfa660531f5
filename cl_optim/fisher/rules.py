r"""Fast per-layer rules for the sum over samples of squared per-sample gradients.

A rule receives one call of a layer (its inputs), the gradients ``delta`` of a chosen scalar per
sample with respect to the call's outputs, and the :class:`~cl_optim.fisher.capture.Layout` that
says which rows belong to which sample (proved by a probe, never assumed). It adds, for each of
the layer's parameters ``w``, ``sum_n (d ell_n / d w)**2`` into an fp32 accumulator.

* ``Linear`` with one row per sample: ``sum_n (delta_n x_n^T)**2 = (delta**2)^T (x**2)``, one GEMM
  and no ``B x out x in`` memory (Goodfellow, arXiv 1510.01799). With several rows per sample
  (``(B, T, D)``, ``(T, B, D)``, tokens flattened to ``(B*T, D)``): ``G_n = sum_t delta_{n,t}
  x_{n,t}^T`` squared into the accumulator tile by tile (:mod:`cl_optim.fisher.squares`: never
  ``B x out x in`` at once).
* ``MultiheadAttention``: the q/k/v and output projections that ``F.multi_head_attention_forward``
  makes are recorded inside the forward (:mod:`~cl_optim.fisher.capture`), their output gradients
  come from the same backward, and each goes through the ``Linear`` rule; failing that, the
  projections are recomputed as leaves and the attention core run again through
  ``F.multi_head_attention_forward`` with identity projections (exact in floating point).
* ``Conv1d``/``Conv2d``: a chunk of samples' weight gradients from one grouped convolution
  backward (the samples as channel groups), squared; no im2col patches.
* ``Embedding``: rows of ``delta`` are summed per (sample, token) *before* squaring (a token
  repeated in a sample contributes one row of that sample's gradient); with
  ``scale_grad_by_freq`` the sum becomes the mean, the frequency a batch of one sample sees. A
  table looked up once for the whole batch (positions ``arange(T)``) is expanded to the batch by
  the capture, so its per-sample gradient is the sample's sum over positions.
* ``LayerNorm``/``RMSNorm`` (any number of leading dimensions), ``GroupNorm``, eval-mode
  ``BatchNorm``: ``sum_t delta * x_hat`` per sample.
* ``LSTM``/``GRU``: the recurrence unrolled with its gate pre-activations kept, each weight a
  ``Linear`` over time steps (:mod:`cl_optim.fisher.recurrent`).

Layers without a rule go through :mod:`cl_optim.fisher.fallback`.
"""

from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import BATCH_MAJOR, Call, Layout
from .squares import per_sample_sq_accumulate_

__all__ = ["Rule", "rule_for", "absorbed_children", "chunks"]

# Accumulators: parameter name within the layer ("weight", "out_proj.bias", ...) -> fp32 tensor.
Accumulators = dict[str, Tensor]


class Rule(NamedTuple):
    name: str
    apply: Callable  # (module, call, deltas, acc, cap, layout, batch) -> None
    accepts: Callable  # (module, call, layouts of its outputs) -> whether the rule is exact there


def _one_output(module, call: Call, layouts) -> bool:
    """Row-wise layers (Linear, Embedding, LayerNorm, RMSNorm): any layout of the rows."""
    return len(layouts) == 1 and layouts[0] is not None


def _batch_major(module, call: Call, layouts) -> bool:
    """Layers that mix the dimensions after the first (convolutions, channel norms)."""
    return len(layouts) == 1 and layouts[0] == BATCH_MAJOR


def _attention_layout(module, call: Call, layouts) -> bool:
    """Batched attention whose output holds the samples where ``batch_first`` says."""
    query = call.main_input() if call.args else call.kwargs.get("query")
    if (
        not isinstance(query, Tensor)
        or query.dim() != 3
        or not layouts
        or layouts[0] != Layout("axis", 0 if module.batch_first else 1)
    ):
        return False
    return all(layout == BATCH_MAJOR for layout in layouts[1:])


def chunks(batch: int, bytes_per_sample: int, cap: int):
    step = max(1, cap // max(1, bytes_per_sample))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def _rows(t: Tensor, layout: Layout, batch: int) -> Tensor:
    """``(B, rows, last)`` fp32: sample-major with every middle dimension as rows."""
    t = layout.sample_major(t, batch).to(torch.float32)
    return t.reshape(batch, -1, t.shape[-1])


def add_linear_squares_(
    x: Tensor, d: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], cap: int
) -> None:
    """``weight += sum_n (d_n^T x_n)**2``, ``bias += sum_n (sum_t d_{n,t})**2`` for sample-major
    ``x (B, R, in)`` and ``d (B, R, out)``; either accumulator may be None."""
    if x.shape[1] == 1:  # one row per sample: the GEMM identity
        if weight is not None:
            weight.addmm_(d[:, 0].square().t(), x[:, 0].square())
        if bias is not None:
            bias.add_(d[:, 0].square().sum(0))
        return
    if weight is not None:  # the per-sample products tile by tile, never B x out x in at once
        per_sample_sq_accumulate_(weight, d, x, cap=cap)
    if bias is not None:
        bias.add_(d.sum(1).square().sum(0))


def _linear(module: nn.Linear, call: Call, deltas, acc: Accumulators, cap: int, layout: Layout, batch: int):
    x, d = _rows(call.main_input(), layout, batch), _rows(deltas[0], layout, batch)
    add_linear_squares_(x, d, acc.get("weight"), acc.get("bias"), cap)


def _recorded_projections(module: nn.MultiheadAttention, call: Call, inner_deltas: list) -> Optional[list]:
    """The call's recorded projections as (input rows, output-gradient rows, weight name, rows of
    it) — rows sample-major — or None when they are not what ``multi_head_attention_forward``
    makes (then the core is run again instead)."""
    if not call.inner or len(inner_deltas) != len(call.inner):
        return None
    e = module.embed_dim
    found = []
    for (x, weight, _bias, _), d in zip(call.inner, inner_deltas):
        if weight is module.out_proj.weight:  # its input is (L * N, E), row l * N + n: interleaved
            if x.dim() != 2:
                return None
            found.append((x, d, "out_proj", slice(None), Layout("interleaved")))
            continue
        if x.dim() != 3:  # the in-projections take (L, N, E): samples on dim 1
            return None
        if module._qkv_same_embed_dim:  # a block of rows of the packed in_proj_weight
            base = module.in_proj_weight
            offset = weight.data_ptr() - base.data_ptr()
            inside = weight.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
            row_bytes = e * base.element_size()
            if (
                not inside
                or weight.stride() != (e, 1)
                or offset % row_bytes
                or not 0 <= offset // row_bytes < 3 * e
            ):
                return None
            first = offset // row_bytes
            found.append((x, d, "in_proj", slice(first, first + weight.shape[0]), Layout("axis", 1)))
            continue
        names = [n for n in "qkv" if weight is getattr(module, f"{n}_proj_weight")]
        if len(names) != 1:
            return None
        i = "qkv".index(names[0])
        found.append((x, d, f"{names[0]}_proj", slice(i * e, (i + 1) * e), Layout("axis", 1)))
    if sum(name == "out_proj" for _, _, name, _, _ in found) != 1:
        return None
    return found


def _mha_recorded(module, found, acc: Accumulators, cap: int, batch: int) -> None:
    """The per-sample squares of each recorded projection, through the ``Linear`` identity."""
    for x, d, name, rows, rows_layout in found:
        if d is None:  # no gradient reached it (a query projection whose output is unused)
            continue
        if name == "out_proj":
            weight_acc, bias_acc = acc.get("out_proj.weight"), acc.get("out_proj.bias")
        elif name == "in_proj":
            weight_acc, bias_acc = acc.get("in_proj_weight"), acc.get("in_proj_bias")
            weight_acc = None if weight_acc is None else weight_acc[rows]
            bias_acc = None if bias_acc is None else bias_acc[rows]
        else:
            weight_acc, bias_acc = acc.get(f"{name}_weight"), acc.get("in_proj_bias")
            bias_acc = None if bias_acc is None else bias_acc[rows]
        add_linear_squares_(
            _rows(x.detach(), rows_layout, batch), _rows(d, rows_layout, batch), weight_acc, bias_acc, cap
        )


def _mha(
    module: nn.MultiheadAttention, call: Call, deltas, acc: Accumulators, cap: int, layout: Layout, batch: int
):
    """Packed (or separate) q/k/v projections and the output projection of one attention call:
    from the projections the capture recorded inside the forward when it could (their output
    gradients came with the layer's), else by running the attention core again."""
    found = _recorded_projections(module, call, deltas[len(call.outputs) :])
    if found is not None:
        _mha_recorded(module, found, acc, cap, batch)
        return
    deltas = deltas[: len(call.outputs)]
    bound = inspect.signature(module.forward).bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    inputs = [a["query"], a["key"], a["value"]]
    if module.batch_first:
        inputs = [t.transpose(0, 1) for t in inputs]
    e = module.embed_dim
    if module._qkv_same_embed_dim:
        weights = [(module.in_proj_weight, "in_proj_weight", slice(i * e, (i + 1) * e)) for i in range(3)]
    else:
        weights = [(getattr(module, f"{n}_proj_weight"), f"{n}_proj_weight", slice(None)) for n in "qkv"]
    bias = module.in_proj_bias
    projections = []
    with torch.no_grad():
        for i, (x, (w, _, rows)) in enumerate(zip(inputs, weights)):
            b = None if bias is None else bias.detach()[i * e : (i + 1) * e]
            projections.append(F.linear(x, w.detach()[rows], b).requires_grad_())
    eye = torch.eye(e, dtype=projections[0].dtype, device=projections[0].device)
    detached = [None if t is None else t.detach() for t in (module.bias_k, module.bias_v)]
    with torch.enable_grad():
        context, attention = F.multi_head_attention_forward(
            *projections, e, module.num_heads, None, None, *detached, module.add_zero_attn, 0.0, eye, None,
            training=False, key_padding_mask=a["key_padding_mask"], need_weights=a["need_weights"],
            attn_mask=a["attn_mask"], use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye,
            v_proj_weight=eye, average_attn_weights=a["average_attn_weights"], is_causal=a["is_causal"],
        )  # fmt: skip
    out_delta = deltas[0] if deltas[0] is not None else torch.zeros_like(call.outputs[0])
    if module.batch_first:
        out_delta = out_delta.transpose(0, 1)  # (L, N, E), as the context
    sequence_first = Layout("axis", 1)
    add_linear_squares_(
        _rows(context.detach(), sequence_first, batch), _rows(out_delta, sequence_first, batch),
        acc.get("out_proj.weight"), acc.get("out_proj.bias"), cap,
    )  # fmt: skip
    outputs, grads = [context], [out_delta.to(context.dtype) @ module.out_proj.weight.detach()]
    if len(deltas) > 1 and deltas[1] is not None and attention is not None:
        outputs.append(attention)
        grads.append(deltas[1].to(attention.dtype))
    projection_deltas = torch.autograd.grad(outputs, projections, grads, allow_unused=True)
    for i, (x, d, (_, name, rows)) in enumerate(zip(inputs, projection_deltas, weights)):
        if d is None:
            continue
        weight_acc = acc.get(name)
        bias_acc = acc.get("in_proj_bias")
        add_linear_squares_(
            _rows(x, sequence_first, batch), _rows(d, sequence_first, batch),
            None if weight_acc is None else weight_acc[rows],
            None if bias_acc is None else bias_acc[i * e : (i + 1) * e], cap,
        )  # fmt: skip


def _conv(module: nn.Module, call: Call, deltas, acc: Accumulators, cap: int, layout: Layout, batch: int):
    x = call.main_input().to(torch.float32)
    d = deltas[0].to(torch.float32)  # (B, Cout, *spatial)
    if "weight" in acc:
        # The per-sample weight gradients of a chunk from one convolution backward with the samples
        # side by side as channel groups: input (1, b*Cin, ...), output gradient (1, b*Cout, ...),
        # groups = b give (b*Cout, Cin, *k), group n being sample n's gradient alone (as vmap's
        # batching rule does). No im2col patches (Cin*k values per output position); 14-20% less
        # time than patches and a batched GEMM on bench_fisher's CNN and Conv1d models. The chunk's
        # gradients and their squares count against the cap.
        weight = acc["weight"]
        cin, cout, spatial = x.shape[1], module.out_channels, len(module.kernel_size)
        for part in chunks(batch, 2 * weight.numel() * 4, cap):
            b = part.stop - part.start
            grads = torch.ops.aten.convolution_backward(
                d[part].reshape(1, b * cout, *d.shape[2:]), x[part].reshape(1, b * cin, *x.shape[2:]),
                d.new_empty(1).expand(b * cout, cin, *module.kernel_size), None, module.stride, module.padding,
                module.dilation, False, [0] * spatial, b, (False, True, False),
            )[1]  # fmt: skip
            # reshape: a one-sample chunk of a channels_last input may come back in that layout
            weight.add_(grads.reshape(b, -1).square_().sum(0).view_as(weight))
    if "bias" in acc:
        acc["bias"].add_(d.reshape(batch, module.out_channels, -1).sum(2).square().sum(0))


def _embedding(
    module: nn.Embedding, call: Call, deltas, acc: Accumulators, cap: int, layout: Layout, batch: int
):
    if "weight" not in acc:
        return
    tokens = layout.sample_major(call.main_input(), batch).reshape(batch, -1)
    rows = layout.sample_major(deltas[0], batch).to(torch.float32).reshape(batch, tokens.shape[1], -1)
    vocab = module.num_embeddings
    sample = torch.arange(batch, device=tokens.device).unsqueeze(1).expand_as(tokens)
    keys = (sample * vocab + tokens).reshape(-1)
    unique, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    per_sample_rows = torch.zeros(unique.numel(), rows.shape[-1], device=rows.device)
    per_sample_rows.index_add_(0, inverse, rows.reshape(-1, rows.shape[-1]))  # sum repeats first
    if module.scale_grad_by_freq:  # torch divides by the token's count in the call: one sample's
        per_sample_rows /= counts.unsqueeze(1).to(per_sample_rows.dtype)
    token_of_row = unique % vocab
    squares = per_sample_rows.square()
    if module.padding_idx is not None:  # torch gives the padding row no gradient
        squares[token_of_row == module.padding_idx] = 0
    acc["weight"].index_add_(0, token_of_row, squares)


def _affine_sums(x_hat: Tensor, d: Tensor, acc: Accumulators) -> None:
    """``x_hat``, ``d``: ``(B, rows, features...)``; sums over rows per sample, then squares."""
    if "weight" in acc:
        acc["weight"].add_((d * x_hat).sum(1).square().sum(0).view_as(acc["weight"]))
    if "bias" in acc:
        acc["bias"].add_(d.sum(1).square().sum(0).view_as(acc["bias"]))


def _normalised_rows(call: Call, deltas, layout: Layout, batch: int, features: int):
    """Sample-major ``(B, rows, *features)`` fp32 input and delta of a norm over the last dims."""
    x = layout.sample_major(call.main_input(), batch).to(torch.float32)
    d = layout.sample_major(deltas[0], batch).to(torch.float32)
    shape = (batch, -1, *x.shape[x.dim() - features :])
    return x.reshape(shape), d.reshape(shape)


def _layer_norm(
    module: nn.LayerNorm, call: Call, deltas, acc: Accumulators, cap: int, layout: Layout, batch: int
):
    features = len(module.normalized_shape)
    x, d = _normalised_rows(call, deltas, layout, batch, features)
    # F.layer_norm without affine: the same (x - mean) / sqrt(var + eps), fused (x.var is slow)
    _affine_sums(F.layer_norm(x, x.shape[2:], eps=module.eps), d, acc)


def _rms_norm(module: nn.Module, call: Call, deltas, acc: Accumulators, cap: int, layout: Layout, batch: int):
    features = len(module.normalized_shape)
    eps = module.eps if module.eps is not None else torch.finfo(call.main_input().dtype).eps
    x, d = _normalised_rows(call, deltas, layout, batch, features)
    dims = tuple(range(2, x.dim()))
    _affine_sums(x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps), d, acc)


def _group_norm(
    module: nn.GroupNorm, call: Call, deltas, acc: Accumulators, cap: int, layout: Layout, batch: int
):
    x = call.main_input().to(torch.float32)
    channels = x.shape[1]
    x_hat = F.group_norm(x, module.num_groups, eps=module.eps).reshape(batch, channels, -1)
    d = deltas[0].to(torch.float32).reshape(batch, channels, -1)
    _affine_sums(x_hat.transpose(1, 2), d.transpose(1, 2), acc)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, call: Call, deltas, acc, cap, layout, batch):
    x = call.main_input().to(torch.float32)
    channels = x.shape[1]
    shape = (1, channels, 1)
    x = x.reshape(batch, channels, -1)
    mean = module.running_mean.to(torch.float32).view(shape)
    var = module.running_var.to(torch.float32).view(shape)
    x_hat = (x - mean) / torch.sqrt(var + module.eps)
    d = deltas[0].to(torch.float32).reshape(batch, channels, -1)
    _affine_sums(x_hat.transpose(1, 2), d.transpose(1, 2), acc)


def absorbed_children(module: nn.Module) -> list[str]:
    """Children whose parameters ``module`` uses directly, without calling them (attention's
    ``out_proj``): they belong to the parent's layer."""
    return ["out_proj"] if isinstance(module, nn.MultiheadAttention) else []


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The fast rule for a module, or None; refuses modules whose samples interact."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or not module.track_running_stats:
            raise RuntimeError(
                f"per-sample Fisher through {type(module).__name__} in train mode (or without running "
                "statistics) is undefined: its output mixes the samples of a batch. Estimate in eval "
                "mode (the default) or replace it with GroupNorm"
            )
        return Rule("batchnorm-eval", _batch_norm, _batch_major)
    kind = type(module)
    if kind is nn.Linear:
        return Rule("linear", _linear, _one_output)
    if kind in (nn.LSTM, nn.GRU):
        from .recurrent import accepts_recurrent, recurrent_squares_

        return Rule("recurrent", recurrent_squares_, accepts_recurrent)
    if kind is nn.MultiheadAttention and not module.training and module.bias_k is None:
        return Rule("attention", _mha, _attention_layout)
    plain_conv = kind in (nn.Conv1d, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
    if plain_conv and not isinstance(module.padding, str):
        return Rule("conv", _conv, _batch_major)
    if kind is nn.Embedding and module.max_norm is None:
        return Rule("embedding", _embedding, _one_output)
    if kind is nn.LayerNorm:
        return Rule("layernorm", _layer_norm, _one_output)
    if kind is getattr(nn, "RMSNorm", None):
        return Rule("rmsnorm", _rms_norm, _one_output)
    if kind is nn.GroupNorm:
        return Rule("groupnorm", _group_norm, _batch_major)
    return None
