"""Build and load the compiled backends on first use.

The C++ CPU kernels (``csrc/cpu``, bound in ``csrc/bindings.cpp``) are compiled just in time with
``torch.utils.cpp_extension.load`` (ninja) into a cache private to this Python environment and
torch version — one environment's build never loads in another — under torch's file lock, so two
processes starting together do not corrupt it. ``CL_OPTIM_BUILD_EXT=1 pip install
--no-build-isolation .`` builds it ahead of time as ``cl_optim._C_cpu`` instead. Whatever fails
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


def _build_cpu() -> None:
    if importlib.util.find_spec("cl_optim._C_cpu") is not None:  # built ahead of time
        torch.ops.load_library(importlib.util.find_spec("cl_optim._C_cpu").origin)
        return
    from torch.utils import cpp_extension

    try:  # the ninja wheel's binary, even when the environment's bin/ is not on PATH
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    cpp_extension.verify_ninja_availability()
    root = csrc_dir()
    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="cl_optim_cpu",
        sources=[str(root / "bindings.cpp"), *sorted(str(p) for p in (root / "cpu").glob("*.cpp"))],
        extra_include_paths=[str(root / "include")],
        # -fno-math-errno lets sqrt vectorise without changing any result; no -march=native and
        # no fast-math: the kernels must give the oracle's numbers on any x86-64 / arm64 CPU.
        extra_cflags=["-O3", "-fno-math-errno", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        is_python_module=False,
        verbose=os.environ.get("CL_OPTIM_VERBOSE_BUILD") == "1",
    )


def cpu_extension_error() -> Optional[BaseException]:
    """None once the CPU kernels are loaded; the build or load error otherwise (tried once)."""
    if "cpu" not in _state:
        try:
            _build_cpu()
            _state["cpu"] = None
        except Exception as error:  # noqa: BLE001 - any failure disables the backend, with its reason
            _state["cpu"] = error
    return _state["cpu"]
