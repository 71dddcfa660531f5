"""Every backend against the forloop oracle, after 10 steps, on parameters and every state tensor.

The zoo (tests/conftest.py) has an empty tensor, one element, odd sizes, a non-contiguous view,
two groups, a parameter without gradient, in fp32, bf16 and fp16. Reduced precision follows
DESIGN.md §4: the candidate's error against an fp64 run is at most twice the oracle's, plus a
small atol.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DTYPES,
    GPU_FP32,
    ZOO_SIZES,
    assert_state_close,
    clone_groups,
    make_zoo,
    set_grads,
    zoo_grads,
    zoo_params,
)

import cl_optim
from cl_optim._terms import StepTerms
from cl_optim.adamw import adamw_step_
from cl_optim.sam import FISHER_BATCH, FISHER_RUNNING, grad_sq_norm, sam_perturb_
from cl_optim.sgd import sgd_step_


def _backends_on(device: str, skipped=()) -> list[str]:
    """Every non-oracle backend that runs fp32 on ``device`` on this machine (cpp builds on first use)."""
    from cl_optim._backend import _REGISTRY, BACKENDS

    return [
        name
        for name in BACKENDS
        if name != "forloop"
        and name not in skipped
        and _REGISTRY[name].shipped
        and _REGISTRY[name].unavailable_reason(torch.device(device), torch.float32) is None
    ]


# Triton on CPU tensors runs in the interpreter: tests/test_triton.py checks it on a small zoo.
CANDIDATES = _backends_on("cpu", skipped=("triton",))


def _cuda_candidates():
    """The non-oracle backends that run on this machine's GPU (called by GPU tests only)."""
    return _backends_on("cuda")


def _on(t: torch.Tensor, device: str) -> torch.Tensor:
    """``t`` on ``device`` with its strides (a transposed CPU tensor stays transposed)."""
    if t.device.type == device:
        return t
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)


STEPS = 10
LOWP_ATOL = {torch.float32: 0.0, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _functional_run(kind: str, backend: str, dtype: torch.dtype, with_terms: bool, device: str = "cpu",
                    zoo_sizes: tuple = ZOO_SIZES, n_steps: int = STEPS, combine: bool = True):  # fmt: skip
    """``n_steps`` steps of the functional op with every optional term switched on (or none),
    COMBINE included."""
    groups = clone_groups(make_zoo(torch.float32, sizes=zoo_sizes), dtype)
    # the grad-less one is not stepped; on CUDA, the same values (the transposed one stays strided)
    params = [_on(p.detach(), device) for p in zoo_params(groups) if p.numel() != 5]
    gen = torch.Generator().manual_seed(3)
    n = len(params)
    fisher = [torch.rand(p.shape, generator=gen).to(device) for p in params] if with_terms else None
    precision = [torch.rand(p.shape, generator=gen).to(device) for p in params]
    anchor = [torch.randn(p.shape, generator=gen).to(device) for p in params]
    buffers = [None] * n
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params]
    # the cuda backend counts AdamW steps on the device, the others on the host (as torch)
    steps = [torch.tensor(0.0, device=device if backend in ("cuda", "triton") else "cpu") for _ in params]
    for step in range(n_steps):
        grads = [g.to(dtype).to(device) for g in zoo_grads(params, step, scale=8.0 if with_terms else 1.0)]
        terms = StepTerms()
        if with_terms:
            saves = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p in params:
                    p.add_(0.01)  # a perturbation RESTORE must undo
            # COMBINE: the gradient the step sees is 0.6 g - 0.3 x1 + 0.5 x2 (two more gradients)
            sources = [[g.to(dtype).to(device) for g in zoo_grads(params, 100 + 10 * k + step, scale=8.0)]
                       for k in range(2)]  # fmt: skip
            terms = StepTerms(
                restore_from=saves,
                combine_from=sources if combine else None,
                combine_coef=torch.tensor([0.6, -0.3, 0.5], dtype=torch.float64, device=device)
                if combine
                else None,
                grad_scale=torch.tensor(8.0, device=device),
                found_inf=torch.tensor(1.0 if step == min(4, n_steps - 2) else 0.0, device=device),
                fisher=fisher,
                fisher_beta=0.95,
                clip_coef=torch.tensor(0.7, device=device),
                ewc_precision=precision,
                ewc_anchor=anchor,
                ewc_lam=[0.5 + i for i in range(n)],
            )
        with torch.no_grad():
            if kind == "sgd":
                sgd_step_(params, grads, buffers, terms, lr=0.05, momentum=0.9, dampening=0.1, nesterov=False,
                          weight_decay=1e-2, maximize=False, backend=backend)  # fmt: skip
            elif kind == "sgd_nesterov":
                sgd_step_(params, grads, buffers, terms, lr=0.05, momentum=0.9, dampening=0.0, nesterov=True,
                          weight_decay=0.0, maximize=True, backend=backend)  # fmt: skip
            else:
                adamw_step_(params, grads, m, v, vmax if kind == "adamw_amsgrad" else None, steps, terms,
                            lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=1e-2, maximize=False,
                            backend=backend)  # fmt: skip
    out = {f"param{i}": p.detach() for i, p in enumerate(params)}
    if kind.startswith("sgd"):
        out.update({f"momentum_buffer{i}": b for i, b in enumerate(buffers)})
    else:
        out.update({f"exp_avg{i}": t for i, t in enumerate(m)})
        out.update({f"exp_avg_sq{i}": t for i, t in enumerate(v)})
        out.update({f"step{i}": t for i, t in enumerate(steps)})
        if kind == "adamw_amsgrad":
            out.update({f"max_exp_avg_sq{i}": t for i, t in enumerate(vmax)})
    if fisher is not None:
        out.update({f"fisher{i}": f for i, f in enumerate(fisher)})
    return out


@pytest.mark.parametrize("with_terms", [False, True], ids=["plain", "all_terms"])
@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov", "adamw", "adamw_amsgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CANDIDATES)
def test_step_backend_matches_forloop(backend, dtype, kind, with_terms):
    oracle = _functional_run(kind, "forloop", dtype, with_terms)
    candidate = _functional_run(kind, backend, dtype, with_terms)
    reference = _functional_run(kind, "forloop", torch.float64, with_terms) if dtype != torch.float32 else {}
    assert candidate.keys() == oracle.keys()
    for name in oracle:
        assert_state_close(candidate[name], oracle[name], reference.get(name), dtype, LOWP_ATOL[dtype])
    # The run really moved the weights and the skipped AMP step left the step count at 9.
    assert not torch.equal(
        oracle["param2"].float(), make_zoo(torch.float32)[0]["params"][2].detach().to(dtype).float()
    )
    if "step0" in oracle:
        assert oracle["step0"].item() == (STEPS - 1 if with_terms else STEPS)


@pytest.mark.parametrize("adaptive", [False, True, "official", "fisher", "fisher_ema"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CANDIDATES)
def test_sam_optimizer_backend_matches_forloop(backend, dtype, adaptive):
    """Whole SAM+AdamW and SAM+SGD iterations over the zoo, every parameter and state tensor."""

    def run(backend, run_dtype, base):
        groups = clone_groups(make_zoo(torch.float32), run_dtype)
        groups[1]["rho"] = 0.2
        kwargs = dict(lr=0.05, momentum=0.9) if base is cl_optim.SGD else dict(lr=1e-2)
        if adaptive == "fisher_ema":
            kwargs["fisher_ema"] = 0.9
        opt = cl_optim.SAM(groups, base, rho=0.05, adaptive=adaptive, backend=backend, **kwargs)
        params = zoo_params(groups)
        for step in range(STEPS):
            set_grads(params, zoo_grads(params, step))
            opt.first_step(zero_grad=True)
            set_grads(params, zoo_grads(params, step + 100))
            opt.second_step(zero_grad=True)
        out = {f"param{i}": p.detach() for i, p in enumerate(params)}
        for i, p in enumerate(params):
            for key, value in opt.state[p].items():
                out[f"{key}{i}"] = value
        return out, opt

    for base in (cl_optim.SGD, cl_optim.AdamW):
        oracle, _ = run("forloop", dtype, base)
        candidate, opt = run(backend, dtype, base)
        assert set(opt.perturb_backends_used.values()) == {backend}
        assert set(opt.base_optimizer.backends_used.values()) == {backend}
        reference = run("forloop", torch.float64, base)[0] if dtype != torch.float32 else {}
        assert candidate.keys() == oracle.keys() and len(oracle) > 7
        for name in oracle:
            assert_state_close(candidate[name], oracle[name], reference.get(name), dtype, LOWP_ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CANDIDATES)
def test_grad_norm_and_perturb_ops(backend, dtype):
    _check_norm_and_perturb(backend, dtype)


def _check_norm_and_perturb(backend, dtype, zoo_sizes=ZOO_SIZES, compare=None):
    """grad_sq_norm and sam_perturb_ of ``backend`` with every SAM weight kind against the oracle;
    ``compare(got, want)`` replaces the compiled kernels' default comparison of the weights."""
    params = [
        p for p in zoo_params(clone_groups(make_zoo(torch.float32, sizes=zoo_sizes), dtype)) if p.numel() != 5
    ]
    grads = [g.to(dtype) for g in zoo_grads(params, 0)]
    fisher = [torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    kinds = [int(p.dim() >= 2) for p in params]
    mixed = [i % 4 for i in range(len(params))]  # every weight kind side by side
    for weighted in (None, kinds, [FISHER_BATCH] * len(params), [FISHER_RUNNING] * len(params), mixed):
        expected = grad_sq_norm(grads, params, weighted, 0.5, fisher=fisher, backend="forloop")
        got = grad_sq_norm(grads, params, weighted, 0.5, fisher=fisher, backend=backend)
        exact = grad_sq_norm([g.double() for g in grads], [p.double() for p in params], weighted, 0.5,
                             fisher=[f.double() for f in fisher])  # fmt: skip
        assert got.dtype == torch.float64 and got.dim() == 0
        # within the oracle's own fp32 accumulation error of the fp64 sum (or 1e-6 relative)
        assert abs(got.double() - exact) <= 2 * abs(expected.double() - exact) + 1e-6 * exact
        outs = {}
        for name in ("forloop", backend):
            ps = [p.detach().clone() for p in params]
            saves = [torch.empty_like(p) for p in ps]
            fs = [f.clone() for f in fisher]
            sam_perturb_(ps, grads, saves, torch.tensor(0.05) / expected.sqrt(), weighted, 0.5, backend=name,
                         fisher=fs, fisher_beta=0.9)  # fmt: skip
            outs[name + "_fisher"] = fs
            assert all(torch.equal(s, p.detach()) for s, p in zip(saves, params))
            outs[name] = ps
        for a, b in zip(outs[backend], outs["forloop"]):
            if backend in ("foreach", "forloop"):  # the same torch ops: bit for bit
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            elif compare is not None:
                compare(a, b)
            else:  # a compiled kernel: its own rounding of the scale, within an ulp
                torch.testing.assert_close(a, b)
        for a, b, before in zip(outs[backend + "_fisher"], outs["forloop_fisher"], fisher):
            torch.testing.assert_close(a, b)
            assert a.numel() == 0 or not torch.equal(a, before)  # the EMA ran


@pytest.mark.parametrize("backend", ["forloop", *CANDIDATES])
def test_nonfinite_gradient_moves_nothing(backend):
    params = [torch.randn(10), torch.randn(3, 4)]
    grads = [torch.randn(10), torch.randn(3, 4)]
    grads[1][1, 2] = float("inf")
    grads[0][3] = float("nan")
    sq = grad_sq_norm(grads, backend=backend)
    assert not torch.isfinite(sq)
    ps = [p.clone() for p in params]
    sam_perturb_(ps, grads, [torch.empty_like(p) for p in ps], torch.tensor(0.0), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(ps, params))


@pytest.mark.gpu
@pytest.mark.parametrize("with_terms", [False, True], ids=["plain", "all_terms"])
@pytest.mark.parametrize("kind", ["sgd", "sgd_nesterov", "adamw", "adamw_amsgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_backends_on_cuda_match_the_cpu_oracle(kind, dtype, with_terms):
    """Each GPU backend's step, with every term, against the forloop oracle run on the CPU."""
    candidates = _cuda_candidates()
    assert "cuda" in candidates, "the CUDA extension did not build or load: see cl_optim.report()"
    oracle = _functional_run(kind, "forloop", dtype, with_terms)
    reference = _functional_run(kind, "forloop", torch.float64, with_terms) if dtype != torch.float32 else {}
    for backend in candidates:
        got = _functional_run(kind, backend, dtype, with_terms, device="cuda")
        assert got.keys() == oracle.keys()
        for name in oracle:
            assert_state_close(
                got[name].cpu(), oracle[name], reference.get(name), dtype, LOWP_ATOL[dtype], GPU_FP32
            )


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sgd", "adamw_amsgrad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_and_cuda_backends_agree_on_cuda(kind, dtype):
    """The two GPU backends side by side: same math, so within one rounding of each other."""
    candidates = _cuda_candidates()
    assert {"cuda", "triton"} <= set(candidates), f"both GPU backends must run here, got {candidates}"
    cuda = _functional_run(kind, "cuda", dtype, True, device="cuda")
    triton = _functional_run(kind, "triton", dtype, True, device="cuda")
    reference = _functional_run(kind, "forloop", torch.float64, True) if dtype != torch.float32 else {}
    for name in cuda:
        assert_state_close(
            triton[name].cpu(), cuda[name].cpu(), reference.get(name), dtype, LOWP_ATOL[dtype], GPU_FP32
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sam_adamw_on_cuda_matches_the_cpu_oracle(dtype):
    """The shipped backends on CUDA tensors against the forloop oracle on the CPU."""

    def run(device, backend):
        groups = clone_groups(make_zoo(torch.float32), dtype)
        for g in groups:
            g["params"] = [torch.nn.Parameter(p.detach().to(device)) for p in g["params"]]
        opt = cl_optim.SAM(groups, cl_optim.AdamW, rho=0.05, lr=1e-2, backend=backend)
        params = zoo_params(groups)
        for step in range(STEPS):
            set_grads(params, [None if g is None else g.to(device) for g in zoo_grads(params, step)])
            opt.first_step(zero_grad=True)
            set_grads(params, [None if g is None else g.to(device) for g in zoo_grads(params, step + 100)])
            opt.second_step(zero_grad=True)
        return [p.detach().cpu() for p in params], opt

    oracle, _ = run("cpu", "forloop")
    for backend in ["forloop", *_cuda_candidates()]:
        got, opt = run("cuda", backend)
        assert set(opt.base_optimizer.backends_used.values()) == {backend}
        for a, b in zip(got, oracle):
            tol = GPU_FP32 if dtype == torch.float32 else dict(rtol=0, atol=LOWP_ATOL[dtype] * 4)
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CANDIDATES)
def test_fisher_and_ewc_ops_match_forloop(backend, dtype):
    _check_fisher_and_ewc_ops(backend, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fisher_and_ewc_ops_on_cuda_match_forloop(dtype):
    for backend in _cuda_candidates():
        _check_fisher_and_ewc_ops(backend, dtype, "cuda")


def _check_fisher_and_ewc_ops(backend, dtype, device, zoo_sizes=ZOO_SIZES):
    """The four Fisher/EWC ops of ``backend`` on ``device`` against the forloop oracle on the CPU."""
    from cl_optim.ewc import ewc_consolidate_, ewc_grad_add_, ewc_penalty, fisher_accumulate_

    zoo = make_zoo(torch.float32, sizes=zoo_sizes)
    params = [p.detach() for p in zoo_params(clone_groups(zoo, dtype)) if p.numel() != 5]
    grads = [g.to(dtype) for g in zoo_grads(params, 0)]
    gen = torch.Generator().manual_seed(9)
    fisher = [torch.rand(p.shape, generator=gen) for p in params]
    fisher[2].view(-1)[::3] = 0.0  # entries where A' = 0: the anchor falls back to p
    lam = [0.5 + i for i in range(len(params))]

    def run(name, on):
        ps = [_on(p, on) for p in params]
        f = [t.clone().to(on) for t in fisher]
        fisher_accumulate_(f, [_on(g, on) for g in grads], 0.25, backend=name)
        a = [torch.zeros(p.shape) if i == 2 else torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
             for i, p in enumerate(params)]  # fmt: skip
        mu = [
            torch.randn(p.shape, generator=torch.Generator().manual_seed(50 + i))
            for i, p in enumerate(params)
        ]
        a, mu = [t.to(on) for t in a], [t.to(on) for t in mu]
        gaps = ewc_consolidate_(a, mu, f, ps, 0.9, 1.0, True, backend=name)
        g = [_on(t.clone(), on) for t in grads]
        ewc_grad_add_(g, ps, a, mu, lam, backend=name)
        out = f, a, mu, g, gaps, ewc_penalty(ps, a, mu, lam, backend=name)
        return [[t.cpu() for t in x] if isinstance(x, list) else x.cpu() for x in out]

    oracle, got = run("forloop", "cpu"), run(backend, device)
    for want_list, got_list in zip(oracle[:4], got[:4]):
        for want, have in zip(want_list, got_list):
            if want.dtype == torch.float32:
                torch.testing.assert_close(have, want)  # fp32 defaults
            else:  # gradients in the parameter dtype: one rounding of the same fp32 value
                torch.testing.assert_close(have.float(), want.float(), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(got[4], oracle[4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[5], oracle[5], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CANDIDATES)
def test_task_ops_match_forloop(backend, dtype):
    _check_task_ops(backend, dtype, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_descent_term_on_cuda_equals_the_descent_written_after_the_step(kind, dtype):
    """CUDA bitwise (no FMA on either side); Triton fuses ``acc + a*x`` on the GPU, in the step
    and in task_combine_ alike, but not always at the same places: a rounding or two apart."""

    def fma_close(got, want):
        torch.testing.assert_close(got, want, rtol=4 * torch.finfo(dtype).eps, atol=1e-6)

    for backend in _cuda_candidates():
        compare = fma_close if backend == "triton" else None
        descent_equals_the_unfused_form(backend, kind, dtype, device="cuda", compare=compare)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_task_ops_on_cuda_match_forloop(dtype):
    def fma_close(got, want):  # Triton fuses acc + a*g on the GPU: one rounding fewer than the oracle
        torch.testing.assert_close(got, want, rtol=2 * torch.finfo(dtype).eps, atol=1e-6)

    for backend in _cuda_candidates():
        _check_task_ops(backend, dtype, "cuda", compare=fma_close if backend == "triton" else None)


def _check_task_ops(backend, dtype, device, zoo_sizes=ZOO_SIZES, compare=None):
    """task_gram and task_combine_ of ``backend`` on ``device`` against the forloop oracle on the
    CPU, the zoo's gradients of three steps as T = 3 task lists. The Gram (fp64 sums of the same
    products in another order) within 1e-12 of the sum of absolute products; the combine (the same
    fp32 operations, one rounding) with the oracle's bits, unless ``compare(got, want)`` says
    otherwise (the interpreter's bf16, Triton's FMA on a GPU). ``out`` keeps the parameters'
    strides: the transposed one is combined through a copy of its gradients in its layout."""
    from cl_optim.multitask.fused import task_combine_, task_gram

    zoo = make_zoo(torch.float32, sizes=zoo_sizes)
    params = [p.detach() for p in zoo_params(clone_groups(zoo, dtype)) if p.numel() != 5]
    tasks = [[g.to(dtype) for g in zoo_grads(params, step)] for step in range(3)]
    on_device = [[_on(g, device) for g in grads] for grads in tasks]
    got = task_gram(on_device, backend=backend)
    assert got.dtype == torch.float64 and got.shape == (3, 3) and got.device.type == device
    flat = torch.stack([torch.cat([g.reshape(-1).double() for g in grads]) for grads in tasks])
    bound = 1e-12 * (flat.abs() @ flat.abs().t())
    assert torch.all((got.cpu() - task_gram(tasks, backend="forloop")).abs() <= bound)
    a = torch.tensor([0.5, -1.25, 2.0])
    for accumulate in (False, True):
        want = [p.clone(memory_format=torch.preserve_format) for p in params]
        task_combine_(want, tasks, a, accumulate=accumulate, backend="forloop")
        out = [_on(p.clone(memory_format=torch.preserve_format), device) for p in params]
        task_combine_(out, on_device, a.to(device), accumulate=accumulate, backend=backend)
        for o, w in zip(out, want):
            assert o.stride() == w.stride()
            if compare is None:
                assert torch.equal(o.cpu(), w)
            else:
                compare(o.cpu(), w)


def combine_equals_the_unfused_form(
    backend: str, kind: str, dtype: torch.dtype, zoo_sizes: tuple = ZOO_SIZES
):
    """COMBINE (``g <- c0 g + c1 x1 + c2 x2`` read inside the step) against the form it replaces:
    ``task_combine_`` into the gradients on the same backend, then the step without it. Bitwise:
    both round the combination to the gradient's dtype once, and every other term is the same."""
    from cl_optim.multitask.fused import task_combine_

    def run(fused: bool):
        groups = clone_groups(make_zoo(torch.float32, sizes=zoo_sizes), dtype)
        params = [p.detach() for p in zoo_params(groups) if p.numel() != 5]
        n = len(params)
        gen = torch.Generator().manual_seed(5)
        fisher = [torch.rand(p.shape, generator=gen) for p in params]
        precision = [torch.rand(p.shape, generator=gen) for p in params]
        anchor = [torch.randn(p.shape, generator=gen) for p in params]
        buffers, m, v = (
            [None] * n,
            [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params],
        )
        steps = [torch.tensor(0.0) for _ in params]
        coef = torch.tensor([0.6, -0.3, 0.5], dtype=torch.float64)
        for step in range(3):
            grads = [g.to(dtype) for g in zoo_grads(params, step, scale=8.0)]
            sources = [
                [g.to(dtype) for g in zoo_grads(params, 100 + 10 * k + step, scale=8.0)] for k in range(2)
            ]
            if not fused:
                task_combine_(grads, [grads, *sources], coef, backend=backend)
            saves = [p.clone() for p in params]
            with torch.no_grad():
                for p in params:
                    p.add_(0.01)
            terms = StepTerms(
                restore_from=saves, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0), fisher=fisher,
                fisher_beta=0.95, clip_coef=torch.tensor(0.7), ewc_precision=precision, ewc_anchor=anchor,
                ewc_lam=0.5, combine_from=sources if fused else None, combine_coef=coef if fused else None,
            )  # fmt: skip
            with torch.no_grad():
                if kind == "sgd":
                    sgd_step_(params, grads, buffers, terms, lr=0.05, momentum=0.9, dampening=0.1, nesterov=False,
                              weight_decay=1e-2, maximize=False, backend=backend)  # fmt: skip
                else:
                    adamw_step_(params, grads, m, v, None, steps, terms, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                                weight_decay=1e-2, maximize=False, backend=backend)  # fmt: skip
        return params + (buffers if kind == "sgd" else m + v) + fisher

    fused, unfused = run(True), run(False)
    for a, b in zip(fused, unfused):
        assert torch.equal(a, b)
    start = make_zoo(torch.float32, sizes=zoo_sizes)[0]["params"][2].detach().to(dtype)
    assert fused[2].shape == start.shape and not torch.equal(fused[2], start)  # it moved


def descent_equals_the_unfused_form(
    backend: str,
    kind: str,
    dtype: torch.dtype,
    zoo_sizes: tuple = ZOO_SIZES,
    device: str = "cpu",
    compare=None,
):
    """DESCENT (``p <- p + lr/S (d0 g + d1 x1 + d2 x2)`` after the update, a 2-D ``combine_coef``)
    against the form it replaces: the step with COMBINE alone, then ``task_combine_`` of the raw
    gradient and the sources into the weights on the same backend with ``d * lr / S`` formed in
    fp64. Bitwise (unless ``compare``), AMP on, the middle step skipped by ``found_inf`` (restore
    only, no descent)."""
    from cl_optim.multitask.fused import task_combine_

    lr = 0.05 if kind == "sgd" else 1e-2
    inv = torch.tensor(8.0, dtype=torch.float64).reciprocal().float().item()  # as AMP rounds 1/S

    def run(fused: bool):
        groups = clone_groups(make_zoo(torch.float32, sizes=zoo_sizes), dtype)
        params = [p.detach().to(device) for p in zoo_params(groups) if p.numel() != 5]
        n = len(params)
        buffers, m, v = (
            [None] * n,
            [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params],
        )
        steps = [torch.tensor(0.0) for _ in params]
        combine = torch.tensor([0.6, -0.3, 0.5], dtype=torch.float64, device=device)
        descent = torch.tensor([-0.7, 0.25, 0.4], dtype=torch.float64, device=device)
        for step in range(3):
            grads = [g.to(device, dtype) for g in zoo_grads(params, step, scale=8.0)]
            sources = [
                [g.to(device, dtype) for g in zoo_grads(params, 100 + 10 * k + step, scale=8.0)]
                for k in range(2)
            ]
            saves = [p.clone() for p in params]
            with torch.no_grad():
                for p in params:
                    p.add_(0.01)
            skipped = step == 1
            terms = StepTerms(
                restore_from=saves, grad_scale=torch.tensor(8.0, device=device),
                found_inf=torch.tensor(float(skipped), device=device), combine_from=sources,
                combine_coef=torch.stack([combine, descent]) if fused else combine,
            )  # fmt: skip
            with torch.no_grad():
                if kind == "sgd":
                    sgd_step_(params, grads, buffers, terms, lr=lr, momentum=0.9, dampening=0.1, nesterov=False,
                              weight_decay=1e-2, maximize=False, backend=backend)  # fmt: skip
                else:
                    adamw_step_(params, grads, m, v, None, steps, terms, lr=lr, beta1=0.9, beta2=0.99, eps=1e-8,
                                weight_decay=1e-2, maximize=False, backend=backend)  # fmt: skip
                if not fused and not skipped:
                    task_combine_(params, [grads, *sources], descent * lr * inv, accumulate=True,
                                  backend=backend)  # fmt: skip
        return [t.cpu() for t in params + (buffers if kind == "sgd" else m + v)]

    fused, unfused = run(True), run(False)
    for a, b in zip(fused, unfused):
        if compare is None:
            assert torch.equal(a, b)
        else:
            compare(a, b)
    start = make_zoo(torch.float32, sizes=zoo_sizes)[0]["params"][2].detach().to(dtype)
    assert not torch.equal(fused[2], start)  # it moved


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["forloop", *CANDIDATES])
def test_combine_term_equals_the_combination_written_into_grad(backend, dtype, kind):
    combine_equals_the_unfused_form(backend, kind, dtype)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["forloop", *CANDIDATES])
def test_descent_term_equals_the_descent_written_after_the_step(backend, dtype, kind):
    descent_equals_the_unfused_form(backend, kind, dtype)
