"""Model merging on digits: do experts trained with SAM merge better?

A 64-256-256-10 MLP is pre-trained (10 epochs) on 30% of the training digits (all ten classes, one
shared 10-way head): the shared start. From it, one expert per task — the five digit pairs
(0/1, 2/3, ...) of the other 70% — is fine-tuned with SGD (momentum 0.9), and a second set with
SAM (rho 0.05) over the same SGD. Each set is merged by every method of ``cl_optim.merge``:

* ``average``: task arithmetic at ``1/K``; ``task_arithmetic``: at 0.3 (Ilharco et al.);
* ``ties``: density 0.2, scale 1 (Yadav et al.);
* ``fisher``: the exact Fisher of each expert on 250 of its training samples (Matena & Raffel);
* ``adamerging`` and ``samerging``: layer-wise coefficients learned on 64 unlabelled training
  inputs per task, Adam without / with SAM (rho 0.07), 100 steps.

Reported per method: the mean over the tasks of the 10-way accuracy on each task's test digits
(no task identity), and the task-aware accuracy (argmax over the task's two classes); with the
pre-trained start and each expert on its own task (``individual``) as references. Last, two
models trained from different seeds on all the digits, and the loss barrier on the straight line
between them before and after permutation alignment (weight matching, Ainsworth et al. 2023).

    python bench/merging.py                 # three seeds, about 20 s on 2 cores
    python bench/merging.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from continual import git_sha, load_digits_dataset  # bench/ is on sys.path when this script runs
from harness import device_name
from torch import nn

import cl_optim
from cl_optim.merge import fisher_merge, learn_merge, task_arithmetic, ties

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
MERGES = ("average", "task_arithmetic", "ties", "fisher", "adamerging", "samerging")


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def split_data(seed: int):
    """Pre-training set (30% of the training digits, all classes), the tasks' train and test sets."""
    x, y, source = load_digits_dataset()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = torch.tensor(x[order]), torch.tensor(y[order])
    n_train = int(0.7 * len(x))
    n_pre = int(0.3 * n_train)
    pre = (x[:n_pre], y[:n_pre])
    train, test = (x[n_pre:n_train], y[n_pre:n_train]), (x[n_train:], y[n_train:])

    def pick(part, pair):
        mask = (part[1] == pair[0]) | (part[1] == pair[1])
        return part[0][mask], part[1][mask]

    tasks = [{"name": f"{a}v{b}", "classes": (a, b), "train": pick(train, (a, b)), "test": pick(test, (a, b))}
             for a, b in PAIRS]  # fmt: skip
    return pre, tasks, (x[:n_train], y[:n_train]), source


def train(model, data, epochs, lr, seed, rho=0.0, batch_size=32):
    """SGD with momentum 0.9, or SAM over it (``rho > 0``): ``epochs`` passes in a seeded order."""
    x, y = data
    base = dict(lr=lr, momentum=0.9)
    opt = (
        cl_optim.SAM(model.parameters(), cl_optim.SGD, rho=rho, **base)
        if rho > 0
        else cl_optim.SGD(model.parameters(), **base)
    )
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]

            def closure(batch=batch):
                opt.zero_grad()
                loss = loss_fn(model(x[batch]), y[batch])
                loss.backward()
                return loss

            closure()
            opt.step(closure) if rho > 0 else opt.step()
    return model


def accuracies(model, state, tasks) -> dict:
    """Per task: the 10-way accuracy and the task-aware one (argmax over the task's classes)."""
    model.load_state_dict(state)
    model.eval()
    ten, aware = [], []
    with torch.no_grad():
        for task in tasks:
            x, y = task["test"]
            logits = model(x)
            ten.append(float((logits.argmax(1) == y).float().mean()))
            a, b = task["classes"]
            pick = torch.where(logits[:, a] >= logits[:, b], a, b)
            aware.append(float((pick == y).float().mean()))
    return {"per_task": ten, "accuracy": float(np.mean(ten)), "task_aware": float(np.mean(aware))}


def merges(model, base, experts, tasks, args) -> dict:
    """Every merge of ``experts`` (state_dicts) from ``base``."""
    k = len(experts)
    out = {
        "average": task_arithmetic(base, experts, 1.0 / k),
        "task_arithmetic": task_arithmetic(base, experts, 0.3),
        "ties": ties(base, experts, density=0.2, scale=1.0),
    }
    fishers = []
    for expert, task in zip(experts, tasks):
        model.load_state_dict(expert)
        x, y = task["train"]
        n = min(250, len(x))
        fishers.append(dict(cl_optim.fisher.estimate(model, [(x[:n], y[:n])], estimator="exact")))
    out["fisher"] = fisher_merge(experts, fishers)
    inputs = [[task["train"][0][:32], task["train"][0][32:64]] for task in tasks]
    gen = torch.Generator().manual_seed(args.seed)
    for name, rho in (("adamerging", 0.0), ("samerging", 0.07)):
        out[name], _ = learn_merge(model, base, experts, inputs, granularity="layer", steps=args.learn_steps,
                                   lr=1e-2, rho=rho, generator=gen)  # fmt: skip
    return out


def alignment(data, args) -> dict:
    """Two models from different seeds on the same data: the loss barrier of the straight line
    between them, before and after weight matching."""
    from cl_optim.landscape import interpolate
    from cl_optim.merge.align import mlp_chain, weight_matching

    a = train(mlp(args.seed + 100), data, args.epochs, args.lr, args.seed)
    b = train(mlp(args.seed + 200), data, args.epochs, args.lr, args.seed + 1)
    state_a, state_b = copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())
    aligned, _ = weight_matching(state_a, state_b, mlp_chain(a))
    batches = [(data[0][i : i + 256], data[1][i : i + 256]) for i in range(0, len(data[0]), 256)]
    before = interpolate(a, state_a, state_b, batches, steps=11)
    after = interpolate(a, state_a, aligned, batches, steps=11)
    return {"barrier_before": before["barrier"], "barrier_after": after["barrier"],
            "loss_before": before["loss"], "loss_after": after["loss"], "alpha": before["alpha"]}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="cl_optim model merging on digits (no download)")
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs per expert")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--rho", type=float, default=0.05, help="SAM radius of the SAM-trained experts")
    parser.add_argument("--learn-steps", type=int, default=100, help="steps of AdaMerging / SAMerging")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--quick", action="store_true", help="one seed, 2 epochs, 20 learning steps: a smoke run"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "merging.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.learn_steps, args.seeds = 2, 20, args.seeds[:1]
    for name in ("pretrain_epochs", "epochs", "learn_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (0 < args.lr < float("inf") and 0 <= args.rho < float("inf")):
        parser.error("--lr must be finite and > 0, --rho finite and >= 0")
    args.out = Path(args.out)
    return args


def run_seed(args, seed: int) -> dict:
    """Every measurement of one seed (data split, initialisation, training order)."""
    tic = time.time()
    seeded = argparse.Namespace(**{**vars(args), "seed": seed})  # what merges and alignment read
    pre, tasks, all_train, _ = split_data(seed)
    model = train(mlp(seed), pre, args.pretrain_epochs, args.lr, seed)
    base = copy.deepcopy(model.state_dict())
    results = {"pretrained": accuracies(model, base, tasks)}
    for trainer, rho in (("sgd", 0.0), ("sam", args.rho)):
        experts = []
        for t, task in enumerate(tasks):
            model.load_state_dict(base)
            train(model, task["train"], args.epochs, args.lr, seed + t, rho=rho)
            experts.append(copy.deepcopy(model.state_dict()))
        own = [accuracies(model, e, [task]) for e, task in zip(experts, tasks)]
        row = {"individual": {"per_task": [r["accuracy"] for r in own],
                              "accuracy": float(np.mean([r["accuracy"] for r in own])),
                              "task_aware": float(np.mean([r["task_aware"] for r in own]))}}  # fmt: skip
        for name, state in merges(model, base, experts, tasks, seeded).items():
            row[name] = accuracies(model, state, tasks)
        results[trainer] = row
    results["alignment"] = alignment(all_train, seeded)
    print(f"[seed {seed}] done ({time.time() - tic:.1f} s)", file=sys.stderr, flush=True)
    return results


def mean_over_seeds(runs: list[dict]) -> dict:
    """Each accuracy averaged over the seeds, with its standard deviation."""

    def summary(rows: list[dict]) -> dict:
        out = {"per_task": np.mean([r["per_task"] for r in rows], 0).tolist()}
        for key in ("accuracy", "task_aware"):
            values = [r[key] for r in rows]
            out[key], out[key + "_std"] = float(np.mean(values)), float(np.std(values))
        return out

    results = {"pretrained": summary([r["pretrained"] for r in runs])}
    for trainer in ("sgd", "sam"):
        results[trainer] = {name: summary([r[trainer][name] for r in runs]) for name in runs[0][trainer]}
    barriers = {key: [r["alignment"][key] for r in runs] for key in ("barrier_before", "barrier_after")}
    results["alignment"] = {key: float(np.mean(v)) for key, v in barriers.items()}
    results["alignment"].update({key + "_by_seed": v for key, v in barriers.items()})
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    runs = [run_seed(args, seed) for seed in args.seeds]
    results = mean_over_seeds(runs)
    source = load_digits_dataset()[2]
    record = {
        "results": results,
        "by_seed": runs,
        "tasks": [f"{a}v{b}" for a, b in PAIRS],
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": source,
        "device": device_name(torch.device("cpu")),
        "versions": {
            "torch": torch.__version__,
            "cl_optim": cl_optim.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "git_sha": git_sha(),
        "seconds": time.time() - start,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"\ndata: {source}; MLP 64-256-256-10 pre-trained {args.pretrain_epochs} epochs on 30% of the training "
          f"digits; experts {args.epochs} epochs per digit pair, SGD lr {args.lr} momentum 0.9 / SAM rho {args.rho}")  # fmt: skip
    print(f"seeds {args.seeds}: means (and standard deviations) over the seeds")
    pre = results["pretrained"]
    print(f"pre-trained start: 10-way {pre['accuracy']:.3f}, task-aware {pre['task_aware']:.3f}")
    print(
        f"\n  {'merge':<16} {'SGD experts':>15} {'(task-aware)':>13} {'SAM experts':>15} {'(task-aware)':>13}"
    )
    for name in ("individual", *MERGES):
        cells = []
        for trainer in ("sgd", "sam"):
            r = results[trainer][name]
            cells.append(f"{r['accuracy']:7.3f} ({r['accuracy_std']:.3f}) {r['task_aware']:13.3f}")
        print(f"  {name:<16} {'  '.join(cells)}")
    al = results["alignment"]
    print(f"\n  barrier between two independently trained models: {al['barrier_before']:.3f} before "
          f"alignment, {al['barrier_after']:.3f} after weight matching (mean over the seeds)")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, args.out)
    print(f"\nwrote {args.out} ({time.time() - start:.0f} s)")
    return record


if __name__ == "__main__":
    main()
