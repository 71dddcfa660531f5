"""Diagonal-Fisher estimation: time per sample of each way of getting per-sample squares, and
the cost of an estimate relative to one batched backward.

Part 1, time per sample: a 784-400-400-10 MLP (478k parameters, the model of
``research/ewc.md`` §2.1) on random inputs, batches of 128. Providers per estimator: ``loop_bs1``
(one forward/backward per sample, what most CL libraries do), ``torch_func_vmap`` (``vmap`` over
``grad``, materialising per-sample gradients), and ``cl_optim`` (``cl_optim.fisher.estimate``).

Part 2, cost relative to one batched forward+backward of the mean loss over the same data
(empirical Fisher, one seed), from paired rounds by the harness's rule (the backward and the
provider timed back to back, alternating; the median of the per-round ratios with their quartiles,
at least 9 rounds and until ±10% or 15 s, 3 with ``--quick``; a wide spread or a loaded machine is
marked and recorded), and each provider's peak memory above what existed before it
(``harness.peak_memory``: the CUDA allocator's peak, or on CPU the running sum of the profiler's
allocations and frees): the MLP, a small CNN (two Conv2d on 3 x 32 x 32), a Conv1d model, a
transformer block model (token and shared position embeddings, two ``TransformerEncoderLayer``,
``RMSNorm``, head) and an LSTM model, all on fast rules. Providers: ``cl_optim`` (a first
estimate on the model, ``reuse_plan=False``: probe and self-check included, their shares of the
estimate printed), ``cl_optim_unchecked`` (``verify=False``, ``reuse_plan=False``: the probe
without the self-check), ``cl_optim_kept_plan`` (the default on a model estimated before: the
routes kept from the last estimate, ``cl_optim.fisher.plans``, so no probe; the self-check runs),
``torch_func_model`` (``vmap`` over ``grad`` of the whole model, what the model-level fallback
costs), ``backpack`` (BackPACK's ``SumGradSquared``, where it installs and supports the model's
layers: the MLP and the convolution models) and ``loop_bs1`` (the last fallback).

    python bench/bench_fisher.py [--quick] [--device cuda]
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
from harness import (
    Case,
    _versions,
    append_rows,
    device_name,
    paired_details,
    paired_measure,
    parse_args,
    peak_memory,
    run,
)
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
                    totals[name] += torch.tensordot(weight, g.square(), dims=1)  # one GEMV, not einsum

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


# ----------------------------------------------------------------------- part 2: cost vs backward


class TransformerClassifier(nn.Module):
    """Tokens + positions looked up with arange(T) (shared by the batch), encoder blocks, RMSNorm,
    mean pool, head: every layer has a fast rule."""

    def __init__(self, vocab=1000, width=128, heads=4, layers=2, length=32, classes=CLASSES):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(length, width)
        self.blocks = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.1, batch_first=True)
                for _ in range(layers)
            ]
        )
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        return self.head(self.norm(self.blocks(h).mean(1)))


def _cnn(device):
    """Two 3x3 convolutions with pooling and a head on 3 x 32 x 32 images (CIFAR-sized)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, CLASSES),
    ).to(device)  # fmt: skip


def _conv1d(device):
    """Two width-5 Conv1d over 16 channels x 128 steps, average pool, head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(16, 64, 5, padding=2), nn.ReLU(), nn.Conv1d(64, 64, 5, padding=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(64, CLASSES),
    ).to(device)  # fmt: skip


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=1000, width=64, hidden=128, classes=CLASSES):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        out, _ = self.rnn(self.tok(tokens))
        return self.head(out[:, -1])


def _cost_models(args):
    gen = torch.Generator().manual_seed(0)
    batches, batch, length = (2, 32, 16) if args.quick else (4, 128, 32)  # issue 17's measure: 4 x 128

    def tokens():
        return [
            (torch.randint(0, 1000, (batch, length), generator=gen).to(args.device),
             torch.randint(0, CLASSES, (batch,), generator=gen).to(args.device))
            for _ in range(batches)
        ]  # fmt: skip

    def images(shape):
        return [
            (torch.randn(batch, *shape, generator=gen).to(args.device),
             torch.randint(0, CLASSES, (batch,), generator=gen).to(args.device))
            for _ in range(batches)
        ]  # fmt: skip

    torch.manual_seed(0)
    return {
        "mlp784": (_model(args.device), _data(batches * batch, args.device, batch=batch)),
        "cnn": (_cnn(args.device), images((3, 32, 32))),
        "conv1d": (_conv1d(args.device), images((16, 4 * length))),
        "transformer": (TransformerClassifier(length=length).to(args.device), tokens()),
        "lstm": (LSTMClassifier().to(args.device), tokens()),
    }


def backpack_sum_grad_squared(model, data):
    """BackPACK's SumGradSquared over the same batches (a copy of the model: its extension hooks
    would slow the other providers). Raises ImportError where BackPACK is not installed
    (``pip install --no-deps backpack-for-pytorch einops unfoldNd``: its wheel pulls torchvision,
    which pulls another torch)."""
    import copy

    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    extended = extend(copy.deepcopy(model))
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    params = [p for p in extended.parameters() if p.requires_grad]

    def step():
        totals = [torch.zeros_like(p) for p in params]
        for x, y in data:
            extended.zero_grad()
            with backpack(SumGradSquared()):
                loss_fn(extended(x), y).backward()
            for total, p in zip(totals, params):
                total += p.sum_grad_squared

    return step


def _backward(model, data):
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for x, y in data:
            torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)

    return step


def _ours(model, data, shares, verify=True, reuse_plan=False):
    def step():
        result = cl_optim.fisher.estimate(
            model, data, estimator="empirical", verify=verify, reuse_plan=reuse_plan
        )
        if verify and not reuse_plan:
            total = result.meta["seconds"]
            check, probe = result.meta["verify"]["seconds"], result.meta["plan"]["seconds"]
            shares.append((check / total, probe / total, check, probe))

    return step


def cost_table(args):
    versions, stamp, dev = _versions(), time.strftime("%Y-%m-%dT%H:%M:%S%z"), device_name(args.device)
    rows = []
    print(f"\nbench_fisher: cost of an empirical-Fisher estimate relative to one batched forward+backward, "
          f"paired rounds — {dev}")  # fmt: skip
    print(
        f"{'model':<12} {'provider':<18} {'x backward p50':>15} {'[p25, p75]':>16}  spread; routes / shares"
    )
    for name, (model, data) in _cost_models(args).items():
        model.eval()
        base = _backward(model, data)
        samples = sum(len(y) for _, y in data)
        loop_data = data[:1] if name != "mlp784" else data
        loop_samples = sum(len(y) for _, y in loop_data)
        shares: list = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kept = cl_optim.fisher.estimate(model, data, estimator="empirical")
            routes = sorted(
                set(r.split(" (")[0].split(":")[0] for r in kept.meta["per_sample"].values()) - {"not called"}
            )
            providers = {
                "cl_optim": _ours(model, data, shares),
                "cl_optim_unchecked": _ours(model, data, shares, verify=False),
                "cl_optim_kept_plan": _ours(model, data, shares, reuse_plan=True),
                "torch_func_model": torch_func_vmap(model, data, "empirical"),
                # The loop runs on fewer samples; its ratio is scaled to the same sample count.
                "loop_bs1": loop_bs1(model, loop_data, "empirical"),
            }
            try:  # built once, outside the timing
                providers = {**providers, "backpack": backpack_sum_grad_squared(model, data)}
                providers["loop_bs1"] = providers.pop("loop_bs1")  # the slow one last, as before
            except ImportError as error:
                print(f"{name:<12} {'backpack':<18} {'not installed':>15}  {error}")
            for provider, fn in providers.items():
                try:
                    # time(provider) / time(backward): the backward is the "provider" of the pair
                    paired = paired_measure(fn, base, args.device, args.quick)
                except Exception as error:  # noqa: BLE001 - torch.func cannot trace every model (LSTM on CPU)
                    print(
                        f"{name:<12} {provider:<18} {'failed':>15}  {type(error).__name__}: {str(error)[:60]}"
                    )
                    continue
                if provider == "loop_bs1":
                    paired.ratios = [r * samples / loop_samples for r in paired.ratios]
                peak = peak_memory(fn, args.device)  # the provider's own peak, above what existed
                p50, (p20, p80) = paired.median, paired.quartiles
                note = f"±{paired.spread:.0%}{'' if paired.converged else ' wide'}{' LOADED' if paired.loaded else ''}; "
                if provider == "cl_optim" and shares:
                    fixed = statistics.median(s[0] + s[1] for s in shares)
                    note += (f"{', '.join(routes)}; probe {statistics.median(s[1] for s in shares):.0%} "
                             f"({statistics.median(s[3] for s in shares) * 1e3:.1f} ms), self-check "
                             f"{statistics.median(s[0] for s in shares):.0%} "
                             f"({statistics.median(s[2] for s in shares) * 1e3:.1f} ms) of the estimate; "
                             f"without both {p50 * (1 - fixed):.2f}x")  # fmt: skip
                note = f"peak {peak / 2**20:.1f} MiB; " + note
                print(f"{name:<12} {provider:<18} {p50:14.2f}x [{p20:6.2f},{p80:7.2f}]  {note}")
                main_row = {
                    "op": "fisher_cost", "provider": provider, "param_set": name, "metric": "x_backward",
                    "unit": "ratio", "p50": f"{p50:.4g}", "p20": f"{p20:.4g}", "p80": f"{p80:.4g}",
                    "device": dev, **versions, "timestamp": stamp,
                }  # fmt: skip
                rows.append(main_row)
                rows.append({**main_row, "metric": "peak_memory", "unit": "bytes", "p50": f"{peak:.4g}", "p20": f"{peak:.4g}", "p80": f"{peak:.4g}"})  # fmt: skip
                for metric, unit, value in paired_details(paired, "backward"):
                    rows.append({**main_row, "metric": metric, "unit": unit, "p50": f"{value:.4g}", "p20": f"{value:.4g}", "p80": f"{value:.4g}"})  # fmt: skip
                if provider == "cl_optim" and shares:
                    marginal = p50 * (1 - statistics.median(s[0] + s[1] for s in shares))
                    rows.append({**main_row, "metric": "x_backward_past_the_plan", "p50": f"{marginal:.4g}",
                                 "p20": f"{marginal:.4g}", "p80": f"{marginal:.4g}"})  # fmt: skip
                    for metric, values in (
                        ("self_check_share", [s[0] for s in shares]),
                        ("probe_share", [s[1] for s in shares]),
                        ("self_check_seconds", [s[2] for s in shares]),
                        ("probe_seconds", [s[3] for s in shares]),
                    ):
                        v = statistics.median(values)
                        unit = "s" if metric.endswith("_seconds") else "ratio"
                        rows.append({**main_row, "metric": metric, "unit": unit, "p50": f"{v:.4g}", "p20": f"{min(values):.4g}", "p80": f"{max(values):.4g}"})  # fmt: skip
    return append_rows(args.csv, rows)


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv)
    rows = run(cases(args), args.device, args.csv, "bench_fisher: diagonal Fisher, time per sample")
    return rows + cost_table(args)


if __name__ == "__main__":
    main()
