"""Backend registry: which implementation runs each fused op on each (device, dtype) group.

Every op has one contract (the per-element math of DESIGN.md §3) and several implementations:

======== =============================================== ===============================
backend  what                                            state in this release
======== =============================================== ===============================
cuda     csrc/cuda, multi-tensor-apply kernels            CUDA tensors; built on first use
triton   kernels/, pointer-table Triton kernels           CUDA tensors (CPU ones under TRITON_INTERPRET=1)
cpp      csrc/cpu, at::parallel_for loops                 CPU tensors; built on first use
foreach  torch._foreach_* over each (device, dtype) group available everywhere
forloop  one tensor at a time, the readable oracle       available everywhere
======== =============================================== ===============================

``"auto"`` takes, for each (device, dtype) group, the first backend in that order that is
available; it passes over an unavailable one with one warning naming the reason (backends that
this release does not ship, or that are written for another device type, are not candidates, so
they cost no warning). A backend asked for by
name that is unavailable raises the reason as an error.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["BACKENDS", "resolve", "report", "check_backend_name", "kernel_op", "prepare"]

# Auto-priority order, fastest first.
BACKENDS = ("cuda", "triton", "cpp", "foreach", "forloop")


@dataclass(frozen=True)
class _Backend:
    name: str
    # Returns None when the backend can run on this device and dtype, else the reason it cannot.
    unavailable_reason: Callable[[torch.device, torch.dtype], Optional[str]]
    shipped: bool = True
    # Device types it is written for (None: all): "auto" passes over the others without a
    # warning — the CUDA kernels not running on CPU tensors is no news.
    device_types: Optional[tuple[str, ...]] = None


def _not_shipped(what: str) -> Callable[[torch.device, torch.dtype], Optional[str]]:
    return lambda device, dtype: f"not part of cl_optim 0.1: {what}"


def _foreach_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"dtype {dtype} is not a real floating-point type"
    return None


def _forloop_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    return _foreach_reason(device, dtype)


def _build_failure(error: BaseException) -> str:
    """The reason a build failed, with the compiler's own error lines (ninja's last line alone,
    "ninja: build stopped: subcommand failed", says nothing)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    compiler = [line for line in lines if "error:" in line or "fatal error" in line]
    detail = "; ".join(dict.fromkeys(compiler[:3])) if compiler else (lines[-1] if lines else "")
    return f"the extension could not be built or loaded: {type(error).__name__}: {detail}"


def _cuda_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return f"the CUDA kernels run on CUDA tensors, not {device.type}"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the CUDA kernels take fp32, fp16 or bf16 tensors, not {dtype}"
    from ._ext import cuda_extension_error

    error = cuda_extension_error()
    return None if error is None else _build_failure(error)


_triton_state: dict = {}


def triton_ops():
    """``torch.ops.cl_optim_triton`` once the Triton kernels import (raises the import error)."""
    if "error" not in _triton_state:
        try:
            import cl_optim.kernels._ops  # noqa: F401  (registers the ops)

            _triton_state["error"] = None
        except Exception as error:  # noqa: BLE001 - no Triton, or a broken one: the backend is off
            _triton_state["error"] = error
    if _triton_state["error"] is not None:
        raise _triton_state["error"]
    return torch.ops.cl_optim_triton


def _triton_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the Triton kernels take fp32, fp16 or bf16 tensors, not {dtype}"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "the Triton kernels run on CUDA tensors (on CPU tensors only under TRITON_INTERPRET=1, for tests)"
        )
    if device.type not in ("cpu", "cuda"):
        return f"the Triton kernels run on CUDA tensors, not {device.type}"
    try:
        triton_ops()
    except Exception as error:  # noqa: BLE001
        return f"Triton is not usable: {type(error).__name__}: {error}"
    return None


def _cpp_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cpu":
        return f"the C++ kernels run on CPU tensors, not {device.type}"
    reason = _foreach_reason(device, dtype)
    if reason is not None:
        return reason
    from ._ext import cpu_extension_error

    error = cpu_extension_error()
    return None if error is None else _build_failure(error)


_REGISTRY = {
    "cuda": _Backend("cuda", _cuda_reason, device_types=("cuda",)),
    "triton": _Backend("triton", _triton_reason, device_types=("cuda",)),
    "cpp": _Backend("cpp", _cpp_reason, device_types=("cpu",)),
    "foreach": _Backend("foreach", _foreach_reason),
    "forloop": _Backend("forloop", _forloop_reason),
}

_warned: set[tuple[str, str]] = set()


COMPILED = ("cuda", "triton", "cpp")  # what torch's fused=True asks for


def check_backend_name(name: str) -> str:
    """Validate a ``backend=`` argument and return it (``"fused"``: the fastest compiled one)."""
    if name not in ("auto", "fused") and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
    return name


def resolve(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Return the backend that runs a (device, dtype) group.

    >>> resolve("forloop", torch.device("cpu"), torch.float32)
    'forloop'
    """
    # A backend that ran once keeps running (the extension is built or loaded once, and the
    # interpreter switch is read when Triton is first imported): every step asks several times.
    key = (requested, device, dtype)
    found = _resolved.get(key)
    if found is not None:
        return found
    found = _resolve(requested, device, dtype)
    _resolved[key] = found
    return found


_resolved: dict = {}


def _resolve(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    check_backend_name(requested)
    if requested == "fused":
        reasons = {}
        for name in COMPILED:
            types = _REGISTRY[name].device_types
            if types and device.type not in types:
                continue
            reasons[name] = _REGISTRY[name].unavailable_reason(device, dtype)
            if reasons[name] is None:
                return name
        detail = "; ".join(f"{name}: {reason}" for name, reason in reasons.items()) or (
            f"none is written for {device.type} tensors (cpp runs CPU tensors, cuda and triton CUDA ones); "
            "backend='foreach' runs on any device"
        )
        raise RuntimeError(
            f"fused=True asks for a compiled backend and none can run on {device} / {dtype}: {detail}"
        )
    if requested != "auto":
        reason = _REGISTRY[requested].unavailable_reason(device, dtype)
        if reason is not None:
            from ._ext import cpu_extension_error, cuda_extension_error

            original = None  # the build error itself, when that is the reason
            if reason.startswith("the extension could not"):
                original = {"cpp": cpu_extension_error, "cuda": cuda_extension_error}[requested]()
            raise RuntimeError(
                f"backend {requested!r} cannot run on {device} / {dtype}: {reason}"
            ) from original
        return requested
    for name in BACKENDS:
        backend = _REGISTRY[name]
        if not backend.shipped or (backend.device_types and device.type not in backend.device_types):
            continue
        reason = backend.unavailable_reason(device, dtype)
        if reason is None:
            return name
        if (name, reason) not in _warned:
            _warned.add((name, reason))
            warnings.warn(f"cl_optim: backend {name!r} skipped: {reason}", RuntimeWarning, stacklevel=3)
    raise RuntimeError(f"no cl_optim backend can run on {device} / {dtype}")


def prepare(backend: str, params) -> None:
    """Build or load the compiled kernels that ``backend`` may pick for these parameters, now.

    Optimizers call it as groups are added, so that the first ``step()`` — possibly inside
    ``torch.compile``, which cannot trace a compiler run — finds them loaded. Failures are kept
    for ``resolve`` to report; nothing is raised here.
    """
    from ._ext import cpu_extension_error, cuda_extension_error

    if backend in ("auto", "fused", "cpp") and any(p.device.type == "cpu" for p in params):
        cpu_extension_error()
    if backend in ("auto", "fused", "cuda") and any(p.device.type == "cuda" for p in params):
        cuda_extension_error()


def kernel_op(backend: str, op_name: str, like: torch.Tensor):
    """The ``torch.ops.cl_optim`` op that runs ``op_name`` for a compiled ``backend``, after
    checking that the backend can run on ``like``'s device and dtype (building the extension
    on first use): a direct functional call gets the same clear error as an optimizer.
    """
    resolve(backend, like.device, like.dtype)
    if backend == "triton":
        return getattr(triton_ops(), op_name)
    return getattr(torch.ops.cl_optim, op_name)


def report(file=None) -> str:
    """Print, and return, which backends this machine can run and why each missing one is missing.

    >>> text = report()  # doctest: +ELLIPSIS
    cl_optim backends...
    """
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    lines = [f"cl_optim backends (torch {torch.__version__}; devices: {', '.join(map(str, devices))})"]
    if not torch.cuda.is_available():
        lines.append("  note: no CUDA device is visible (torch.cuda.is_available() is False)")
    for name in BACKENDS:
        backend = _REGISTRY[name]
        for device in devices:
            reason = backend.unavailable_reason(device, torch.float32)
            status = "available" if reason is None else f"unavailable: {reason}"
            lines.append(f"  {name:<8} {str(device):<5} {status}")
    text = "\n".join(lines)
    print(text, file=file)
    return text
