r"""Permutation alignment before merging: weight matching (Ainsworth, Hayase & Srinivasa, "Git
Re-Basin: Merging Models modulo Permutation Symmetries", ICLR 2023).

**Same function, different parameters.** A hidden layer's units can be listed in any order. For
``h = sigma(W1 x + b1)``, ``y = W2 h + b2``, an elementwise ``sigma`` and any permutation matrix
``P`` (``P^T P = I``)::

    sigma(P W1 x + P b1) = P sigma(W1 x + b1) = P h,    (W2 P^T)(P h) = W2 h,

so ``(P W1, P b1, W2 P^T, b2)`` computes exactly the function of ``(W1, b1, W2, b2)``. A
BatchNorm between the layers normalises each unit on its own, so permuting its ``weight``,
``bias``, ``running_mean`` and ``running_var`` with the same ``P`` keeps the function too; a
Conv2d's output channels play the part of the units. Two networks trained from different
initialisations therefore tend to differ by such a relabelling on top of any real difference, and
averaging them unit by unit mixes unrelated units: the loss on the line between them rises (the
barrier). Aligning one to the other first removes the relabelling.

**Weight matching** chooses one permutation ``P_l`` per hidden boundary ``l`` (``P_0`` and
``P_L``, the input and the output, are the identity) to bring ``B`` closest to ``A``::

    max_P  sum_l < W_l^A, P_l W_l^B P_{l-1}^T >_F       (equivalently  min sum_l ||W^A - P W^B P^T||^2)

where the sum runs over every permuted entry (biases and BatchNorm entries with rows only). With
every permutation but ``P_l`` fixed the objective is linear in ``P_l``, ``sum_i C[i, pi(i)]``
with ``C = sum_k W_k^A (W_k^B)'^T`` (each entry ``k`` the boundary touches, its permuted axis
moved first and the other axes, already permuted by their own permutations, flattened): a linear
assignment problem. :func:`weight_matching` solves these in turn, in a random order, until a whole
sweep improves nothing (coordinate descent; every accepted step raises the objective, so it ends).

* :func:`mlp_chain`: the permutation spec of a plain chain of Linear/Conv2d layers (with optional
  BatchNorm), read off ``model.named_modules()``;
* :func:`weight_matching`: ``other`` permuted to match ``reference``, and the permutations.

A spec is a list with one dict per permutation (a hidden boundary)::

    {"name": "0->2", "size": 16, "axes": {"0.weight": 0, "0.bias": 0, "1.weight": 0, ..., "2.weight": 1}}

``axes`` maps a ``state_dict`` key to the axis this permutation reorders; ``name`` and ``size``
are optional in a hand-written spec (``size`` is then read off the tensors). A permuted entry
``k`` of the result is ``other[k].index_select(axis, perm)`` along each of its permuted axes.

Example:
    >>> import torch
    >>> from cl_optim.merge.align import mlp_chain, weight_matching
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> spec = mlp_chain(net)
    >>> spec[0]["name"], spec[0]["size"], spec[0]["axes"]
    ('0->2', 4, {'0.weight': 0, '0.bias': 0, '2.weight': 1})
    >>> ref = net.state_dict()
    >>> p = torch.tensor([2, 0, 3, 1])  # relabel the hidden units by hand
    >>> other = {"0.weight": ref["0.weight"][p], "0.bias": ref["0.bias"][p],
    ...          "2.weight": ref["2.weight"][:, p], "2.bias": ref["2.bias"]}
    >>> aligned, perms = weight_matching(ref, other, spec)
    >>> perms[0]  # the inverse of p
    tensor([1, 3, 0, 2])
    >>> all(torch.equal(aligned[k], ref[k]) for k in ref)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = ["mlp_chain", "weight_matching"]

# The state_dict entries each supported module may own (anything else, e.g. weight_norm's
# weight_g/weight_v, means the module is not the plain layer the spec assumes).
_LAYER_KEYS = {"weight", "bias"}
_NORM_KEYS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
# Of a BatchNorm's entries, those indexed by channel (num_batches_tracked is a scalar).
_NORM_PERMUTED = ("weight", "bias", "running_mean", "running_var")


def mlp_chain(model: nn.Module) -> list[dict]:
    r"""The permutation spec of a plain chain of ``Linear``/``Conv2d`` layers.

    Walks ``model.named_modules()`` in order, which must be the order of computation (true of
    ``nn.Sequential``). Between two consecutive weight layers ``L`` and ``L'`` lies one hidden
    boundary of ``n = L.out`` units; its permutation ``P`` reorders::

        L.weight rows, L.bias            (axis 0)     # P W, P b
        BatchNorm weight, bias, running_mean, running_var between them (axis 0)
        L'.weight columns                (axis 1)     # W' P^T

    The input of the first layer and the output of the last are never permuted. Parameter-free
    modules (activations, dropout, pooling, a flatten of 1x1 maps) are assumed to act on each unit
    or channel on its own, which every elementwise activation does. Refused with a ValueError: a
    layer whose input size is not the previous layer's output size (a flatten of ``C x H x W``
    maps into a Linear, say), a BatchNorm of another size, grouped convolutions, and any other
    module that owns parameters or buffers (LayerNorm, Embedding, ...), which this spec cannot
    describe.

    Returns one dict per boundary, in order: ``{"name": "L->L'", "size": n, "axes": {key: axis}}``.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU(),
        ...                           torch.nn.Linear(3, 1))
        >>> [(s["name"], s["size"], sorted(s["axes"].items())) for s in mlp_chain(net)]  # doctest: +NORMALIZE_WHITESPACE
        [('0->3', 3, [('0.bias', 0), ('0.weight', 0), ('1.bias', 0), ('1.running_mean', 0),
                      ('1.running_var', 0), ('1.weight', 0), ('3.weight', 1)])]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mlp_chain needs an nn.Module, got {type(model).__name__}")
    spec: list[dict] = []
    previous = None  # (name, out size) of the last weight layer seen
    pending: dict = {}  # keys permuted on axis 0 by the boundary after `previous`
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        what = (
            f"module {name!r} ({type(module).__name__})" if name else f"the model ({type(module).__name__})"
        )
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        if any(True for _ in module.children()):
            # A container: its children are visited next. One holding parameters of its own uses
            # them in a way the chain cannot see (e.g. a parametrized Linear).
            if own:
                raise ValueError(
                    f"mlp_chain cannot describe {what}: it has children and parameters of its own "
                    f"({', '.join(n for n, _ in own)})"
                )
            continue
        local = set(module.state_dict())
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise ValueError(
                    f"mlp_chain cannot describe {what}: grouped convolution (groups={module.groups})"
                )
            if "weight" not in local or not local <= _LAYER_KEYS:
                raise ValueError(
                    f"mlp_chain cannot describe {what}: expected entries weight and bias, got {sorted(local)}"
                )
            if isinstance(module.weight, nn.parameter.UninitializedParameter):
                raise ValueError(f"mlp_chain cannot describe {what}: a lazy layer not yet initialised")
            fan_in, fan_out = (
                (module.in_features, module.out_features)
                if isinstance(module, nn.Linear)
                else (module.in_channels, module.out_channels)
            )
            if previous is not None:
                if fan_in != previous[1]:
                    raise ValueError(
                        f"mlp_chain cannot describe {what}: it takes {fan_in} inputs but the previous "
                        f"layer {previous[0]!r} gives {previous[1]} (not a plain chain, e.g. a flatten "
                        "of several positions per channel)"
                    )
                pending[f"{prefix}weight"] = 1
                spec.append({"name": f"{previous[0]}->{name}", "size": previous[1], "axes": pending})
            pending = {f"{prefix}{key}": 0 for key in ("weight", "bias") if key in local}
            previous = (name, fan_out)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not local <= _NORM_KEYS:
                raise ValueError(
                    f"mlp_chain cannot describe {what}: unexpected entries {sorted(local - _NORM_KEYS)}"
                )
            if previous is None:
                continue  # normalises the input, which is never permuted
            if module.num_features != previous[1]:
                raise ValueError(
                    f"mlp_chain cannot describe {what}: {module.num_features} features after layer "
                    f"{previous[0]!r} with {previous[1]} outputs"
                )
            pending.update({f"{prefix}{key}": 0 for key in _NORM_PERMUTED if key in local})
        elif own:
            raise ValueError(
                f"mlp_chain cannot describe {what}: only Linear, Conv2d and BatchNorm1d/2d may own "
                f"parameters or buffers in a chain (it has {', '.join(n for n, _ in own)})"
            )
    # The last layer's outputs (and a BatchNorm after it) are the model's output: not permuted.
    return spec


def weight_matching(
    reference: Mapping[str, Tensor],
    other: Mapping[str, Tensor],
    spec: Sequence[Mapping],
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> tuple[dict, list[Tensor]]:
    r"""``other`` relabelled to match ``reference``: Git Re-Basin's weight matching.

    Maximises, over one permutation ``pi_p`` per entry of ``spec``, the sum over every permuted
    entry ``k`` of ``<reference[k], other[k] permuted>_F`` (a layer's weight with its rows
    permuted by its own boundary and its columns by the previous one). By coordinate descent:
    starting from the identity, each sweep visits the boundaries in a random order (a
    ``torch.Generator`` seeded with ``seed``) and replaces ``pi_p`` by the solution of the linear
    assignment problem (``scipy.optimize.linear_sum_assignment``, maximize)::

        C = sum_{k touched by p} R_k O_k^T,   pi_p = argmax_pi sum_i C[i, pi(i)]

    with ``R_k`` the reference entry and ``O_k`` the other entry with its other axes permuted by
    the current permutations, the axis of ``p`` moved first and the rest flattened (a Conv2d
    weight ``(out, in, kh, kw)`` becomes ``(out, in*kh*kw)`` or ``(in, out*kh*kw)``). A new
    ``pi_p`` is kept only if it raises the objective, so each sweep is monotone; it stops after a
    sweep that changes nothing, or after ``max_iter`` sweeps. The costs are accumulated in fp64.

    Returns ``(aligned, perms)``: a new ``state_dict`` with exactly the keys of ``other`` in its
    order (permuted entries ``other[k].index_select(axis, perms[p])``, the rest copied; dtypes
    kept), and one int64 index tensor per spec entry (on the CPU). If ``other`` is ``reference``
    with units relabelled by ``q``, ``perms[p]`` is the inverse of ``q``. Neither input is
    modified and nothing returned aliases them.

    Example:
        >>> import torch
        >>> ref = {"a.weight": torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]),
        ...        "b.weight": torch.tensor([[1.0, 2.0, 3.0]])}
        >>> spec = [{"axes": {"a.weight": 0, "b.weight": 1}}]
        >>> other = {"a.weight": ref["a.weight"][[2, 0, 1]], "b.weight": ref["b.weight"][:, [2, 0, 1]]}
        >>> aligned, perms = weight_matching(ref, other, spec)
        >>> perms
        [tensor([1, 2, 0])]
        >>> aligned["b.weight"]
        tensor([[1., 2., 3.]])
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as error:
        raise ImportError(
            "weight_matching solves linear assignment problems with scipy: pip install scipy"
        ) from error
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    _check_states(reference, other)
    perm_axes, sizes, names = _check_spec(spec, other)

    # Per key, the (permutation index, axis) pairs that reorder it; the fp64 copies the costs use,
    # on other's device (only the permuted entries, once).
    by_key: dict[str, list[tuple[int, int]]] = {}
    for p, axes in enumerate(perm_axes):
        for key, axis in axes.items():
            by_key.setdefault(key, []).append((p, axis))
    device = {key: other[key].device for key in by_key}
    ref64 = {key: reference[key].detach().to(device[key], torch.float64) for key in by_key}
    other64 = {key: other[key].detach().to(device[key], torch.float64) for key in by_key}

    perms = [torch.arange(n) for n in sizes]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        improved = False
        for p in torch.randperm(len(perm_axes), generator=generator).tolist():
            n = sizes[p]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for key, axis in perm_axes[p].items():
                # other[key] with every axis but this one already in its current order.
                w = other64[key]
                for q, ax in by_key[key]:
                    if q != p:
                        w = w.index_select(ax, perms[q].to(w.device))
                r = ref64[key].movedim(axis, 0).reshape(n, -1)
                w = w.movedim(axis, 0).reshape(n, -1)
                cost += (r @ w.T).cpu()
            if not torch.isfinite(cost).all():
                raise ValueError(
                    f"the cost of {names[p]} is not finite: NaN or inf in the weights it touches"
                )
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            candidate = torch.as_tensor(cols, dtype=torch.int64)
            old = cost[torch.arange(n), perms[p]].sum().item()
            new = cost[torch.as_tensor(rows, dtype=torch.int64), candidate].sum().item()
            # Keep the current permutation on a tie (up to fp64 rounding of the sums): a sweep that
            # only swaps between equally good permutations must count as no progress, or it never ends.
            if new > old + 1e-12 * max(1.0, abs(old)):
                perms[p] = candidate
                improved = True
        if not improved:
            break

    aligned = {}
    for key, value in other.items():
        value = value.detach()
        if key in by_key:
            for p, axis in by_key[key]:
                value = value.index_select(axis, perms[p].to(value.device))  # a new tensor
            aligned[key] = value
        else:
            aligned[key] = value.clone()
    return aligned, perms


def _check_states(reference: Mapping[str, Tensor], other: Mapping[str, Tensor]) -> None:
    for name, state in (("reference", reference), ("other", other)):
        if not isinstance(state, Mapping):
            raise TypeError(
                f"{name} must be a state_dict (a mapping of names to tensors), got {type(state).__name__}"
            )
    missing, extra = set(reference) - set(other), set(other) - set(reference)
    if missing or extra:
        raise ValueError(
            f"other does not have the keys of reference: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    for key, ref in reference.items():
        for name, t in (("reference", ref), ("other", other[key])):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{key!r}] is a {type(t).__name__}, not a tensor")
        if other[key].shape != ref.shape:
            raise ValueError(
                f"other[{key!r}] has shape {tuple(other[key].shape)}, reference[{key!r}] {tuple(ref.shape)}"
            )


def _check_spec(
    spec: Sequence[Mapping], state: Mapping[str, Tensor]
) -> tuple[list[dict], list[int], list[str]]:
    """Each entry's ``{key: axis}`` (axes made non-negative), size and name; every key present,
    every permuted axis of the entry's size, and no (key, axis) reordered twice."""
    if isinstance(spec, Mapping) or not isinstance(spec, Sequence):
        raise TypeError(f"spec must be a list of dicts (one per permutation), got {type(spec).__name__}")
    perm_axes, sizes, names = [], [], []
    seen: dict[tuple[str, int], str] = {}
    for p, entry in enumerate(spec):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("axes"), Mapping) or not entry["axes"]:
            raise ValueError(f"spec[{p}] must be a dict with a non-empty 'axes' dict of key -> axis")
        name = str(entry.get("name", f"spec[{p}]"))
        size = entry.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"{name}: size must be a positive int, got {size!r}")
        axes = {}
        for key, axis in entry["axes"].items():
            if key not in state:
                raise ValueError(f"{name} permutes {key!r}, which is not in the state_dicts")
            ndim = state[key].dim()
            if not isinstance(axis, int) or not -ndim <= axis < ndim:
                raise ValueError(f"{name} permutes {key!r} along axis {axis!r}; it has {ndim} dims")
            axis %= ndim
            n = state[key].shape[axis]
            if size is None:
                size = n
            if n != size:
                raise ValueError(f"{name} permutes {size} units but {key!r} has {n} along axis {axis}")
            if (key, axis) in seen:
                raise ValueError(f"{key!r} axis {axis} is permuted by both {seen[key, axis]} and {name}")
            seen[key, axis] = name
            axes[key] = axis
        perm_axes.append(axes)
        sizes.append(int(size))
        names.append(name)
    return perm_axes, sizes, names
