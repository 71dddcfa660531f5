"""Plain optimizer steps: SGD with momentum (20 B/param floor) and AdamW (28 B/param), fp32.

Providers: torch.optim's three implementations (for-loop, foreach, fused) and every cl_optim
backend available on the device.

    python bench/bench_step.py [--quick] [--device cuda] [--sets resnet18 many_small]
"""

from __future__ import annotations

import torch
from harness import PARAM_SETS, Case, cl_optim_backends, make_params, numel, parse_args, run

import cl_optim

OPS = {
    "sgd_momentum": (20, torch.optim.SGD, cl_optim.SGD, dict(lr=1e-3, momentum=0.9)),
    "adamw": (28, torch.optim.AdamW, cl_optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
}


def cases(args):
    out = []
    for set_name in args.sets:
        shapes = PARAM_SETS[set_name](args.quick)
        for op, (floor, torch_cls, ours_cls, kwargs) in OPS.items():

            def torch_provider(flags, torch_cls=torch_cls, kwargs=kwargs, shapes=shapes):
                def factory():
                    opt = torch_cls(make_params(shapes, args.device), **kwargs, **flags)
                    return opt.step

                return factory

            def ours_provider(backend, ours_cls=ours_cls, kwargs=kwargs, shapes=shapes):
                def factory():
                    opt = ours_cls(make_params(shapes, args.device), backend=backend, **kwargs)
                    return opt.step

                return factory

            providers = {
                "torch_forloop": torch_provider({"foreach": False}),
                "torch_foreach": torch_provider({"foreach": True}),
                "torch_fused": torch_provider({"fused": True}),
            }
            for backend in cl_optim_backends(args.device):
                providers[f"cl_optim_{backend}"] = ours_provider(backend)
            out.append(Case(op, set_name, numel(shapes), floor, providers, ["torch_fused", "torch_foreach"]))
    return out


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv)
    return run(cases(args), args.device, args.csv, "bench_step: one optimizer step")


if __name__ == "__main__":
    main()
