"""Where many small tensors lie in memory, and what it costs a multi-tensor step (CPU).

The README and DESIGN.md §5 say that the C++ kernels stream 16 KiB tensors at a fraction of one
large tensor's rate, and that most of the difference is where the tensors lie. This script
measures it, each pair in paired rounds (:func:`harness.paired_measure`: median of per-round ratios, quartiles):

``grad_sq_norm`` (the cpp op, called with its lists) over ``count`` tensors of ``size`` fp32
elements, each layout against one tensor of the same total size:

- ``views``: the tensors are views of one buffer (the op's per-tensor cost alone);
- ``separate``: allocated one after another;
- ``interleaved``: allocated alternately with as many other tensors of the same size (as a model's
  parameters and their gradients are when made together, and as ``zero_grad(set_to_none=True)``
  leaves gradients among the backward's temporaries);
- ``one_element``: ``count`` one-element tensors against one (the per-tensor cost, no data).

Allocating an optimizer's state list by list (all first moments, then all second moments) rather
than a parameter's buffers together was tried on an AdamW step over these tensors: 0.90-1.12x
across runs, following what the process had freed before; not kept (cl_optim/adamw.py).

    python bench/bench_layout.py [--quick] [--count 2000] [--size 4096]
"""

from __future__ import annotations

import statistics
import time

import torch
from harness import _versions, append_rows, device_name, paired_measure, parse_args

from cl_optim._backend import kernel_op


def _norm_cases(count: int, size: int) -> dict:
    """``{layout: (baseline step, step)}`` for grad_sq_norm."""
    op = kernel_op("cpp", "grad_sq_norm", torch.zeros(1))
    call = lambda tensors: lambda: op(tensors, [], [], [], 0.0)  # noqa: E731
    one = torch.randn(count * size)
    separate = [torch.randn(size) for _ in range(count)]
    others, interleaved = [], []
    for _ in range(count):
        others.append(torch.randn(size))  # the gaps between the tensors read
        interleaved.append(torch.randn(size))
    return {
        "views": (call([one]), call(list(one.split(size)))),
        "separate": (call([one]), call(separate)),
        "interleaved": (call([one]), call(interleaved)),
        "one_element": (call([torch.randn(1)]), call([torch.randn(1) for _ in range(count)])),
    }


def main(argv=None):
    def extra(parser):
        parser.add_argument("--count", type=int, default=2000)
        parser.add_argument("--size", type=int, default=4096)

    args = parse_args(__doc__.splitlines()[0], argv, extra)
    if args.device.type != "cpu":
        raise SystemExit("bench_layout measures the CPU kernels; run it with --device cpu")
    count, size = (min(500, args.count), args.size) if args.quick else (args.count, args.size)
    versions, dev = _versions(), device_name(args.device)
    stamp = {"device": dev, **versions, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    param_set = f"{count}x{size}"
    rows = []

    def row(provider, metric, unit, p50, q25, q75):  # the quartiles in the p20/p80 columns, as paired rows
        rows.append({"op": "layout_grad_sq_norm", "provider": provider, "param_set": param_set, "metric": metric,
                     "unit": unit, "p50": f"{p50:.6g}", "p20": f"{q25:.6g}", "p80": f"{q75:.6g}", **stamp})  # fmt: skip

    print(f"bench_layout: grad_sq_norm over {count} tensors of {size} fp32 elements, paired rounds — {dev}")
    for layout, (one, step) in _norm_cases(count, size).items():
        result = paired_measure(one, step, args.device, args.quick)
        if layout != "one_element":  # time(one tensor) / time(layout): below 1 where it is slower
            q25, q75 = result.quartiles
            row(layout, "paired_speedup_vs_one_tensor", "x", result.median, q25, q75)
            print(f"{layout:<22} vs one tensor {result.median:6.3f}x [{q25:.3f}, {q75:.3f}] "
                  f"({len(result.ratios)} rounds{', loaded' if result.loaded else ''})")  # fmt: skip
            continue
        # No data: what each tensor of a list costs the op, per round the difference of the two.
        extra = [(t - b) / count * 1e6 for t, b in zip(result.provider_s, result.base_s)]
        q25, _, q75 = statistics.quantiles(extra, n=4, method="inclusive")
        row(layout, "per_tensor_us", "us", statistics.median(extra), q25, q75)
        print(f"{'per tensor of a list':<22} {statistics.median(extra):.3f} us [{q25:.3f}, {q75:.3f}]")
    append_rows(args.csv, rows)
    return rows


if __name__ == "__main__":
    main()
