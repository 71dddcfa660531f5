"""Markdown tables of the latest benchmark rows, for the README.

For each (op, parameter set, provider) the newest row of each metric in the CSV is used; one
table per op family lists the median time, effective GB/s, the fraction of the bandwidth
ceiling and the speed-up over the family's main baseline, with the device, versions and git sha
the rows name.

    python bench/report.py [--csv bench/results/bench.csv]
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

from harness import DEFAULT_CSV

MAIN_BASELINE = {
    "sgd_momentum": "torch_fused",
    "adamw": "torch_fused",
    "sam_adamw": "pytorch_optimizer",
    "sam_sgd": "pytorch_optimizer",
    "adamw_ewc": "autograd_penalty",
    "sgd_ewc": "autograd_penalty",
    "fisher_empirical": "loop_bs1",
    "fisher_exact": "loop_bs1",
    # The SAM variants (bench_sam_family.py): the library that implements the same rule. INFTY's
    # LookSAM skips its correction (less work, not the algorithm); MSAM and RWP have no comparator.
    "gsam_adamw": "pytorch_optimizer",
    "wsam_adamw": "pytorch_optimizer",
    "wsam_coupled_adamw": "pytorch_optimizer",
    "looksam_adamw_k5": "pytorch_optimizer",
    "fsam_adamw": "pytorch_optimizer",
    "gam_adamw": "infty",
    "cflat_adamw": "infty",
}


def latest(rows):
    table: dict = defaultdict(dict)
    for row in rows:  # the CSV is append-only: later rows win
        table[(row["op"], row["param_set"], row["provider"])][row["metric"]] = row
    return table


def markdown(csv_path: Path) -> str:
    with csv_path.open() as f:
        table = latest(list(csv.DictReader(f)))
    ops = list(dict.fromkeys(key[0] for key in table))
    lines = []
    for op in ops:
        if op == "fisher_cost":
            lines += _fisher_cost(table)
            continue
        if op.startswith(("landscape_", "layout_")):  # bench_landscape, bench_layout print their own
            continue
        base = MAIN_BASELINE.get(op)
        keys = [key for key in table if key[0] == op]
        # the header names the newest run of the op (older rows of other sets may remain)
        any_row = max((row for key in keys for row in table[key].values()), key=lambda row: row["timestamp"])
        lines.append(
            f"**{op}** — {any_row['device']}; torch {any_row['torch']}, cl_optim {any_row['cl_optim']} "
            f"({any_row['git_sha']}, {any_row['timestamp'][:10]})\n"
        )
        unit = table[keys[0]]["time"]["unit"]
        lines.append(f"| set | provider | {unit} p50 [p20, p80] | GB/s | of ceiling | vs {base} |")
        lines.append("|---|---|---|---|---|---|")
        for key in keys:
            metrics = table[key]
            t = metrics["time"]
            gbs = f"{float(metrics['bandwidth']['p50']):.1f}" if "bandwidth" in metrics else "-"
            frac = _fraction(metrics)
            speed = _speedup(metrics, base)
            lines.append(
                f"| {key[1]} | {key[2]} | {float(t['p50']):.3g} [{float(t['p20']):.3g}, {float(t['p80']):.3g}] "
                f"| {gbs} | {frac} | {speed} |"
            )
        lines.append("")
    return "\n".join(lines)


def _paired(metrics: dict, name: str):
    """The row of a paired metric, if the run that timed the row's provider made it: the same git
    sha, stamped no earlier than the time row (a later run that paired another provider, or none,
    must not show the older run's pair next to its own times)."""
    row, timed = metrics.get(name), metrics.get("time")
    if row is None or timed is None:
        return row
    if row["git_sha"] != timed["git_sha"] or row["timestamp"] < timed["timestamp"]:
        return None
    return row


def _paired_note(metrics: dict, against: str) -> str:
    """How a paired value against ``against`` was measured: " ±<half the interquartile range>",
    and " (loaded)" when other work shared the machine."""
    spread = _paired(metrics, f"paired_spread_vs_{against}")
    loaded = _paired(metrics, f"paired_loaded_vs_{against}")
    return (f" ±{float(spread['p50']):.0%}" if spread else "") + (
        " (loaded)" if loaded and float(loaded["p50"]) else ""
    )


def _fraction(metrics: dict) -> str:
    """The fraction of the bandwidth ceiling: from paired rounds against the ceiling's pass where
    the run made them (median, ±half the interquartile range), else against the run's one-shot
    ceiling."""
    paired = _paired(metrics, "paired_fraction_of_ceiling")
    if paired is not None:
        return f"{float(paired['p50']):.0%}{_paired_note(metrics, 'ceiling')} paired"
    one_shot = metrics.get("fraction_of_ceiling")
    return f"{float(one_shot['p50']):.0%}" if one_shot else "-"


def _speedup(metrics: dict, base: str) -> str:
    """The speed-up over ``base``: from paired rounds where the run made them (median, ±half the
    interquartile range, "loaded" when other work shared the machine), else the ratio of two
    medians timed apart, marked as such."""
    paired = _paired(metrics, f"paired_speedup_vs_{base}")
    if paired is not None:
        return f"{float(paired['p50']):.2f}x{_paired_note(metrics, base)}"
    speed = metrics.get(f"speedup_vs_{base}")
    return f"{float(speed['p50']):.2f}x (unpaired)" if speed else "—"


def _fisher_cost(table) -> list:
    """Cost of a Fisher estimate as a multiple of one batched forward+backward (paired rounds)."""
    keys = [key for key in table if key[0] == "fisher_cost"]
    newest = max(row["timestamp"] for key in keys for row in table[key].values())
    keys = [key for key in keys if any(row["timestamp"] == newest for row in table[key].values())]  # one run
    models = list(dict.fromkeys(key[1] for key in keys))
    order = [
        "cl_optim",
        "cl_optim_unchecked",
        "cl_optim_kept_plan",
        "torch_func_model",
        "backpack",
        "loop_bs1",
    ]
    keys.sort(key=lambda k: (models.index(k[1]), order.index(k[2]) if k[2] in order else len(order)))
    any_row = next(iter(table[keys[0]].values()))
    lines = [
        f"**fisher_cost** — {any_row['device']}; torch {any_row['torch']}, cl_optim {any_row['cl_optim']} "
        f"({any_row['git_sha']}, {any_row['timestamp'][:10]}); empirical Fisher over the same batches as "
        "one forward+backward of the mean loss, median of paired rounds [p20, p80]\n",
        "| model | provider | x backward | peak memory | probe share | self-check share | past the probe and self-check |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in keys:
        metrics = table[key]
        ratio = metrics["x_backward"]
        shares = [
            f"{float(metrics[m]['p50']):.0%}" if m in metrics else "-"
            for m in ("probe_share", "self_check_share")
        ]
        for i, m in enumerate(("probe_seconds", "self_check_seconds")):
            if m in metrics:
                shares[i] += f" ({float(metrics[m]['p50']) * 1e3:.1f} ms)"
        past = metrics.get("x_backward_past_the_plan")
        past = f"{float(past['p50']):.2f}x" if past else "-"
        peak = f"{float(metrics['peak_memory']['p50']) / 2**20:.1f} MiB" if "peak_memory" in metrics else "-"
        lines.append(
            f"| {key[1]} | {key[2]} | {float(ratio['p50']):.2f}x [{float(ratio['p20']):.2f}, {float(ratio['p80']):.2f}] "
            f"| {peak} | {shares[0]} | {shares[1]} | {past} |"
        )
    return lines + [""]


def _footprint(metrics: dict) -> str:
    """A step's bytes against the last-level cache: whether the ratio is cache-resident."""
    moved, cache = metrics.get("bytes_per_step"), metrics.get("last_level_cache")
    if moved is None:
        return "-"
    moved = float(moved["p50"])
    text = f"{moved / 2**20:.0f} MiB"
    if cache is not None:
        text += " (in cache)" if moved <= float(cache["p50"]) else " (beyond the LLC)"
    return text


def compact(csv_path: Path) -> str:
    """One row per (op, set): the main baseline, torch's best, and cl_optim's fastest backend."""
    with csv_path.open() as f:
        table = latest(list(csv.DictReader(f)))
    any_row = next(iter(next(iter(table.values())).values()))
    lines = [
        f"{any_row['device']}; torch {any_row['torch']}, cl_optim {any_row['cl_optim']} "
        f"({any_row['git_sha']}, {any_row['timestamp'][:10]}). Median time of the optimizer-side step "
        "(Fisher: per sample).\n",
        "| op | set | baseline | baseline time | fastest cl_optim | cl_optim time | speed-up | cl_optim of ceiling | a step's bytes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for op, param_set in dict.fromkeys((key[0], key[1]) for key in table):
        base = MAIN_BASELINE.get(op)
        if op == "fisher_cost" or op.startswith(("landscape_", "layout_")):
            continue
        ours = {k[2]: m for k, m in table.items() if k[:2] == (op, param_set) and k[2].startswith("cl_optim")}
        if base is None or (op, param_set, base) not in table or not ours:
            continue
        name, metrics = min(ours.items(), key=lambda item: float(item[1]["time"]["p50"]))
        unit = metrics["time"]["unit"]
        base_time = float(table[(op, param_set, base)]["time"]["p50"])
        time = float(metrics["time"]["p50"])
        frac = _fraction(metrics)
        speed = (
            _speedup(metrics, base)
            if _paired(metrics, f"paired_speedup_vs_{base}") is not None
            else f"{base_time / time:.2f}x (unpaired)"
        )
        lines.append(
            f"| {op} | {param_set} | {base} | {base_time:.3g} {unit} | {name} | {time:.3g} {unit} "
            f"| {speed} | {frac} | {_footprint(metrics)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--compact", action="store_true", help="one row per op and set")
    args = parser.parse_args()
    print(compact(args.csv) if args.compact else markdown(args.csv))
