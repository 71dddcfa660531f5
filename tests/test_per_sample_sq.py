"""per_sample_sq_accumulate_: out += sum_b (deltas[b]^T inputs[b])**2 on every backend this machine
runs (the forloop oracle, cpp, Triton under the interpreter), against an fp64 sum over samples of
explicit outer products (an independent formula: no bmm, no tiling)."""

from __future__ import annotations

import pytest
import torch

from cl_optim._backend import resolve
from cl_optim.fisher.squares import per_sample_sq_accumulate_


def _available(backend: str) -> bool:
    try:
        resolve(backend, torch.device("cpu"), torch.float32)
        return True
    except RuntimeError:
        return False


BACKENDS = [b for b in ("forloop", "cpp", "triton") if b == "forloop" or _available(b)]


def _reference(deltas: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """sum_b (sum_r outer(deltas[b, r], inputs[b, r]))**2 in fp64, one outer product at a time."""
    batch, rows, m = deltas.shape
    total = torch.zeros(m, inputs.shape[2], dtype=torch.float64)
    for b in range(batch):
        grad = torch.zeros_like(total)
        for r in range(rows):
            grad += torch.outer(deltas[b, r].double(), inputs[b, r].double())
        total += grad * grad
    return total


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-6) -> None:
    scale = want.abs().max().clamp_min(1e-30)
    error = ((got.double() - want).abs().max() / scale).item()
    assert error <= rtol, f"relative error {error:.3g} (max |want| {scale.item():.3g})"


# (B, R, M, N): tiles and blocks not dividing the sizes, one row per sample, one sample, a first
# convolution (small M x N, long R), more samples than one GEMM chunk.
SMALL_SHAPES = [(3, 5, 7, 11), (2, 1, 3, 4), (1, 17, 33, 65), (4, 40, 70, 90), (5, 300, 8, 27)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_matches_outer_products(backend, shape):
    gen = torch.Generator().manual_seed(sum(shape))
    batch, rows, m, n = shape
    deltas = torch.randn(batch, rows, m, generator=gen)
    inputs = torch.randn(batch, rows, n, generator=gen)
    start = torch.rand(m, n, generator=gen)
    out = start.clone()
    per_sample_sq_accumulate_(out, deltas, inputs, backend=backend)
    _assert_close(out, start.double() + _reference(deltas, inputs))


@pytest.mark.parametrize("shape", [(40, 3, 200, 200), (3, 2, 2, 70000), (9, 4, 600, 300)], ids=str)
def test_cpp_tiled_paths(shape):
    """Past the whole-batch path: row tiles, column tiles (a row wider than the scratch), chunks."""
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ extension is not available")
    gen = torch.Generator().manual_seed(1)
    batch, rows, m, n = shape
    deltas = torch.randn(batch, rows, m, generator=gen)
    inputs = torch.randn(batch, rows, n, generator=gen)
    want = torch.zeros(m, n)
    per_sample_sq_accumulate_(want, deltas.double(), inputs.double(), backend="forloop")
    out = torch.zeros(m, n)
    per_sample_sq_accumulate_(out, deltas, inputs, backend="cpp")
    _assert_close(out, want.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_operands_and_output(backend):
    """Convolution operands (transposed views of (B, C, L) tensors) and a transposed out."""
    gen = torch.Generator().manual_seed(2)
    d = torch.randn(3, 6, 20, generator=gen)  # (B, Cout, L)
    patches = torch.randn(3, 9, 20, generator=gen)  # (B, Cin * k, L)
    deltas, inputs = d.transpose(1, 2), patches.transpose(1, 2)
    storage = torch.rand(9, 6, generator=gen)
    out = storage.t()  # (6, 9), not contiguous: written through
    want = out.double() + _reference(deltas, inputs)
    per_sample_sq_accumulate_(out, deltas, inputs, backend=backend)
    _assert_close(out, want)
    _assert_close(storage.t(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_in_fp32(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    deltas = torch.randn(4, 9, 5, generator=gen).to(dtype)
    inputs = torch.randn(4, 9, 6, generator=gen).to(dtype)
    out = torch.zeros(5, 6)
    per_sample_sq_accumulate_(out, deltas, inputs, backend=backend)
    _assert_close(out, _reference(deltas, inputs))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_fp64_inputs(backend):
    gen = torch.Generator().manual_seed(4)
    deltas = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64) * 1e3
    inputs = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    out = torch.zeros(5, 6)
    per_sample_sq_accumulate_(out, deltas, inputs, backend=backend)
    _assert_close(out, _reference(deltas, inputs), rtol=1e-7)  # fp64 products, one rounding to fp32


def test_cpp_deterministic_across_thread_counts():
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ extension is not available")
    gen = torch.Generator().manual_seed(5)
    deltas = torch.randn(37, 8, 300, generator=gen)
    inputs = torch.randn(37, 8, 260, generator=gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            out = torch.zeros(300, 260)
            per_sample_sq_accumulate_(out, deltas, inputs, backend="cpp")
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (2, 0, 4, 5)], ids=str)
def test_nothing_to_add(backend, shape):
    batch, rows, m, n = shape
    out = torch.full((m, n), 7.0)
    per_sample_sq_accumulate_(out, torch.ones(batch, rows, m), torch.ones(batch, rows, n), backend=backend)
    assert torch.equal(out, torch.full((m, n), 7.0))


BAD = [
    ("out is (torch.float64|Double), expected", lambda: (torch.zeros(2, 3, dtype=torch.float64), torch.ones(1, 2, 2), torch.ones(1, 2, 3))),
    ("shapes do not match", lambda: (torch.zeros(2, 4), torch.ones(1, 2, 2), torch.ones(1, 2, 3))),
    ("shapes do not match", lambda: (torch.zeros(2, 3), torch.ones(1, 2, 2), torch.ones(1, 5, 3))),
    ("must have 3 dimensions", lambda: (torch.zeros(2, 3), torch.ones(2, 2), torch.ones(1, 2, 3))),
    ("one dtype per call", lambda: (torch.zeros(2, 3), torch.ones(1, 2, 2), torch.ones(1, 2, 3, dtype=torch.float16))),
    ("share memory", lambda: (torch.zeros(1, 3).expand(2, 3), torch.ones(1, 2, 2), torch.ones(1, 2, 3))),
    ("must be a tensor, got None", lambda: (torch.zeros(2, 3), None, torch.ones(1, 2, 3))),
    ("do not share memory", lambda: (torch.zeros(6).as_strided((2, 3), (1, 1)), torch.ones(1, 2, 2), torch.ones(1, 2, 3))),
    ("out requires grad", lambda: (torch.zeros(2, 3, requires_grad=True), torch.ones(1, 2, 2), torch.ones(1, 2, 3))),
    ("out shares memory with inputs", lambda: _aliased_out()),
    ("deltas is torch.int64|kernels take", lambda: (torch.zeros(2, 3), torch.ones(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 3, dtype=torch.long))),
]  # fmt: skip


def _aliased_out():
    inputs = torch.ones(1, 2, 3)
    return inputs[0], torch.ones(1, 2, 2), inputs  # out is inputs[0]: (2, 3) written while read


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("message,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_named_and_out_unchanged(backend, message, make):
    out, deltas, inputs = make()
    before = out.clone()
    with pytest.raises(RuntimeError, match="per_sample_sq_accumulate_.*" + message):
        per_sample_sq_accumulate_(out, deltas, inputs, backend=backend)
    assert torch.equal(out, before)


def test_opcheck_cpp():
    if "cpp" not in BACKENDS:
        pytest.skip("the C++ extension is not available")
    out = torch.zeros(4, 5)
    deltas, inputs = torch.randn(3, 2, 4), torch.randn(3, 2, 5)
    torch.library.opcheck(torch.ops.cl_optim.per_sample_sq_accumulate_, (out, deltas, inputs))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [*SMALL_SHAPES, (64, 32, 384, 128), (64, 256, 64, 288)], ids=str)
def test_gpu_backends_match_outer_products(backend, dtype, shape):
    try:
        resolve(backend, torch.device("cuda"), dtype)
    except RuntimeError as error:
        pytest.fail(f"{backend} is not available on this GPU machine: {error}")
    gen = torch.Generator().manual_seed(sum(shape))
    batch, rows, m, n = shape
    deltas = torch.randn(batch, rows, m, generator=gen).to(dtype)
    inputs = torch.randn(batch, rows, n, generator=gen).to(dtype)
    start = torch.rand(m, n, generator=gen)
    out = start.cuda()
    per_sample_sq_accumulate_(out, deltas.cuda(), inputs.cuda(), backend=backend)
    _assert_close(out.cpu(), start.double() + _reference(deltas, inputs), rtol=1e-5)
    again = start.cuda()
    per_sample_sq_accumulate_(again, deltas.cuda(), inputs.cuda(), backend=backend)
    assert torch.equal(out, again)  # one order of summation per element: the same bits every launch


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_that_require_grad_and_inference_mode(backend):
    """The op's GEMMs are its own arithmetic: inputs that require grad are read as values, and the
    tiled C++ path (threads running ATen ops) works under inference mode on every thread count."""
    gen = torch.Generator().manual_seed(6)
    deltas = torch.randn(40, 3, 200, generator=gen)
    inputs = torch.randn(40, 3, 200, generator=gen)
    want = torch.zeros(200, 200)
    per_sample_sq_accumulate_(want, deltas, inputs, backend="forloop")
    out = torch.zeros(200, 200)
    per_sample_sq_accumulate_(out, deltas.clone().requires_grad_(), inputs, backend=backend)
    assert not out.requires_grad
    _assert_close(out, want.double(), rtol=1e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            fresh = torch.zeros(200, 200)
            per_sample_sq_accumulate_(fresh, deltas, inputs, backend=backend)
    finally:
        torch.set_num_threads(threads)
    _assert_close(fresh, want.double(), rtol=1e-5)
