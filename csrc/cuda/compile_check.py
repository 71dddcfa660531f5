"""Compile every CUDA kernel file ahead of time, without a GPU: ``nvcc -c`` for each architecture.

CI runs it; a compile error fails CI. It prints each kernel's registers, spills and shared memory
(``ptxas -v``) so a register-pressure regression shows. The files are torch-light (CUDA runtime
headers only), so each compiles in seconds.

    python csrc/cuda/compile_check.py --arch 80 90
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def nvcc_path() -> str:
    # /usr/local/bin/nvcc may be a wrapper script: CUDA_HOME is set explicitly where it exists.
    cuda_home = os.environ.get("CUDA_HOME") or (
        "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None
    )
    if cuda_home and Path(cuda_home, "bin", "nvcc").exists():
        return str(Path(cuda_home, "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found is None:
        raise SystemExit("nvcc not found: set CUDA_HOME or put nvcc on PATH")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"], help="compute capabilities, e.g. 80 90")
    args = parser.parse_args(argv)
    nvcc = nvcc_path()
    failures = 0
    sources = sorted(HERE.glob("*.cu"))
    with tempfile.TemporaryDirectory() as out:
        for source in sources:
            for arch in args.arch:
                command = [
                    nvcc, "-std=c++20", "-O3", f"-I{HERE.parent / 'include'}",
                    "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
                    "-c", str(source), "-o", str(Path(out, f"{source.stem}_{arch}.o")),
                ]  # fmt: skip
                result = subprocess.run(command, capture_output=True, text=True)
                status = "ok" if result.returncode == 0 else "FAILED"
                print(f"{source.name:<20} sm_{arch}: {status}")
                if result.returncode != 0:
                    failures += 1
                    print(result.stderr, file=sys.stderr)
                    continue
                kernels = len(re.findall(r"Compiling entry function", result.stderr))
                registers = [int(r) for r in re.findall(r"Used (\d+) registers", result.stderr)]
                spills = sum(int(s) for s in re.findall(r"(\d+) bytes spill stores", result.stderr))
                print(f"    {kernels} kernel specialisations, registers {min(registers, default=0)}-"
                      f"{max(registers, default=0)}, spill stores {spills} bytes in all")  # fmt: skip
    print(f"{len(sources)} files x {len(args.arch)} architectures, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
