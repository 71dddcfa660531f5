"""The oracle's numbers at the edges, on every backend (issue: the kernels, reviewed).

Each case is one the review found a backend to get wrong, with the number torch (or the fp64
oracle) gives: AdamW's first moment when beta1 = 0 and the moment is huge (torch's lerp takes the
other form for weights >= 0.5), the AMP step count with GradScaler's summed or NaN ``found_inf``,
AMSGrad's running maximum when a NaN is in it, an EWC penalty past the fp32 range, the
consolidation of an entry whose precision stays zero. The multi-task ops' edges were not found by a
review but written with their kernels: a subnormal gradient in the Gram matrix, and an fp16
weighted sum that only fits when rounded once.
"""

from __future__ import annotations

import pytest
import torch
from test_op_checks import AVAILABLE

import cl_optim
from cl_optim._terms import StepTerms
from cl_optim.adamw import adamw_step_
from cl_optim.ewc import ewc_consolidate_, ewc_penalty
from cl_optim.multitask.fused import task_combine_, task_gram

STEP_BACKENDS = [b for b in AVAILABLE]


def _adamw(backend, params, grads, m, v, vmax, steps, terms=None, beta1=0.9):
    adamw_step_(params, grads, m, v, vmax, steps, terms, lr=1e-3, beta1=beta1, beta2=0.999, eps=1e-8,
                weight_decay=0.0, maximize=False, backend=backend)  # fmt: skip


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_adamw_first_moment_with_beta1_zero_is_the_gradient(backend):
    """beta1 = 0: exp_avg must become the gradient, 1.0 after a 1e8 (m + 1 * (1 - 1e8) cancels
    to 0 in fp32; torch's lerp uses g - (g - m) * 0 for weights >= 0.5)."""
    p = [torch.zeros(4)]
    m, v = [torch.zeros(4)], [torch.zeros(4)]
    steps = [torch.tensor(0.0)]
    for g in (1e8, 1.0):
        _adamw(backend, p, [torch.full((4,), g)], m, v, None, steps, beta1=0.0)
    reference = torch.nn.Parameter(torch.zeros(4))
    torch_opt = torch.optim.AdamW([reference], lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0)
    for g in (1e8, 1.0):
        reference.grad = torch.full((4,), g)
        torch_opt.step()
    assert torch.equal(m[0], torch.ones(4))
    assert torch.equal(torch_opt.state[reference]["exp_avg"], torch.ones(4))


@pytest.mark.parametrize("backend", STEP_BACKENDS)
@pytest.mark.parametrize("found_inf", [2.0, float("nan")], ids=["two_devices_overflowed", "nan"])
def test_a_skipped_amp_step_counts_nothing(backend, found_inf):
    """GradScaler hands over the sum of its per-device flags (2 when two devices overflowed) and
    may hand over a NaN: either skips, and counts no step (1 - found_inf counted -1 and NaN)."""
    p, g = [torch.ones(3)], [torch.ones(3)]
    m, v = [torch.zeros(3)], [torch.zeros(3)]
    steps = [torch.tensor(5.0, device="cpu")]
    terms = StepTerms(grad_scale=torch.tensor(1.0), found_inf=torch.tensor(found_inf))
    _adamw(backend, p, g, m, v, None, steps, terms)
    assert float(steps[0]) == 5.0
    assert torch.equal(p[0], torch.ones(3)) and torch.equal(m[0], torch.zeros(3))


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_amsgrad_keeps_a_nan_in_its_maximum_as_torch_does(backend):
    """torch.maximum propagates NaN; a max written as (a > b ? a : b) drops a NaN in a."""
    p, g = [torch.ones(3)], [torch.ones(3)]
    m, v = [torch.zeros(3)], [torch.zeros(3)]
    vmax = [torch.tensor([float("nan"), 0.0, 0.0])]
    steps = [torch.tensor(0.0)]
    _adamw(backend, p, g, m, v, vmax, steps)
    assert torch.isnan(vmax[0][0]) and torch.isnan(p[0][0])
    assert torch.isfinite(vmax[0][1:]).all() and torch.isfinite(p[0][1:]).all()


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_the_ewc_penalty_past_the_fp32_range(backend):
    """lam/2 * A * d^2 = 0.5 * 4e30 * (1e5)^2 = 2e40: finite in fp64 on every backend (an fp32
    accumulation gave inf)."""
    params = [torch.full((2,), 1e5)]
    precision, anchor = [torch.full((2,), 4e30)], [torch.zeros(2)]
    value = ewc_penalty(params, precision, anchor, [1.0], backend=backend)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value.cpu(), torch.tensor(2 * 2e40, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_consolidating_an_entry_whose_precision_stays_zero(backend):
    """decay = weight = 0 with a non-finite anchor: the new precision is 0, so the anchor moves to
    the weights and the constant gains nothing (the oracle once gave 0 * inf = nan)."""
    precision, anchor = [torch.zeros(3)], [torch.tensor([float("inf"), 1.0, 2.0])]
    fisher, params = [torch.ones(3)], [torch.tensor([0.5, 0.5, 0.5])]
    gaps = ewc_consolidate_(precision, anchor, fisher, params, 0.0, 0.0, True, backend=backend)
    assert torch.equal(gaps.cpu(), torch.zeros(1, dtype=torch.float64))
    assert torch.equal(anchor[0], params[0]) and torch.equal(precision[0], torch.zeros(3))


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_a_subnormal_gradient_keeps_its_square_in_the_gram(backend):
    """1e-40 is subnormal in fp32 and its square (1e-80) is 0 in fp32: the products are fp64 and no
    backend flushes the fp32 value to zero on its way there."""
    g = torch.full((4,), 1e-40)
    assert g[0] != 0
    gram = task_gram([[g], [torch.ones(4)]], backend=backend)
    x = float(g[0])
    torch.testing.assert_close(gram.cpu(), torch.tensor([[4 * x * x, 4 * x], [4 * x, 4.0]], dtype=torch.float64),
                               rtol=1e-15, atol=0)  # fmt: skip


@pytest.mark.parametrize("backend", STEP_BACKENDS)
def test_an_accumulated_fp16_combine_rounds_once(backend):
    """out = 65504 (the fp16 maximum) + 65504 - 65504: 65504 in fp32 and in fp16; adding each task
    to out in fp16 would reach inf after the first."""
    out = [torch.full((2,), 65504.0, dtype=torch.float16)]
    tasks = [[out[0].clone()], [-out[0]]]
    task_combine_(out, tasks, torch.ones(2), accumulate=True, backend=backend)
    assert torch.equal(out[0], tasks[0][0])


def test_the_optimizer_path_takes_the_same_edges():
    """The same beta1 = 0 case through cl_optim.AdamW on the default backend."""
    w = torch.nn.Parameter(torch.zeros(2))
    opt = cl_optim.AdamW([w], lr=1e-3, betas=(0.0, 0.999), weight_decay=0.0)
    for g in (1e8, 1.0):
        w.grad = torch.full((2,), g)
        opt.step()
    assert torch.equal(opt.state[w]["exp_avg"], torch.ones(2))


# ---------------------------------------------------------------------------------- layouts


def _bytes_allocated_by(fn) -> int:
    """Bytes ``fn`` allocates on the CPU, freed or not (the profiler's allocations of every event,
    as bench/harness.py counts a step's memory)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    return sum(max(0, e.self_cpu_memory_usage) for e in prof.events())


@pytest.mark.parametrize("backend", [b for b in STEP_BACKENDS if b not in ("forloop", "foreach")])
def test_channels_last_state_is_stepped_in_place_with_the_oracles_numbers(backend):
    """A channels_last conv weight with channels_last gradient and state (what zeros_like gives)
    is walked in its own memory order: no copy in and out (the review measured a cpp AdamW step at
    154.7 ms with the copies, 11.8 ms without), and the numbers of the forloop oracle."""
    gen = torch.Generator().manual_seed(0)

    def tensors():
        return [torch.randn(8, 16, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)]

    weights, grads = tensors(), tensors()
    assert not weights[0].is_contiguous()

    def run(backend):
        p = [weights[0].clone(memory_format=torch.preserve_format)]
        m, v = [torch.zeros_like(p[0])], [torch.zeros_like(p[0])]
        steps = [torch.tensor(0.0)]
        for _ in range(3):
            _adamw(backend, p, grads, m, v, None, steps)
        return p, m, v, steps

    oracle = run("forloop")
    got = run(backend)
    for a, b in zip(got[:3], oracle[:3]):
        assert a[0].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a[0], b[0])
    if backend == "cpp":  # the Triton launcher's own tables allocate; the C++ op allocates only copies
        p, m, v, steps = got
        assert _bytes_allocated_by(lambda: _adamw(backend, p, grads, m, v, None, steps)) < p[0].numel() * 4


@pytest.mark.parametrize("backend", [b for b in STEP_BACKENDS if b not in ("forloop", "foreach")])
def test_a_gradient_of_another_layout_is_read_in_the_parameters_order(backend):
    """A contiguous gradient next to a channels_last weight: copied into the weight's layout (not
    into a contiguous one, which would pair the wrong elements), and the numbers of the oracle."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(4, 6, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 6, 3, 3, generator=gen)  # contiguous
    results = []
    for name in ("forloop", backend):
        p = [weight.clone(memory_format=torch.preserve_format)]
        m, v = [torch.zeros_like(p[0])], [torch.zeros_like(p[0])]
        _adamw(name, p, [grad], m, v, None, [torch.tensor(0.0)])
        results.append((p[0], m[0], v[0]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
