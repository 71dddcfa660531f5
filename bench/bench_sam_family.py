"""SAM variants, optimizer side: one full iteration of each (LookSAM: k = 5 of them), fp32, AdamW.

Run with the plain SAM rows by ``bench_sam.py`` (the one command, below); this module builds the
variant cases and the paired rounds, and ``python bench/bench_sam_family.py`` runs the variants
alone with the same arguments.

    python bench/bench_sam.py [--quick] [--device cuda] [--sets resnet18 transformer many_small]

Variants and providers (hyper-parameters matched where a provider has them):

========= ====================================== ================================== ==================
variant   cl_optim (over ``cl_optim.AdamW``,     pytorch_optimizer 4.1 (over torch's INFTY 0.1.2 (over
          every backend)                         fused AdamW)                       torch's fused AdamW)
========= ====================================== ================================== ==================
gsam      GSAM(rho=0.05, alpha=0.4)              GSAM(alpha=0.4), rho 0.05 from a    gsam.GSAM
                                                 ProportionScheduler, foreach=True
wsam      WSAM(rho=0.05, gamma=0.9, decouple)    WSAM (per-tensor path: its          —
                                                 foreach=True also reaches the fused
                                                 base, which refuses fused+foreach)
wsam_     WSAM(..., decouple=False)              WSAM(decouple=False)                —
coupled
looksam   LookSAM(rho=0.05, k=5, alpha=0.7)      LookSAM(k=5), foreach=True          looksam.LookSAM
fsam      FriendlySAM(rho=0.05, sigma=1,         FriendlySAM, foreach=True           —
          lmbda=0.9)
msam      MSAM(rho=0.3)                          —                                   —
gam       GAM(rho=0.02, grad_norm_rho=0.2)       —                                   gam.GAM (betas,
                                                                                     gamma as ours)
cflat     CFlat(rho=0.2, lamb=0.2)               —                                   c_flat.C_Flat
rwp       RWP(rho=0.01, alpha=0.5)               —                                   —
========= ====================================== ================================== ==================

pytorch_optimizer takes ``foreach=True`` where it combines with the fused base (its batched
path, the default on CUDA; on CPU up to twice as fast as its per-tensor default here). INFTY
0.1.2's LookSAM never builds its reused direction (it reads a state key, ``old_grad``, that
nothing writes): its reuse steps are plain AdamW steps and its SAM steps skip the projection, so
it does less work than the other two; its GAM ascends along ``h`` with radius 1 whatever
``norm_rho``. pytorch_optimizer's ``LookSAM.step(closure)`` calls the closure on every step,
reuse steps too (a second pass at ``w`` that LookSAM exists to save): it is driven here by
``first_step``/``second_step`` with the closure on its SAM steps only. cl_optim's LookSAM takes
global norms by default, the other two per-tensor ones: ``cl_optim_<fastest>_layerwise`` is
cl_optim's per-tensor form. Neither library has MSAM or RWP: those rows are cl_optim's backends
only (no baseline).

Optimizer side only: no model, no forward or backward. Each provider's closure (and the
backward before ``step``) copies a preallocated, fixed set of random gradients into ``.grad``
(``torch._foreach_copy_``; a different set per pass, four sets cycled), so every provider pays the
same closure cost: 1 + (closure calls) gradient writes per iteration — SAM, GSAM, WSAM,
FriendlySAM and RWP 2, MSAM 1, GAM and C-Flat 4, LookSAM 6 per k = 5 iterations (one SAM step:
1 + 1; four reuse steps: 1 + 0). Every timed call checks that its provider made exactly that
many writes. Where a provider's ``step`` makes the first pass itself (INFTY, pytorch_optimizer's
GSAM) the closure makes that write; the others get it before ``step``/``first_step``.

Bytes floor of a row (B/param, fp32, per timed call) = AdamW's update (28 per iteration, with
the restore read; ``bench_sam.py``) + the variant's bytes beyond it at the floor of a fully fused
design (DESIGN.md §11, the column the plain SAM rows' 48 = 20 + 28 also use) + 8 per gradient
write (the copies are timed, so they are in the floor). DESIGN.md §11's "as implemented" bytes
are listed beside them (with the COMBINE term where the variant uses it over a fused base):

======== ====================== ============================ ====== ===========
variant  beyond the base: floor beyond the base: implemented writes row floor
======== ====================== ============================ ====== ===========
gsam     36                     40                           2      80
wsam     28                     36                           2      72
wsam_c.  28                     36                           2      72
looksam  36 + 4 x 12 = 84       52 + 4 x 12 = 100            6      272 (per 5)
fsam     32                     64                           2      76
msam     12                     28                           1      48
gam      104                    132                          4      164
cflat    84                     116                          4      144
rwp      20                     56                           2      64
======== ====================== ============================ ====== ===========

(``wsam`` is the decoupled form, the paper's and pytorch_optimizer's default; ``wsam_coupled``
steps the base with the combined gradient, against pytorch_optimizer's ``decouple=False``.)

The ``cl_optim_cpp_written`` rows (GSAM, both WSAM forms, LookSAM, GAM, C-Flat, RWP) are the same
optimizer with its final combination written into ``.grad`` by ``task_combine_`` first (8 B/param
more, and the check of the last gradient where the COMBINE form's bound stands in for it;
decoupled WSAM's written form 40 more: two combinations and a descent pass with its guard); the
paired rounds compare the two.

LookSAM's rows (``looksam_adamw_k5``) are times of 5 consecutive iterations, one SAM step and
four reuse steps; every other row is one iteration. The paired rounds give the speed-up of the
fastest cl_optim backend against each other library, each pair timed back to back (median and
p25/p75 of the per-round ratios, rounds until their half-range is within ±10% of the median or
15 s, 2 s with ``--quick``; the machine's load while they ran recorded and flagged: ``paired.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from harness import (
    PARAM_SETS,
    Case,
    _versions,
    append_rows,
    cl_optim_backends,
    device_name,
    make_params,
    numel,
    paired_rows,
    parse_args,
    run,
)

import cl_optim

try:  # a baseline; a machine without it (a lent GPU's image) still measures cl_optim's rows
    import pytorch_optimizer
except ImportError:
    pytorch_optimizer = None

try:  # INFTY is optional (it pulls torchvision): `pip install --no-deps infty==0.1.2`
    from infty.optim.geometry_reshaping.c_flat import C_Flat as InftyCFlat
    from infty.optim.geometry_reshaping.gam import GAM as InftyGAM
    from infty.optim.geometry_reshaping.gsam import GSAM as InftyGSAM
    from infty.optim.geometry_reshaping.looksam import LookSAM as InftyLookSAM
except ImportError:
    InftyCFlat = InftyGAM = InftyGSAM = InftyLookSAM = None

ADAMW = dict(lr=1e-3, weight_decay=1e-2)
BASE_BYTES = 28  # AdamW's update, fp32, with the restore read
WRITE_BYTES = 8  # one gradient set copied into .grad
SETS = ("resnet18", "transformer", "many_small")
GRADIENT_SETS = 4  # the most writes of one iteration (GAM, C-Flat)
LOOKSAM_K = 5


# ------------------------------------------------------------------------------ the closure


_gradients: dict = {}


def gradient_sets(shapes, device) -> list[list[torch.Tensor]]:
    """The fixed random gradients of a parameter set, one list per pass (only the newest set kept)."""
    key = (tuple(tuple(s) for s in shapes), str(device))
    if key not in _gradients:
        _gradients.clear()
        gen = torch.Generator().manual_seed(1)
        _gradients[key] = [
            [(torch.randn(s, generator=gen) * 1e-2).to(device) for s in shapes] for _ in range(GRADIENT_SETS)
        ]
    return _gradients[key]


class Feed:
    """The stand-in for a forward/backward: copies the next gradient set into ``.grad``.

    A ``.grad`` that a ``zero_grad(set_to_none=True)`` removed gets its preallocated tensor back
    (the first ``.grad`` of the parameter), so no pass allocates. Returns ``(logits, loss_list)``
    as INFTY's closures do (pytorch_optimizer's GSAM unpacks two values too; the others ignore it).
    """

    def __init__(self, params, sets):
        self.params, self.sets, self.calls = params, sets, 0
        self.own = [p.grad for p in params]
        self.result = (None, [torch.zeros((), device=params[0].device)])

    def __call__(self):
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            for p, own in zip(self.params, self.own):
                if p.grad is None:
                    p.grad = own
            grads = [p.grad for p in self.params]
        torch._foreach_copy_(grads, self.sets[self.calls % len(self.sets)])
        self.calls += 1
        return self.result


def _checked(step: Callable[[], None], feed: Feed, writes: int, name: str) -> Callable[[], None]:
    """The step, checking that it made exactly ``writes`` gradient writes (the same closure cost
    for every provider)."""

    def timed():
        before = feed.calls
        step()
        if feed.calls - before != writes:
            raise RuntimeError(f"{name}: {feed.calls - before} gradient writes per call, expected {writes}")

    return timed


# ---------------------------------------------------------------------------- the providers


@dataclass(frozen=True)
class Variant:
    extra: int  # B/param beyond the base update per timed call, fused floor (DESIGN.md §11)
    writes: int  # gradient writes per timed call
    ours: Callable  # (params, backend) -> cl_optim optimizer over cl_optim.AdamW
    pytorch_optimizer: Optional[Callable] = None  # (params, feed) -> step callable
    infty: Optional[Callable] = None  # (params, feed) -> step callable
    iterations: int = 1  # iterations per timed call
    also: Optional[dict] = None  # name -> options of one more cl_optim provider (fastest backend)

    @property
    def floor(self) -> int:
        return self.iterations * BASE_BYTES + self.extra + WRITE_BYTES * self.writes


def _two_pass(opt, feed):
    """The backward, first_step, the closure's pass at w + e, second_step."""

    def step():
        feed()
        opt.first_step()
        feed()
        opt.second_step()

    return step


def _fused_adamw(params):
    return torch.optim.AdamW(params, fused=True, **ADAMW)


def _po_gsam(params, feed):
    base = _fused_adamw(params)
    rho = pytorch_optimizer.ProportionScheduler(
        torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0), max_lr=ADAMW["lr"], min_lr=0.0,
        max_value=0.05, min_value=0.05,
    )  # fmt: skip
    opt = pytorch_optimizer.GSAM(params, base, torch.nn.Module(), rho, alpha=0.4, foreach=True)
    return lambda: opt.step(feed)  # its step calls the closure for both passes


def _po_wsam(params, feed, decouple=True):
    opt = pytorch_optimizer.WSAM(torch.nn.Module(), params, torch.optim.AdamW, rho=0.05, gamma=0.9,
                                 decouple=decouple, fused=True, **ADAMW)  # fmt: skip
    return _two_pass(opt, feed)  # its step(closure) calls the closure for both passes: the same


def _po_wsam_coupled(params, feed):
    return _po_wsam(params, feed, decouple=False)


def _po_looksam(params, feed):
    opt = pytorch_optimizer.LookSAM(params, torch.optim.AdamW, rho=0.05, k=LOOKSAM_K, alpha=0.7,
                                    foreach=True, fused=True, **ADAMW)  # fmt: skip

    # Its step(closure) calls the closure on reuse steps too (a second pass at w that LookSAM exists
    # to save); first_step/second_step with the closure only on SAM steps is LookSAM's algorithm.
    def step():
        for _ in range(LOOKSAM_K):
            feed()
            sam_step = opt.get_step() % opt.k == 0
            opt.first_step()
            if sam_step:
                feed()
            opt.second_step()

    return step


def _po_friendly_sam(params, feed):
    opt = pytorch_optimizer.FriendlySAM(params, torch.optim.AdamW, rho=0.05, sigma=1.0, lmbda=0.9,
                                        foreach=True, fused=True, **ADAMW)  # fmt: skip
    return _two_pass(opt, feed)


def _infty(cls, args, repeat=1):
    def provider(params, feed):
        opt = cls(params, _fused_adamw(params), torch.nn.Module(), args)

        def step():  # INFTY's step calls the closure for every pass, the first too
            for _ in range(repeat):
                opt.step(feed)

        return step

    return provider if cls is not None else None


WRITTEN = "written_combination"  # an `also` option: the provider without the COMBINE term

VARIANTS = {
    "gsam": Variant(
        36, 2,
        lambda params, backend: cl_optim.GSAM(params, cl_optim.AdamW, rho=0.05, alpha=0.4, backend=backend, **ADAMW),
        _po_gsam,
        _infty(InftyGSAM, {"rho": 0.05, "alpha": 0.4}),
        also={"written": {WRITTEN: True}},
    ),
    "wsam": Variant(
        28, 2,
        lambda params, backend, **options: cl_optim.WSAM(params, cl_optim.AdamW, rho=0.05, gamma=0.9, decouple=True,
                                                         backend=backend, **options, **ADAMW),
        _po_wsam,
        also={"written": {WRITTEN: True}},
    ),
    "wsam_coupled": Variant(
        28, 2,
        lambda params, backend, **options: cl_optim.WSAM(params, cl_optim.AdamW, rho=0.05, gamma=0.9, decouple=False,
                                                         backend=backend, **options, **ADAMW),
        _po_wsam_coupled,
        also={"written": {WRITTEN: True}},
    ),
    "looksam": Variant(
        84, 6,
        lambda params, backend, **options: cl_optim.LookSAM(params, cl_optim.AdamW, rho=0.05, k=LOOKSAM_K,
                                                            alpha=0.7, backend=backend, **options, **ADAMW),
        _po_looksam,
        _infty(InftyLookSAM, {"rho": 0.05, "k": LOOKSAM_K, "alpha": 0.7}, repeat=LOOKSAM_K),
        iterations=LOOKSAM_K,
        # per-tensor norms, as pytorch_optimizer and INFTY; the combination written into .grad
        also={"layerwise": {"layerwise": True}, "written": {WRITTEN: True}},
    ),
    "fsam": Variant(
        32, 2,
        lambda params, backend: cl_optim.FriendlySAM(params, cl_optim.AdamW, rho=0.05, sigma=1.0, lmbda=0.9,
                                                     backend=backend, **ADAMW),
        _po_friendly_sam,
    ),
    "msam": Variant(
        12, 1, lambda params, backend: cl_optim.MSAM(params, cl_optim.AdamW, rho=0.3, backend=backend, **ADAMW)
    ),
    "gam": Variant(
        104, 4,
        lambda params, backend: cl_optim.GAM(params, cl_optim.AdamW, rho=0.02, grad_norm_rho=0.2, backend=backend,
                                             **ADAMW),
        infty=_infty(InftyGAM, {"rho": 0.02, "norm_rho": 0.2, "grad_beta_1": 0.6, "grad_beta_2": 0.5,
                                "grad_beta_3": 0.4, "grad_gamma": 0.03}),
        also={"written": {WRITTEN: True}},
    ),
    "cflat": Variant(
        84, 4,
        lambda params, backend, **options: cl_optim.CFlat(params, cl_optim.AdamW, rho=0.2, lamb=0.2, backend=backend,
                                                          **options, **ADAMW),
        infty=_infty(InftyCFlat, {"rho": 0.2, "lamb": 0.2}),
        also={"written": {WRITTEN: True}},
    ),
    "rwp": Variant(
        20, 2,
        lambda params, backend, **options: cl_optim.RWP(params, cl_optim.AdamW, rho=0.01, alpha=0.5, backend=backend,
                                                        **options, **ADAMW),
        also={"written": {WRITTEN: True}},
    ),
}  # fmt: skip


def _ours(variant: Variant, params, feed, backend, **options):
    written = options.pop(WRITTEN, False)
    opt = variant.ours(params, backend, **options)
    if written:  # the final combination written into .grad, then the update reads it (no COMBINE)
        opt._FUSE_COMBINATION = False
    if isinstance(opt, cl_optim.MSAM):
        return lambda: (feed(), opt.step())  # no second pass: the gradient at the perturbed point

    def step():  # the backward, then step(closure): 1 closure call (GAM, C-Flat 3; LookSAM's reuse steps 0)
        for _ in range(variant.iterations):
            feed()
            opt.step(feed)

    return step


def op_name(name: str, variant: Variant) -> str:
    return f"{name}_adamw" + (f"_k{variant.iterations}" if variant.iterations > 1 else "")


def family_cases(args) -> list[Case]:
    """One case per variant and parameter set (``resnet18``, ``transformer``, ``many_small``)."""
    backends = cl_optim_backends(args.device)
    if InftyGSAM is None:
        print("INFTY is not installed: no INFTY provider (`pip install --no-deps infty==0.1.2`)")
    if pytorch_optimizer is None:
        print("pytorch_optimizer is not installed: no pytorch_optimizer provider")
    out = []
    for set_name in [s for s in args.sets if s in SETS]:
        shapes = PARAM_SETS[set_name](args.quick)
        for name, variant in VARIANTS.items():
            if name not in getattr(args, "variants", VARIANTS):
                continue
            providers = {}
            for provider, make in (
                ("pytorch_optimizer", variant.pytorch_optimizer if pytorch_optimizer is not None else None),
                ("infty", variant.infty),
            ):
                if make is not None:
                    providers[provider] = _factory(make, shapes, args.device, variant, provider)
            for backend in backends:
                make = lambda params, feed, backend=backend, variant=variant: _ours(
                    variant, params, feed, backend
                )
                providers[f"cl_optim_{backend}"] = _factory(
                    make, shapes, args.device, variant, f"cl_optim_{backend}"
                )
            for suffix, options in (variant.also or {}).items():
                make = lambda params, feed, variant=variant, options=options: _ours(
                    variant, params, feed, backends[0], **options
                )
                name_also = f"cl_optim_{backends[0]}_{suffix}"
                providers[name_also] = _factory(make, shapes, args.device, variant, name_also)
            case = Case(op_name(name, variant), set_name, numel(shapes), variant.floor, providers,
                        ["pytorch_optimizer", "infty"])  # fmt: skip
            case.min_reps, case.budget_s = (2, 0.2) if args.quick else (5, 1.5)
            case.paired = False  # paired() below: against the libraries and the written form
            out.append(case)
    return out


def _factory(make, shapes, device, variant, name):
    def factory():
        params = make_params(shapes, device)
        feed = Feed(params, gradient_sets(shapes, device))
        return _checked(make(params, feed), feed, variant.writes, name)

    return factory


# ---------------------------------------------------------------------------- paired rounds


def paired(cases: list[Case], args) -> list:
    """The fastest cl_optim backend against each other library of a case and against the same
    optimizer with its combination written, in paired rounds (``harness.paired_rows``)."""
    ours = f"cl_optim_{cl_optim_backends(args.device)[0]}"
    versions, dev, out = _versions(), device_name(args.device), []
    stamp = {"device": dev, **versions, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    print(f"\npaired rounds: speed-up of {ours}, median [p25, p75] of per-round ratios, ±half the range")
    for case in cases:
        if ours not in case.providers or case.paired:  # run() has paired it (bench_sam.py's plain SAM rows)
            continue
        written = f"{ours}_written"  # what the COMBINE term saves: the same optimizer without it
        # paired_rows keeps those the case provides
        out += paired_rows(case, None, args.device, stamp, ours=ours, against=[*case.baselines, written])
    return append_rows(args.csv, out)


def _options(parser) -> None:
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="the variants to run (all by default; none: bench_sam.py's plain SAM rows only)")  # fmt: skip


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv, extra=_options)
    cases = family_cases(args)
    rows = run(
        cases, args.device, args.csv, "bench_sam_family: one iteration of each SAM variant, optimizer side"
    )
    return rows + paired(cases, args)


if __name__ == "__main__":
    main()
