"""EWC steps: the penalty gradient plus the update, fp32.

Bytes floors (DESIGN.md §3): AdamW+EWC 36 B/param, SGD-momentum+EWC 28 B/param. Providers:
``autograd_penalty`` (``lam/2 * sum F (p - mu)^2`` added to the loss and back-propagated, as
Avalanche does, then torch's fused step), ``foreach_addcmul`` (the analytic gradient added with
``torch._foreach_addcmul_``, then torch's fused step), and cl_optim's optimizers with ``ewc=`` on
every available backend (the term inside the update).

    python bench/bench_ewc.py [--quick] [--device cuda] [--sets resnet18 many_small]
"""

from __future__ import annotations

import torch
from harness import PARAM_SETS, Case, cl_optim_backends, make_params, numel, parse_args, run

import cl_optim

LAM = 100.0
OPS = {
    "adamw_ewc": (36, torch.optim.AdamW, cl_optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    "sgd_ewc": (28, torch.optim.SGD, cl_optim.SGD, dict(lr=1e-3, momentum=0.9)),
}


def _consolidated(params):
    gen = torch.Generator().manual_seed(1)
    ewc = cl_optim.EWC([(f"p{i}", p) for i, p in enumerate(params)], lam=LAM)
    ewc.consolidate({f"p{i}": torch.rand(p.shape, generator=gen).to(p.device) for i, p in enumerate(params)})
    return ewc


def _torch_terms(params):
    ewc = _consolidated(params)
    precision = [e.precision for e in ewc._entries.values()]
    anchor = [e.anchor for e in ewc._entries.values()]
    return precision, anchor


def autograd_penalty(torch_cls, kwargs, shapes, device):
    params = make_params(shapes, device)
    precision, anchor = _torch_terms(params)
    opt = torch_cls(params, fused=True, **kwargs)

    def step():
        with torch.enable_grad():
            penalty = sum((a * (p - mu) ** 2).sum() for p, a, mu in zip(params, precision, anchor)) * (
                LAM / 2
            )
            penalty.backward()
        opt.step()

    return step


def foreach_addcmul(torch_cls, kwargs, shapes, device):
    params = make_params(shapes, device)
    precision, anchor = _torch_terms(params)
    opt = torch_cls(params, fused=True, **kwargs)
    grads = [p.grad for p in params]

    def step():
        with torch.no_grad():
            torch._foreach_addcmul_(grads, precision, torch._foreach_sub(params, anchor), value=LAM)
        opt.step()

    return step


def fused(ours_cls, kwargs, shapes, device, backend):
    params = make_params(shapes, device)
    opt = ours_cls(params, ewc=_consolidated(params), backend=backend, **kwargs)
    return opt.step


def cases(args):
    out = []
    for set_name in args.sets:
        shapes = PARAM_SETS[set_name](args.quick)
        for op, (floor, torch_cls, ours_cls, kwargs) in OPS.items():
            providers = {
                "autograd_penalty": lambda t=torch_cls, k=kwargs, s=shapes: autograd_penalty(
                    t, k, s, args.device
                ),
                "foreach_addcmul": lambda t=torch_cls, k=kwargs, s=shapes: foreach_addcmul(
                    t, k, s, args.device
                ),
            }
            for backend in cl_optim_backends(args.device):
                providers[f"cl_optim_{backend}"] = lambda b=backend, o=ours_cls, k=kwargs, s=shapes: fused(
                    o, k, s, args.device, b
                )
            out.append(
                Case(op, set_name, numel(shapes), floor, providers, ["autograd_penalty", "foreach_addcmul"])
            )
    return out


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv)
    return run(cases(args), args.device, args.csv, "bench_ewc: EWC penalty gradient + update")


if __name__ == "__main__":
    main()
