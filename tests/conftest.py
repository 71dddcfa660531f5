"""Shared fixtures: the parameter zoo, deterministic gradients and the reduced-precision rule."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

# `python -m pytest` (the README's test command) puts the working directory first on sys.path.
# From the source tree that makes its kernels/ directory (installed as cl_optim.kernels) importable
# as a top-level `kernels`, shadowing the PyPI package of that name, which transformers imports
# since 5.25 (its hub kernels): every Hugging Face integration test then failed on "cannot import
# name 'CUDAProperties' from 'kernels'". cl_optim comes from its install, so the tree's root is
# dropped from sys.path wherever the install finds cl_optim without it.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
_without_root = [p for p in sys.path if pathlib.Path(p or os.curdir).resolve() != _ROOT]
if len(_without_root) < len(sys.path):
    _with_root, sys.path[:] = list(sys.path), _without_root
    if importlib.util.find_spec("cl_optim") is None:  # not installed: the tree is how it is found
        sys.path[:] = _with_root


def _tested_copy() -> tuple[pathlib.Path, bool]:
    import cl_optim

    where = pathlib.Path(cl_optim.__file__).resolve().parent
    return where, where == _ROOT / "cl_optim"


def pytest_report_header(config):
    """Which cl_optim the run tests: an install (editable or not) wins over the tree's root, so a
    run from one checkout with another checkout installed tests the other one."""
    where, here = _tested_copy()
    return f"cl_optim: {where}" + ("" if here else f" -- NOT this tree ({_ROOT})")


def pytest_terminal_summary(terminalreporter):
    """The same, where it is not this tree, at the end of every run (``-q`` prints no header)."""
    where, here = _tested_copy()
    if not here:
        terminalreporter.write_sep(
            "!",
            f"these tests ran cl_optim from {where}, not this tree ({_ROOT}): pip install -e . here",
            yellow=True,
        )


# The Triton kernels run on CPU tensors under the interpreter in these tests. Triton decides
# between interpreting and compiling when it is first imported (torch's test utilities import it),
# so the switch is set here, before any test module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Sizes of DESIGN.md §4: empty, one element, odd sizes, and one past 2**18.
ZOO_SIZES = (0, 1, 97, 1025, 278011)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_zoo(dtype: torch.dtype, seed: int = 0, sizes: tuple = ZOO_SIZES) -> list[dict]:
    """Two parameter groups covering every shape of the zoo, one non-contiguous and one grad-less.

    ``sizes``: the five 1-D sizes (empty, one, odd, mid, big); the Triton interpreter tests pass
    smaller ones."""
    gen = torch.Generator().manual_seed(seed)

    def param(*shape):
        return torch.nn.Parameter(torch.randn(*shape, generator=gen).to(dtype))

    empty, one, odd, mid, big = (param(n) for n in sizes)
    # A non-contiguous leaf: the transpose of a 31x33 matrix.
    strided = torch.nn.Parameter(torch.randn(31, 33, generator=gen).to(dtype).t())
    assert not strided.is_contiguous()
    frozen_grad = param(5)  # never gets a gradient
    return [
        {"params": [empty, one, odd, frozen_grad]},
        {"params": [mid, big, strided], "lr": 0.03},
    ]


def zoo_params(groups: list[dict]) -> list[torch.Tensor]:
    return [p for g in groups for p in g["params"]]


def clone_groups(groups: list[dict], dtype: torch.dtype | None = None) -> list[dict]:
    """A deep copy of the zoo (values, strides and group options), optionally in another dtype."""
    out = []
    for g in groups:
        params = []
        for p in g["params"]:
            q = torch.empty_strided(p.shape, p.stride(), dtype=dtype or p.dtype)
            with torch.no_grad():
                q.copy_(p)
            params.append(torch.nn.Parameter(q))
        out.append({**g, "params": params})
    return out


def zoo_grads(params: list[torch.Tensor], step: int, scale: float = 1.0) -> list[torch.Tensor | None]:
    """Deterministic fp32 gradients for a step; the 5-element parameter gets None."""
    grads = []
    for i, p in enumerate(params):
        if p.numel() == 5:
            grads.append(None)
            continue
        gen = torch.Generator().manual_seed(1000 * step + i)
        grads.append(torch.randn(p.shape, generator=gen) * scale)
    return grads


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.to(p.dtype)


def assert_close_lowp(candidate: torch.Tensor, oracle: torch.Tensor, reference: torch.Tensor, atol: float):
    """Reduced precision: the candidate's error against the fp64 run is at most twice the oracle's.

    ``reference`` is the same computation in fp64; ``oracle`` the forloop in the same dtype. Both
    the largest and the mean absolute error are compared (plus ``atol``): elementwise, two valid
    fp16/bf16 implementations that round an fp32 intermediate differently (torch's CPU kernels use
    FMA, a portable C++ build does not) drift apart by a few ulps in accumulated state.
    """
    assert candidate.dtype == oracle.dtype
    if reference.numel() == 0:
        return
    ref = reference.double()
    err_candidate = (candidate.double() - ref).abs()
    err_oracle = (oracle.double() - ref).abs()
    for name, reduce in (("largest", torch.max), ("mean", torch.mean)):
        got, allowed = reduce(err_candidate).item(), 2 * reduce(err_oracle).item() + atol
        assert got <= allowed, (
            f"{name} error {got:.3g} exceeds 2x the oracle's ({allowed:.3g} with atol {atol})"
        )


# fp32 tolerance of a GPU backend against the CPU oracle: the GPU contracts a*b + c into one FMA
# (one rounding instead of two), which over 10 steps moves fp32 state by about 1e-6 relative.
GPU_FP32 = dict(rtol=1e-5, atol=1e-5)


def assert_state_close(candidate, oracle, reference, dtype, atol=1e-2, fp32=None):
    """``fp32``: the tolerances of ``torch.testing.assert_close`` for fp32 (its defaults if None)."""
    if dtype == torch.float32 or reference is None:
        torch.testing.assert_close(candidate, oracle, **(fp32 or {}))
    else:
        assert candidate.dtype == oracle.dtype
        assert_close_lowp(candidate, oracle, reference, atol)
