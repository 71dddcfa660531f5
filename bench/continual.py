"""The continual-learning main job (placeholder until the benchmark issue lands).

The full benchmark (permuted and split 8x8-digits tasks; fine-tune, EWC, online EWC, SAM and
EWC+SAM; accuracy matrix, forgetting, JSON and a plot) needs cl_optim.EWC and is not built yet.
Until then this script runs a small, real check of what exists: a two-task sequence of synthetic
regression problems trained with cl_optim.SGD and cl_optim.SAM, reporting the loss on each task
after each stage (how much task 1 is forgotten while learning task 2).

    python bench/continual.py [--steps 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

import cl_optim


def make_task(seed: int, n: int = 256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    w = torch.randn(16, 1, generator=gen)
    return x, torch.tanh(x @ w)


def train(model, opt, task, steps, use_sam):
    x, y = task
    loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)
    for _ in range(steps):
        loss_fn().backward()
        if use_sam:
            opt.first_step(zero_grad=True)
            loss_fn().backward()
            opt.second_step(zero_grad=True)
        else:
            opt.step()
            opt.zero_grad()


@torch.no_grad()
def evaluate(model, task):
    x, y = task
    return torch.nn.functional.mse_loss(model(x), y).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    tasks = [make_task(args.seed + 1), make_task(args.seed + 2)]
    print("placeholder main job: two synthetic regression tasks (the digits benchmark is not built yet)")
    print(f"{'method':<8} {'task1 after 1':>14} {'task1 after 2':>14} {'task2 after 2':>14} {'ms/step':>8}")
    for method in ("sgd", "sam"):
        torch.manual_seed(args.seed)
        model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        if method == "sam":
            opt = cl_optim.SAM(model.parameters(), cl_optim.SGD, rho=0.05, lr=0.05, momentum=0.9)
        else:
            opt = cl_optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        start = time.perf_counter()
        train(model, opt, tasks[0], args.steps, method == "sam")
        after_first = evaluate(model, tasks[0])
        train(model, opt, tasks[1], args.steps, method == "sam")
        elapsed_ms = 1e3 * (time.perf_counter() - start) / (2 * args.steps)
        print(
            f"{method:<8} {after_first:>14.4f} {evaluate(model, tasks[0]):>14.4f} "
            f"{evaluate(model, tasks[1]):>14.4f} {elapsed_ms:>8.2f}"
        )


if __name__ == "__main__":
    main()
