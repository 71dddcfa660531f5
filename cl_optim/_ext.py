"""Build and load the compiled backends on first use.

The C++ CPU kernels (``csrc/cpu``, bound in ``csrc/bindings.cpp``) and, with a CUDA build of torch,
the CUDA kernels (``csrc/cuda``, bound in ``csrc/bindings_cuda.cpp``) are compiled just in time with
``torch.utils.cpp_extension.load`` (ninja) into a cache private to this Python environment and
torch version — one environment's build never loads in another — under torch's file lock, so two
processes starting together do not corrupt it. ``CL_OPTIM_BUILD_EXT=1 pip install
--no-build-isolation .`` builds them ahead of time as ``cl_optim._C_cpu`` / ``cl_optim._C_cuda``. Whatever fails
(no ninja, no compiler, a compile error) is kept, so ``backend="auto"`` can fall back with the
reason and ``backend="cpp"`` can raise it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from . import ops  # noqa: F401  (the schemas must exist before kernels bind to them)

_state: dict = {}


def csrc_dir() -> Path:
    """The C++ sources: ``cl_optim._csrc`` when installed, ``csrc/`` in a source checkout."""
    spec = importlib.util.find_spec("cl_optim._csrc")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[1] / "csrc"


def cache_dir() -> Path:
    """Per environment and torch version; ``CL_OPTIM_EXT_DIR`` overrides."""
    override = os.environ.get("CL_OPTIM_EXT_DIR")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    if override:
        return Path(override) / tag
    environment = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "cl_optim" / environment / tag


def _load_ahead_of_time_build(module: str) -> bool:
    spec = importlib.util.find_spec(f"cl_optim.{module}")
    if spec is None:
        return False
    torch.ops.load_library(spec.origin)
    return True


def _ninja_on_path():
    from torch.utils import cpp_extension

    try:  # the ninja wheel's binary, even when the environment's bin/ is not on PATH
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    cpp_extension.verify_ninja_availability()
    return cpp_extension


def _build_cpu() -> None:
    if _load_ahead_of_time_build("_C_cpu"):
        return
    cpp_extension = _ninja_on_path()
    root = csrc_dir()
    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    _announce(build / "cl_optim_cpu.so", "the C++ CPU kernels", "about 30 s on 2 cores")
    cpp_extension.load(
        name="cl_optim_cpu",
        sources=[str(root / "bindings.cpp"), *sorted(str(p) for p in (root / "cpu").glob("*.cpp"))],
        extra_include_paths=[str(root / "include")],
        # -fno-math-errno lets sqrt vectorise without changing any result; -ffp-contract=off keeps
        # a*b + c two roundings in every clone (the AVX-512 one would otherwise fuse them), so a
        # seeded run gives the same numbers on every CPU; no -march=native and no fast-math.
        extra_cflags=["-O3", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
        verbose=os.environ.get("CL_OPTIM_VERBOSE_BUILD") == "1",
    )


def _build_cuda() -> None:
    if _load_ahead_of_time_build("_C_cuda"):
        return
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a build without CUDA")
    cpp_extension = _ninja_on_path()
    root = csrc_dir()
    build = cache_dir() / "cuda"
    build.mkdir(parents=True, exist_ok=True)
    _announce(build / "cl_optim_cuda.so", "the CUDA kernels", "a few minutes")
    # One compile per kernel file; TORCH_CUDA_ARCH_LIST, when set, picks the architectures
    # (default: those of the visible GPUs).
    cpp_extension.load(
        name="cl_optim_cuda",
        sources=[str(root / "bindings_cuda.cpp"), *sorted(str(p) for p in (root / "cuda").glob("*.cu"))],
        extra_include_paths=[str(root / "include"), str(root)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3"],
        build_directory=str(build),
        is_python_module=False,
        verbose=os.environ.get("CL_OPTIM_VERBOSE_BUILD") == "1",
    )


def _announce(library: Path, what: str, how_long: str) -> None:
    """Say so before a first build: it blocks the first optimizer for a while, with no other sign
    (CL_OPTIM_QUIET_BUILD=1 silences it)."""
    if not library.exists() and os.environ.get("CL_OPTIM_QUIET_BUILD") != "1":
        print(f"cl_optim: compiling {what} (once per environment, {how_long}) into {library.parent}",
              file=sys.stderr, flush=True)  # fmt: skip


def _built_once(key: str, build) -> Optional[BaseException]:
    """Run ``build`` the first time only; None if it succeeded, else the error it raised."""
    if key not in _state:
        try:
            build()
            _state[key] = None
        except Exception as error:  # noqa: BLE001 - any failure disables the backend, with its reason
            _state[key] = error
    return _state[key]


def cuda_extension_error() -> Optional[BaseException]:
    """None once the CUDA kernels are loaded; the build or load error otherwise (tried once)."""
    return _built_once("cuda", _build_cuda)


def cpu_extension_error() -> Optional[BaseException]:
    """None once the CPU kernels are loaded; the build or load error otherwise (tried once)."""
    return _built_once("cpu", _build_cpu)
