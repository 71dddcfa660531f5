"""The GPU run in one command: build, test and benchmark cl_optim on the CUDA device at hand.

    python bench/gpu_check.py --out DIR [--budget-s 480] [--only build gpu_tests ...]
    python bench/gpu_check.py --dry-run          # on any machine: what it would run, and that it can

In order, each step a subprocess with its own time cap, cut to what is left of ``--budget-s``:

1. ``install``: cl_optim, editable, where the checkout is not installed (a bare machine);
2. ``environment``: the card, driver, torch/Triton/CUDA versions and free memory;
3. ``build``: the CUDA extension (``TORCH_CUDA_ARCH_LIST`` from the card when unset, all cores);
4. ``gpu_tests``: ``pytest -m gpu`` over the test files that hold GPU tests (the CUDA and Triton
   kernels against the oracle, the landscape on CUDA, the checks of the CUDA glue);
5. the benchmarks' CUDA rows, ``--quick`` sets: the plain steps (with the device-to-device copy
   ceiling and launches per step the harness records for every row), a 100M-parameter AdamW and
   SGD step, EWC, SAM and its variants, the multi-task ops, the per-sample Fisher estimators, the
   landscape tools.

Every step's output goes to ``DIR/gpu_check.log``, the benchmark rows to ``DIR/bench.csv`` (the
harness's schema, the card's name in every row) and a summary to ``DIR/summary.md``: each step's
status (ok, failed with its exit code, timed out, skipped for the budget) and seconds, then the
tables of ``bench/report.py`` over the CSV. A step that fails or times out does not stop the
ones after it (a failed build does: everything after needs it); when the budget is spent the
remaining steps are listed as skipped and what was measured is kept — the summary is rewritten
after every step. Three files, so the whole result comes back from a remote machine that returns
only a few.

``--dry-run`` (CI runs it) prints every command with its cap and checks, without a GPU, that each
piece can start: the benchmark modules and the GPU test files import, and pytest collects the GPU
tests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
DEFAULT_BUDGET_S = 480.0  # 8 minutes: the bound on an H100/H200
OUTPUTS = ("summary.md", "bench.csv", "gpu_check.log")

# A checkout copied to a bare machine has no cl_optim installed: an editable install (no
# dependencies, no build isolation: nothing is fetched) maps kernels/ to cl_optim.kernels as
# setup.py does; a source path alone would leave the Triton backend out. Whether it is installed is
# asked of a fresh interpreter outside the checkout (one started in it finds the source folder, and
# the install's import hook is only loaded by interpreters started after it).
_INSTALL = f"""
import subprocess, sys, tempfile
def importable():
    probe = "import cl_optim, cl_optim.kernels; print('cl_optim', cl_optim.__version__, 'from', cl_optim.__file__)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tempfile.gettempdir(), capture_output=True, text=True)
    print(done.stdout.strip() or (done.stderr.strip().splitlines() or ["no output"])[-1])
    return done.returncode == 0
if not importable():
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "-e", {str(ROOT)!r}], check=True)
    if not importable():
        raise SystemExit("cl_optim is still not importable after the editable install")
"""

_ENVIRONMENT = """
import torch, triton, cl_optim
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "cl_optim", cl_optim.__version__)
assert torch.cuda.is_available(), "torch sees no CUDA device"
d = torch.cuda.current_device()
p = torch.cuda.get_device_properties(d)
free, total = torch.cuda.mem_get_info(d)
print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
      f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} free)")
"""

_BUILD = """
import time, torch
from cl_optim import _ext
tic = time.time()
error = _ext.cuda_extension_error()
if error is not None:
    raise SystemExit(f"the CUDA extension did not build: {error}")
print(f"CUDA extension ready in {time.time() - tic:.1f} s")
"""


@dataclass
class Step:
    name: str
    argv: list[str]
    cap_s: float  # the most this step may take, before the budget cuts it
    required: bool = False  # a failure stops the steps after it
    status: str = "pending"
    seconds: float = 0.0
    detail: str = ""
    env: dict = field(default_factory=dict)


def gpu_test_files() -> list[str]:
    """The test files with GPU tests (``pytest.mark.gpu``): the others are not imported, so a
    package that only a CPU test needs (INFTY, pytorch_optimizer) cannot fail the collection."""
    return sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").glob("test_*.py")
        if "mark.gpu" in path.read_text()
    )


def steps(out: Path, python: str = sys.executable) -> list[Step]:
    csv = str(out / "bench.csv")

    def bench(script: str, *extra: str) -> list[str]:
        return [python, str(BENCH / script), "--device", "cuda", "--csv", csv, *extra]

    arch = {} if os.environ.get("TORCH_CUDA_ARCH_LIST") else {"CL_OPTIM_ARCH_FROM_CARD": "1"}
    # By priority: what a short lease must not miss comes first; caps sum past the default budget
    # on purpose (a step that finishes early leaves its time to the next).
    return [
        Step("install", [python, "-c", _INSTALL], 90, required=True),
        Step("environment", [python, "-c", _ENVIRONMENT], 45, required=True),
        Step(
            "build",
            [python, "-c", _BUILD],
            240,
            required=True,
            env={"MAX_JOBS": str(os.cpu_count() or 8), **arch},
        ),
        Step(
            "gpu_tests",
            [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rfEs", *gpu_test_files()],
            180,
        ),  # fmt: skip
        Step("bench_step", bench("bench_step.py", "--quick"), 60),
        Step("bench_sam", bench("bench_sam.py", "--quick", "--sets", "resnet18", "many_small"), 90),
        Step("bench_ewc", bench("bench_ewc.py", "--quick"), 60),
        Step("bench_step_100m", bench("bench_step.py", "--sets", "huge"), 60),
        Step("bench_fisher", bench("bench_fisher.py", "--quick"), 60),
        Step("bench_multitask", bench("bench_multitask.py", "--quick"), 45),
        Step("bench_landscape", bench("bench_landscape.py", "--quick"), 45),
    ]


def shown(argv: list[str]) -> str:
    """A step's command for the eye: inline scripts by name, paths relative to the checkout."""
    shown_argv = ["<inline script>" if i > 0 and argv[i - 1] == "-c" else a for i, a in enumerate(argv)]
    return shlex.join(shown_argv).replace(str(ROOT) + os.sep, "")


def _card_arch() -> Optional[str]:
    """``TORCH_CUDA_ARCH_LIST`` for the visible card (one architecture: a faster build)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def run_step(step: Step, remaining_s: float, log) -> None:
    """Run one step with its cap cut to ``remaining_s``; its output appended to ``log``."""
    cap = min(step.cap_s, remaining_s)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    if env.pop("CL_OPTIM_ARCH_FROM_CARD", None):
        arch = _card_arch()
        if arch:
            env["TORCH_CUDA_ARCH_LIST"] = arch
    log.write(f"\n===== {step.name} (cap {cap:.0f} s): {shown(step.argv)}\n")
    log.flush()
    tic = time.time()
    # A process group of its own: a timed-out step is stopped with everything it started (ninja, nvcc).
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip

    def stop_step(signum, frame):  # gpu_check told to stop (a remote run's timeout): its step too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop_step) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait(timeout=cap)
        step.status = "ok" if code == 0 else "failed"
        step.detail = "" if code == 0 else f"exit code {code}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        step.status = "timed out"
        step.detail = f"stopped at {cap:.0f} s" + (" (the budget's end)" if cap < step.cap_s else "")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    step.seconds = time.time() - tic
    log.write(f"===== {step.name}: {step.status} {step.detail} ({step.seconds:.1f} s)\n")
    log.flush()


def write_summary(out: Path, plan: list[Step], budget_s: float, started: float) -> None:
    lines = [
        "# cl_optim GPU check",
        "",
        f"Budget {budget_s:.0f} s, used {time.time() - started:.0f} s "
        f"({time.strftime('%Y-%m-%d %H:%M:%S %z')}). Logs: `gpu_check.log`; rows: `bench.csv`.",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.detail} |" for s in plan]
    csv = out / "bench.csv"
    if csv.exists():
        try:
            sys.path.insert(0, str(BENCH))
            from report import markdown

            lines += ["", markdown(csv)]
        except Exception as error:  # noqa: BLE001 - the summary must be written whatever the report does
            lines += ["", f"(bench/report.py could not read bench.csv: {error!r})"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def dry_run(plan: list[Step]) -> int:
    """Print the plan and check that every piece starts; 0 if all can."""
    import importlib
    import importlib.util

    problems = []
    print("gpu_check would run, in order (caps in seconds, cut to the budget):")
    for step in plan:
        print(f"  {step.name:<16} {step.cap_s:5.0f}  {shown(step.argv)}")
    sys.path.insert(0, str(BENCH))
    # The tree itself only where cl_optim is not installed (a lent machine's copy), and last: first on
    # the path, its kernels/ would shadow the PyPI package `kernels` that transformers imports.
    if importlib.util.find_spec("cl_optim") is None:
        sys.path.append(str(ROOT))
    from harness import parse_args

    for step in plan:
        index = next(
            (i for i, a in enumerate(step.argv) if a.endswith(".py") and a.startswith(str(BENCH))), None
        )
        if index is None:
            continue
        script = Path(step.argv[index])
        try:
            module = importlib.import_module(script.stem)
            # its arguments as the script will parse them (a set name it does not know, say)
            parse_args(script.stem, step.argv[index + 1 :], extra=getattr(module, "_options", None))
        except (Exception, SystemExit) as error:  # noqa: BLE001 - report every piece that cannot start
            problems.append(f"{step.name}: {script.name} cannot start: {error!r}")
    files = gpu_test_files()
    if not files:
        problems.append("gpu_tests: no test file holds a pytest.mark.gpu test")
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    collected = [line for line in collect.stdout.splitlines() if "::" in line]
    if collect.returncode != 0 or not collected:
        problems.append(
            f"gpu_tests: pytest could not collect the GPU tests:\n{collect.stdout[-2000:]}{collect.stderr[-2000:]}"
        )
    print(f"  gpu_tests: {len(collected)} GPU tests in {len(files)} files collect")
    for problem in problems:
        print(f"PROBLEM {problem}", file=sys.stderr)
    print("dry run: every piece starts" if not problems else f"dry run: {len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-clock budget of the whole run; the steps left when it ends are skipped")  # fmt: skip
    parser.add_argument(
        "--only", nargs="+", default=None, help="run these steps only (the required ones too)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the steps and check that each can start")
    args = parser.parse_args(argv)
    if not args.budget_s > 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    plan = steps(args.out)
    names = [s.name for s in plan]
    if args.only is not None:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            parser.error(f"--only: no step named {', '.join(unknown)} (steps: {', '.join(names)})")
        plan = [s for s in plan if s.required or s.name in args.only]
    if args.dry_run:
        return dry_run(plan)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a fresh run: no rows or log of an earlier one mixed in
        (args.out / name).unlink(missing_ok=True)
    started = time.time()
    stop: Optional[str] = None
    with open(args.out / "gpu_check.log", "w") as log:
        for step in plan:
            remaining = args.budget_s - (time.time() - started)
            if stop is not None:
                step.status, step.detail = "skipped", stop
            elif remaining < 5:
                step.status, step.detail = "skipped", "the budget was spent"
            else:
                print(f"[gpu_check] {step.name} (at most {min(step.cap_s, remaining):.0f} s)", flush=True)
                run_step(step, remaining, log)
                print(
                    f"[gpu_check] {step.name}: {step.status} {step.detail} ({step.seconds:.1f} s)", flush=True
                )
                if step.required and step.status != "ok":
                    stop = f"{step.name} did not succeed"
            write_summary(args.out, plan, args.budget_s, started)
    print((args.out / "summary.md").read_text())
    return 0 if all(s.status == "ok" for s in plan) else 1


if __name__ == "__main__":
    sys.exit(main())
