"""SAM iterations, optimizer side (first_step + second_step), fp32, and the SAM variants.

Bytes floors (DESIGN.md §3): SAM+AdamW 48 B/param (norm 4, perturb 16, restore+AdamW 28),
SAM+SGD-momentum 40 B/param. Providers: ``pytorch_optimizer.SAM`` over torch's fused base (what
users run today), cl_optim.SAM over torch's fused base, and cl_optim.SAM over cl_optim's base
on every available backend (restore and update in one call).

The variants (GSAM, WSAM, LookSAM, FriendlySAM, MSAM, GAM, C-Flat, RWP; one full iteration each,
the closure writing precomputed gradients into ``.grad``) against pytorch_optimizer's and INFTY's,
on the ``resnet18``, ``transformer`` and ``many_small`` sets: ``bench_sam_family.py``, whose
docstring gives the providers, the closure and the bytes floors. Then paired rounds: the fastest
cl_optim backend against each other library, each pair timed back to back. ``--quick`` runs
every provider with 2 repetitions and 3 paired rounds: a few minutes on 2 cores, not one (the
for-loop backends and INFTY's LookSAM and GAM are slow on ``many_small``).

    python bench/bench_sam.py [--quick] [--device cuda] [--sets resnet18 transformer many_small]
"""

from __future__ import annotations

try:  # the baseline; a machine without it (a lent GPU's image) still measures cl_optim's rows
    import pytorch_optimizer
except ImportError:
    pytorch_optimizer = None
import torch
from bench_sam_family import _options, family_cases, paired
from harness import PARAM_SETS, Case, cl_optim_backends, make_params, numel, parse_args, run

import cl_optim

OPS = {
    "sam_adamw": (48, torch.optim.AdamW, cl_optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    "sam_sgd": (40, torch.optim.SGD, cl_optim.SGD, dict(lr=1e-3, momentum=0.9)),
}


def _iteration(opt):
    def step():
        opt.first_step()
        opt.second_step()

    return step


def cases(args):
    out = []
    for set_name in args.sets:
        shapes = PARAM_SETS[set_name](args.quick)
        for op, (floor, torch_cls, ours_cls, kwargs) in OPS.items():
            providers = {
                "pytorch_optimizer": lambda torch_cls=torch_cls, kwargs=kwargs, shapes=shapes: _iteration(
                    pytorch_optimizer.SAM(
                        make_params(shapes, args.device), torch_cls, rho=0.05, fused=True, **kwargs
                    )
                ),
                "cl_optim+torch_fused": lambda torch_cls=torch_cls, kwargs=kwargs, shapes=shapes: _iteration(
                    cl_optim.SAM(make_params(shapes, args.device), torch_cls, rho=0.05, fused=True, **kwargs)
                ),
            }
            if pytorch_optimizer is None:
                del providers["pytorch_optimizer"]
            for backend in cl_optim_backends(args.device):
                providers[f"cl_optim_{backend}"] = lambda backend=backend, ours_cls=ours_cls, kwargs=kwargs, shapes=shapes: _iteration(
                    cl_optim.SAM(make_params(shapes, args.device), ours_cls, rho=0.05, backend=backend, **kwargs)
                )  # fmt: skip
            baseline = "pytorch_optimizer" if pytorch_optimizer is not None else "cl_optim+torch_fused"
            case = Case(op, set_name, numel(shapes), floor, providers, [baseline])
            if args.quick:
                case.min_reps, case.budget_s = 2, 0.2
            out.append(case)
    return out


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv, extra=_options)
    all_cases = cases(args) + family_cases(args)
    rows = run(
        all_cases, args.device, args.csv, "bench_sam: one iteration of SAM and its variants, optimizer side"
    )
    return rows + paired(all_cases, args)


if __name__ == "__main__":
    main()
