"""The self-check: a plan's routed computation against the model run one sample at a time.

Both sides take one random output cotangent for each of the first ``VERIFY_SAMPLES`` samples and
zero for the others, which stay in the routed batch: a split of one sample's rows (tokens taken
as samples), a merge of two samples' rows, a shared row and a forward that mixes samples all
change the checked samples' squares. Every way is linear in the cotangent, so one random
direction checks the split for all C seeds of ``exact`` at a C-th of the cost.

The check works in one |W|-sized buffer: the reference's squares, their norms (the tolerances),
negated, then the routed squares added on top, which leaves the residual. Where the estimate lends
its zeroed totals (before its first batch) that buffer costs nothing to allocate. A fresh
reference and routed result per check, two |W|-sized buffers, made the check of bench_fisher's MLP
about twice as slow, mostly in page faults of freshly mapped memory (about 1000 per estimate).
Only where a parameter differs are both sides computed apart, and the layers that differ moved
one step down until they agree.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .batch import Batch
from .engine import LEVELS, MODEL_FUNC, MODEL_LOOP, _tolerance  # engine imports this module lazily
from .fallback import model_looped_squares_

__all__ = ["check", "VERIFY_SAMPLES"]

VERIFY_SAMPLES = 2  # two: a merge of two samples' rows shows only when both are checked


def check(engine, batch: Batch, output: Tensor, capture, scratch: Optional[dict] = None) -> int:
    """Checks ``engine``'s routes on the forward ``(output, capture)`` of ``batch`` (its first
    samples against the model run one at a time) and moves a layer that differs one step down,
    with a warning, until they agree. ``scratch``: zeroed fp32 accumulators by parameter name to
    work in, left zeroed. Returns the number of samples checked."""
    k = min(batch.size, VERIFY_SAMPLES)
    seed = torch.zeros(output.shape, dtype=torch.float32, device=output.device)
    seed[:k] = torch.randn((k, *output.shape[1:]), generator=engine.generator).to(output.device)
    # The parameters of the layers that ran (the others get no gradient on either side).
    ran = {f for m in capture.calls for f in engine.layers[m].values()}
    params = {n: p for n, p in engine.params.items() if n in ran or n in engine.model_level}
    work = _zeros(params) if scratch is None else {n: scratch[n] for n in params}
    try:
        alone = torch.cat(model_looped_squares_(engine.model, params, batch.take(k), [seed[:k]], work))
        _check_samples_do_not_interact(output[:k].detach(), alone)
        names = list(work)
        tolerances, want_norms = _tolerances(engine, work, names)
        for t in work.values():
            t.neg_()
        engine.accumulate(batch, output, capture, [seed], work)  # the routed side: the residual
        errors = torch.stack([work[n].norm() for n in names]).tolist()
        if all(error <= tol for error, tol in zip(errors, tolerances)):
            return k
        # Something differs: the reference again, kept apart, and the routed side settled against it.
        for t in work.values():
            t.zero_()
        model_looped_squares_(engine.model, params, batch.take(k), [seed[:k]], work)
        _settle(engine, batch, output, capture, seed, params, work, names, want_norms, tolerances)
        return k
    finally:
        if scratch is not None:
            for t in work.values():
                t.zero_()


def _settle(engine, batch, output, capture, seed, params, want, names, want_norms, tolerances) -> None:
    """Moves the layers whose routed squares differ from ``want`` one step down, repeated until
    they agree (the lowest ways are the definition itself)."""
    for _ in range(len(LEVELS)):
        got = _zeros(params)
        engine.accumulate(batch, output, capture, [seed], got)
        errors = torch.stack([(got[n] - want[n]).norm() for n in names]).tolist()
        bad = {
            n: error / max(w, 1e-30)
            for n, error, w, tol in zip(names, errors, want_norms, tolerances)
            if not error <= tol
        }
        if not bad:
            return
        for name, error in bad.items():
            if name in engine.model_level:
                if engine.model_level[name] == MODEL_FUNC:
                    engine.model_level[name] = MODEL_LOOP
                    engine._warn(f"`{name}` through torch.func (model) differs from a batch-size-1 loop "
                                 f"(relative error {error:.2g}); it goes through a loop over samples")  # fmt: skip
                continue
            for module in engine.owners[name]:
                if engine.routes.get(module) is not None and engine.routes[module].level < MODEL_FUNC:
                    engine._demote(module, f"its per-sample squares differ from a batch-size-1 computation "
                                           f"(relative error {error:.2g} on {name})")  # fmt: skip


def _tolerances(engine, want: dict, names: list) -> tuple[list, list]:
    """Per parameter: its dtype's relative tolerance of the reference's norm, plus an absolute
    floor of 1e-5 of the largest per-element scale (a parameter whose squares are all but zero
    is not held to rounding)."""
    want_norms = torch.stack([want[n].norm() for n in names]).tolist()  # one sync, not one per tensor
    sizes = [max(1, want[n].numel()) ** 0.5 for n in names]
    scale = max((w / n for w, n in zip(want_norms, sizes)), default=0.0)
    tolerances = [
        _tolerance(engine.params[n]) * w + 1e-5 * scale * size for n, w, size in zip(names, want_norms, sizes)
    ]
    return tolerances, want_norms


def _zeros(params: dict) -> dict:
    return {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}


def _check_samples_do_not_interact(together: Tensor, alone: Tensor) -> None:
    """Every way here takes each sample's output from the batch's forward; a model whose output
    for a sample depends on the others (statistics of the batch) has no such output to take."""
    if together.shape != alone.shape or not torch.allclose(
        together.float(), alone.float(), rtol=_tolerance(together), atol=1e-5
    ):
        error = float((together.float() - alone.float()).norm() / alone.float().norm().clamp_min(1e-30))
        raise ValueError(
            "the model's outputs for the first samples of a batch differ from their outputs one sample at "
            f"a time (relative error {error:.2g}): its samples interact in the forward (statistics of the "
            "batch, train-mode normalisation), so there is no per-sample Fisher of the batch's forward. "
            "Remove the interaction (eval mode, per-sample statistics) before estimating"
        )
