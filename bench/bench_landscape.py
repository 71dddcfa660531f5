"""Hessian measurements: time and Hessian-vector products of ``cl_optim.landscape`` against PyHessian
and a plain power iteration.

On an MLP (64-128-128-10, tanh) and a small CNN (two 3x3 convolutions, 16x16 inputs), over 2
batches of 128 random samples with cross-entropy, in eval mode:

* HVPs until the top eigenvalue is within 1e-3 of the reference, Lanczos against power iteration
  from the same start (the comparison at equal accuracy);
* top eigenvalue at each method's own tolerance 1e-3: ``cl_optim`` (Lanczos, ``hessian_eigenvalues``,
  which stops on the Ritz residual, so it overshoots the accuracy asked),
  ``power`` (plain power iteration on ``cl_optim.landscape.hvp``, stopping when the Rayleigh
  quotient changes by less than the tolerance, as PyHessian does) and ``pyhessian``
  (``hessian(...).eigenvalues(tol=1e-3)``, PyHessian 0.1). Each is reported with its HVPs (one
  HVP = one product over all the data) and its relative error against Lanczos at 1e-10.
* trace: ``cl_optim`` Hutchinson with 100 probes in blocks of 10, and PyHessian's ``trace``
  (Rademacher, stops at a relative change below 1e-3, at most 100).

Speed-ups against PyHessian come from paired rounds by the harness's rule (each pair timed back to
back, the order alternating; the median of the per-round ratios with their quartiles, at least 9
rounds and until ±10% or 15 s, 3 rounds with ``--quick``; a wide spread or a loaded machine is
marked and recorded).

    python bench/bench_landscape.py [--quick] [--device cpu]
"""

from __future__ import annotations

import time

import torch
from harness import _versions, append_rows, device_name, paired_details, paired_measure, parse_args
from torch import nn

import cl_optim
from cl_optim import landscape

TOL = 1e-3


def _mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.tanh(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.tanh(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def _cases(device, quick):
    gen = torch.Generator().manual_seed(0)
    batches, size = (1, 64) if quick else (2, 128)

    def data(shape):
        return [
            (torch.randn(size, *shape, generator=gen).to(device), torch.randint(0, 10, (size,), generator=gen).to(device))
            for _ in range(batches)
        ]  # fmt: skip

    torch.manual_seed(0)
    return {
        "mlp": (_mlp().to(device).eval(), data((64,))),
        "cnn": (SmallCNN().to(device).eval(), data((1, 16, 16))),
    }


def power_iteration(model, data, tol=TOL, max_iter=200):
    """Plain power iteration: the largest-magnitude eigenvalue, stop on a relative change below tol."""
    n = sum(p.numel() for p in model.parameters())
    v = torch.randn(n, generator=torch.Generator().manual_seed(0))
    v /= v.norm()
    value, count = None, 0
    for _ in range(max_iter):
        w = landscape.hvp(model, data, v, mode="eval")
        count += 1
        new = float(torch.dot(w, v))
        v = w / w.norm()
        if value is not None and abs(new - value) <= tol * abs(value):
            return new, count
        value = new
    return value, count


def products_to_accuracy(model, data, reference: float, accuracy: float = TOL) -> dict:
    """Hessian-vector products until the top eigenvalue is within ``accuracy`` (relative) of the
    reference: Lanczos (its top Ritz value) against power iteration (its Rayleigh quotient), from
    the same random start."""
    from cl_optim.landscape.eigen import _ritz, lanczos
    from cl_optim.landscape.objective import Objective

    out = {}
    with Objective(model, data, mode="eval") as objective:
        start = torch.randn(objective.size, generator=torch.Generator().manual_seed(0))

        def reached(alpha, beta, basis):
            return abs(float(_ritz(alpha, beta)[0].max()) - reference) <= accuracy * abs(reference)

        alpha, _, _ = lanczos(objective.hvp, start, 300, check=reached)
        out["cl_optim"] = len(alpha)
        v, count = start / start.norm(), 0
        while count < 1000:
            w = objective.hvp(v.unsqueeze(0))[0]
            count += 1
            if abs(float(torch.dot(w, v)) - reference) <= accuracy * abs(reference):
                break
            v = w / w.norm()
        out["power"] = count
    return out


def _pyhessian(model, data):
    try:
        from pyhessian import hessian
    except ImportError:
        return None
    counter = {"n": 0}
    original = hessian.dataloader_hv_product  # the class (pyhessian re-exports it over its module)

    def counting(self, v):
        counter["n"] += 1
        return original(self, v)

    hessian.dataloader_hv_product = counting
    return hessian(
        model, nn.CrossEntropyLoss(), dataloader=data, cuda=next(model.parameters()).is_cuda
    ), counter


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv)
    versions, stamp, dev = _versions(), time.strftime("%Y-%m-%dT%H:%M:%S%z"), device_name(args.device)
    rows = []
    print(f"\nbench_landscape: Hessian measurements, paired rounds against PyHessian — {dev}")
    print(
        f"{'model':<6} {'what':<10} {'provider':<10} {'value':>10} {'rel error':>10} {'HVPs':>6} {'ms':>9} {'x vs pyhessian':>22}"
    )

    def record(model_name, op, provider, metric, unit, p50, p20=None, p80=None):
        rows.append({
            "op": op, "provider": provider, "param_set": model_name, "metric": metric, "unit": unit,
            "p50": f"{p50:.6g}", "p20": f"{(p20 if p20 is not None else p50):.6g}",
            "p80": f"{(p80 if p80 is not None else p50):.6g}", "device": dev, **versions, "timestamp": stamp,
        })  # fmt: skip

    for name, (model, data) in _cases(args.device, args.quick).items():
        reference, _ = landscape.hessian_eigenvalues(
            model, data, tol=1e-10, max_iter=300, mode="eval", dtype=torch.float64
        )
        reference = float(reference[0])
        exact_trace, _ = landscape.hessian_trace(model, data, n_probes=2000, block=50, mode="eval")
        loaded = _pyhessian(model, data)
        eig = {
            "cl_optim": lambda m=model, d=data: landscape.hessian_eigenvalues(m, d, tol=TOL, mode="eval"),
            "power": lambda m=model, d=data: power_iteration(m, d),
        }
        trace = {"cl_optim": lambda m=model, d=data: landscape.hessian_trace(m, d, n_probes=100, mode="eval")}
        if loaded is not None:
            engine, counter = loaded
            eig["pyhessian"] = lambda e=engine: e.eigenvalues(maxIter=200, tol=TOL)
            trace["pyhessian"] = lambda e=engine: e.trace(maxIter=100, tol=TOL)
        for what, providers in (("top eig", eig), ("trace", trace)):
            op = "landscape_eig" if what == "top eig" else "landscape_trace"
            for provider, fn in providers.items():
                before = cl_optim.landscape.objective.Objective.products
                if loaded is not None:
                    counter["n"] = 0
                tic = time.perf_counter()
                result = fn()
                elapsed = time.perf_counter() - tic
                hvps = (
                    counter["n"]
                    if provider == "pyhessian"
                    else cl_optim.landscape.objective.Objective.products - before
                )
                if what == "top eig":
                    value = float(result[0]) if provider == "power" else float(result[0][0])
                    error = abs(value - reference) / abs(reference)
                else:
                    value = float(result[0]) if provider == "cl_optim" else float(sum(result) / len(result))
                    error = abs(value - exact_trace) / abs(exact_trace)
                speed = ""
                if loaded is not None and provider != "pyhessian":
                    paired = paired_measure(providers["pyhessian"], fn, args.device, args.quick)
                    q25, q75 = paired.quartiles
                    speed = f"{paired.median:.2f}x [{q25:.2f}, {q75:.2f}] ±{paired.spread:.0%}"
                    speed += "" if paired.converged else " wide"
                    speed += " LOADED" if paired.loaded else ""
                    record(name, op, provider, "speedup_vs_pyhessian", "x", paired.median, q25, q75)
                    for metric, unit, value in paired_details(paired, "pyhessian"):
                        record(name, op, provider, metric, unit, value, value, value)
                print(
                    f"{name:<6} {what:<10} {provider:<10} {value:10.4g} {error:10.2e} {hvps:6d} {1e3 * elapsed:9.1f} {speed:>22}"
                )
                record(name, op, provider, "value", "", value)
                record(name, op, provider, "relative_error", "ratio", error)
                record(name, op, provider, "hvps", "count", hvps)
                record(name, op, provider, "time", "ms", 1e3 * elapsed)
        print(
            f"{name:<6} reference: top eigenvalue {reference:.6g} (Lanczos, tol 1e-10), trace {exact_trace:.6g} (2000 probes)"
        )
        needed = products_to_accuracy(model, data, reference)
        print(
            f"{name:<6} HVPs to a top eigenvalue within {TOL:g} of the reference: Lanczos {needed['cl_optim']}, "
            f"power iteration {needed['power']}"
        )
        for provider, count in needed.items():
            record(name, "landscape_eig", provider, "hvps_to_1e-3", "count", count)
    if all(r["provider"] != "pyhessian" for r in rows):
        print("PyHessian is not installed (pip install --no-deps pyhessian): its rows are missing")
    return append_rows(args.csv, rows)


if __name__ == "__main__":
    main()
