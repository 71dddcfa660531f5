r"""Diagonal Fisher estimation with named estimators, per-sample without batch-size-1 loops.

With logits ``z_n = f(x_n)``, ``p_n = softmax(z_n)`` and per-sample scores
``g_n(c) = d log p(c | x_n) / d theta``, the estimators are (each a mean over samples):

=============  ==========================================================================
``exact``      ``F = 1/N sum_n sum_c p_n,c * g_n(c)**2``  (the true Fisher; C backward passes of
               the columns ``sqrt(p_c) (e_c - p)``, whose outer products sum to
               ``diag(p) - p p^T``)
``mc``         ``F = 1/(N M) sum_n sum_m g_n(y_m)**2`` with ``y_m ~ p_n`` (unbiased for exact)
``empirical``  ``F = 1/N sum_n g_n(y_n)**2`` with the observed labels (biased; Kunstner et al.
               2019)
``batched``    ``F = 1/K sum_k (1/b sum_{n in batch k} g_n(y_n))**2``, the square of the
               mini-batch mean gradient (Avalanche, PyCIL); about ``empirical / b``. Accepted with
               a warning.
=============  ==========================================================================

``likelihood="gaussian"`` (regression, variance ``sigma**2``) replaces the categorical by
``N(f(x), sigma**2 I)``: exact ``F = 1/N sum_n diag(J_n^T J_n) / sigma**2``.

Per-sample squares come from the layer rules of :mod:`cl_optim.fisher.rules` (the ``Linear``
identity ``(delta**2)^T (x**2)``, chunked rules for sequences, convolutions, embeddings and norm
layers, ``torch.func`` for anything else); a model that calls a module twice per forward (tied
weights) goes through ``torch.func`` on the whole model. Accumulation is fp32 whatever the model
dtype; the loss reduction (mean or sum) and ``loss_scale`` do not change the result.

Example:
    >>> import torch, cl_optim
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    >>> fisher = cl_optim.fisher.estimate(model, data, estimator="exact")
    >>> sorted(fisher), fisher.meta["samples"]
    (['0.bias', '0.weight', '2.bias', '2.weight'], 32)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rules import add_sq_grads_, add_vmapped_squares_, rule_for

__all__ = ["estimate", "FisherResult", "ESTIMATORS"]

ESTIMATORS = ("exact", "mc", "empirical", "batched")
DEFAULT_MEMORY_CAP = 256 * 2**20


class FisherResult(dict):
    """``{parameter name: fp32 Fisher diagonal}`` with ``meta`` (estimator, samples, normalisation)."""

    def __init__(self, values: dict, meta: dict):
        super().__init__(values)
        self.meta = meta


def estimate(
    model: nn.Module,
    data: Iterable,
    estimator: str = "exact",
    n_samples: Optional[int] = None,
    loss_fn: Optional[Callable] = None,
    *,
    likelihood: str = "categorical",
    sigma: float = 1.0,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    eval_mode: bool = True,
    loss_scale: float = 1.0,
    memory_cap: int = DEFAULT_MEMORY_CAP,
) -> FisherResult:
    """Estimate the diagonal Fisher of ``model`` on ``data`` at the current weights.

    Args:
        model: outputs logits ``(B, C)`` (categorical) or predictions ``(B, D)``/``(B,)`` (gaussian).
        data: batches ``(inputs, targets)`` (``inputs`` a tensor, a tuple or list of tensors for
            ``model(*inputs)``, or a dict for ``model(**inputs)``), or dicts as Hugging Face
            collators make them (targets from ``labels``, every other entry a keyword argument).
            The model's output may be a tensor or have ``.logits``. ``exact`` and ``mc`` ignore
            the targets.
        estimator: ``"exact"``, ``"mc"``, ``"empirical"`` or ``"batched"`` (module docstring).
        n_samples: use at most this many samples (the first ones of ``data``).
        loss_fn: per-batch NLL for ``empirical``/``batched``, mean or sum reduction (detected);
            default cross-entropy, or ``0.5 * ||f - y||**2 / sigma**2`` for gaussian.
        likelihood: ``"categorical"`` or ``"gaussian"``; ``sigma`` its standard deviation.
        mc_samples: labels drawn per sample for ``mc``; ``generator`` makes them reproducible.
        eval_mode: estimate in eval mode (dropout off, BatchNorm statistics frozen and used as
            constants); every module's mode is restored afterwards. BatchNorm in train mode is
            refused: it couples the samples of a batch.
        loss_scale: multiplies the backward seeds (an fp16 model's gradients may underflow) and
            is divided out of the squares; the result does not depend on it.
        memory_cap: bytes one chunk of materialised per-sample gradients may take.

    Returns:
        A :class:`FisherResult`: fp32 tensors keyed by parameter name (parameters that require
        grad), and ``meta``.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if likelihood not in ("categorical", "gaussian"):
        raise ValueError(f"unknown likelihood {likelihood!r}; expected 'categorical' or 'gaussian'")
    if not sigma > 0 or not loss_scale > 0 or mc_samples < 1:
        raise ValueError("sigma and loss_scale must be > 0 and mc_samples >= 1")
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if estimator == "batched":
        warnings.warn(
            "estimator='batched' squares the mini-batch mean gradient: its scale is about 1/batch_size "
            "of the empirical Fisher (lam must be about batch_size times larger for the same effect)",
            UserWarning,
            stacklevel=2,
        )
    if loss_fn is None:
        loss_fn = _default_nll(likelihood, sigma)

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    totals = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in named}
    modes = {m: m.training for m in model.modules()}
    if eval_mode:
        model.eval()
    try:
        layer_names, whole_model = _layers(model, named)
        layers = {m: {k: totals[full] for k, full in own.items()} for m, own in layer_names.items()}
        rule_names = {name: rule_for(m)[1] for name, m in model.named_modules() if m in layers}
        seen, batches = 0, 0
        expansions_checked: set = set()
        for batch in data:
            batch = _Batch.of(batch)
            if n_samples is not None:
                remaining = n_samples - seen
                if remaining <= 0:
                    break
                batch = batch.take(remaining)
            inputs, targets, size = batch, batch.targets, batch.size
            capture = _Capture(layers, size)
            with torch.enable_grad(), capture:
                try:
                    output = _logits(model(*batch.args, **batch.kwargs))
                except Exception as error:
                    if not capture.expanded:
                        raise
                    raise ValueError(_not_broadcast(capture)) from error
            if not capture.expanded <= expansions_checked:  # a layer expanded for the first time
                _check_expansion_is_transparent(model, batch, output, capture)
                expansions_checked |= capture.expanded
            if not bool(torch.isfinite(output).all()):
                raise ValueError(
                    "the model's output contains inf or nan: no Fisher can be estimated at these weights"
                )
            if likelihood == "categorical" and (output.dim() < 2 or output.shape[-1] < 2):
                # One logit: the softmax is 1 whatever the weights, and the Fisher all zero.
                raise ValueError(
                    f"the model's output has shape {list(output.shape)}: a categorical likelihood needs "
                    "logits over at least two classes, (B, C) with C >= 2 (one output gives an all-zero "
                    "Fisher); for a regression output pass likelihood='gaussian' (with sigma)"
                )
            whole_model = whole_model or capture.reused()
            if not whole_model and batches == 0 and estimator != "batched":
                whole_model = not _layers_cover_all_uses(capture, output, named)
            if estimator == "batched":
                _add_batched(model, named, totals, output, targets, loss_fn)
            else:
                seeds = _seeds(estimator, likelihood, sigma, output, targets, loss_fn, mc_samples, generator)
                seeds = [s * loss_scale for s in seeds]
                if whole_model:
                    _add_whole_model(model, named, totals, inputs, seeds, memory_cap)
                else:
                    _add_by_layer(capture, output, seeds, memory_cap)
            seen += size
            batches += 1
    finally:
        for module, training in modes.items():
            module.train(training)
    if seen == 0:
        raise ValueError("estimate() got no samples from data")
    norm = batches if estimator == "batched" else seen * loss_scale**2
    for t in totals.values():
        t.div_(norm)
    meta = {
        "estimator": estimator,
        "likelihood": likelihood,
        "samples": seen,
        "batches": batches,
        "mc_samples": mc_samples if estimator == "mc" else None,
        "normalization": "mean over batches of the squared batch-mean gradient"
        if estimator == "batched"
        else "mean over samples of squared per-sample gradients",
        "per_sample": "torch.func (whole model)" if whole_model else rule_names,
    }
    return FisherResult(totals, meta)


# ----------------------------------------------------------------------------------- helpers


def _default_nll(likelihood: str, sigma: float) -> Callable:
    if likelihood == "categorical":
        return lambda output, target: F.cross_entropy(output.float(), target)
    return lambda output, target: 0.5 * ((output.float() - target.float()) ** 2).sum() / sigma**2


class _Batch:
    """One batch as the model takes it: positional and keyword inputs, targets, sample count."""

    def __init__(self, args: tuple, kwargs: dict, targets):
        self.args, self.kwargs, self.targets = args, kwargs, targets
        leading = [
            t.shape[0] for t in (targets, *args, *kwargs.values()) if isinstance(t, Tensor) and t.dim()
        ]
        if not leading:
            raise ValueError("a batch needs at least one tensor with a batch dimension")
        # The sample count: the targets' length, else the longest leading dimension of the inputs
        # (a (1, T) position_ids next to (B, T) input_ids is shared, not a batch of one).
        self.size = targets.shape[0] if isinstance(targets, Tensor) and targets.dim() else max(leading)

    @classmethod
    def of(cls, batch) -> _Batch:
        if isinstance(batch, Tensor):
            return cls((batch,), {}, None)
        if isinstance(batch, Mapping):  # a Hugging Face batch: labels are the targets
            return cls((), {k: v for k, v in batch.items() if k != "labels"}, batch.get("labels"))
        inputs, targets = batch[0], (batch[1] if len(batch) > 1 else None)
        if isinstance(inputs, Mapping):
            return cls((), dict(inputs), targets)
        return cls(tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {}, targets)

    def _cut(self, value, n):
        if isinstance(value, Tensor) and value.dim() and value.shape[0] == self.size:
            return value[:n]
        return value  # shared across the batch (position ids, masks of shape (1, T)) or not a tensor

    def take(self, n: int) -> _Batch:
        """The first ``n`` samples: every tensor whose leading dimension is the batch is cut."""
        if n >= self.size:
            return self
        return _Batch(tuple(self._cut(a, n) for a in self.args),
                      {k: self._cut(v, n) for k, v in self.kwargs.items()}, self._cut(self.targets, n))  # fmt: skip


def _logits(output):
    """The prediction tensor of a model's output: itself, ``.logits`` (Hugging Face), or the first
    element of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}; fisher.estimate needs a tensor or .logits")


def _check_expansion_is_transparent(model, batch: _Batch, output: Tensor, capture: _Capture) -> None:
    """Layers that ran once for the whole batch (a position table looked up with ``(1, T)`` ids)
    are given their output expanded to the batch, so that each sample's gradient reaches them
    apart; broadcasting makes that invisible to the rest of the model. Checked on the first batch
    in which a layer is expanded: the model's output must be the same without the expansion."""
    with torch.no_grad():
        plain = _logits(model(*batch.args, **batch.kwargs))
    if plain.shape != output.shape or not torch.allclose(
        plain.float(), output.detach().float(), rtol=1e-4, atol=1e-5
    ):
        raise ValueError(_not_broadcast(capture))


def _not_broadcast(capture: _Capture) -> str:
    names = [type(m).__name__ for m in capture.expanded]
    return (
        f"{names} ran once for the whole batch and the model does not broadcast their output over the "
        "samples: their per-sample Fisher cannot be separated (run them per sample)"
    )


def _layers(model: nn.Module, named: list) -> tuple[dict, bool]:
    """module -> {own parameter name: accumulator key}, and whether any parameter is shared.

    A parameter owned by two modules (tied weights) gets one gradient from two places: its
    per-sample square is not the sum of the two layers' squares, so the whole model goes
    through torch.func instead.
    """
    canonical = {id(p): name for name, p in named}
    layers, owners = {}, {}
    for module in model.modules():
        own = {}
        for name, p in module._parameters.items():
            if p is not None and id(p) in canonical:
                own[name] = canonical[id(p)]
                owners[id(p)] = owners.get(id(p), 0) + 1
        if own:
            rule_for(module)  # refuses train-mode BatchNorm before any work
            layers[module] = own
    return layers, any(count > 1 for count in owners.values())


class _Capture:
    """Forward hooks that keep each layer's inputs and output, and count calls.

    A layer called once for the whole batch (its output's leading dimension 1 while the batch has
    ``size`` samples, e.g. a position table looked up with ``(1, T)`` ids) hands the rest of the
    model its output expanded to ``size``: broadcasting gives the same result, and the gradient
    that comes back is per sample (a ``(1, ...)`` output would get the batch sum of them).
    """

    def __init__(self, layers: dict, size: int):
        self.layers = layers
        self.size = size
        self.records: dict = {}
        self.calls: dict = {}
        self.expanded: set = set()
        self.handles = []

    def __enter__(self):
        for module in self.layers:
            self.handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _hook(self, module, args, kwargs, output):
        self.calls[module] = self.calls.get(module, 0) + 1
        if not isinstance(output, Tensor):
            raise TypeError(
                f"{type(module).__name__} returns {type(output).__name__}; per-sample rules need a tensor"
            )
        saved = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        versions = tuple(a._version if isinstance(a, Tensor) else None for a in args)
        if self.size > 1 and output.dim() and output.shape[0] == 1:
            self.expanded.add(module)
            output = output.expand(self.size, *output.shape[1:])
            saved = tuple(_expand_leading(a, self.size) for a in saved)
            kwargs = {k: _expand_leading(v, self.size) for k, v in kwargs.items()}
        self.records[module] = (saved, versions, kwargs, output)
        # Later in-place ops (ReLU(inplace=True)) must not change the tensor we differentiate at.
        return output.clone()

    def reused(self) -> bool:
        return any(count > 1 for count in self.calls.values())


def _expand_leading(value, size: int):
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == 1:
        return value.expand(size, *value.shape[1:])
    return value


def _seeds(estimator, likelihood, sigma, output, targets, loss_fn, mc_samples, generator) -> list[Tensor]:
    """Output-space cotangents v whose per-sample gradients J_n^T v_n, squared and summed, are F."""
    out = output.detach().to(torch.float32)
    if estimator == "empirical":
        if targets is None:
            raise ValueError("estimator='empirical' needs targets in the data")
        return [_per_sample_loss_grad(output, targets, loss_fn)]
    if likelihood == "categorical":
        if out.dim() != 2:
            raise ValueError(f"categorical likelihood needs logits of shape (B, C), got {tuple(out.shape)}")
        probs = torch.softmax(out, dim=1)
        eye = torch.eye(out.shape[1], dtype=out.dtype, device=out.device)
        if estimator == "exact":
            # sqrt(p_c) (e_c - p): their outer products sum to diag(p) - p p^T.
            return [probs[:, c : c + 1].sqrt() * (eye[c] - probs) for c in range(out.shape[1])]
        labels = torch.multinomial(probs.cpu(), mc_samples, replacement=True, generator=generator).to(
            out.device
        )
        return [(eye[labels[:, m]] - probs) / math.sqrt(mc_samples) for m in range(mc_samples)]
    flat = out.reshape(out.shape[0], -1)
    if estimator == "exact":
        return [
            torch.zeros_like(flat)
            .index_fill_(1, torch.tensor([o], device=out.device), 1.0 / sigma)
            .view_as(out)
            for o in range(flat.shape[1])
        ]
    noise = torch.randn((mc_samples, *out.shape), generator=generator).to(out.device)
    return [noise[m] / (sigma * math.sqrt(mc_samples)) for m in range(mc_samples)]


def _per_sample_loss_grad(output: Tensor, targets, loss_fn) -> Tensor:
    """d loss_n / d output_n, whatever the reduction of ``loss_fn`` (mean or sum: detected)."""
    out = output.detach().to(torch.float32).requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(out, targets)
        if loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar (mean or sum reduction)")
        (grad,) = torch.autograd.grad(loss, out)
        twice = loss_fn(torch.cat([out.detach(), out.detach()]), torch.cat([targets, targets]))
    value, doubled = loss.item(), twice.item()
    if math.isclose(doubled, 2 * value, rel_tol=1e-4, abs_tol=1e-12):
        return grad  # sum reduction
    if math.isclose(doubled, value, rel_tol=1e-4, abs_tol=1e-12):
        return grad * out.shape[0]  # mean reduction: undo the 1/B
    raise ValueError(
        "loss_fn is neither a mean nor a sum over samples; pass a per-batch NLL with one of them"
    )


def _layers_cover_all_uses(capture: _Capture, output: Tensor, named: list) -> bool:
    """Whether the per-layer view accounts for every use of every parameter.

    A parameter also used outside its module (``h @ embed.weight.t()``) gets gradient that no
    layer rule sees. Checked once, on the first batch: the batch gradient of a random output
    seed must equal the sum of what each layer contributes.
    """
    params = [p for _, p in named]
    seed = torch.randn(output.shape, generator=torch.Generator().manual_seed(0)).to(output)
    full = torch.autograd.grad(output, params, seed, retain_graph=True, allow_unused=True)
    modules = [m for m in capture.layers if m in capture.records]
    deltas = torch.autograd.grad(
        output, [capture.records[m][3] for m in modules], seed, retain_graph=True, allow_unused=True
    )
    local = {id(p): torch.zeros_like(p) for p in params}
    for module, delta in zip(modules, deltas):
        if delta is None:
            continue
        own = [p for p in module._parameters.values() if p is not None and id(p) in local]
        grads = torch.autograd.grad(
            capture.records[module][3], own, delta, retain_graph=True, allow_unused=True
        )
        for p, g in zip(own, grads):
            if g is not None:
                local[id(p)] += g
    for p, g in zip(params, full):
        g = torch.zeros_like(p) if g is None else g
        if not torch.allclose(
            local[id(p)].float(), g.float(), rtol=1e-3, atol=1e-6 * (1 + g.abs().max().item())
        ):
            return False
    return True


def _add_by_layer(capture: _Capture, output: Tensor, seeds: list[Tensor], cap: int) -> None:
    modules = [m for m in capture.layers if m in capture.records]
    outputs = [capture.records[m][3] for m in modules]
    for module in modules:
        saved, versions, _, _ = capture.records[module]
        for a, v in zip(saved, versions):
            if isinstance(a, Tensor) and a._version != v:
                raise RuntimeError(
                    f"the input of {type(module).__name__} was modified in place after the layer ran"
                )
    for seed in seeds:
        deltas = torch.autograd.grad(
            output, outputs, grad_outputs=seed.to(output.dtype), retain_graph=True, allow_unused=True
        )
        for module, delta in zip(modules, deltas):
            if delta is None:
                continue
            saved, _, kwargs, _ = capture.records[module]
            add_sq_grads_(module, saved, kwargs, delta, capture.layers[module], cap)


def _add_whole_model(model, named, totals, batch: _Batch, seeds, cap) -> None:
    """Tied weights: per-sample gradients of the whole model with torch.func, in chunks. Inputs
    whose leading dimension is the batch are mapped over; the others (shared position ids, masks
    of shape (1, T)) are passed whole to every sample."""
    params = {name: p.detach() for name, p in named}
    for seed in seeds:
        add_vmapped_squares_(model, params, batch.args, batch.kwargs, seed, totals, cap, output=_logits)


def _add_batched(model, named, totals, output, targets, loss_fn) -> None:
    if targets is None:
        raise ValueError("estimator='batched' needs targets in the data")
    seed = _per_sample_loss_grad(output, targets, loss_fn) / output.shape[0]  # mean-loss gradient
    grads = torch.autograd.grad(
        output, [p for _, p in named], grad_outputs=seed.to(output.dtype), allow_unused=True
    )
    for (name, _), g in zip(named, grads):
        if g is not None:
            totals[name].add_(g.to(torch.float32).square())
