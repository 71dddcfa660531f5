"""The multi-task ops ``task_gram`` and ``task_combine_`` (cl_optim/multitask/fused.py) on every
backend that runs here — forloop (the oracle), foreach, cpp, and triton on CPU tensors under the
interpreter — against an independent reference (the task gradients flattened with ``torch.cat``
in fp64, a matrix product) and against the oracle.

Task lists of odd tensors (empty, 0-dim, one element, 33x7, a transposed view, a strided slice
with gaps, channels_last next to a contiguous twin, 33000 elements: several chunks of the cpp and
Triton loops), T = 1, 2, 3, 8 (and 9, 17 on small tensors), fp32/fp16/bf16 and fp64 where the
backend takes it. The combine gives the oracle's bits (same fp32 operations, one rounding),
except bf16 under the Triton interpreter, which truncates where the oracle rounds (one ulp, as
tests/test_triton.py allows). The CUDA kernels run only in the ``gpu`` tests at the end.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from test_op_checks import AVAILABLE  # noqa: E402

from cl_optim import _checks  # noqa: E402
from cl_optim.multitask.fused import task_combine_, task_gram  # noqa: E402

BACKENDS = [b for b in ("forloop", "foreach", "cpp", "triton") if b in AVAILABLE]
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _takes(backend: str, dtype: torch.dtype) -> bool:
    return not (dtype == torch.float64 and backend in ("triton", "cuda"))


def _tensor(shape, gen, dtype, layout, device="cpu"):
    if layout == "transposed":  # dense but not contiguous
        t = torch.randn(shape[::-1], generator=gen).t()
    elif layout == "gaps":  # every other column of a wider matrix: not dense, walked through a copy
        t = torch.randn(shape[0], 2 * shape[1], generator=gen)[:, ::2]
    else:
        t = torch.randn(shape, generator=gen)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device).copy_(t)


# (shape, layout of task 0's tensor, layout of the other tasks' tensors)
ZOO = [((0,), "", ""), ((), "", ""), ((1,), "", ""), ((33, 7), "", ""), ((9, 13), "transposed", "transposed"),
       ((5, 4), "gaps", ""), ((2, 3, 4, 5), "channels_last", ""), ((33000,), "", "")]  # fmt: skip
SMALL = [((0,), "", ""), ((), "", ""), ((7, 3), "transposed", ""), ((97,), "", "")]


def make_tasks(num_tasks, dtype=torch.float32, seed=0, zoo=ZOO, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [[_tensor(shape, gen, dtype, first if t == 0 else other, device) for shape, first, other in zoo]
            for t in range(num_tasks)]  # fmt: skip


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1).double().cpu() for g in grads])


def assert_gram_close(got: torch.Tensor, task_grads, want=None) -> None:
    """``got`` is the (T, T) fp64 Gram matrix of ``task_grads``: symmetric bit for bit, and within
    1e-12 of the sum of absolute products of ``want``, by default the fp64 matrix product of the
    flattened gradients (fp64 sums of the same products in another order differ by far less)."""
    f = torch.stack([flat(grads) for grads in task_grads])
    assert got.dtype == torch.float64 and got.shape == (len(task_grads),) * 2
    assert torch.equal(got, got.t())
    err = (got.cpu() - (f @ f.t() if want is None else want)).abs()
    assert torch.all(err <= 1e-12 * (f.abs() @ f.abs().t())), err.max()


def combine_reference(out_before, task_grads, a, accumulate) -> list[torch.Tensor]:
    """out + a @ F in fp64, cut back into out's shapes."""
    f = torch.stack([flat(grads) for grads in task_grads])
    total = a.double().cpu() @ f + (flat(out_before) if accumulate else 0)
    pieces, at = [], 0
    for o in out_before:
        pieces.append(total[at : at + o.numel()].reshape(o.shape))
        at += o.numel()
    return pieces


def assert_near_reference(got, reference, out_before, task_grads, a, accumulate) -> None:
    """Within the fp32 (fp64) accumulation of T + 1 terms and one rounding to the output dtype."""
    for k, (g, ref) in enumerate(zip(got, reference)):
        eps = torch.finfo(torch.float64 if g.dtype == torch.float64 else torch.float32).eps
        scale = sum(abs(float(a[t])) * task_grads[t][k].double().cpu().abs() for t in range(len(task_grads)))
        if accumulate:
            scale = scale + out_before[k].double().abs()
        bound = (len(task_grads) + 1) * eps * scale + torch.finfo(g.dtype).eps * ref.abs()
        info = torch.finfo(g.dtype)  # + half a subnormal ulp of the output dtype
        assert torch.all((g.double().cpu() - ref).abs() <= bound + info.smallest_normal * info.eps)


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    m = x.abs()
    return (torch.nextafter(m, torch.full_like(m, float("inf"))) - m).double()


def assert_like_oracle(got: list, want: list, backend: str) -> None:
    """The oracle's bits; bf16 under the Triton interpreter (which truncates) within one ulp."""
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.stride() == w.stride()
        if backend == "triton" and g.dtype == torch.bfloat16:
            assert torch.all((g.double() - w.double()).abs() <= _bf16_ulp(w)), "more than one bf16 ulp apart"
        else:
            assert torch.equal(g, w)


# ---------------------------------------------------------------------------------- the Gram matrix


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_matches_the_flattened_product_and_the_oracle(backend, num_tasks, dtype):
    if not _takes(backend, dtype):
        pytest.skip(f"{backend} takes fp32, fp16 and bf16")
    tasks = make_tasks(num_tasks, dtype, seed=num_tasks)
    got = task_gram(tasks, backend=backend)
    assert got.device.type == "cpu"
    assert_gram_close(got, tasks)
    assert_gram_close(got, tasks, want=task_gram(tasks, backend="forloop"))


@pytest.mark.parametrize("num_tasks", [9, 17])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_of_many_tasks(backend, num_tasks):
    """Beyond 8 tasks (the CUDA kernel's tiles, Triton's 16 and 32 task rows), on small tensors."""
    tasks = make_tasks(num_tasks, seed=num_tasks, zoo=SMALL)
    assert_gram_close(task_gram(tasks, backend=backend), tasks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_large_finite_gradient_gives_a_finite_gram(backend):
    """1e20 squared overflows fp32 (and bf16, which has its range): in fp64 it is 1e40."""
    for dtype in (torch.float32, torch.bfloat16):
        g = [[torch.full((3,), 1e20, dtype=dtype)], [torch.tensor([1e20, -1e20, 2.0], dtype=dtype)]]
        got = task_gram(g, backend=backend)
        assert torch.isfinite(got).all()
        x = g[0][0].double()
        torch.testing.assert_close(got[0, 0], (x * x).sum(), rtol=1e-15, atol=0)
        assert_gram_close(got, g)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, under the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_and_nan_reach_the_gram(backend):
    """Worked by hand: inf*inf, inf*(-2), inf*0 = nan, anything*nan; finite entries stay exact."""
    inf, nan = float("inf"), float("nan")
    firsts = ([inf, 1.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0], [0.0, 0.0, nan, 0.0])
    tasks = [[torch.tensor(first), torch.ones(2)] for first in firsts]
    expected = torch.tensor([[inf, -inf, nan], [-inf, 6.0, nan], [nan, nan, nan]], dtype=torch.float64)
    got = task_gram(tasks, backend=backend)
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ combine


@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "accumulate"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_matches_the_flattened_sum_and_the_oracle(backend, num_tasks, dtype, accumulate):
    if not _takes(backend, dtype):
        pytest.skip(f"{backend} takes fp32, fp16 and bf16")
    tasks = make_tasks(num_tasks, dtype, seed=10 + num_tasks)
    a = torch.randn(num_tasks, generator=torch.Generator().manual_seed(num_tasks), dtype=torch.float64)
    # Three equal lists in the zoo's layouts (a strided slice with gaps, channels_last, ...).
    before, out, want = (make_tasks(1, dtype, seed=99)[0] for _ in range(3))
    task_combine_(out, tasks, a, accumulate=accumulate, backend=backend)
    task_combine_(want, tasks, a, accumulate=accumulate, backend="forloop")
    assert_like_oracle(out, want, backend)  # strides kept too: channels_last stays channels_last
    rounded = a.to(torch.float64 if dtype == torch.float64 else torch.float32)  # the opmath coefficients
    reference = combine_reference(before, tasks, rounded, accumulate)
    assert_near_reference(out, reference, before, tasks, rounded, accumulate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_of_many_tasks(backend):
    tasks = make_tasks(17, seed=3, zoo=SMALL)
    a = torch.linspace(-1.0, 1.0, 17)
    out, want = [torch.empty_like(g) for g in tasks[0]], [torch.empty_like(g) for g in tasks[0]]
    task_combine_(out, tasks, a, backend=backend)
    task_combine_(want, tasks, a, backend="forloop")
    assert_like_oracle(out, want, backend)


@pytest.mark.parametrize("accumulate", [False, True], ids=["set", "accumulate"])
@pytest.mark.parametrize("which", [0, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_may_be_one_of_the_task_lists(backend, which, accumulate):
    """out is task ``which``'s list itself (the same tensors, any layout): every element is read
    before it is written, as the oracle computes on copies."""
    tasks, copies = make_tasks(3, seed=5), make_tasks(3, seed=5)
    a = torch.tensor([0.5, -1.5, 2.0])
    want = make_tasks(3, seed=5)[which]
    task_combine_(want, copies, a, accumulate=accumulate, backend="forloop")
    task_combine_(tasks[which], tasks, a, accumulate=accumulate, backend=backend)
    assert_like_oracle(tasks[which], want, backend)
    for t in {0, 1, 2} - {which}:  # the other lists are only read
        assert all(torch.equal(x, y) for x, y in zip(tasks[t], copies[t]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_rounds_once(backend):
    """fp16: 65504 + 65504 - 65504 is 65504 in fp32 and in the result; a sum rounded to fp16 after
    each task would be inf after the second."""
    big = torch.full((3,), 65504.0, dtype=torch.float16)
    out = [torch.empty(3, dtype=torch.float16)]
    task_combine_(out, [[big], [big], [-big]], torch.ones(3), backend=backend)
    assert torch.equal(out[0], big)


# ------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_same_bits_on_every_call(backend):
    tasks = make_tasks(3, seed=7)
    a = torch.tensor([0.3, -0.7, 1.1])
    grams = [task_gram(tasks, backend=backend) for _ in range(3)]
    assert all(torch.equal(g, grams[0]) for g in grams)
    outs = []
    for _ in range(3):
        out = [torch.zeros_like(g) for g in tasks[0]]
        task_combine_(out, tasks, a, backend=backend)
        outs.append(out)
    assert all(torch.equal(x, y) for out in outs for x, y in zip(out, outs[0]))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp backend cannot be built on this machine")
def test_the_cpp_gram_does_not_depend_on_the_thread_count():
    """One partial per chunk (32768 elements) and task pair, added in chunk order: 1 thread and 2
    give the same bits over 16 chunks."""
    gen = torch.Generator().manual_seed(0)
    tasks = [[torch.randn(200_000, generator=gen), torch.randn(300_000, generator=gen)] for _ in range(4)]
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out = [torch.empty_like(g) for g in tasks[0]]
            task_combine_(out, tasks, torch.tensor([1.0, -2.0, 0.5, 3.0]), backend="cpp")
            results.append((task_gram(tasks, backend="cpp"), out))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(x, y) for x, y in zip(results[0][1], results[1][1]))
    assert_gram_close(results[0][0], tasks)


# ------------------------------------------------------------------------------------- bad inputs


def _refused(fn, message, *tensor_lists):
    snapshot = [(t, t.clone()) for tensors in tensor_lists for t in tensors]
    with pytest.raises(RuntimeError, match=message):
        fn()
    assert all(torch.equal(t, before) for t, before in snapshot), "a refused call wrote"


@pytest.mark.parametrize("backend", BACKENDS)
def test_misaligned_task_lists_are_refused(backend):
    tasks = make_tasks(3, seed=1, zoo=SMALL)
    out = [torch.zeros_like(g) for g in tasks[0]]
    a = torch.ones(3)
    short = [tasks[0], tasks[1][:-1], tasks[2]]
    _refused(lambda: task_gram(short, backend=backend), r"not a multiple of num_tasks = 3", *tasks)
    _refused(
        lambda: task_combine_(out, short, a, backend=backend), r"grads has 11 entries for 3 tasks of 4", out
    )
    reshaped = [tasks[0], tasks[1], [*tasks[2][:2], tasks[2][2].t().contiguous(), tasks[2][3]]]
    _refused(
        lambda: task_gram(reshaped, backend=backend), r"grads \(task 2\)\[2\] has shape \[3, 7\]", *tasks
    )
    _refused(lambda: task_combine_(out, reshaped, a, backend=backend), r"grads \(task 2\)\[2\]", out)
    halved = [tasks[0], [g.half() for g in tasks[1]], tasks[2]]
    _refused(lambda: task_gram(halved, backend=backend), r"grads \(task 1\)\[0\] is", *tasks)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_coefficients_are_refused(backend):
    tasks = make_tasks(2, seed=2, zoo=SMALL)
    out = [torch.ones_like(g) for g in tasks[0]]
    for a, message in ((torch.ones(3), r"grads has 8 entries for 3 tasks of 4"),
                       (torch.ones(1), r"grads has 8 entries for 1 tasks of 4"),
                       (torch.ones(2, 1), r"coefficients must be a 1-D tensor"),
                       (torch.tensor(1.0), r"coefficients must be a 1-D tensor"),
                       (torch.ones(2, dtype=torch.int64), r"dense floating-point"),
                       (torch.ones(0), r"coefficients is empty")):  # fmt: skip
        _refused(lambda a=a: task_combine_(out, tasks, a, accumulate=True, backend=backend), message, out)


def test_coefficients_on_another_device_are_refused_by_the_validator():
    """The CPU has one device: checked here on the validator, on a GPU in tests/test_gpu_checks.py."""
    tasks = make_tasks(2, seed=2, zoo=SMALL)
    out = [torch.ones_like(g) for g in tasks[0]]
    with pytest.raises(RuntimeError, match=r"coefficients are on meta, out\[0\] on cpu"):
        _checks.check_task_combine_(out, tasks[0] + tasks[1], torch.ones(2, device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_task_is_refused(backend):
    if backend in ("forloop", "foreach"):  # T is the number of lists
        with pytest.raises(RuntimeError, match=r"num_tasks must be at least 1, got 0"):
            task_gram([], backend=backend)
        return
    from cl_optim._backend import kernel_op

    grads = make_tasks(2, seed=4, zoo=SMALL)
    op = kernel_op(backend, "task_gram", grads[0][0])
    for num_tasks in (0, -1):
        with pytest.raises(RuntimeError, match=rf"num_tasks must be at least 1, got {num_tasks}"):
            op(grads[0] + grads[1], num_tasks)
    with pytest.raises(RuntimeError, match=r"grads has 7 entries, not a multiple of num_tasks = 2"):
        op(grads[0] + grads[1][:-1], 2)


# -------------------------------------------------------------------------------------------- GPU


def _gpu_backends():
    from test_backends import _cuda_candidates

    return _cuda_candidates()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES[:3], ids=str)
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 8, 9, 12, 17])
def test_gpu_backends_match_the_cpu_oracle(num_tasks, dtype):
    """Every GPU backend (cuda, triton, foreach) on CUDA tensors, T up to 17 (the CUDA kernels' diagonal
    and 8x4 tiles, the combine's argument and device-table paths), against the oracle on the CPU."""
    backends = _gpu_backends()
    assert "cuda" in backends, "the CUDA extension did not build or load: see cl_optim.report()"
    zoo = ZOO if num_tasks <= 8 else SMALL
    tasks = make_tasks(num_tasks, dtype, seed=num_tasks, zoo=zoo)
    a = torch.randn(num_tasks, generator=torch.Generator().manual_seed(1))
    for backend in backends:
        on_gpu = make_tasks(num_tasks, dtype, seed=num_tasks, zoo=zoo, device="cuda")
        got = task_gram(on_gpu, backend=backend)
        assert got.device.type == "cuda"
        assert_gram_close(got, tasks)
        assert torch.equal(got, task_gram(on_gpu, backend=backend)), "not deterministic"
        for accumulate in (False, True):
            want = make_tasks(1, dtype, seed=99, zoo=zoo)[0]
            task_combine_(want, tasks, a, accumulate=accumulate, backend="forloop")
            out = make_tasks(1, dtype, seed=99, zoo=zoo, device="cuda")[0]
            task_combine_(out, on_gpu, a.cuda(), accumulate=accumulate, backend=backend)
            got_out = [t.cpu() for t in out]
            if backend == "triton":  # Triton fuses acc + a*g into an FMA on the GPU: one rounding apart
                for g, w in zip(got_out, want):
                    torch.testing.assert_close(g, w, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
            else:
                assert_like_oracle(got_out, want, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_calls_are_checked_like_the_others(backend):
    """Nothing to launch is no reason to skip the checks: every backend refuses zero tasks and a
    2-D coefficient tensor alike, and an empty bucket of T tasks is a T x T zero matrix."""
    with pytest.raises(RuntimeError, match="num_tasks must be at least 1"):
        task_gram([], backend=backend)
    with pytest.raises(RuntimeError, match="coefficients must be a 1-D tensor"):
        task_combine_([], [[], []], torch.ones(2, 1), backend=backend)
    assert torch.equal(task_gram([[], [], []], backend=backend), torch.zeros(3, 3, dtype=torch.float64))
