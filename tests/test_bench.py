"""The microbenchmark harness: a quick run writes well-formed rows for every provider."""

from __future__ import annotations

import csv
import importlib
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _load(name):
    return importlib.import_module(name)  # bench/ is on sys.path, as when a script runs


def test_quick_step_and_ewc_benchmarks_write_the_csv_schema(tmp_path):
    harness = _load("harness")
    out = tmp_path / "bench.csv"
    for name in ("bench_step", "bench_ewc"):
        _load(name).main(["--quick", "--sets", "many_small", "--csv", str(out)])
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == harness.CSV_FIELDS
    providers = {(r["op"], r["provider"]) for r in rows}
    expected_backends = {f"cl_optim_{b}" for b in harness.cl_optim_backends(harness.torch.device("cpu"))}
    assert {"cl_optim_foreach", "cl_optim_forloop"} <= expected_backends
    for op in ("sgd_momentum", "adamw"):
        assert {
            (op, p) for p in ("torch_forloop", "torch_foreach", "torch_fused", *expected_backends)
        } <= providers
    for op in ("adamw_ewc", "sgd_ewc"):
        assert {(op, p) for p in ("autograd_penalty", "foreach_addcmul", *expected_backends)} <= providers
    for r in rows:
        assert float(r["p20"]) <= float(r["p50"]) * 1.0001 + 1e-12 or r["metric"].startswith("speedup")
        assert r["device"] and r["torch"] and r["git_sha"] and r["param_set"] == "many_small"
    metrics = {r["metric"] for r in rows}
    assert {
        "time",
        "bandwidth",
        "fraction_of_ceiling",
        "allocated_memory",
        "speedup_vs_torch_fused",
    } <= metrics
    # The fastest cl_optim provider of each op, timed in paired rounds against the ceiling's pass:
    # a fraction of it (a copy or triad over the same working set is not 10x slower than a step).
    paired_fractions = {(r["op"], r["provider"]): float(r["p50"]) for r in rows
                        if r["metric"] == "paired_fraction_of_ceiling"}  # fmt: skip
    assert {op for op, _ in paired_fractions} == {"sgd_momentum", "adamw", "adamw_ewc", "sgd_ewc"}
    assert all(provider.startswith("cl_optim") for _, provider in paired_fractions)
    assert all(0.05 < value < 5 for value in paired_fractions.values())
    # the autograd penalty allocates its graph; the fused EWC term does not need one
    allocated = {(r["op"], r["provider"]): float(r["p50"]) for r in rows if r["metric"] == "allocated_memory"}
    assert allocated[("adamw_ewc", "autograd_penalty")] > allocated[("adamw_ewc", "cl_optim_foreach")]


def test_quick_landscape_benchmark_writes_its_rows(tmp_path):
    out = tmp_path / "bench.csv"
    rows = _load("bench_landscape").main(["--quick", "--csv", str(out)])
    with out.open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) > 0
    needed = {(r["param_set"], r["provider"]) for r in written if r["metric"] == "hvps_to_1e-3"}
    assert needed == {("mlp", "cl_optim"), ("mlp", "power"), ("cnn", "cl_optim"), ("cnn", "power")}
    counts = {
        (r["param_set"], r["provider"]): float(r["p50"]) for r in written if r["metric"] == "hvps_to_1e-3"
    }
    assert counts[("mlp", "cl_optim")] < counts[("mlp", "power")]  # Lanczos needs fewer products
    errors = [
        float(r["p50"]) for r in written if r["metric"] == "relative_error" and r["provider"] == "cl_optim"
    ]
    assert errors and max(errors[:1]) < 1e-3  # the top eigenvalue at tol 1e-3 is within 1e-3


def test_gpu_check_dry_run_lists_the_plan_and_every_piece_starts(capsys):
    """What CI runs: every benchmark imports and parses its GPU arguments, the GPU tests collect."""
    gpu_check = _load("gpu_check")
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("environment", "build", "gpu_tests", "bench_step_100m", "bench_sam", "bench_fisher"):
        assert f"  {name} " in out
    assert "dry run: every piece starts" in out
    assert gpu_check.main(["--dry-run", "--only", "bench_ewc"]) == 0
    out = capsys.readouterr().out
    assert "bench_ewc" in out and "bench_sam " not in out and "build" in out  # the required steps stay


def test_gpu_check_keeps_going_past_failures_and_stops_at_its_budget(tmp_path, monkeypatch):
    """A failed or timed-out step does not stop the next; the budget's end skips the rest; a
    failed required step skips everything after it; the summary says which, step by step."""
    gpu_check = _load("gpu_check")
    py = sys.executable

    def plan(out, python=py):
        return [
            gpu_check.Step("first", [py, "-c", "print('hello')"], 10, required=True),
            gpu_check.Step("fails", [py, "-c", "raise SystemExit(3)"], 10),
            gpu_check.Step("sleeps", [py, "-c", "import time; time.sleep(60)"], 2),
            gpu_check.Step("too_late", [py, "-c", "print('never')"], 10),
        ]

    monkeypatch.setattr(gpu_check, "steps", plan)
    assert gpu_check.main(["--out", str(tmp_path), "--budget-s", "6"]) == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| first | ok |" in summary and "| fails | failed |" in summary and "exit code 3" in summary
    assert "| sleeps | timed out |" in summary and "| too_late | skipped |" in summary
    log = (tmp_path / "gpu_check.log").read_text()
    assert "hello" in log and "never" not in log

    def broken(out, python=py):
        return [
            gpu_check.Step("build", [py, "-c", "raise SystemExit(1)"], 10, required=True),
            gpu_check.Step("after", [py, "-c", "print('never')"], 10),
        ]

    monkeypatch.setattr(gpu_check, "steps", broken)
    assert gpu_check.main(["--out", str(tmp_path), "--budget-s", "60"]) == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "| build | failed |" in summary and "| after | skipped | 0.0 | build did not succeed |" in summary


def test_paired_rounds_converge_on_a_clear_ratio_and_report_a_wide_one():
    """Paired rounds stop once the half-range of the per-round speed-ups is within ±10%, and a
    spread that stays wide is reported as such (sleeps stand in for two providers)."""
    import time

    paired = _load("paired")
    result = paired.paired_speedup(lambda: time.sleep(0.004), lambda: time.sleep(0.002), "cpu", budget_s=5.0)
    assert 1.5 < result.median < 2.5 and result.converged and 5 <= len(result.ratios) < 41
    assert "x [" in result.describe() and "wide" not in result.describe()
    delays = iter([0.001, 0.006] * 50)  # the provider alternates between fast and slow
    wide = paired.paired_speedup(lambda: time.sleep(0.003), lambda: time.sleep(next(delays)), "cpu",
                                 min_rounds=4, max_rounds=8, budget_s=0.05)  # fmt: skip
    assert not wide.converged and "wide" in wide.describe() and len(wide.ratios) >= 4
    harness = _load("harness")
    quick = harness.paired_measure(lambda: None, lambda: None, "cpu", quick=True)
    assert len(quick.ratios) >= 3  # every script's rule: at least 3 rounds quick, 9 otherwise
    details = dict((metric, value) for metric, _, value in harness.paired_details(quick, "base"))
    assert details["paired_rounds_vs_base"] == len(quick.ratios) and "paired_loaded_vs_base" in details


def test_load_is_read_from_the_machine_and_flagged():
    """Other processes' CPU time and steal per second of wall time, from /proc/stat and this
    process's own CPU time; a quarter of a core of other work, or 5% steal, flags the row."""
    paired = _load("paired")
    start = paired.Snapshot(wall=0.0, own_cpu=1.0, machine=(100.0, 2.0), loadavg=0.5)
    quiet = paired.load_between(
        start, paired.Snapshot(wall=2.0, own_cpu=4.0, machine=(103.2, 2.0), loadavg=0.6)
    )
    assert abs(quiet["own_cores"] - 1.5) < 1e-12 and abs(quiet["other_cores"] - 0.1) < 1e-12
    assert quiet["steal"] == 0.0 and not paired.is_loaded(quiet)
    busy = paired.load_between(
        start, paired.Snapshot(wall=2.0, own_cpu=4.0, machine=(105.0, 2.0), loadavg=1.9)
    )
    assert abs(busy["other_cores"] - 1.0) < 1e-12 and paired.is_loaded(busy)
    stolen = paired.load_between(
        start, paired.Snapshot(wall=2.0, own_cpu=4.0, machine=(103.0, 2.2), loadavg=1.0)
    )
    assert abs(stolen["steal"] - 0.1) < 1e-12 and paired.is_loaded(stolen)
    # one stray 10 ms tick in a 10 ms window reads as a whole busy core: within the resolution
    short = paired.load_between(
        start, paired.Snapshot(wall=0.01, own_cpu=1.0, machine=(100.01, 2.0), loadavg=0.5)
    )
    assert abs(short["other_cores"] - 1.0) < 1e-9 and not paired.is_loaded(short)
    now = paired.Snapshot.now()
    if now.machine is not None:  # Linux: the real counters move forward
        later = paired.load_between(now, paired.Snapshot.now())
        assert later["other_cores"] >= 0 and later["own_cores"] >= 0
        sizes = paired.cache_sizes()
        assert sizes and paired.last_level_cache() == max(sizes.values()) > 0


def test_the_report_prefers_paired_speedups_and_marks_the_others(tmp_path):
    report = _load("report")
    base = {"op": "adamw", "param_set": "large", "unit": "x", "device": "cpu", "torch": "2", "triton": "3",
            "cl_optim": "0.1", "git_sha": "abc", "timestamp": "2026-12-02T00:00:00"}  # fmt: skip
    rows = [
        {**base, "provider": "torch_fused", "metric": "time", "unit": "ms", "p50": "10", "p20": "9", "p80": "11"},
        {**base, "provider": "cl_optim_cpp", "metric": "time", "unit": "ms", "p50": "5", "p20": "4", "p80": "6"},
        {**base, "provider": "cl_optim_cpp", "metric": "speedup_vs_torch_fused", "p50": "2", "p20": "1", "p80": "3"},
        {**base, "provider": "cl_optim_cpp", "metric": "paired_speedup_vs_torch_fused", "p50": "1.8", "p20": "1.7", "p80": "1.9"},
        {**base, "provider": "cl_optim_cpp", "metric": "paired_spread_vs_torch_fused", "p50": "0.06", "p20": "0.06", "p80": "0.06"},
        {**base, "provider": "cl_optim_cpp", "metric": "paired_loaded_vs_torch_fused", "p50": "1", "p20": "1", "p80": "1"},
        {**base, "provider": "cl_optim_cpp", "metric": "bytes_per_step", "p50": str(2**30), "p20": "0", "p80": "0"},
        {**base, "provider": "cl_optim_cpp", "metric": "last_level_cache", "p50": str(2**29), "p20": "0", "p80": "0"},
    ]  # fmt: skip
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = report.compact(path)
    assert "| 1.80x ±6% (loaded) |" in table and "1024 MiB (beyond the LLC)" in table


def test_gpu_check_stopped_from_outside_stops_its_step(tmp_path):
    """A remote run's timeout stops gpu_check with SIGTERM: the step it was running (its own
    process group, so that a timed-out step is stopped whole) goes with it."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    driver = f"""
import sys
sys.path.insert(0, {str(ROOT / "bench")!r})
import gpu_check
child = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
gpu_check.steps = lambda out, python=sys.executable: [gpu_check.Step("sleeps", [sys.executable, "-c", child], 100)]
sys.exit(gpu_check.main(["--out", {str(tmp_path)!r}, "--budget-s", "100"]))
"""
    proc = subprocess.Popen([sys.executable, "-c", driver])
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the step outlived gpu_check")


def test_the_ceiling_streams_the_ops_working_set():
    """The ceiling's arrays hold at least the op's working set (up to 4x the last-level cache),
    never fewer elements than the op: a many-small step moving 295 MB is not held to a copy of
    66 MB that a 32 MiB cache partly keeps."""
    harness = _load("harness")
    cache = 32 * 2**20
    many_small = 2000 * 4096
    assert harness.ceiling_elements(many_small, 36 * many_small, cache) == 4 * cache // 8
    assert harness.ceiling_elements(64_000_000, 36 * 64_000_000, cache) == 64_000_000  # already past it
    assert harness.ceiling_elements(1000, 36_000, cache) == 4500  # a small op: its own working set
    assert harness.ceiling_elements(1000, 36e12, None) == 2**30 // 8  # no cache known: 1 GiB
    assert harness.ceiling_elements(1000, None, cache) == 1000  # no bytes floor: the op's size


def test_quick_layout_benchmark_writes_its_rows(tmp_path):
    """bench_layout.py: each placement of grad_sq_norm's tensors against one tensor, and the
    per-tensor cost of a list."""
    out = tmp_path / "bench.csv"
    rows = _load("bench_layout").main(["--quick", "--count", "50", "--size", "256", "--csv", str(out)])
    with out.open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) == 4
    measured = {(r["op"], r["provider"], r["metric"]) for r in written}
    assert measured == {
        *(
            ("layout_grad_sq_norm", layout, "paired_speedup_vs_one_tensor")
            for layout in ("views", "separate", "interleaved")
        ),
        ("layout_grad_sq_norm", "one_element", "per_tensor_us"),
    }
    assert all(float(r["p50"]) > 0 for r in written if r["metric"] != "per_tensor_us")
