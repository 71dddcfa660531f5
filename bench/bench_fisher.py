"""Diagonal-Fisher estimation: time per sample of each way of getting per-sample squares.

A 784-400-400-10 MLP (478k parameters, the model of ``research/ewc.md`` §2.1) on random inputs,
batches of 128. Providers per estimator: ``loop_bs1`` (one forward/backward per sample, what most
CL libraries do), ``torch_func_vmap`` (``vmap`` over ``grad``, materialising per-sample
gradients), and ``cl_optim`` (``cl_optim.fisher.estimate``: the ``(delta^2)^T (x^2)`` identity
through hooks). There is no bytes floor: the table reports time per sample.

    python bench/bench_fisher.py [--quick] [--device cuda]
"""

from __future__ import annotations

import torch
from harness import Case, parse_args, run
from torch import nn
from torch.func import functional_call, grad, vmap

import cl_optim

CLASSES = 10


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, CLASSES)
    ).to(device)


def _data(samples, device, batch=128):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 784, generator=gen).to(device)
    y = torch.randint(0, CLASSES, (samples,), generator=gen).to(device)
    return [(x[s : s + batch], y[s : s + batch]) for s in range(0, samples, batch)]


def loop_bs1(model, data, estimator):
    params = list(model.parameters())
    totals = [torch.zeros_like(p) for p in params]

    def step():
        for x, y in data:
            for n in range(x.shape[0]):
                logp = torch.log_softmax(model(x[n : n + 1])[0], 0)
                if estimator == "empirical":
                    terms = [(1.0, logp[y[n]])]
                else:
                    probs = logp.detach().exp()
                    terms = [(probs[c], logp[c]) for c in range(CLASSES)]
                for weight, value in terms:
                    grads = torch.autograd.grad(value, params, retain_graph=True)
                    for t, g in zip(totals, grads):
                        t.add_(weight * g.square())

    return step


def torch_func_vmap(model, data, estimator):
    params = {name: p.detach() for name, p in model.named_parameters()}
    totals = {name: torch.zeros_like(p) for name, p in params.items()}

    def log_prob(p, x, c):
        logp = torch.log_softmax(functional_call(model, p, (x.unsqueeze(0),))[0], 0)
        return torch.gather(logp, 0, c.unsqueeze(0))[0]

    per_sample = vmap(grad(log_prob), in_dims=(None, 0, 0))

    def step():
        for x, y in data:
            if estimator == "empirical":
                labels, weights = [y], [torch.ones(x.shape[0], device=x.device)]
            else:
                with torch.no_grad():
                    probs = torch.softmax(model(x), 1)
                labels = [torch.full_like(y, c) for c in range(CLASSES)]
                weights = [probs[:, c] for c in range(CLASSES)]
            for label, weight in zip(labels, weights):
                for name, g in per_sample(params, x, label).items():
                    totals[name] += torch.einsum("n,n...->...", weight, g.square())

    return step


def ours(model, data, estimator):
    return lambda: cl_optim.fisher.estimate(model, data, estimator=estimator)


def cases(args):
    out = []
    for estimator in ("empirical", "exact"):
        loops = 64 if args.quick else 256  # the b = 1 loop is slow: time it on fewer samples
        samples = 256 if args.quick else 1024
        model = _model(args.device)
        providers = {
            "loop_bs1": lambda e=estimator, m=model, n=loops: loop_bs1(m, _data(n, args.device, batch=n), e),
            "torch_func_vmap": lambda e=estimator, m=model, n=samples: torch_func_vmap(
                m, _data(n, args.device), e
            ),
            "cl_optim": lambda e=estimator, m=model, n=samples: ours(m, _data(n, args.device), e),
        }
        # Per-sample times; the loop runs on `loops` samples, the others on `samples`.
        case = Case(f"fisher_{estimator}", "mlp784", 0, None, providers, ["loop_bs1", "torch_func_vmap"])
        case.unit_count = {"loop_bs1": loops, "torch_func_vmap": samples, "cl_optim": samples}
        case.min_reps, case.budget_s = 2, 2.0
        out.append(case)
    return out


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv)
    return run(cases(args), args.device, args.csv, "bench_fisher: diagonal Fisher, time per sample")


if __name__ == "__main__":
    main()
