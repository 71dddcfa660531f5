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

Per-sample squares come from fast layer rules where a probe proves which rows of a layer call
belong to which sample (:mod:`cl_optim.fisher.rules`: ``Linear`` by the identity
``(delta**2)^T (x**2)``, sequence and flattened-token ``Linear``, attention projections,
convolutions, embeddings and position tables, norm layers), and from a chain of slower but exact
ways for everything else (:mod:`cl_optim.fisher.fallback`: ``torch.func`` on the layer, the layer
one sample at a time, ``torch.func`` on the whole model, the model one sample at a time). With
``verify=True`` (the default) the routed computation is checked on the first samples against the
model run one sample at a time (:mod:`cl_optim.fisher.engine`). The routes are kept for the next
estimate on the same model while the model, the first batch's shapes and the graph of its forward
are unchanged, and checked again there (:mod:`cl_optim.fisher.plans`; ``reuse_plan=False``
plans afresh). One model is estimated by one thread at a time: ``torch.func`` swaps its
parameters during the model-level ways.
Accumulation is fp32 whatever
the model dtype; the loss reduction (mean or sum) and ``loss_scale`` do not change the result.

Example:
    >>> import torch, cl_optim
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    >>> fisher = cl_optim.fisher.estimate(model, data, estimator="exact")
    >>> sorted(fisher), fisher.meta["samples"]
    (['0.bias', '0.weight', '2.bias', '2.weight'], 32)
"""

from __future__ import annotations

import gc
import time
import warnings
from collections.abc import Iterable
from typing import Callable, Optional

import torch
from torch import nn

from . import plans, workspace
from .batch import Batch, logits
from .engine import PROBE_SAMPLES, Engine
from .seeds import default_nll, per_sample_loss_grad, seeds

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
    verify: bool = True,
    reuse_plan: bool = True,
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
        memory_cap: bytes one chunk of materialised per-sample gradients may take (with a
            convolution's im2col patches, which count too).
        verify: check the per-layer computation on the first 2 samples of the first batch against
            the model run one sample at a time; a layer that differs moves to a slower exact way,
            with a warning naming it. Its cost is in ``meta["verify"]``.
        reuse_plan: reuse the routes of the last estimate on this model while its modules,
            parameters, modes and hooks, the first batch's shapes and the graph of its forward
            are the same (:mod:`cl_optim.fisher.plans`): the probe is skipped, the self-check
            runs as always, and a layer it would move plans the estimate afresh. Only with
            ``verify=True``. ``False`` plans afresh and keeps the new plan.
            ``meta["plan"]["reused"]`` says which happened.

    Returns:
        A :class:`FisherResult`: fp32 tensors keyed by parameter name (parameters that require
        grad), and ``meta``: the estimator, samples, batches, normalisation, ``per_sample`` (how
        each layer's per-sample squares were computed, and why), ``seconds`` and ``verify``.
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
        loss_fn = default_nll(likelihood, sigma)

    started = time.perf_counter()
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:  # (autograd refused the probe's empty list with a message that named nothing)
        raise ValueError(
            "the model has no parameters that require grad: there is no Fisher to estimate "
            "(requires_grad_(True) on the parameters whose Fisher you want)"
        )
    totals = {name: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for name, p in named}
    modes = {m: m.training for m in model.modules()}
    if eval_mode:
        model.eval()
    # The objects that exist before the estimate are frozen out of the collector's sight: each
    # batch's hooks and graphs allocate enough small containers to set off full collections, and
    # walking every object of the process in each cost 9% of an estimate (4 batches of 64,
    # bench_fisher's transformer). Collection goes on for what the estimate makes (a forward's
    # reference cycles are freed batch by batch); unfrozen at the end. Not done when the caller
    # froze objects itself (unfreezing would release theirs too). The price: garbage cycles that
    # already exist when the estimate starts are held until it returns, and a freeze another
    # thread makes meanwhile is undone with ours.
    freezing = gc.isenabled() and gc.get_freeze_count() == 0
    if freezing:
        gc.freeze()
    try:
        with workspace.kept():  # the rules' large temporaries, reused from batch to batch
            engine = Engine(model, named, memory_cap, verify)
            model_signature = plans.model_signature(model, named)  # after eval(): the modes count
            # A kept plan is reused only with the self-check, which runs on every estimate: the
            # guards cannot see everything a plan rests on (review of cd2254f: a permutation read from
            # an attribute, samples that start to interact as a weight leaves zero).
            kept = plans.recall(model, model_signature) if reuse_plan and verify else None
            planned_on, reused, graph, trusted = None, False, (), False
            seen, batches = 0, 0
            for raw in data:
                batch = Batch.of(raw)
                if n_samples is not None:
                    if seen >= n_samples:
                        break
                    batch = batch.take(n_samples - seen)
                if estimator == "batched":
                    with torch.enable_grad():
                        output = logits(model(*batch.args, **batch.kwargs))
                    _check_output(output, likelihood)
                    _add_batched(named, totals, output, batch.targets, loss_fn)
                else:
                    fresh = not engine.planned and batch.size > 1
                    # The self-check may work in the totals while nothing is in them (batches of one
                    # sample before the first plan add theirs without one).
                    lend = totals if seen == 0 else None
                    if fresh:
                        planned_on = plans.batch_signature(batch.take(min(batch.size, PROBE_SAMPLES)))
                        reused = kept is not None and kept.batch == planned_on
                        if reused:
                            plans.restore(engine, kept)
                        else:
                            engine.plan(batch, scratch=lend)
                    output, capture = engine.forward(batch)
                    if fresh:
                        graph, trusted = plans.inspect(engine, capture, output)
                        # The forward runs other operations now, or the self-check moves a layer:
                        # planned afresh on this batch, so that a reused plan gives a fresh one's numbers.
                        if reused and (graph != kept.graph or not engine.recheck(batch, scratch=lend)):
                            engine, reused = Engine(model, named, memory_cap, verify), False
                            engine.plan(batch, scratch=lend)
                            output, capture = engine.forward(batch)
                            graph, trusted = plans.inspect(engine, capture, output)
                    if batch.size > 1 and engine.unrouted(capture):  # a layer the plan has not seen
                        engine.plan(batch)
                        output, capture = engine.forward(batch)
                        trusted = False  # planned part-way: not kept
                    _check_output(output, likelihood)
                    draws = seeds(
                        estimator, likelihood, sigma, output, batch.targets, loss_fn, mc_samples, generator
                    )
                    draws = [s * loss_scale for s in draws]
                    if not engine.planned:  # one sample: the definition itself is the cheapest
                        engine.alone.update(capture.calls)
                        engine.accumulate_one(batch, draws, totals)
                    else:
                        engine.accumulate(batch, output, capture, draws, totals)
                seen += batch.size
                batches += 1
            if planned_on is not None and (not reused or engine.plan_seconds):  # a new or changed plan
                plans.keep(
                    model, plans.snapshot(engine, model_signature, planned_on, graph) if trusted else None
                )
    finally:
        if freezing:
            gc.unfreeze()
        for module, training in modes.items():
            module.train(training)
    if seen == 0:
        raise ValueError("estimate() got no samples from data")
    norm = batches if estimator == "batched" else seen * loss_scale**2
    for t in totals.values():
        t.div_(norm)
    seconds = time.perf_counter() - started
    meta = {
        "estimator": estimator,
        "likelihood": likelihood,
        "samples": seen,
        "batches": batches,
        "mc_samples": mc_samples if estimator == "mc" else None,
        "normalization": "mean over batches of the squared batch-mean gradient"
        if estimator == "batched"
        else "mean over samples of squared per-sample gradients",
        "per_sample": None if estimator == "batched" else engine.describe(),
        "seconds": seconds,
    }
    if estimator != "batched":
        meta["plan"] = {"seconds": engine.plan_seconds, "reused": reused}
        meta["verify"] = (
            {
                "samples": engine.verified_samples,
                "seconds": engine.verify_seconds,
                "share": engine.verify_seconds / seconds if seconds > 0 else 0.0,
            }
            if verify
            else None
        )
    return FisherResult(totals, meta)


# ----------------------------------------------------------------------------------- helpers


def _check_output(output, likelihood: str) -> None:
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


def _add_batched(named, totals, output, targets, loss_fn) -> None:
    if targets is None:
        raise ValueError("estimator='batched' needs targets in the data")
    seed = per_sample_loss_grad(output, targets, loss_fn) / output.shape[0]  # mean-loss gradient
    grads = torch.autograd.grad(
        output, [p for _, p in named], grad_outputs=seed.to(output.dtype), allow_unused=True
    )
    for (name, _), g in zip(named, grads):
        if g is not None:
            g = g.to(torch.float32)
            totals[name].addcmul_(g, g)
