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
