"""cl_optim.multitask.combine against reference formulas written on flattened vectors (torch.cat),
from the papers: PCGrad (Yu et al. 2020), CAGrad (Liu et al. 2021, solved with scipy as the
official code does), MGDA (min-norm point; scipy for more than two tasks), IMTL-G (Liu et al.
2021), GradVac (Wang et al. 2021) and A-GEM (Chaudhry et al. 2019)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from cl_optim import multitask

SHAPES = [(3, 5), (7,), (2, 1, 3), ()]


def _tasks(t, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(t)]


def _flat(grads):
    return torch.cat([g.reshape(-1).double() for g in grads])


def _unflat(vector, like):
    out, at = [], 0
    for g in like:
        out.append(vector[at : at + g.numel()].view(g.shape).to(g.dtype))
        at += g.numel()
    return out


def _close(got, want_flat, like, tol=1e-10):
    assert [g.shape for g in got] == [g.shape for g in like] and all(g.dtype == like[0].dtype for g in got)
    err = float((_flat(got) - want_flat).norm() / want_flat.norm().clamp_min(1e-300))
    assert err <= tol, err


def _simplex_min(objective, t):
    res = minimize(objective, np.ones(t) / t, bounds=[(0, 1)] * t,
                   constraints=({"type": "eq", "fun": lambda x: 1 - sum(x)},), tol=1e-14)  # fmt: skip
    return res.x


# ------------------------------------------------------------------------------------ reference formulas


def pcgrad_reference(vectors):
    """Fixed order 0..T-1 for every i, projections off the original g_j."""
    out = []
    for i, g in enumerate(vectors):
        g = g.clone()
        for j, other in enumerate(vectors):
            if j != i and g @ other < 0:
                g -= (g @ other) / (other @ other) * other
        out.append(g)
    return sum(out)


def cagrad_reference(vectors, c=0.4):
    grads = torch.stack(vectors).numpy()  # (T, n)
    a = grads @ grads.T
    t = len(vectors)
    g0_norm = np.sqrt(a.mean() + 1e-8)
    scale = c * g0_norm + 1e-8
    b = np.ones(t) / t
    w = _simplex_min(lambda x: x @ a @ b + scale * np.sqrt(x @ a @ x + 1e-8), t)
    gw = w @ grads
    g = grads.mean(0) + scale / (np.linalg.norm(gw) + 1e-8) * gw
    return torch.from_numpy(g / (1 + c**2))


def mgda_reference(vectors):
    if len(vectors) == 2:
        g1, g2 = vectors
        alpha = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
        alpha = min(1.0, max(0.0, alpha))
        return alpha * g1 + (1 - alpha) * g2
    grads = torch.stack(vectors).numpy()
    a = grads @ grads.T
    w = _simplex_min(lambda x: x @ a @ x, len(vectors))
    return torch.from_numpy(w @ grads)


def imtl_reference(vectors):
    g = torch.stack(vectors)
    u = g / g.norm(dim=1, keepdim=True)
    d = g[0:1] - g[1:]
    uu = u[0:1] - u[1:]
    alpha = g[0] @ uu.t() @ torch.linalg.inv(d @ uu.t())
    alpha = torch.cat([1 - alpha.sum().unsqueeze(0), alpha])
    return alpha @ g


def gradvac_reference(vectors, targets, beta):
    """Fixed order; returns the combined vector and the new targets."""
    targets = targets.clone()
    out = []
    for i, g in enumerate(vectors):
        g = g.clone()
        for j, other in enumerate(vectors):
            if j == i:
                continue
            phi = float(g @ other / (g.norm() * other.norm()))
            target = float(targets[i, j])
            if phi < target:
                g += (
                    g.norm()
                    * (target * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - target**2))
                    / (other.norm() * np.sqrt(1 - target**2))
                    * other
                )
            targets[i, j] = (1 - beta) * target + beta * phi
        out.append(g)
    return sum(out), targets


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("t", [2, 3, 4])
def test_pcgrad_fixed_order(t, dtype):
    tasks = _tasks(t, dtype)
    got = multitask.combine(tasks, "pcgrad", shuffle=False)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    _close(got, pcgrad_reference([_flat(g) for g in tasks]), tasks[0], tol)


def test_pcgrad_random_order_is_one_of_the_orders_and_seeded():
    tasks = _tasks(3)
    a = multitask.combine(tasks, "pcgrad", generator=torch.Generator().manual_seed(3))
    b = multitask.combine(tasks, "pcgrad", generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("t", [2, 3, 5])
def test_cagrad_matches_the_official_objective_solved_by_scipy(t):
    tasks = _tasks(t, seed=t)
    got = multitask.combine(tasks, "cagrad", c=0.4)
    _close(got, cagrad_reference([_flat(g) for g in tasks]), tasks[0], 1e-3)


@pytest.mark.parametrize("t", [2, 3, 4])
def test_mgda_is_the_min_norm_point(t):
    tasks = _tasks(t, seed=10 + t)
    got = _flat(multitask.combine(tasks, "mgda"))
    want = mgda_reference([_flat(g) for g in tasks])
    if t == 2:
        _close(multitask.combine(tasks, "mgda"), want, tasks[0], 1e-12)  # the closed form
    else:  # the same minimum norm (the minimiser may be a face of the simplex)
        assert abs(float(got.norm()) - float(want.norm())) <= 1e-6 * float(want.norm())


@pytest.mark.parametrize("t", [2, 3, 4])
def test_imtl_closed_form(t):
    tasks = _tasks(t, seed=20 + t)
    got = multitask.combine(tasks, "imtl")
    want = imtl_reference([_flat(g) for g in tasks])
    _close(got, want, tasks[0], 1e-9)
    # IMTL-G's defining property: the combined gradient has equal projections on every unit task gradient
    flat = _flat(got)
    projections = [float(flat @ _flat(g) / _flat(g).norm()) for g in tasks]
    assert max(projections) - min(projections) < 1e-9 * max(abs(p) for p in projections)


def test_agem_projects_only_on_conflict():
    tasks = _tasks(2, seed=5)
    g, ref = (_flat(x) for x in tasks)
    want = g - (g @ ref) / (ref @ ref) * ref if g @ ref < 0 else g
    _close(multitask.combine(tasks, "agem"), want, tasks[0], 1e-12)
    aligned = [tasks[0], [x.clone() for x in tasks[0]]]
    _close(multitask.combine(aligned, "agem"), _flat(tasks[0]), tasks[0], 0.0)
    with pytest.raises(ValueError, match="two entries"):
        multitask.combine(_tasks(3), "agem")


def test_gradvac_keeps_its_targets_between_calls():
    tasks = _tasks(3, seed=7)
    vac = multitask.GradVac(beta=0.5, shuffle=False)
    targets = torch.zeros(3, 3, dtype=torch.float64)
    for step in range(3):
        step_tasks = _tasks(3, seed=7 + step)
        want, targets = gradvac_reference([_flat(g) for g in step_tasks], targets, 0.5)
        _close(vac(step_tasks), want, tasks[0], 1e-10)
        torch.testing.assert_close(vac.state, targets)
    restored = multitask.GradVac()
    restored.load_state_dict(vac.state_dict())
    assert torch.equal(restored.state, vac.state) and restored.beta == 0.5


def test_sum_mean_and_the_gram_matrix():
    tasks = _tasks(3)
    flats = [_flat(g) for g in tasks]
    _close(multitask.combine(tasks, "sum"), sum(flats), tasks[0], 1e-12)
    _close(multitask.combine(tasks, "mean"), sum(flats) / 3, tasks[0], 1e-12)
    torch.testing.assert_close(multitask.gram(tasks), torch.stack(flats) @ torch.stack(flats).t())


def test_bad_input_is_refused():
    tasks = _tasks(2)
    with pytest.raises(ValueError, match="non-empty list over tasks"):
        multitask.combine([], "sum")
    with pytest.raises(ValueError, match="must align"):
        multitask.combine([tasks[0], tasks[1][:-1]], "sum")
    with pytest.raises(ValueError, match="does not match task 0"):
        multitask.combine([tasks[0], [tasks[1][0].t(), *tasks[1][1:]]], "sum")
    with pytest.raises(ValueError, match="unknown method"):
        multitask.combine(tasks, "nash")
    with pytest.raises(ValueError, match="takes no option"):
        multitask.combine(tasks, "imtl", c=0.5)


def test_the_docstring_example_runs():
    import doctest
    import importlib

    module = importlib.import_module("cl_optim.multitask.aggregators")
    failures, tried = doctest.testmod(module)
    assert tried > 0 and failures == 0
