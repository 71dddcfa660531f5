r"""Per-layer rules for the sum over samples of squared per-sample gradients.

Each rule receives what a layer saw in one forward — its inputs ``x`` and the gradient ``delta``
of a chosen scalar per sample with respect to its output — and adds, for each of the layer's own
parameters ``w``, ``sum_n (d ell_n / d w)**2`` into an fp32 accumulator. Samples must not
interact inside the network (no BatchNorm in train mode); the layer must run once per forward.

* ``Linear`` on ``(B, in)``: ``sum_n (delta_n x_n^T)**2 = (delta**2)^T (x**2)``, one GEMM and no
  ``B x out x in`` memory (Goodfellow, arXiv 1510.01799).
* ``Linear`` on ``(B, T..., in)``, ``Conv1d``/``Conv2d``: the per-sample gradient
  ``G_n = sum_t delta_{n,t} x_{n,t}^T`` (im2col patches for convolutions) is formed for a chunk of
  samples at a time, under a memory cap, then squared.
* ``Embedding``: rows of ``delta`` are summed per (sample, token) *before* squaring, since a token
  repeated in a sample contributes one per-sample gradient row.
* ``LayerNorm``/``GroupNorm``/eval-mode ``BatchNorm`` affine: ``sum_t delta * x_hat`` per sample.
* anything else: ``torch.func`` (``vmap`` over ``grad``) on the module alone, in chunks.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["add_sq_grads_", "add_vmapped_squares_", "rule_for"]

# Accumulators: parameter name within the module ("weight", "bias", ...) -> fp32 tensor.
Accumulators = dict[str, Tensor]


def _chunks(batch: int, bytes_per_sample: int, cap: int):
    step = max(1, cap // max(1, bytes_per_sample))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def _linear(module: nn.Linear, args, kwargs, delta: Tensor, acc: Accumulators, cap: int) -> None:
    x = args[0].to(torch.float32)
    d = delta.to(torch.float32)
    if x.dim() == 2:
        if "weight" in acc:
            acc["weight"].addmm_(d.square().t(), x.square())
        if "bias" in acc:
            acc["bias"].add_(d.square().sum(0))
        return
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
    d = d.reshape(d.shape[0], -1, d.shape[-1])  # (B, T, out)
    if "weight" in acc:
        per_sample = module.out_features * module.in_features * 4
        for part in _chunks(x.shape[0], per_sample, cap):
            grads = torch.bmm(d[part].transpose(1, 2), x[part])  # (b, out, in)
            acc["weight"].add_(grads.square().sum(0))
    if "bias" in acc:
        acc["bias"].add_(d.sum(1).square().sum(0))


def _conv(module: nn.Module, args, kwargs, delta: Tensor, acc: Accumulators, cap: int) -> None:
    x = args[0].to(torch.float32)
    d = delta.to(torch.float32)
    two_d = isinstance(module, nn.Conv2d)
    if not two_d:  # Conv1d as a 1 x k Conv2d
        x, d = x.unsqueeze(2), d.unsqueeze(2)
    kernel = module.kernel_size if two_d else (1, module.kernel_size[0])
    dilation = module.dilation if two_d else (1, module.dilation[0])
    padding = module.padding if two_d else (0, module.padding[0])
    stride = module.stride if two_d else (1, module.stride[0])
    batch = x.shape[0]
    d = d.reshape(batch, module.out_channels, -1)  # (B, Cout, L)
    if "weight" in acc:
        per_sample = module.out_channels * x.shape[1] * math.prod(kernel) * 4
        for part in _chunks(batch, per_sample, cap):
            patches = F.unfold(x[part], kernel, dilation=dilation, padding=padding, stride=stride)
            grads = torch.bmm(d[part], patches.transpose(1, 2))  # (b, Cout, Cin * k)
            acc["weight"].add_(grads.square().sum(0).view_as(acc["weight"]))
    if "bias" in acc:
        acc["bias"].add_(d.sum(2).square().sum(0))


def _embedding(module: nn.Embedding, args, kwargs, delta: Tensor, acc: Accumulators, cap: int) -> None:
    if "weight" not in acc:
        return
    index = args[0]
    batch = index.shape[0]
    tokens = index.reshape(batch, -1)
    rows = delta.to(torch.float32).reshape(batch, tokens.shape[1], -1)
    vocab = module.num_embeddings
    sample = torch.arange(batch, device=index.device).unsqueeze(1).expand_as(tokens)
    keys = (sample * vocab + tokens).reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    per_sample_rows = torch.zeros(unique.numel(), rows.shape[-1], device=rows.device)
    per_sample_rows.index_add_(0, inverse, rows.reshape(-1, rows.shape[-1]))  # sum repeats first
    token_of_row = unique % vocab
    squares = per_sample_rows.square()
    if module.padding_idx is not None:  # torch gives the padding row no gradient
        squares[token_of_row == module.padding_idx] = 0
    acc["weight"].index_add_(0, token_of_row, squares)


def _affine_sums(x_hat: Tensor, d: Tensor, reduce_dims: tuple, acc: Accumulators) -> None:
    if "weight" in acc:
        acc["weight"].add_((d * x_hat).sum(reduce_dims).square().sum(0).view_as(acc["weight"]))
    if "bias" in acc:
        acc["bias"].add_(d.sum(reduce_dims).square().sum(0).view_as(acc["bias"]))


def _layer_norm(module: nn.LayerNorm, args, kwargs, delta: Tensor, acc: Accumulators, cap: int) -> None:
    x = args[0].to(torch.float32)
    dims = tuple(range(x.dim() - len(module.normalized_shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + module.eps)
    middle = tuple(range(1, x.dim() - len(module.normalized_shape)))
    _affine_sums(x_hat, delta.to(torch.float32), middle, acc)


def _group_norm(module: nn.GroupNorm, args, kwargs, delta: Tensor, acc: Accumulators, cap: int) -> None:
    x = args[0].to(torch.float32)
    batch, channels = x.shape[:2]
    grouped = x.reshape(batch, module.num_groups, -1)
    mean = grouped.mean(2, keepdim=True)
    var = grouped.var(2, unbiased=False, keepdim=True)
    x_hat = ((grouped - mean) / torch.sqrt(var + module.eps)).reshape(batch, channels, -1)
    _affine_sums(x_hat, delta.to(torch.float32).reshape(batch, channels, -1), (2,), acc)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, args, kwargs, delta, acc, cap) -> None:
    x = args[0].to(torch.float32)
    batch, channels = x.shape[:2]
    shape = (1, channels, 1)
    x = x.reshape(batch, channels, -1)
    mean = module.running_mean.to(torch.float32).view(shape)
    var = module.running_var.to(torch.float32).view(shape)
    x_hat = (x - mean) / torch.sqrt(var + module.eps)
    _affine_sums(x_hat, delta.to(torch.float32).reshape(batch, channels, -1), (2,), acc)


def add_vmapped_squares_(module: nn.Module, params: dict, args, kwargs, seed: Tensor, acc: Accumulators, cap: int,
                         output: Callable = lambda out: out) -> None:  # fmt: skip
    """``acc[name] += sum_n (d <seed_n, output(module(inputs_n))> / d params[name])**2`` with
    torch.func (``vmap`` over ``grad``), in chunks under the memory cap ``cap``.

    Inputs whose leading dimension is the batch (``seed``'s), positional or keyword, are mapped
    over one sample at a time; the others (position ids of shape (1, T), flags) are passed whole.
    """
    from torch.func import functional_call, grad, vmap

    batch = seed.shape[0]
    mapped_args = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.shape[:1] == (batch,)]
    mapped_keys = [k for k, v in kwargs.items() if isinstance(v, Tensor) and v.shape[:1] == (batch,)]

    def contracted(p, sample_args, sample_kwargs, seed_n):
        call_args, call_kwargs = list(args), dict(kwargs)
        for i, a in zip(mapped_args, sample_args):
            call_args[i] = a.unsqueeze(0)
        for k, v in zip(mapped_keys, sample_kwargs):
            call_kwargs[k] = v.unsqueeze(0)
        out = output(functional_call(module, p, tuple(call_args), call_kwargs))
        return (out.squeeze(0).to(torch.float32) * seed_n).sum()

    sample_args = tuple(args[i].detach() for i in mapped_args)
    sample_kwargs = tuple(kwargs[k].detach() for k in mapped_keys)
    per_sample = sum(acc[name].numel() for name in params) * 4
    for part in _chunks(batch, per_sample, cap):
        grads = vmap(grad(contracted), in_dims=(None, 0, 0, 0))(
            params,
            tuple(a[part] for a in sample_args),
            tuple(v[part] for v in sample_kwargs),
            seed[part].to(torch.float32),
        )
        for name in params:
            acc[name].add_(grads[name].to(torch.float32).square().sum(0))


def _generic(module: nn.Module, args, kwargs, delta: Tensor, acc: Accumulators, cap: int) -> None:
    """torch.func fallback: per-sample vector-Jacobian products of the module's own parameters."""
    own = dict(module.named_parameters(recurse=False))
    add_vmapped_squares_(module, {name: own[name].detach() for name in acc}, args, kwargs, delta, acc, cap)


Rule = Callable[..., None]


def rule_for(module: nn.Module) -> tuple[Rule, str]:
    """The rule for a module and its name, refusing modules whose samples interact."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or not module.track_running_stats:
            raise RuntimeError(
                f"per-sample Fisher through {type(module).__name__} in train mode (or without running "
                "statistics) is undefined: its output mixes the samples of a batch. Estimate in eval "
                "mode (the default) or replace it with GroupNorm"
            )
        return _batch_norm, "batchnorm-eval"
    if type(module) is nn.Linear:
        return _linear, "linear"
    plain_conv = type(module) in (nn.Conv1d, nn.Conv2d)
    if (
        plain_conv
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return _conv, "conv"
    if type(module) is nn.Embedding and module.max_norm is None:
        return _embedding, "embedding"
    if type(module) is nn.LayerNorm:
        return _layer_norm, "layernorm"
    if type(module) is nn.GroupNorm:
        return _group_norm, "groupnorm"
    return _generic, "torch.func"


def add_sq_grads_(module, args, kwargs, delta, acc, cap) -> None:
    rule, _ = rule_for(module)
    rule(module, args, kwargs, delta, acc, cap)
