"""The continual-learning main job: what cl_optim's optimizers do against forgetting.

Three task sequences built from scikit-learn's 8x8 digits (shipped with the package, no download):

* permuted: ``--tasks`` tasks, each a fixed permutation of the 64 pixels (the first is the
  identity), all ten classes, one shared 10-way head (domain-incremental, as permuted MNIST);
* split: the ten classes in pairs (0/1, 2/3, ...), one 2-way head per task (task-incremental);
* class_incremental: the same pairs, one shared 10-way head, no task identity at test time.

An MLP (64-256-256, ReLU) is trained on the tasks in order with each method, all through
cl_optim's public API, one file per method under ``bench/cl_methods/`` sharing the training loop
here: ``finetune`` (SGD with momentum), ``ewc`` (separate-mode EWC, exact Fisher), ``online_ewc``
(Schwarz et al.), ``sam`` (SAM over SGD), ``ewc_sam``, the flat-region variants ``gsam`` (GSAM),
``looksam`` (LookSAM, k = 5, alpha = 0.2), ``cflat`` (C-Flat) and ``cflat_ewc``, ``large_lr``
(plain SGD at the edge of stability measured on the first task), ``replay``, ``lwf``, ``align``,
``pnn`` and ``combined`` (split only; a column per task) and ``pronc`` (class-incremental only).
After each task it records the test accuracy on every task and, with ``cl_optim.landscape``, the
top Hessian eigenvalue and trace of every seen task's loss and the loss barrier from the previous
task's solution (``bench/flatness.py``); it reports per method the accuracy matrix, average final
accuracy, average forgetting (best earlier accuracy minus final, tasks 1..T-1) and the
optimizer-side time per step. Writes a JSON file and three PNG plots (accuracy per method; mean
accuracy per scenario, methods as lines; flatness).

    python bench/continual.py                      # defaults: about 100 s on 2 cores
    python bench/continual.py --methods finetune ewc --lam 1000 --epochs 5
    python bench/continual.py --data-dir ~/data/mnist   # MNIST / Fashion-MNIST IDX files
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

# bench/ is on sys.path when this script runs
from cl_methods import METHODS as METHOD_CLASSES
from cl_methods import SCENARIOS
from continual_data import load_digits_dataset, load_idx_dataset, make_tasks
from continual_plots import plot, plot_flatness, plot_summary
from flatness import consecutive_barrier, measure_seen_tasks
from harness import device_name

import cl_optim

METHODS = tuple(METHOD_CLASSES)  # bench/cl_methods: a file per method
BENCHMARKS = ("permuted", "split", "class_incremental")
ROOT = Path(__file__).resolve().parents[1]


def accuracy(model, task, device, method=None):
    model.eval()
    model.active = task["head"]
    x, y = task["test"]
    with torch.no_grad():
        logits = method.logits(model, x.to(device)) if method is not None else model(x.to(device))
        pred = logits.argmax(1).cpu()
    model.train()
    return float((pred == y).float().mean())


class Diverged(Exception):
    """Training a method made its weights, loss or outputs non-finite."""


def backends_of(opt) -> dict:
    """The backends that actually ran each (device, dtype) bucket: the update, and SAM's perturbation."""
    if isinstance(opt, cl_optim.SAM):
        return {
            "update": dict(opt.base_optimizer.backends_used),
            "perturbation": dict(opt.perturb_backends_used),
        }
    return {"update": dict(opt.backends_used)}


def run_method(name, tasks, args, device, progress):
    """Train the method ``name`` (bench/cl_methods) on ``tasks`` in order; its result fields."""
    torch.manual_seed(args.seed)
    method = METHOD_CLASSES[name].from_args(args)
    heads = sorted({t["head"]: t["classes"] for t in tasks}.items())
    model = method.make_model(tasks[0]["train"][0].shape[1], [c for _, c in heads]).to(device)
    extra = method.prepare(model, tasks, args, device)
    opt, ewc = method.optimizer(model, args)
    is_sam = isinstance(opt, cl_optim.SAM)
    measure = args.flatness and method.measures_flatness
    matrix, flatness, barriers, step_seconds, steps = [], [], [], 0.0, 0
    gen = torch.Generator().manual_seed(args.seed)
    previous = None
    try:
        for i, task in enumerate(tasks):
            method.before_task(model, task, opt)
            step_seconds, steps = train_task(model, opt, ewc, task, method, gen, args, device, progress,
                                             is_sam, step_seconds, steps)  # fmt: skip
            # PNN answers a task only once its column exists: chance before, as an untrained head
            matrix.append([accuracy(model, t, device, method) if t["head"] < len(getattr(model, "columns", tasks))
                           else _chance(t) for t in tasks])  # fmt: skip
            if measure:
                light = dict(samples=64, probes=4, tol=1e-2) if args.quick else {}  # a smoke run within 30 s
                flatness.append(measure_seen_tasks(model, tasks[: i + 1], device, args.seed, **light))
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if previous is not None:
                    barriers.append(consecutive_barrier(model, previous, state, tasks[i - 1], task, device))
                previous = state
    except Diverged as error:
        # The tasks learnt before the divergence stay in the record (and the plot).
        return {"diverged": str(error), "diverged_at_task": len(matrix), "accuracy_matrix": matrix,
                "steps": steps, "backends": backends_of(opt), **extra}  # fmt: skip
    final = matrix[-1]
    forgetting = [
        max(matrix[i][j] for i in range(j, len(tasks) - 1)) - final[j] for j in range(len(tasks) - 1)
    ]
    result = {
        "accuracy_matrix": matrix,
        "average_accuracy": float(np.mean(final)),
        "average_forgetting": float(np.mean(forgetting)) if forgetting else 0.0,
        "backward_transfer": -float(np.mean(forgetting)) if forgetting else 0.0,
        "optimizer_ms_per_step": 1e3 * step_seconds / max(1, steps),
        "steps": steps,
        "parameters": sum(p.numel() for p in model.parameters()),  # grows with growth methods
        "backends": backends_of(opt),
        **extra,
    }
    if measure:
        result.update(flatness=flatness, barriers=barriers)
    result.update(method.report())
    return result


def _chance(task) -> float:
    """The accuracy of always answering the task's most frequent test class."""
    labels = task["test"][1]
    return float(torch.bincount(labels).max()) / len(labels)


def train_task(model, opt, ewc, task, method, gen, args, device, progress, is_sam, step_seconds, steps):
    """One task's epochs, then (EWC) its Fisher; returns the running step time and count. The
    ``method`` (bench/cl_methods) gives each batch's loss."""
    model.active = task["head"]
    x, y = (t.to(device) for t in task["train"])
    nonfinite_loss = torch.zeros((), dtype=torch.bool, device=device)  # read once, at the end
    for _ in range(args.epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        for start in range(0, len(x), args.batch_size):
            batch = order[start : start + args.batch_size]
            batch_loss = method.batch_loss(model, x[batch], y[batch], task)
            opt.zero_grad()
            loss = batch_loss()
            nonfinite_loss |= ~torch.isfinite(loss.detach())
            loss.backward()
            closure_seconds = [0.0]

            def closure(batch_loss=batch_loss, closure_seconds=closure_seconds):
                # SAM and its variants call it as often as they need (LookSAM: on SAM steps only,
                # C-Flat: three times); its forward/backward is not optimizer time.
                start = time.perf_counter()
                opt.zero_grad()
                loss = batch_loss()
                loss.backward()
                closure_seconds[0] += time.perf_counter() - start
                return loss

            tic = time.perf_counter()
            if is_sam:
                opt.step(closure)
            else:
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_seconds += time.perf_counter() - tic - closure_seconds[0]
            steps += 1
            method.after_step()  # outside the timed step
            method.after_batch(x[batch], y[batch], task)
            progress.update(1)
    with torch.no_grad():
        outputs_finite = bool(torch.isfinite(model(x[: args.batch_size])).all())
    if (
        bool(nonfinite_loss)
        or not outputs_finite
        or not all(bool(torch.isfinite(p).all()) for p in model.parameters())
    ):
        raise Diverged(
            f"the loss, weights or outputs became non-finite during task {task['name']}: lower --lr or --lam"
        )
    if ewc is not None:
        n = min(args.fisher_samples, len(x))
        data = [(x[s : s + 250], y[s : s + 250]) for s in range(0, n, 250)]
        ewc.consolidate(cl_optim.fisher.estimate(model, data, estimator="exact"))
    method.after_task(model, task)
    return step_seconds, steps


# --------------------------------------------------------------------------------- reports


def format_matrix(name, result, tasks):
    lines = [f"  {name}: accuracy on task j (columns) after training task i (rows)"]
    header = "           " + " ".join(f"{t['name']:>7}" for t in tasks)
    lines.append(header)
    for i, row in enumerate(result["accuracy_matrix"]):
        lines.append(f"    {tasks[i]['name']:>6} " + " ".join(f"{a:7.3f}" for a in row))
    return "\n".join(lines)


def git_sha():
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="cl_optim continual-learning benchmark (digits, no download)"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    parser.add_argument("--tasks", type=int, default=5, help="tasks per benchmark (split has at most 5)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--lam", type=float, default=300.0, help="EWC lambda (lam/2 * sum A d^2 convention)")
    parser.add_argument("--gamma", type=float, default=0.9, help="online EWC decay")
    parser.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    parser.add_argument("--fisher-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="MNIST/Fashion-MNIST IDX files instead of digits"
    )
    parser.add_argument(
        "--max-train", type=int, default=None, help="cap on training samples (before splitting)"
    )
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "continual.json"),
        help="the JSON file to write (a directory: continual.json in it); the plot goes next to it",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="3 tasks, 3 epochs: a smoke run of a few seconds"
    )
    parser.add_argument(
        "--no-flatness", dest="flatness", action="store_false",
        help="skip the Hessian measurements after each task (the large_lr method still measures its edge)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.epochs, args.fisher_samples = 3, 3, 250
    check_args(parser, args)
    return args


def check_args(parser, args) -> None:
    """Every argument checked before any training: a bad one is an error now, not after the
    methods before it have run (or, for --epochs 0, results that overwrite a real run)."""
    import math

    def need(ok, message):
        if not ok:
            parser.error(message)

    for name in ("tasks", "epochs", "batch_size", "fisher_samples"):
        value = getattr(args, name)
        need(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    need(
        args.max_train is None or args.max_train >= 1, f"--max-train must be at least 1, got {args.max_train}"
    )
    need(0 < args.lr < math.inf, f"--lr must be finite and > 0, got {args.lr}")
    need(0 <= args.lam < math.inf, f"--lam must be finite and >= 0, got {args.lam}")
    need(0 < args.gamma <= 1, f"--gamma must be in (0, 1], got {args.gamma}")
    need(0 <= args.rho < math.inf, f"--rho must be finite and >= 0, got {args.rho}")
    if ("split" in args.benchmarks or "class_incremental" in args.benchmarks) and args.tasks > 5:
        print(
            f"note: split and class_incremental have 5 tasks (digit pairs); --tasks {args.tasks} applies to "
            "permuted only",
            file=sys.stderr,
        )
    need(args.data_dir is None or args.data_dir.is_dir(), f"--data-dir {args.data_dir} is not a directory")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type == "cuda":
        need(
            torch.cuda.is_available(),
            f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device",
        )
        need(device.index is None or device.index < torch.cuda.device_count(),
             f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")  # fmt: skip
    from cl_optim._backend import resolve

    try:  # builds or loads a compiled backend now: its one-time cost is not counted as step time
        resolve(args.backend, device, torch.float32)
    except (ValueError, RuntimeError) as error:
        parser.error(f"--backend {args.backend}: {error}")
    out = Path(args.out)
    args.out = out / "continual.json" if out.is_dir() or args.out.endswith(("/", os.sep)) else out
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out.with_suffix(".json.tmp"), "w"):
            pass
        os.remove(args.out.with_suffix(".json.tmp"))
    except OSError as error:
        parser.error(f"--out {args.out}: cannot write there ({error})")


def write_record(args, record) -> None:
    """The JSON, written through a temporary file: a run stopped half-way leaves a readable file
    with the methods finished so far."""
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, args.out)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if args.data_dir is not None:
        x, y, source = load_idx_dataset(args.data_dir)
    else:
        x, y, source = load_digits_dataset()
    tasks_by_bench = {
        kind: make_tasks(x, y, kind, args.tasks, args.seed, max_train=args.max_train)
        for kind in args.benchmarks
    }
    total = sum(
        sum(kind in SCENARIOS.get(m, (kind,)) for m in args.methods)
        * args.epochs
        * sum(-(-len(t["train"][0]) // args.batch_size) for t in tasks)
        for kind, tasks in tasks_by_bench.items()
    )
    from tqdm import tqdm

    results = {}
    start = time.time()
    record = {
        "results": results,
        "tasks": {kind: [t["name"] for t in tasks] for kind, tasks in tasks_by_bench.items()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": source,
        "device": device_name(device),
        "versions": {
            "torch": torch.__version__,
            "cl_optim": cl_optim.__version__,
            "python": platform.python_version(),
        },
        "git_sha": git_sha(),
        "complete": False,
    }
    # A progress bar on a terminal; otherwise (a log file, CI) one line per method.
    lines = not sys.stderr.isatty()
    with tqdm(total=total, desc="training", unit="step", file=sys.stderr, disable=None) as progress:
        for kind, tasks in tasks_by_bench.items():
            results[kind] = {}
            for method in args.methods:
                if kind not in SCENARIOS.get(method, (kind,)):
                    continue  # e.g. PNN: task-incremental only
                progress.set_postfix_str(f"{kind}/{method}")
                tic = time.time()
                results[kind][method] = result = run_method(method, tasks, args, device, progress)
                record.update(seconds=time.time() - start, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
                write_record(args, record)
                if lines:
                    summary = (f"diverged at task {result['diverged_at_task']}" if "diverged" in result else
                               f"avg acc {result['average_accuracy']:.3f}, forgetting {result['average_forgetting']:.3f}")  # fmt: skip
                    print(
                        f"[{kind}/{method}] {summary} ({time.time() - tic:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )

    print(f"\ndata: {source}; MLP {x.shape[1]}-256-256; SGD lr {args.lr} momentum 0.9; "
          f"{args.epochs} epochs/task; lam {args.lam}; rho {args.rho}; seed {args.seed}")  # fmt: skip
    for kind, tasks in tasks_by_bench.items():
        print(f"\n== {kind} ({len(tasks)} tasks) ==")
        for method, result in results[kind].items():
            if "diverged" not in result:
                print(format_matrix(method, result, tasks))
        print(f"\n  {'method':<11} {'avg acc':>8} {'forgetting':>11} {'opt ms/step':>12}  backend")
        for method, result in results[kind].items():
            if "diverged" in result:
                print(f"  {method:<11} diverged: {result['diverged']}")
                continue
            used = sorted({b for part in result["backends"].values() for b in part.values()})
            print(
                f"  {method:<11} {result['average_accuracy']:8.3f} {result['average_forgetting']:11.3f} "
                f"{result['optimizer_ms_per_step']:12.3f}  {', '.join(used)}"
            )
        flat = {m: r for m, r in results[kind].items() if r.get("flatness")}
        if flat:
            print(f"\n  {'method':<11} {'top eig':>8} {'trace':>8} {'barrier prev':>13} {'barrier new':>12}"
                  "   (seen tasks' losses after the last task; mean barrier between consecutive solutions)")  # fmt: skip
            for method, result in flat.items():
                last = result["flatness"][-1]
                barriers = result["barriers"] or [{"previous_task": 0.0, "new_task": 0.0}]
                print(
                    f"  {method:<11} {np.mean(last['sharpness']):8.3f} {np.mean(last['trace']):8.2f} "
                    f"{np.mean([b['previous_task'] for b in barriers]):13.3f} "
                    f"{np.mean([b['new_task'] for b in barriers]):12.3f}"
                )
            if "lr" in results[kind].get("large_lr", {}):
                lr = results[kind]["large_lr"]
                curve = lr.get("sharpness_curve", [])
                ratios = [round(row["ratio"], 2) for row in curve]
                print(f"  large_lr: lr {lr['lr']:.3g} = 2 / {lr['first_task_sharpness_at_finetune']:.3g}; first task's "
                      f"sharpness / (2/lr) over training: {ratios[:6]}{' ...' if len(ratios) > 6 else ''}")  # fmt: skip
    record.update(complete=True, seconds=time.time() - start, timestamp=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_record(args, record)
    png = args.out.with_suffix(".png")
    plot(results, tasks_by_bench, png)
    summary_png = args.out.with_name(args.out.stem + "_summary.png")
    plot_summary(results, tasks_by_bench, summary_png)
    flat_png = args.out.with_name(args.out.stem + "_flatness.png")
    if args.flatness:
        plot_flatness(results, tasks_by_bench, flat_png)
    print(f"\nwrote {os.path.relpath(args.out)}, {os.path.relpath(png)}, {os.path.relpath(summary_png)}"
          f"{', ' + os.path.relpath(flat_png) if args.flatness else ''} ({record['seconds']:.0f} s)")  # fmt: skip
    return record


if __name__ == "__main__":
    main()
