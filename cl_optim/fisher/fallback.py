"""The slower ways to per-sample squares, each right where the one before cannot be used.

1. ``layer_vmapped_squares_``: ``torch.func`` (``vmap`` over ``grad``) on one layer call, its
   samples along one axis of every output (tuple outputs such as LSTM's, keyword inputs whose
   sample axis is the batch are split per sample too).
2. ``layer_looped_squares_``: the layer run on one sample at a time (for layers ``vmap`` cannot
   trace, such as GRU).
3. ``model_vmapped_squares_``: ``torch.func`` on the whole model for the given parameters (a layer
   whose samples cannot be separated at its own output, tied weights, parameters used outside
   their module).
4. ``model_looped_squares_``: the model run on one sample at a time: the definition itself.

All accumulate ``sum_n (d <v_n, out_n> / d w)**2`` in fp32 under a memory cap.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .batch import Batch, logits
from .rules import chunks

__all__ = [
    "layer_vmapped_squares_",
    "layer_looped_squares_",
    "model_vmapped_squares_",
    "model_looped_squares_",
]


def _split(args, kwargs, in_axes: list):
    """Flattened inputs, the sample axis of each (None: shared by the samples), and the tree."""
    leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
    if len(in_axes) != len(leaves):
        raise ValueError("the layer's inputs changed structure since it was planned")
    return leaves, list(in_axes), spec


def model_input_axes(batch: Batch) -> list:
    """The model's inputs hold the samples on dim 0 where their leading dimension is the batch."""
    leaves, _ = tree_flatten((tuple(batch.args), dict(batch.kwargs)))
    return [0 if isinstance(t, Tensor) and t.dim() and t.shape[0] == batch.size else None for t in leaves]


def vmapped_squares_(
    module: nn.Module,
    params: dict,
    args,
    kwargs,
    cotangents: list,
    acc: dict,
    cap: int,
    dims: list,
    outputs: Callable,
    in_axes: list,
) -> None:
    """``acc[name] += sum_n (d sum_k <cotangents[k]_n, outputs(module(inputs_n))[k]> / d params[name])**2``
    with ``vmap`` over ``grad``. Output ``k`` and its cotangent hold the samples along ``dims[k]``,
    flattened input ``i`` along ``in_axes[i]`` (None: shared, passed whole); inputs are split one
    sample at a time, kept as a batch of one."""
    from torch.func import functional_call, grad, vmap

    pairs = [(k, c, dims[k]) for k, c in enumerate(cotangents) if c is not None]
    if not pairs or not params:
        return
    batch = pairs[0][1].shape[pairs[0][2]]
    leaves, axes, spec = _split(args, kwargs, in_axes)
    mapped = [i for i, d in enumerate(axes) if d is not None]

    def contracted(p, sample_inputs, sample_cotangents):
        call = list(leaves)
        for i, t in zip(mapped, sample_inputs):
            call[i] = t.unsqueeze(axes[i])
        call_args, call_kwargs = tree_unflatten(call, spec)
        out = outputs(functional_call(module, p, call_args, call_kwargs))
        total = 0.0
        for (k, _, d), c in zip(pairs, sample_cotangents):
            total = total + (out[k].select(d, 0).to(torch.float32) * c).sum()
        return total

    inputs = tuple(leaves[i].detach() for i in mapped)
    cots = tuple(c.to(torch.float32) for _, c, _ in pairs)
    in_dims = (None, tuple(axes[i] for i in mapped), tuple(d for _, _, d in pairs))
    per_sample = sum(acc[name].numel() for name in params) * 4
    for part in chunks(batch, per_sample, cap):
        # Outside no_grad the result would also be tracked through the parameters not mapped
        # (grad is a function transform: it ignores the outer no_grad for its own inputs). A failure
        # part-way is safe: the engine adds into a scratch copy and falls back on any exception.
        with torch.no_grad():
            grads = vmap(grad(contracted), in_dims=in_dims)(
                params,
                tuple(t.narrow(axes[i], part.start, part.stop - part.start) for i, t in zip(mapped, inputs)),
                tuple(c.narrow(d, part.start, part.stop - part.start) for c, (_, _, d) in zip(cots, pairs)),
            )
        for name in params:
            acc[name].add_(grads[name].to(torch.float32).square().sum(0))


def layer_vmapped_squares_(module, call, deltas, acc, cap, dims, in_axes) -> None:
    params = {name: module.get_parameter(name).detach() for name in acc}
    vmapped_squares_(
        module, params, call.args, call.kwargs, deltas, acc, cap, dims, call.pick_outputs, in_axes
    )


def layer_looped_squares_(module, call, delta_sets: list, acc, dims, in_axes) -> None:
    """One sample at a time through the layer alone, for every set of output cotangents."""
    params = [module.get_parameter(name) for name in acc]
    present = [ds for ds in delta_sets if any(d is not None for d in ds)]
    if not present or not params:
        return
    k, first = next((k, d) for k, d in enumerate(present[0]) if d is not None)
    batch = first.shape[dims[k]]
    leaves, axes, spec = _split(call.args, call.kwargs, in_axes)
    for n in range(batch):
        sample = [t if d is None else t.narrow(d, n, 1) for t, d in zip(leaves, axes)]
        sample_args, sample_kwargs = tree_unflatten(sample, spec)
        with torch.enable_grad():
            out = call.pick_outputs(module(*sample_args, **sample_kwargs))
        for ds in present:
            total = sum(
                (o.to(torch.float32) * d.narrow(dim, n, 1).to(torch.float32)).sum()
                for o, d, dim in zip(out, ds, dims)
                if d is not None
            )
            grads = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
            for name, g in zip(acc, grads):
                if g is not None:
                    g = g.to(torch.float32)
                    acc[name].addcmul_(g, g)  # one pass, no temporary


def model_vmapped_squares_(model, params: dict, batch: Batch, seeds: list, acc: dict, cap: int) -> None:
    for seed in seeds:
        vmapped_squares_(
            model, params, batch.args, batch.kwargs, [seed], acc, cap, [0], lambda out: [logits(out)],
            model_input_axes(batch),
        )  # fmt: skip


def model_looped_squares_(model, params: dict, batch: Batch, seeds: list, acc: dict) -> list:
    """The definition: each sample alone through the model, one backward per seed. Returns the
    samples' outputs (detached)."""
    names = list(params)
    tensors = [params[name] for name in names]
    outputs = []
    for n in range(batch.size):
        part = batch.rows(n, n + 1)
        with torch.enable_grad():
            out = logits(model(*part.args, **part.kwargs))
        if out.shape[0] != 1:
            raise ValueError(
                f"the model's output has {out.shape[0]} rows for one sample: fisher.estimate needs one "
                "row of logits per sample"
            )
        outputs.append(out.detach())
        for seed in seeds:
            grads = torch.autograd.grad(
                out, tensors, seed[n : n + 1].to(out.dtype), retain_graph=True, allow_unused=True
            )
            for name, g in zip(names, grads):
                if g is not None:
                    g = g.to(torch.float32)
                    acc[name].addcmul_(g, g)  # one pass, no temporary
            # Freed before the next sample's are made, which then take their memory: two sets
            # alive at once cost the self-check of bench_fisher's MLP about 400 page faults.
            grads = g = None
    return outputs
