"""The Triton backend (kernels/) against the forloop oracle, on CPU tensors under the interpreter.

``TRITON_INTERPRET=1`` is set before the kernels are imported (the interpreter runs each program
in NumPy), and the zoo is smaller than the other backends' — empty, 1, 97, 1025, 2500 elements
and the strided 31x33 — so that several programs per tensor and every edge still occur while the
run stays short. The interpreter rounds fp32 to bf16 by truncation (the GPU rounds to nearest
even); that is the only allowance made here, in ``_assert_lowp``: one bf16 ulp.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import DTYPES, assert_state_close, clone_groups, make_zoo, set_grads, zoo_grads, zoo_params  # noqa: E402
from test_backends import (  # noqa: E402
    LOWP_ATOL,
    _check_fisher_and_ewc_ops,
    _check_norm_and_perturb,
    _check_task_ops,
    _functional_run,
    combine_equals_the_unfused_form,
    descent_equals_the_unfused_form,
)

import cl_optim  # noqa: E402
from cl_optim._backend import resolve  # noqa: E402

triton = pytest.importorskip(
    "triton", reason="the Triton backend needs the triton package (in the dev extra)"
)
if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):  # pragma: no cover
    import numpy

    if tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
        pytest.skip(f"the interpreter of Triton {triton.__version__} cannot run loops with runtime bounds under "
                    f"NumPy {numpy.__version__}; Triton 3.7+ can", allow_module_level=True)  # fmt: skip
if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - set above unless overridden
    pytest.skip("TRITON_INTERPRET=0 was set: the Triton tests run on CPU tensors only under the interpreter",
                allow_module_level=True)  # fmt: skip

SMALL_ZOO = (0, 1, 97, 1025, 2500)
STEPS = 4


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at the magnitude of each element of ``x`` (bf16), as fp64."""
    magnitude = x.abs()
    return (torch.nextafter(magnitude, torch.full_like(magnitude, float("inf"))) - magnitude).double()


def _assert_within_one_bf16_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """The interpreter's fp32 -> bf16 conversion truncates where the GPU (and the oracle) round to
    nearest even: from the same state, one written value differs by at most one ulp."""
    if got.dtype != torch.bfloat16:  # fp32 state (the running Fisher): the fp32 defaults
        torch.testing.assert_close(got, want)
        return
    assert torch.all((got.double() - want.double()).abs() <= _bf16_ulp(want)), "more than one bf16 ulp apart"


def test_triton_backend_is_available_on_cpu_only_under_the_interpreter():
    assert resolve("triton", torch.device("cpu"), torch.float32) == "triton"
    # "auto" keeps the C++ / PyTorch backends on CPU tensors: the interpreter is for tests.
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = cl_optim.SGD([p], lr=0.1)
    opt.step()
    assert opt.backends_used["cpu/torch.float32"] != "triton"


@pytest.mark.parametrize("with_terms", [False, True], ids=["plain", "all_terms"])
@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov", "adamw", "adamw_amsgrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_step_kernels_match_forloop(kind, dtype, with_terms):
    """Every state tensor after 4 steps (one of them skipped by AMP in the all-terms run)."""
    run = dict(zoo_sizes=SMALL_ZOO, n_steps=STEPS)
    oracle = _functional_run(kind, "forloop", dtype, with_terms, **run)
    got = _functional_run(kind, "triton", dtype, with_terms, **run)
    reference = (
        _functional_run(kind, "forloop", torch.float64, with_terms, **run) if dtype != torch.float32 else {}
    )
    assert got.keys() == oracle.keys()
    for name in oracle:
        assert_state_close(got[name], oracle[name], reference.get(name), dtype, LOWP_ATOL[dtype])


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combine_term_equals_the_combination_written_into_grad(kind, dtype):
    """Bitwise, bf16 included: the same kernels' rounding on both sides."""
    combine_equals_the_unfused_form("triton", kind, dtype, zoo_sizes=SMALL_ZOO)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_descent_term_equals_the_descent_written_after_the_step(kind, dtype):
    """Bitwise, bf16 included, a skipped step in the middle."""
    descent_equals_the_unfused_form("triton", kind, dtype, zoo_sizes=SMALL_ZOO)


@pytest.mark.parametrize("with_terms", [False, True], ids=["plain", "all_terms"])
@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov", "adamw", "adamw_amsgrad"])
def test_bf16_step_kernels_are_within_one_ulp_of_forloop(kind, with_terms):
    """bf16: one step from the same state, each written value within one ulp of the oracle's
    (several steps would compound the interpreter's truncation bias, which the GPU does not have).
    Without COMBINE, whose bf16 gradient is a second truncated rounding: it is checked bitwise
    against task_combine_ on this backend (tests/test_backends.py)."""
    run = dict(zoo_sizes=SMALL_ZOO, n_steps=1, combine=False)
    oracle = _functional_run(kind, "forloop", torch.bfloat16, with_terms, **run)
    got = _functional_run(kind, "triton", torch.bfloat16, with_terms, **run)
    assert got.keys() == oracle.keys()
    for name in oracle:
        _assert_within_one_bf16_ulp(got[name], oracle[name])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_and_perturb_kernels_match_forloop(dtype):
    compare = _assert_within_one_bf16_ulp if dtype == torch.bfloat16 else None
    _check_norm_and_perturb("triton", dtype, SMALL_ZOO, compare)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fisher_and_ewc_kernels_match_forloop(dtype):
    _check_fisher_and_ewc_ops("triton", dtype, "cpu", SMALL_ZOO)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multitask_kernels_match_forloop(dtype):
    """task_gram and task_combine_ (tests/test_multitask_ops.py has the rest: T up to 17, aliasing)."""
    _check_task_ops(
        "triton", dtype, "cpu", SMALL_ZOO, _assert_within_one_bf16_ulp if dtype == torch.bfloat16 else None
    )


@pytest.mark.parametrize("adaptive", [False, True, "fisher_ema"])
def test_sam_adamw_optimizer_on_triton_matches_forloop(adaptive):
    def run(backend):
        groups = clone_groups(make_zoo(torch.float32, sizes=SMALL_ZOO))
        kwargs = dict(fisher_ema=0.9) if adaptive == "fisher_ema" else {}
        opt = cl_optim.SAM(
            groups, cl_optim.AdamW, rho=0.05, adaptive=adaptive, lr=1e-2, backend=backend, **kwargs
        )
        params = zoo_params(groups)
        for step in range(STEPS):
            set_grads(params, zoo_grads(params, step))
            opt.first_step(zero_grad=True)
            set_grads(params, zoo_grads(params, step + 100))
            opt.second_step(zero_grad=True)
        state = [v for p in params for v in opt.state[p].values()]
        return [p.detach() for p in params] + state, opt

    oracle, _ = run("forloop")
    got, opt = run("triton")
    assert set(opt.base_optimizer.backends_used.values()) == {"triton"}
    assert set(opt.perturb_backends_used.values()) == {"triton"}
    assert len(got) == len(oracle) > 7
    for a, b in zip(got, oracle):
        torch.testing.assert_close(a, b)


def test_pointer_tables_are_reused_until_a_tensor_moves():
    """A new gradient tensor costs a new address table, not a new chunk map (same sizes)."""
    from cl_optim.kernels import _pointer_table

    p = [torch.nn.Parameter(torch.randn(3000)), torch.nn.Parameter(torch.randn(10))]
    opt = cl_optim.SGD(p, lr=0.1, momentum=0.9, backend="triton")
    for t in p:
        t.grad = torch.ones_like(t)
    opt.step()
    opt.step()  # buffers exist now; the same tensors from here on
    _pointer_table._address_tables.clear()
    _pointer_table._chunk_maps.clear()
    opt.step()
    tables, maps = len(_pointer_table._address_tables), len(_pointer_table._chunk_maps)
    opt.step()
    assert (len(_pointer_table._address_tables), len(_pointer_table._chunk_maps)) == (tables, maps)  # reused
    p[0].grad = torch.ones_like(p[0])  # a new gradient tensor: a new address table, the same chunk map
    opt.step()
    assert (len(_pointer_table._address_tables), len(_pointer_table._chunk_maps)) == (tables + 1, maps)


def test_the_chunk_map_covers_every_element_once():
    """The device-built chunk map against the plain enumeration, over random lists of sizes
    (empty tensors, one element, exact multiples of the block, odd sizes)."""
    from cl_optim.kernels._pointer_table import ChunkMap

    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 40, (), generator=gen))
        block = int(torch.tensor([4, 16, 1024])[torch.randint(0, 3, (), generator=gen)])
        sizes = tuple(int(x) for x in torch.randint(0, 5 * block, (n,), generator=gen))
        if trial % 7 == 0:
            sizes = sizes[:-1] + (block * 3,)
        chunks = ChunkMap(sizes, torch.device("cpu"), block)
        expected = [(t, start) for t, size in enumerate(sizes) for start in range(0, size, block)]
        assert chunks.num_chunks == len(expected)
        assert chunks.chunk_tensor.tolist() == [t for t, _ in expected]
        assert chunks.chunk_start.tolist() == [start for _, start in expected]
        assert chunks.sizes.tolist() == list(sizes)


def test_the_table_caches_are_bounded_in_bytes():
    from cl_optim.kernels._pointer_table import _BoundedCache

    class Entry:
        def __init__(self, nbytes):
            self.nbytes = nbytes

    cache = _BoundedCache(100)
    for key in range(10):
        cache.get(key, lambda: Entry(30))
    assert len(cache) == 3 and cache.total == 90 and list(cache.entries) == [7, 8, 9]
    cache.get(7, lambda: Entry(30))  # a hit moves it to the newest end
    cache.get(10, lambda: Entry(30))
    assert list(cache.entries) == [9, 7, 10]
    cache.get(11, lambda: Entry(500))  # larger than the bound: kept alone
    assert list(cache.entries) == [11] and cache.total == 500


def test_compiled_step_on_triton_traces_without_graph_breaks():
    """The Triton ops are custom ops with fake kernels: a whole step compiles with fullgraph=True."""
    torch._dynamo.reset()  # other tests' compilations of Optimizer.step count towards its recompile limit
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt = cl_optim.AdamW(model.parameters(), lr=1e-2, fisher_ema=0.9, backend="triton")
        step = torch.compile(opt.step, fullgraph=True, backend="aot_eager") if compiled else opt.step
        for i in range(3):
            model(x + i).square().sum().backward()
            step()
            opt.zero_grad()
        results.append(
            [p.detach() for p in model.parameters()] + [v for s in opt.state.values() for v in s.values()]
        )
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
