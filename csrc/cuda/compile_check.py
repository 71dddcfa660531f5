"""Compile the CUDA backend ahead of time, without a GPU.

* every kernel file: ``nvcc -c`` for each architecture, printing each kernel's registers and
  spills (``ptxas -v``) so a register-pressure regression shows. The files are torch-light (CUDA
  runtime headers only), so each compiles in seconds;
* the torch glue (``csrc/bindings_cuda.cpp``): a syntax and type check with the host compiler
  against the installed torch's headers and the CUDA runtime headers (linking needs a CUDA build
  of torch, which the GPU machines have). A CPU build of torch lacks one generated header,
  ``c10/cuda/impl/cuda_cmake_macros.h``; a stand-in is written to a temporary directory.

CI runs it; a compile error fails CI.

    python csrc/cuda/compile_check.py --arch 80 90
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The flags torch's extension builder gives nvcc (torch.utils.cpp_extension.COMMON_NVCC_FLAGS, read
# from the installed torch where there is one): no implicit __half/__nv_bfloat16 conversions or
# operators. Checked with the same, so that what compiles here compiles in the just-in-time build.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
with contextlib.suppress(ImportError):  # the check also runs where torch is not installed
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as TORCH_NVCC_FLAGS  # noqa: F811


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


def check_glue(out: str) -> bool:
    """Type-check the torch glue of the CUDA ops; returns True when it compiles."""
    import sysconfig

    from torch.utils import cpp_extension

    cuda_home = Path(nvcc_path()).resolve().parents[1]
    includes = [*cpp_extension.include_paths(), str(cuda_home / "include"), str(HERE.parent),
                str(HERE.parent / "include"), sysconfig.get_paths()["include"]]  # fmt: skip
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        stub = Path(out, "stub", "c10", "cuda", "impl")
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(Path(out, "stub")))
    compiler = os.environ.get("CXX", "c++")
    source = HERE.parent / "bindings_cuda.cpp"
    command = [compiler, "-std=c++20", "-fsyntax-only", *(f"-I{p}" for p in includes), str(source)]
    result = subprocess.run(command, capture_output=True, text=True)
    print(f"{source.name:<20} host: {'ok' if result.returncode == 0 else 'FAILED'}")
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
    return result.returncode == 0


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
                    nvcc, "-std=c++17", "-O3", *TORCH_NVCC_FLAGS, f"-I{HERE.parent / 'include'}",
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
        if not check_glue(out):
            failures += 1
    print(f"{len(sources)} kernel files x {len(args.arch)} architectures and the glue, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
