"""Compile every Triton kernel specialisation ahead of time, without a GPU.

    python -m cl_optim.kernels.compile_check --arch 80 90

For each kernel of this package and each specialisation the optimizers can launch (listed once,
in ``SPECIALISATIONS`` below: parameter dtypes times the flag combinations of the public API),
``triton.compile`` builds PTX and a cubin for a ``GPUTarget`` of each architecture. It prints
per kernel the number of specialisations, warps and shared memory (Triton's metadata) and, where
``cuobjdump`` is found (Triton's wheel bundles one), registers and stack (spill) bytes read from
the cubins. It
exits non-zero on any failure. CI runs it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences Triton 3.9's notice

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from . import (  # noqa: E402
    _reduce,
    adamw_step,
    ewc_consolidate,
    ewc_grad_add,
    ewc_penalty,
    fisher_accumulate,
    grad_norm,
    per_sample_sq,
    sam_perturb,
    sgd_step,
    task_combine,
    task_gram,
)
from ._pointer_table import BLOCK  # noqa: E402

DTYPES = (tl.float32, tl.float16, tl.bfloat16)
TABLE = {
    "addresses": "*i64",
    "n_tensors": "i32",
    "sizes": "*i64",
    "chunk_tensor": "*i32",
    "chunk_start": "*i64",
}


# The option terms of a step, as the public API combines them: none, each alone, SAM's restore
# with its skip flag, GradScaler's unscale with its skip flag, the SAM variants' COMBINE with a
# restore (GSAM and LookSAM 1 source, GAM 3; 0 scales the gradient alone), all together, and
# WSAM's DESCENT (with and without AMP).
_TERMS = [
    {},
    {"SAVE": True, "SKIP": True},
    {"AMP": True, "SKIP": True},
    {"FISHER": True},
    {"EWC": True},
    {"CLIP": True},
    {"N_SOURCES": 0},
    {"SAVE": True, "SKIP": True, "N_SOURCES": 1},
    {"SAVE": True, "SKIP": True, "N_SOURCES": 3},
    {"SAVE": True, "SKIP": True, "AMP": True, "FISHER": True, "EWC": True, "CLIP": True, "N_SOURCES": 2},
    {"SAVE": True, "SKIP": True, "N_SOURCES": 1, "DESCENT": True},  # WSAM's decoupled descent
    {"SAVE": True, "SKIP": True, "AMP": True, "N_SOURCES": 1, "DESCENT": True},
]
_STEP_FLAGS = ("SAVE", "FISHER", "EWC", "AMP", "SKIP", "CLIP", "DESCENT")


def _terms(**base):
    for terms in _TERMS:
        yield {**dict.fromkeys(_STEP_FLAGS, False), "N_SOURCES": -1, **base, **terms}


# kernel -> (argument types, constexpr dicts): every specialisation the launchers can produce
# for the combinations above, in every parameter dtype. Enumerated here and nowhere else.
SPECIALISATIONS = {
    sgd_step._sgd_kernel: (
        {
            **TABLE,
            "lams": "*fp32",
            "inv_scale_ptr": "*fp32",
            "found_inf_ptr": "*fp32",
            "clip_ptr": "*fp32",
            "combine_ptr": "*fp32",
            "descent_ptr": "*fp32",
            "lr": "fp32",
            "momentum": "fp32",
            "one_minus_dampening": "fp32",
            "weight_decay": "fp32",
            "sign": "fp32",
            "beta": "fp32",
            "one_minus_beta": "fp32",
        },  # fmt: skip
        [
            dict(P_DTYPE=d, **t)
            for d in DTYPES
            for momentum, ready, nesterov in ((0, 0, 0), (1, 0, 0), (1, 1, 0), (1, 1, 1))
            for t in _terms(MOMENTUM=bool(momentum), READY=bool(ready), NESTEROV=bool(nesterov))
        ],  # fmt: skip
    ),
    adamw_step._adamw_kernel: (
        {
            **TABLE,
            "lams": "*fp32",
            "step_sizes": "*fp32",
            "bias2_sqrts": "*fp32",
            "inv_scale_ptr": "*fp32",
            "found_inf_ptr": "*fp32",
            "clip_ptr": "*fp32",
            "combine_ptr": "*fp32",
            "descent_ptr": "*fp32",
            "decay": "fp32",
            "one_minus_beta1": "fp32",
            "beta2": "fp32",
            "one_minus_beta2": "fp32",
            "eps": "fp32",
            "sign": "fp32",
            "beta": "fp32",
            "one_minus_beta": "fp32",
        },  # fmt: skip
        [dict(P_DTYPE=d, **t) for d in DTYPES for amsgrad in (False, True) for t in _terms(AMSGRAD=amsgrad)],
    ),
    grad_norm._grad_sq_norm_partials: (
        {**TABLE, "partials": "*fp64", "partial_offset": "i32", "eta": "fp32"},
        [dict(G_DTYPE=d, KIND=k) for d in DTYPES for k in range(4)],
    ),
    sam_perturb._sam_perturb_kernel: (
        {
            **TABLE,
            "scale_ptr": "*fp32",
            "inv_scale_ptr": "*fp32",
            "finite_ptr": "*fp32",
            "eta": "fp32",
            "beta": "fp32",
            "one_minus_beta": "fp32",
        },  # fmt: skip
        [
            dict(P_DTYPE=d, KIND=k, FISHER=fisher, AMP=amp, FINITE=True)
            for d in DTYPES
            for k in range(4)
            for fisher, amp in ((False, False), (True, False), (True, True))
        ],  # fmt: skip
    ),
    fisher_accumulate._fisher_accumulate_kernel: (
        {**TABLE, "weight": "fp32"},
        [dict(G_DTYPE=d) for d in DTYPES],
    ),
    ewc_grad_add._ewc_grad_add_kernel: ({**TABLE, "lams": "*fp32"}, [dict(P_DTYPE=d) for d in DTYPES]),
    ewc_penalty._ewc_penalty_partials: (
        {**TABLE, "lams": "*fp64", "partials": "*fp64"},
        [dict(P_DTYPE=d) for d in DTYPES],
    ),
    ewc_consolidate._ewc_consolidate_kernel: (
        {**TABLE, "partials": "*fp64", "decay": "fp32", "weight": "fp32"},
        [dict(P_DTYPE=d, WEIGHTED_ANCHOR=w) for d in DTYPES for w in (False, True)],
    ),
    # T is a runtime value of the combine, and of the Gram up to its power of two T_PAD (T = 1..32).
    task_gram._task_gram_partials: (
        {**TABLE, "partials": "*fp64", "num_tasks": "i32", "num_chunks": "i32"},
        [
            dict(G_DTYPE=d, T_PAD=t, SUB=task_gram.sub_block(t), BLOCK=task_gram.CHUNK)
            for d in DTYPES
            for t in (1, 2, 4, 8, 16, 32)
        ],  # fmt: skip
    ),
    task_combine._task_combine_kernel: (
        {**TABLE, "coefficients": "*fp32", "num_tasks": "i32"},
        [dict(OUT_DTYPE=d, ACCUMULATE=a) for d in DTYPES for a in (False, True)],
    ),
    # Strides as i64: a layer's deltas or patches past 2**31 elements index without overflow.
    per_sample_sq._per_sample_sq_kernel: (
        {
            "out": "*fp32",
            "deltas": "*{dtype}",
            "inputs": "*{dtype}",
            **dict.fromkeys(("batch", "rows", "m", "n"), "i32"),
            **dict.fromkeys(("d_sb", "d_sr", "d_sm", "x_sb", "x_sr", "x_sn", "o_sm", "o_sn"), "i64"),
        },  # fmt: skip
        [
            dict(
                BLOCK_M=per_sample_sq.BLOCK_M,
                BLOCK_N=per_sample_sq.BLOCK_N,
                BLOCK_R=per_sample_sq.BLOCK_R,
                _pointer_dtype=name,
            )
            for name in ("fp32", "fp16", "bf16")
        ],  # fmt: skip
    ),
    _reduce._segment_sum_kernel: (
        {"partials": "*fp64", "begins": "*i64", "ends": "*i64", "out": "*fp64", "longest": "i32"},
        [{}],
    ),
}


def _cubin_resources(cubin: bytes, out: Path) -> tuple[int, int] | None:
    """(registers, spill store bytes) of a cubin, from cuobjdump when a CUDA toolkit is present."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"  # Triton ships one
    toolkit = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    tool = next((str(p) for p in (bundled, toolkit) if p.exists()), shutil.which("cuobjdump"))
    if tool is None:
        return None
    path = out / "kernel.cubin"
    path.write_bytes(cubin)
    text = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    registers = re.search(r"REG:(\d+)", text)
    spills = re.search(r"STACK:(\d+)", text)
    return (int(registers.group(1)) if registers else 0, int(spills.group(1)) if spills else 0)


# PTX instructions of approximate arithmetic (Triton's fp32 defaults for sqrt and division on
# NVIDIA GPUs): the kernels must round as torch and the C++/CUDA kernels do (sqrt.rn, div.rn).
_APPROXIMATE = re.compile(r"\b(?:sqrt|div|rcp|rsqrt|ex2|lg2)\.approx\.[a-z0-9.]+|\bdiv\.full\.[a-z0-9.]+")


def _source(ast_source, kernel, signature, constexprs):
    """``ASTSource`` across Triton versions: 3.3+ take ``constexprs=``, 3.2 (torch 2.6) ``constants=``."""
    try:
        return ast_source(fn=kernel, signature=signature, constexprs=constexprs)
    except TypeError:
        return ast_source(fn=kernel, signature=signature, constants=constexprs)


def main(argv=None) -> int:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", nargs="+", type=int, default=[80, 90], help="compute capabilities, e.g. 80 90"
    )
    args = parser.parse_args(argv)
    failures, total = 0, 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for kernel, (types, specialisations) in SPECIALISATIONS.items():
            for arch in args.arch:
                registers, stack, shared, warps, count = [], [], [], set(), 0
                for constexprs in specialisations:
                    if "BLOCK" in kernel.arg_names:  # the chunk of the pointer-table kernels
                        constexprs = {"BLOCK": BLOCK, **constexprs}  # (a kernel may take another)
                    else:
                        constexprs = dict(constexprs)
                    # A kernel with typed pointers names their dtype per specialisation.
                    pointer_dtype = constexprs.pop("_pointer_dtype", None)
                    typed = (
                        {k: v.format(dtype=pointer_dtype) for k, v in types.items()}
                        if pointer_dtype
                        else types
                    )
                    signature = {**typed, **{name: "constexpr" for name in constexprs}}
                    try:
                        compiled = triton.compile(_source(ASTSource, kernel, signature, constexprs),
                                                  target=GPUTarget("cuda", arch, 32))  # fmt: skip
                    except Exception as error:  # noqa: BLE001 - report every failure, then exit 1
                        failures += 1
                        print(f"FAILED {kernel.__name__} sm_{arch} {constexprs}: {error}", file=sys.stderr)
                        continue
                    approximate = _APPROXIMATE.findall(compiled.asm["ptx"])
                    if approximate:  # the kernels give the oracle's (torch's) rounding: no fast math
                        failures += 1
                        print(f"FAILED {kernel.__name__} sm_{arch} {constexprs}: approximate math in the PTX: "
                              f"{sorted(set(approximate))}", file=sys.stderr)  # fmt: skip
                        continue
                    count += 1
                    shared.append(compiled.metadata.shared)
                    warps.add(compiled.metadata.num_warps)
                    resources = _cubin_resources(compiled.asm["cubin"], Path(tmp))
                    if resources is not None:
                        registers.append(resources[0])
                        stack.append(resources[1])
                total += count
                detail = f"registers {min(registers)}-{max(registers)}, stack {max(stack)} B" if registers else (
                    "registers: no cuobjdump")  # fmt: skip
                print(f"{kernel.__name__:<28} sm_{arch}: {count}/{len(specialisations)} ok, warps {sorted(warps)}, "
                      f"shared {max(shared, default=0)} B, {detail}")  # fmt: skip
    print(f"{total} specialisations compiled in {time.perf_counter() - start:.0f} s, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
