"""The op input checks on a GPU: the CUDA and Triton ops refuse mismatched inputs (as on the CPU,
tests/test_op_checks.py) and tensors on another device, and change nothing.

Needs a CUDA device (skipped with the ``gpu`` marker otherwise); a device-mismatch case needs a
CUDA tensor next to a CPU one, which the CPU-only tests cannot make.
"""

from __future__ import annotations

import pytest
import torch
from test_op_checks import (
    ALIGNED,
    FP32_LISTS,
    MISMATCHES,
    SHAPES,
    TASK_LISTS,
    _assert_unchanged,
    _call_kernel,
    _snapshot,
    _spoil,
    _spoil_task_list,
    _valid,
)

from cl_optim._backend import resolve

pytestmark = pytest.mark.gpu


def _cuda_backends():
    names = []
    for name, library in (("cuda", "cl_optim"), ("triton", "cl_optim_triton")):
        try:
            if resolve(name, torch.device("cuda"), torch.float32) == name:
                names.append((name, library))
        except RuntimeError:
            pass
    return names


def _on_cuda(args: dict) -> dict:
    moved = {}
    for key, value in args.items():
        if isinstance(value, list):
            moved[key] = [v.cuda() if isinstance(v, torch.Tensor) else v for v in value]
        elif isinstance(value, torch.Tensor):
            moved[key] = value.cuda()
        else:
            moved[key] = value
    return moved


def _cases():
    for op, lists in ALIGNED.items():
        for name, written in lists.items():
            for how in (*MISMATCHES, "cpu_entry"):
                if how == "expanded" and not written:
                    continue
                yield op, name, how


@pytest.mark.parametrize("op,name,how", list(_cases()))
def test_cuda_and_triton_ops_refuse_mismatches_and_other_devices(op, name, how):
    backends = _cuda_backends()
    if not backends:
        pytest.skip("neither the cuda nor the triton backend runs on this machine's GPU")
    for _, library in backends:
        args = _on_cuda(_valid(op))
        if how == "cpu_entry":
            args[name] = [t.cpu() if i == 1 else t for i, t in enumerate(args[name])]
            expected = rf"{name}\[1\] is on cpu"
        elif how == "expanded":  # made on the GPU: a copy to it would not keep the zero stride
            args[name] = list(args[name])
            args[name][1] = torch.zeros(1, 4, dtype=args[name][1].dtype, device="cuda").expand(3, 4)
            expected = rf"{name}\[1\]"
        else:
            args[name] = [t.cuda() for t in _spoil([t.cpu() for t in args[name]], how, name in FP32_LISTS)]
            expected = r"not|layout|sparse" if how == "sparse" else rf"{name}(\[1\]| has 2 entries)"
        snapshot = _snapshot(args)
        with pytest.raises((RuntimeError, NotImplementedError), match=expected):
            _call_kernel(library, op, args)
        torch.cuda.synchronize()
        _assert_unchanged(snapshot)


def _task_cases():
    for op, lists in TASK_LISTS.items():
        for name, written in lists.items():
            for how in (*MISMATCHES, "cpu_entry"):
                if how == "expanded" and not written:
                    continue
                yield op, name, how
    yield "task_combine_", "coefficients", "cpu_entry"


@pytest.mark.parametrize("op,name,how", list(_task_cases()))
def test_the_multitask_ops_refuse_mismatches_and_other_devices(op, name, how):
    """The task lists of task_gram and task_combine_ (task-major in `grads`, see test_op_checks.py)
    and the coefficients, on the CUDA and Triton ops."""
    backends = _cuda_backends()
    if not backends:
        pytest.skip("neither the cuda nor the triton backend runs on this machine's GPU")
    for _, library in backends:
        args = _valid(op)
        if how == "cpu_entry" and name == "coefficients":
            args = _on_cuda(args)
            args["coefficients"] = args["coefficients"].cpu()
            expected = r"coefficients are on cpu, out\[0\] on cuda"
        elif how == "cpu_entry":
            args = _on_cuda(args)
            key, t = ("out", 0) if name == "out" else ("grads", 0 if name == "grads" else int(name[12:-1]))
            index = 1 if key == "out" else t * len(SHAPES) + 1
            args[key] = [x.cpu() if i == index else x for i, x in enumerate(args[key])]
            expected = r"\[1\] is on cpu"
        elif how == "expanded":  # made on the GPU: a copy to it would not keep the zero stride
            args = _on_cuda(args)
            args["out"] = list(args["out"])
            args["out"][1] = torch.zeros(1, 4, device="cuda").expand(3, 4)
            expected = r"out\[1\]"
        else:
            expected = _spoil_task_list(args, name, how)
            args = _on_cuda(args)
        snapshot = _snapshot(args)
        with pytest.raises((RuntimeError, NotImplementedError), match=expected):
            _call_kernel(library, op, args)
        torch.cuda.synchronize()
        _assert_unchanged(snapshot)
