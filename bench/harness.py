"""Shared harness of the microbenchmarks: parameter sets, timing, bandwidth, memory, CSV and tables.

Every script (``bench_step.py``, ``bench_sam.py``, ``bench_ewc.py``, ``bench_fisher.py``) builds,
for each parameter set, a list of providers — callables that make one optimizer-side step — and
hands them to :func:`run`. Per row it measures the median and p20/p80 time, the effective GB/s on
the op's bytes floor (DESIGN.md §3), the fraction of a bandwidth ceiling measured in the same run
(the fastest of a copy, two STREAM-like triads and torch's fused AdamW over arrays sized to the op's
working set: :func:`ceiling_elements`; for the fastest cl_optim provider also in paired rounds
against that pass, which the one-shot ceiling is not: it moves with the machine), the speed-up against
each baseline, the peak extra memory of a step, and on CUDA the kernel launches per step; then
the fastest cl_optim provider against each baseline in paired rounds (``paired.py``: the median
of per-round speed-ups and its quartiles, rounds until ±10% or a budget, the machine's load while
they ran, flagged when other work shared it), with the bytes a step moves next to the last-level
cache. Rows are appended to a long-format CSV naming the device, versions and git sha.

cl_optim's providers are one per backend that ``cl_optim`` can run on the device, found in its
registry, so a new backend appears in every table without editing the scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from paired import Paired, last_level_cache, paired_speedup, synchronize

import cl_optim
from cl_optim._backend import _REGISTRY, BACKENDS

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT / "bench" / "results" / "bench.csv"
CSV_FIELDS = [
    "op", "provider", "param_set", "metric", "unit", "p50", "p20", "p80",
    "device", "torch", "triton", "cl_optim", "git_sha", "timestamp",
]  # fmt: skip


# ---------------------------------------------------------------------------- parameter sets


def _resnet18_shapes():
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    channels_in = 64
    for stage, channels in enumerate((64, 128, 256, 512)):
        for block in range(2):
            first_in = channels_in if block == 0 else channels
            shapes += [(channels, first_in, 3, 3), (channels,), (channels,)]
            shapes += [(channels, channels, 3, 3), (channels,), (channels,)]
            if block == 0 and stage > 0:  # downsample
                shapes += [(channels, channels_in, 1, 1), (channels,), (channels,)]
        channels_in = channels
    return shapes + [(1000, 512), (1000,)]


def _transformer_shapes(layers=6, width=384, vocab=8192):
    shapes = [(vocab, width), (1024, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


PARAM_SETS = {
    "large": lambda quick: [(8_000_000,)] if quick else [(64_000_000,)],
    "resnet18": lambda quick: _resnet18_shapes(),
    "transformer": lambda quick: _transformer_shapes(layers=2 if quick else 6),
    "many_small": lambda quick: [(4096,)] * (500 if quick else 2000),
    # A 100M-parameter step for GPUs (bench/gpu_check.py): named only, never a default set.
    "huge": lambda quick: [(100_000_000,)],
}
DEFAULT_SETS = [name for name in PARAM_SETS if name != "huge"]


def make_params(shapes, device, dtype=torch.float32, seed=0):
    """Leaf parameters with gradients, deterministic."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device, dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-2).to(device, dtype)
        params.append(p)
    return params


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


# ------------------------------------------------------------------------------- measuring


_l2_flush: dict = {}


def _flush_l2(device):
    if device not in _l2_flush:
        _l2_flush[device] = torch.empty(64 * 2**20, dtype=torch.int32, device=device)
    _l2_flush[device].zero_()


def time_step(
    step: Callable[[], None], device: torch.device, min_reps=5, max_reps=30, budget_s=1.5
) -> list[float]:
    """Seconds per call: one warm-up, then repeats until ``budget_s`` (at least ``min_reps``).

    On CUDA: CUDA events around each call, with the L2 cache flushed before it.
    """
    step()
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    while len(times) < min_reps or (len(times) < max_reps and spent < budget_s):
        if device.type == "cuda":
            _flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end) / 1e3
        else:
            tic = time.perf_counter()
            step()
            elapsed = time.perf_counter() - tic
        times.append(elapsed)
        spent += elapsed
    return times


def paired_measure(base: Callable[[], None], provider: Callable[[], None], device, quick: bool) -> Paired:
    """``provider`` against ``base`` in paired rounds by the harness's rule (:mod:`paired`; ratios
    time(base)/time(provider)): at least 9 rounds, then until ±10% or 15 s (``quick``: 3 rounds,
    2 s). 9 rounds at least: a baseline that allocates per step (pytorch_optimizer's SAM: 39-61 ms
    a round on the ResNet-18-like set) met ±10% within 5 rounds at 1.62x and 2.00x in two runs."""
    return paired_speedup(
        base, provider, device, min_rounds=3 if quick else 9, budget_s=2.0 if quick else 15.0
    )


def paired_details(result: Paired, against: str) -> list[tuple[str, str, float]]:
    """``(metric, unit, value)`` of how a paired ratio was measured: its spread, rounds, whether
    the machine was loaded and by how much (rows next to the ratio's own)."""
    out = [
        (f"paired_spread_vs_{against}", "ratio", result.spread),
        (f"paired_rounds_vs_{against}", "count", float(len(result.ratios))),
        (f"paired_loaded_vs_{against}", "flag", float(result.loaded)),
    ]
    for key in ("other_cores", "steal", "own_cores"):
        if result.load.get(key) is not None:
            out.append(
                (
                    f"paired_{key}_vs_{against}",
                    "cores" if key.endswith("cores") else "ratio",
                    result.load[key],
                )
            )
    return out


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), q[1], q[7]


def _rss(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _profiled_memory_events(step: Callable[[], None]) -> list:
    """The CPU profiler's events of one run of ``step``, with their memory use."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return list(prof.events())


def peak_memory(step: Callable[[], None], device: torch.device) -> float:
    """Bytes a step holds at its peak beyond what existed before it.

    CUDA: the caching allocator's peak above the memory in use before the step. CPU: the running
    sum of the profiler's memory events (each op's net allocation at its start, each free as it
    happens) in time order, its maximum: the peak of what the step itself allocated."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    changes = [
        (e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
        for e in _profiled_memory_events(step)
        if e.name == "[memory]" or e.self_cpu_memory_usage
    ]
    running = peak = 0
    for _, change in sorted(changes, key=lambda c: c[0]):
        running += change
        peak = max(peak, running)
    return float(peak)


def extra_memory(step: Callable[[], None], device: torch.device) -> tuple[str, Optional[float]]:
    """(metric, bytes) of what a step allocates beyond what existed before it.

    CUDA: the caching allocator's peak above the memory in use before the step
    (``peak_extra_memory``). CPU: the bytes the step allocates, from the profiler
    (``allocated_memory``) — an upper bound of its peak, since glibc reuses freed blocks and the
    resident set of a warmed-up process hardly moves.
    """
    if device.type == "cuda":
        return "peak_extra_memory", peak_memory(step, device)
    synchronize(device)
    return "allocated_memory", float(
        sum(max(0, e.self_cpu_memory_usage) for e in _profiled_memory_events(step))
    )


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on file descriptor 2: keep tables readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def launches_per_step(step: Callable[[], None], device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        synchronize(device)
    return float(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))


def ceiling_elements(total: int, working_set: Optional[float], cache: Optional[int]) -> int:
    """Elements per array of the ceiling's passes for an op over ``total`` elements that moves
    ``working_set`` bytes a step: ``total``, or more where the op's working set is larger than the
    copy pass's two arrays, up to 4x the last-level ``cache`` (past which a stream's rate no
    longer depends on its size; 1 GiB where the cache is not known). Why: the passes must stream
    from where the op's data lives. Over 2000 x 4096 elements a copy touches 66 MB, which a 32 MiB
    cache partly holds, while AdamW+EWC over the same parameters moves 295 MB, which no cache
    holds: a ceiling of the op's element count read 90 GB/s there against 28 GB/s on the
    64M-element set, and every step over those parameters read 20% of it. The working set is counted as the bytes a step moves, not the
    distinct bytes it touches: an op that reads and writes the same data moves more than it holds,
    so one whose data just fits the cache gets a ceiling from memory and can read above 100%.

    >>> ceiling_elements(1000, 36 * 1000, 2**25), ceiling_elements(1000, 36e9, 2**25)
    (4500, 16777216)
    """
    if working_set is None:
        return total
    wanted = min(working_set, 4 * cache if cache else 2**30)
    return max(total, math.ceil(wanted / 8))


@dataclass
class Ceiling:
    """The fastest streaming pass over a working set: its rate, and the pass itself (a callable
    holding its arrays) with the bytes it moves a call, to be timed again next to a step."""

    rate: float  # bytes/s
    step: Callable[[], None]
    nbytes: float
    name: str


def bandwidth_ceiling(total: int, device: torch.device) -> Ceiling:
    """The fastest of four streaming passes over ``total`` fp32 elements
    (:func:`ceiling_elements` sizes them for an op).

    A copy (8 B/element), a STREAM-like triad ``a = b + s*c`` and its in-place form
    ``a += s*b`` (12 B), and torch's fused AdamW step on one tensor (28 B), each counted in bytes
    moved per second (the bytes the kernel must move, as the floors of DESIGN.md §3 count them).
    """
    a, b, c = (torch.rand(total, device=device) for _ in range(3))
    param = make_params([(total,)], device)
    fused = torch.optim.AdamW(param, lr=1e-3, fused=True)
    passes = {
        "copy": (lambda: a.copy_(b), 8),
        "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 12),
        "in-place triad": (lambda: a.add_(b, alpha=1e-3), 12),  # no write-allocate read of the output
        "fused AdamW": (fused.step, 28),
    }
    best = None
    for name, (step, per_element) in passes.items():
        nbytes = per_element * total
        rate = nbytes / statistics.median(time_step(step, device, min_reps=5, budget_s=0.5))
        if best is None or rate > best.rate:
            best = Ceiling(rate, step, nbytes, name)
    return best


# ---------------------------------------------------------------------------------- providers


def cl_optim_backends(device: torch.device) -> list[str]:
    """Every cl_optim backend that can run fp32 on ``device``, fastest first (not Triton's
    interpreter on CPU tensors: it exists for tests and is not a provider to time)."""
    return [
        name
        for name in BACKENDS
        if _REGISTRY[name].shipped
        and not (name == "triton" and device.type == "cpu")
        and _REGISTRY[name].unavailable_reason(device, torch.float32) is None
    ]


@dataclass
class Case:
    """One op on one parameter set, with providers: name -> factory returning the step callable."""

    op: str
    param_set: str
    elements: int
    bytes_per_element: Optional[float]  # the floor of DESIGN.md §3; None where it does not apply
    providers: dict[str, Callable[[], Callable[[], None]]]
    baselines: list[str]
    # Report time per unit (e.g. per sample) when set: one count, or one per provider.
    unit_count: Optional[Union[int, dict]] = None
    min_reps: int = 5
    budget_s: float = 1.5
    paired: bool = True  # run() pairs the fastest cl_optim provider with each baseline (paired.py)


def _versions():
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        triton_version = "none"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        git_sha = sha.stdout.strip() or "unknown"
        # Uncommitted code changes mark the sha; the results folder a run writes to does not.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if dirty.stdout.strip():
            git_sha += "-dirty"
    except OSError:
        git_sha = "unknown"
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cl_optim": cl_optim.__version__,
        "git_sha": git_sha,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
        cpu = model.strip()
    except (OSError, AttributeError):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def run(cases: list[Case], device: torch.device, csv_path: Path, title: str) -> list[dict]:
    """Measure every provider of every case, print a table, append the rows to the CSV."""
    versions = _versions()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    dev = device_name(device)
    ceilings: dict[int, Ceiling] = {}  # by the elements each array of the passes streams
    cache = cache_of(device)
    rows, written = [], 0
    print(
        f"\n{title} — {dev}; torch {versions['torch']}, cl_optim {versions['cl_optim']} ({versions['git_sha']})"
    )
    header = f"{'op':<16} {'set':<12} {'provider':<22} {'ms p50':>9} {'[p20, p80]':>17} {'GB/s':>7} {'ceil':>5} {'speed-up':>20} {'+MiB':>9}"
    print(header)
    print("-" * len(header))
    for case in cases:
        streamed = None
        if case.bytes_per_element is not None:
            streamed = ceiling_elements(case.elements, case.bytes_per_element * case.elements, cache)
            if streamed not in ceilings:
                ceilings[streamed] = bandwidth_ceiling(streamed, device)
        ceiling = ceilings.get(streamed)
        results = {}
        for name, factory in case.providers.items():
            step = factory()
            times = time_step(step, device, min_reps=case.min_reps, budget_s=case.budget_s)
            if case.unit_count:
                units = case.unit_count[name] if isinstance(case.unit_count, dict) else case.unit_count
                times = [t / units for t in times]
            results[name] = {
                "times": times,
                "memory": extra_memory(step, device),
                "launches": launches_per_step(step, device),
            }
            del step
        for name, result in results.items():
            p50, p20, p80 = quantiles(result["times"])
            unit = "ms/sample" if case.unit_count else "ms"
            metrics = [("time", unit, 1e3 * p50, 1e3 * p20, 1e3 * p80)]
            bandwidth = fraction = None
            if case.bytes_per_element is not None:
                moved = case.bytes_per_element * case.elements
                bandwidth = moved / p50 / 1e9
                rate = ceiling.rate
                fraction = moved / p50 / rate
                metrics += [
                    ("bandwidth", "GB/s", bandwidth, moved / p80 / 1e9, moved / p20 / 1e9),
                    ("fraction_of_ceiling", "ratio", fraction, moved / p80 / rate, moved / p20 / rate),
                ]  # fmt: skip
            speedups = {}
            for base in case.baselines:
                if base in results and base != name:
                    b50, b20, b80 = quantiles(results[base]["times"])
                    speedups[base] = b50 / p50
                    metrics.append((f"speedup_vs_{base}", "x", b50 / p50, b20 / p80, b80 / p20))
            memory_metric, memory_bytes = result["memory"]
            mb = memory_bytes / 2**20
            metrics.append((memory_metric, "MiB", mb, mb, mb))
            if result["launches"] is not None:
                metrics.append(
                    ("launches_per_step", "count", result["launches"], result["launches"], result["launches"])
                )
            for metric, unit, v50, v20, v80 in metrics:
                rows.append(
                    {
                        "op": case.op, "provider": name, "param_set": case.param_set, "metric": metric,
                        "unit": unit, "p50": f"{v50:.6g}", "p20": f"{v20:.6g}", "p80": f"{v80:.6g}",
                        "device": dev, "torch": versions["torch"], "triton": versions["triton"],
                        "cl_optim": versions["cl_optim"], "git_sha": versions["git_sha"], "timestamp": stamp,
                    }
                )  # fmt: skip
            main_base = next((b for b in case.baselines if b in speedups), None)
            speed = f"{speedups[main_base]:.2f}x vs {main_base}" if main_base else "baseline"
            gbs = f"{bandwidth:7.1f}" if bandwidth is not None else "      -"
            frac = f"{fraction:5.0%}" if fraction is not None else "    -"
            memory = f"{mb:9.1f}"
            print(
                f"{case.op:<16} {case.param_set:<12} {name:<22} {1e3 * p50:9.3f} "
                f"[{1e3 * p20:7.3f},{1e3 * p80:8.3f}] {gbs} {frac} {speed:>20} {memory}"
            )
        if case.paired:
            stamped = {"device": dev, **versions, "timestamp": stamp}
            rows += paired_rows(case, results, device, stamped, ceiling=ceiling)
        # Each case's rows as soon as it is measured: a run stopped part-way (gpu_check's budget)
        # keeps what it measured.
        append_rows(csv_path, rows[written:], quiet=True)
        written = len(rows)
    if ceilings:
        for elements, found in ceilings.items():
            print(f"bandwidth ceiling over {elements / 1e6:.1f}M fp32 elements: {found.rate / 1e9:.1f} GB/s "
                  f"({found.name})")  # fmt: skip
    memory_note = (
        "allocator peak above the memory in use" if device.type == "cuda" else "bytes allocated by the step"
    )
    per_unit = " (fisher rows: ms per sample)" if any(case.unit_count for case in cases) else ""
    print(f"+MiB: {memory_note}; ceil: effective GB/s over the ceiling{per_unit}")
    print(f"{len(rows)} rows appended to {csv_path}")
    return rows


def cache_of(device: torch.device) -> Optional[int]:
    """Bytes of the last-level cache that a step's working set competes for (a GPU's L2)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    return last_level_cache()


def paired_rows(case: Case, results: Optional[dict], device: torch.device, stamp: dict,
                ours: Optional[str] = None, against: Optional[list[str]] = None,
                ceiling: Optional[Ceiling] = None) -> list[dict]:  # fmt: skip
    """``ours`` (by default the fastest cl_optim provider of ``results``) against each provider of
    ``against`` (by default the case's baselines) in paired rounds (:mod:`paired`: median of
    per-round speed-ups, its quartiles, rounds until ±10% or the budget, the machine's load while
    it ran), printed and as rows; with the bytes a step moves next to the last-level cache, so a
    cache-resident ratio can be told from a bandwidth-bound one.

    With ``ceiling``, also ``ours`` against the ceiling's pass in paired rounds:
    ``paired_fraction_of_ceiling``, per round (step's bytes / step's time) / (pass's bytes / pass's
    time). The one-shot ceiling of :func:`run` moves with the machine (62.5, 63.0 and 95.6 GB/s in
    three runs within 15 minutes here, which put steps measured minutes later at 112-119% of it);
    timed back to back, the pass and the step share the machine's state. Each round times one call
    of each by the host clock around a synchronisation: on a GPU a step of well under a millisecond
    carries its launch and sync there, which pulls the fraction towards the pass's."""
    if ours is None:
        candidates = [name for name in results if name.startswith("cl_optim")]
        if not candidates:
            return []
        ours = min(candidates, key=lambda name: statistics.median(results[name]["times"]))
    against = [
        b for b in (case.baselines if against is None else against) if b in case.providers and b != ours
    ]
    rows = []

    def row(metric, unit, p50, p20=None, p80=None):
        p20, p80 = (p50 if p20 is None else p20), (p50 if p80 is None else p80)
        rows.append({"op": case.op, "provider": ours, "param_set": case.param_set, "metric": metric, "unit": unit,
                     "p50": f"{p50:.6g}", "p20": f"{p20:.6g}", "p80": f"{p80:.6g}", **stamp})  # fmt: skip

    cache = cache_of(device)
    moved = None if case.bytes_per_element is None else case.bytes_per_element * case.elements
    where = ""
    if moved is not None:
        row("bytes_per_step", "B", moved)
        if cache:
            row("last_level_cache", "B", cache)
            state = "cache-resident" if moved <= cache else "beyond the last-level cache"
            where = f"; {moved / 2**20:.0f} MiB a step, cache {cache / 2**20:.0f} MiB: {state}"
    quick = case.budget_s < 1.0
    for base in against:
        result = paired_measure(case.providers[base](), case.providers[ours](), device, quick)
        if isinstance(case.unit_count, dict):  # per unit (a Fisher sample): the calls do different counts
            scale = case.unit_count[ours] / case.unit_count[base]
            result.ratios = [r * scale for r in result.ratios]
        q25, q75 = result.quartiles
        row(f"paired_speedup_vs_{base}", "x", result.median, q25, q75)
        for metric, unit, value in paired_details(result, base):
            row(metric, unit, value)
        print(f"  paired: {case.op} {case.param_set} {ours} vs {base}: {result.describe()}{where}")
    if ceiling is not None and moved is not None and not case.unit_count:
        result = paired_measure(ceiling.step, case.providers[ours](), device, quick)
        result.ratios = [r * moved / ceiling.nbytes for r in result.ratios]  # time ratio -> bandwidth ratio
        q25, q75 = result.quartiles
        row("paired_fraction_of_ceiling", "ratio", result.median, q25, q75)
        for metric, unit, value in paired_details(result, "ceiling"):
            row(metric, unit, value)
        print(f"  paired: {case.op} {case.param_set} {ours} of the ceiling ({ceiling.name}): "
              f"{result.median:.0%} [{q25:.0%}, {q75:.0%}] ±{result.spread:.0%}{' (loaded)' if result.loaded else ''}")  # fmt: skip
    return rows


def append_rows(csv_path: Path, rows: list, quiet: bool = False) -> list:
    """Append long-format rows to the results CSV (its header first if the file is new)."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
    if not quiet:
        print(f"{len(rows)} rows appended to {csv_path}")
    return rows


def parse_args(description: str, argv=None, extra: Optional[Callable] = None):
    """The common options; ``extra(parser)`` adds a script's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller sets and fewer cases (under a minute)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), choices=list(PARAM_SETS))
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    return args
