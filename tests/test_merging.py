"""bench/merging.py: a quick run gives a complete record in which every merge is measured."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # as when the script runs: its folder is on the path
_spec = importlib.util.spec_from_file_location("merging", ROOT / "bench" / "merging.py")
merging = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merging)


def test_quick_run_measures_every_merge(tmp_path):
    out = tmp_path / "merging.json"
    record = merging.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["results"] == record["results"]
    results = record["results"]
    for trainer in ("sgd", "sam"):
        row = results[trainer]
        assert set(row) == {"individual", *merging.MERGES}
        # each expert learns its own digit pair; every merge is a real model (above chance: 0.1)
        assert min(row["individual"]["per_task"]) > 0.9
        for name in merging.MERGES:
            assert len(row[name]["per_task"]) == 5
            assert 0.1 < row[name]["accuracy"] <= 1 and row[name]["task_aware"] >= row[name]["accuracy"]
    alignment = results["alignment"]
    assert alignment["barrier_after"] < alignment["barrier_before"]
    assert record["git_sha"] and record["versions"]["torch"]
