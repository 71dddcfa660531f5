"""bench/multi_digits.py --quick: the whole path (rho sweep, erm and F-MTL for every aggregator) runs
in-process in a few seconds and writes well-formed JSON and Markdown.

Checks the layout and that every accuracy is a real number in (0, 1] well above chance (0.1 per
digit): after 2 epochs on 1,258 pairs the quick run reaches about 0.5. Whether F-MTL wins is the
full run's question, not this test's.
"""

from __future__ import annotations

import importlib
import json
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _check_accuracy(value):
    assert isinstance(value, float) and math.isfinite(value)
    assert 0.3 < value <= 1.0


def test_quick_run_writes_json_and_markdown(tmp_path):
    multi_digits = importlib.import_module("multi_digits")  # bench/ is on sys.path, as when a script runs
    out = tmp_path / "multi_digits.json"
    multi_digits.main(["--quick", "--out", str(out)])

    record = json.loads(out.read_text())
    assert record["complete"] is True
    assert {"settings", "sweep", "results", "device", "versions", "git_sha", "wall_seconds"} <= set(record)
    assert record["device"] and record["versions"]["torch"] and record["versions"]["cl_optim"]
    settings = record["settings"]
    assert settings["seeds"] == [0] and settings["quick"] is True
    assert settings["backend_used"] == "auto"
    # No test image is in the train split: the pairs are formed after the split.
    assert settings["images"]["train"] + settings["images"]["test"] == 1797
    assert settings["pairs"]["train"] == settings["images"]["train"]  # 1 pair per image in --quick

    sweep = record["sweep"]
    assert sweep["method"] == "sum" and sweep["seed"] == 0
    assert [row["name"] for row in sweep["candidates"]][0] == "erm"
    assert sweep["chosen"]["name"] in [row["name"] for row in sweep["candidates"][1:]]
    assert (settings["rho"], settings["adaptive"]) == (sweep["chosen"]["rho"], sweep["chosen"]["adaptive"])
    for row in sweep["candidates"]:
        for key in ("task1", "task2", "avg"):
            _check_accuracy(row["val"][key])

    assert list(record["results"]) == list(multi_digits.METHODS)
    for method, result in record["results"].items():
        for kind in ("erm", "fmtl"):
            summary = result[kind]
            assert [run["seed"] for run in summary["per_seed"]] == [0]
            for run in summary["per_seed"]:
                for key in ("task1", "task2", "avg"):
                    _check_accuracy(run[key])
                assert math.isclose(run["avg"], (run["task1"] + run["task2"]) / 2)
                assert run["seconds"] > 0 and math.isfinite(run["final_train_loss"])
            for key in ("task1", "task2", "avg"):
                _check_accuracy(summary["mean"][key])
                assert summary["std"][key] == 0.0  # one seed
        delta = result["delta_avg"]
        assert math.isclose(delta["mean"], result["fmtl"]["mean"]["avg"] - result["erm"]["mean"]["avg"])
        assert result["verdict"].startswith(f"{method}: F-MTL")

    markdown = out.with_suffix(".md").read_text()
    assert "| method |" in markdown
    for method in multi_digits.METHODS:
        assert f"| {method} |" in markdown
