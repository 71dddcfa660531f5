"""cl_optim.landscape against exact Hessians of small models (torch.autograd.functional.hessian
on the flattened parameters)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from cl_optim import landscape


def _model(seed=0, hidden=5, dtype=torch.float64):
    """fp64 by default: the comparisons with the exact Hessian are then to rounding of fp64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)


def _data(seed=0, sizes=(7, 5), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, 3, generator=gen).to(dtype), torch.randint(0, 3, (b,), generator=gen)) for b in sizes
    ]


def exact_hessian(model, data):
    """The Hessian of the sample-weighted mean cross-entropy, fp64, by autograd on the flat vector."""
    model64 = copy.deepcopy(model).double()
    named = [(n, p) for n, p in model64.named_parameters() if p.requires_grad]
    shapes = [p.shape for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    total = sum(len(y) for _, y in data)

    def loss(vector):
        params, at = {}, 0
        for (name, _), shape in zip(named, shapes):
            size = math.prod(shape)
            params[name] = vector[at : at + size].view(shape)
            at += size
        return (
            sum(
                nn.functional.cross_entropy(functional_call(model64, params, (x.double(),)), y) * len(y)
                for x, y in data
            )
            / total
        )

    return torch.autograd.functional.hessian(loss, flat)


def test_hvp_equals_the_exact_hessian_times_the_vectors():
    model, data = _model(), _data()
    h = exact_hessian(model, data)
    n = h.shape[0]
    vectors = torch.randn(4, n, generator=torch.Generator().manual_seed(1))
    got = landscape.hvp(model, data, vectors, dtype=torch.float64)
    torch.testing.assert_close(got, vectors.double() @ h, rtol=1e-9, atol=1e-12)
    one = landscape.hvp(model, data, vectors[0], dtype=torch.float64)
    torch.testing.assert_close(one, h @ vectors[0].double(), rtol=1e-9, atol=1e-12)
    as_params = landscape.hvp(
        model, data, landscape.unflatten(vectors[0], list(model.parameters())), dtype=torch.float64
    )
    torch.testing.assert_close(landscape.flatten(as_params), one)
    model32, data32 = _model(dtype=torch.float32), _data(dtype=torch.float32)  # fp32: to fp32 rounding
    got32 = landscape.hvp(model32, data32, vectors.float())
    torch.testing.assert_close(
        got32.double(), vectors.double() @ exact_hessian(model32, data32), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigenvalues_match_the_exact_hessian(which):
    model, data = _model(), _data()
    h = exact_hessian(model, data)
    exact = torch.linalg.eigvalsh(h)
    order = {"LA": torch.argsort(exact, descending=True), "SA": torch.argsort(exact),
             "LM": torch.argsort(exact.abs(), descending=True)}[which]  # fmt: skip
    values, vectors = landscape.hessian_eigenvalues(
        model,
        data,
        k=3,
        which=which,
        tol=1e-8,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(values, exact[order[:3]], rtol=1e-4, atol=1e-8)
    residual = vectors @ h - values.unsqueeze(1) * vectors  # H v = lambda v
    assert float(residual.norm(dim=1).max()) < 1e-4 * float(exact.abs().max())


def test_the_largest_eigenvalue_of_an_indefinite_hessian_is_not_the_largest_magnitude():
    """Far from a minimum the Hessian is indefinite. With the negated loss (a maximisation, or a
    saddle) the most negative eigenvalue has the larger magnitude: power iteration returns it."""
    model, data = _model(), _data()

    def negated(output, y):
        return -nn.functional.cross_entropy(output, y)

    exact = -torch.linalg.eigvalsh(exact_hessian(model, data)).flip(0)  # eigenvalues of -H, ascending
    assert exact[0] < 0 < exact[-1] < abs(exact[0]), exact  # the premise of the test
    values, _ = landscape.hessian_eigenvalues(
        model, data, loss_fn=negated, which="LA", tol=1e-8, dtype=torch.float64
    )
    torch.testing.assert_close(values[0], exact[-1], rtol=1e-4, atol=0.0)
    magnitude, _ = landscape.hessian_eigenvalues(
        model, data, loss_fn=negated, which="LM", tol=1e-8, dtype=torch.float64
    )
    torch.testing.assert_close(magnitude[0], exact[0], rtol=1e-4, atol=0.0)


def test_a_warm_start_from_the_eigenvector_converges_in_fewer_products():
    model, data = _model(), _data()
    cold = landscape.objective.Objective  # counts products
    counts = {}
    original = cold.hvp

    def counting(self, vectors):
        counts["n"] = counts.get("n", 0) + vectors.shape[0]
        return original(self, vectors)

    cold.hvp = counting
    try:
        _, vectors = landscape.hessian_eigenvalues(model, data, tol=1e-6, dtype=torch.float64)
        first = counts.pop("n")
        landscape.hessian_eigenvalues(model, data, tol=1e-6, dtype=torch.float64, init=vectors)
        second = counts.pop("n")
    finally:
        cold.hvp = original
    assert second < first, (first, second)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_the_trace_is_within_its_standard_error(method):
    model, data = _model(), _data()
    exact = float(torch.trace(exact_hessian(model, data)))
    estimate, error = landscape.hessian_trace(  # 30 probes: Hutch++'s sketch (10) stays below n (38)
        model,
        data,
        n_probes=30,
        method=method,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(0),
    )
    assert 0 < error < abs(exact)
    assert abs(estimate - exact) <= 4 * error, (estimate, exact, error)


def test_hutch_plus_plus_has_a_smaller_error_where_a_few_eigenvalues_dominate():
    model, data = _model(), _data()
    _, plain = landscape.hessian_trace(model, data, n_probes=60, generator=torch.Generator().manual_seed(0))
    _, plus = landscape.hessian_trace(
        model, data, n_probes=60, method="hutch++", generator=torch.Generator().manual_seed(0)
    )
    assert plus < plain


def test_the_model_is_restored_bit_for_bit_and_its_modes_kept():
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.5), nn.Linear(5, 3))
    model.train()
    model[2].eval()
    data = _data(dtype=torch.float32)
    before = [t.clone() for t in list(model.parameters()) + list(model.buffers())]
    with pytest.raises(ValueError, match="train mode with BatchNorm1d"):
        landscape.hessian_eigenvalues(model, data)
    with pytest.warns(UserWarning, match="not converged"):  # 5 products: a warning, not a silent value
        landscape.hessian_eigenvalues(model, data, mode="train", max_iter=5)  # running stats move inside
    landscape.hessian_trace(model, data, n_probes=4, mode="eval")
    after = list(model.parameters()) + list(model.buffers())
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    assert model.training and model[1].training and not model[2].training


def test_bad_input_is_refused_clearly():
    model, data = _model(), _data()
    with pytest.raises(ValueError, match="no batches"):
        landscape.hvp(model, [], torch.zeros(38))
    with pytest.raises(ValueError, match="scalar"):
        landscape.hessian_trace(model, data, loss_fn=lambda out, y: out.sum(1))
    with pytest.raises(ValueError, match="not finite"):
        landscape.hessian_trace(
            model, [(torch.full((2, 3), float("nan"), dtype=torch.float64), torch.tensor([0, 1]))]
        )
    with pytest.raises(ValueError, match="n = 38"):
        landscape.hvp(model, data, torch.zeros(5))
    with pytest.raises(ValueError, match="which must be"):
        landscape.hessian_eigenvalues(model, data, which="largest")
    frozen = _model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        landscape.hessian_eigenvalues(frozen, data)
    partly = _model()
    partly[0].weight.requires_grad_(False)  # frozen parameters are left out of the space
    values, vectors = landscape.hessian_eigenvalues(partly, data)
    assert vectors.shape[1] == 38 - 15


# ------------------------------------------------------------------------------------ spectrum


def test_the_spectrum_of_a_full_lanczos_has_its_nodes_at_the_eigenvalues():
    model, data = _model(), _data()
    exact = torch.linalg.eigvalsh(exact_hessian(model, data))
    grid, density = landscape.hessian_spectrum(
        model, data, runs=3, steps=38, dtype=torch.float64, sigma=1e-3, points=4000,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    step = float(grid[1] - grid[0])
    assert abs(float(density.sum()) * step - 1.0) < 1e-3  # a probability density
    assert grid[0] < exact[0] and grid[-1] > exact[-1]
    # Mean of the density = average Rayleigh quotient of the start vectors, about tr(H)/n.
    mean = float((grid * density).sum() * step)
    assert abs(mean - float(exact.mean())) < 0.5 * float(exact.abs().max())


# ------------------------------------------------------------------------------------ sharpness


class Quadratic(nn.Module):
    """L(w) = 0.5 mean((X w - y)^2): gradient X^T r / N, Hessian A = X^T X / N, exactly."""

    def __init__(self, n=4):
        super().__init__()
        self.w = nn.Linear(n, 1, bias=False).double()

    def forward(self, x):
        return self.w(x)


def _mse(out, y):
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def test_sam_sharpness_of_a_quadratic_in_closed_form():
    gen = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(10, 4, generator=gen, dtype=torch.float64),
        torch.randn(10, generator=gen, dtype=torch.float64),
    )
    model = Quadratic()
    w = model.w.weight.detach()[0]
    g = x.t() @ (x @ w - y) / 10
    a = x.t() @ x / 10
    rho = 0.3
    want = rho * float(g.norm()) + 0.5 * rho**2 * float(g @ a @ g) / float(g @ g)
    got = landscape.sam_sharpness(model, [(x, y)], rho, loss_fn=_mse, dtype=torch.float64)
    assert abs(got - want) < 1e-10
    assert torch.equal(model.w.weight.detach()[0], w)  # restored
    # More ascent steps find at least as high a point of the ball; m-sharpness averages per batch.
    assert (
        landscape.sam_sharpness(model, [(x, y)], rho, steps=5, loss_fn=_mse, dtype=torch.float64)
        >= got - 1e-12
    )
    halves = [(x[:5], y[:5]), (x[5:], y[5:])]
    per_batch = landscape.sam_sharpness(model, halves, rho, loss_fn=_mse, per_batch=True, dtype=torch.float64)
    each = [landscape.sam_sharpness(model, [h], rho, loss_fn=_mse, dtype=torch.float64) for h in halves]
    assert abs(per_batch - sum(each) / 2) < 1e-12


def test_stability_thresholds():
    import cl_optim

    p = [nn.Parameter(torch.zeros(2))]
    assert landscape.stability_threshold(torch.optim.SGD(p, lr=0.1)) == pytest.approx(20.0)
    assert landscape.stability_threshold(cl_optim.SGD(p, lr=0.1, momentum=0.9)) == pytest.approx(38.0)
    assert landscape.stability_threshold(
        torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5)
    ) == pytest.approx(76.0)
    adam = torch.optim.AdamW(p, lr=1e-3, betas=(0.9, 0.999))
    assert landscape.stability_threshold(adam) == pytest.approx(38_000.0) and landscape.is_adaptive(adam)
    sam = cl_optim.SAM(p, cl_optim.SGD, rho=0.05, lr=0.2)
    assert landscape.stability_threshold(sam) == pytest.approx(10.0) and not landscape.is_adaptive(sam)
    with pytest.raises(ValueError, match="Nesterov"):
        landscape.stability_threshold(torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True))
    two = torch.optim.SGD([{"params": p, "lr": 0.1}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.2}])
    with pytest.raises(ValueError, match="different thresholds"):
        landscape.stability_threshold(two)


def test_preconditioned_sharpness_is_the_top_eigenvalue_of_the_preconditioned_hessian():
    model, data = _model(), _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        sum(nn.functional.cross_entropy(model(x), y) for x, y in data).backward()
        opt.step()
    h = exact_hessian(model, data)
    scale = []
    for p in model.parameters():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        scale.append((1 / torch.sqrt(v_hat.sqrt() + 1e-8)).reshape(-1))
    s = torch.cat(scale).double()
    want = float(torch.linalg.eigvalsh(s[:, None] * h * s[None, :]).max())
    got = landscape.preconditioned_sharpness(model, data, opt, tol=1e-8, dtype=torch.float64)
    assert abs(got - want) <= 1e-4 * abs(want)
    with pytest.raises(ValueError, match="not stepped"):
        fresh = _model()
        landscape.preconditioned_sharpness(fresh, data, torch.optim.Adam(fresh.parameters()))


# ------------------------------------------------------------------------------------ interpolation and surfaces


def test_interpolation_follows_the_analytic_curve_of_a_quadratic():
    gen = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(10, 4, generator=gen, dtype=torch.float64),
        torch.randn(10, generator=gen, dtype=torch.float64),
    )
    model = Quadratic()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v + torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in a.items()}
    path = landscape.interpolate(model, a, b, [(x, y)], steps=11, loss_fn=_mse)
    for alpha, loss in zip(path["alpha"], path["loss"]):
        w = (1 - alpha) * a["w.weight"][0] + alpha * b["w.weight"][0]
        assert abs(loss - float(0.5 * ((x @ w - y) ** 2).mean())) < 1e-12
    assert path["barrier"] <= 1e-12  # a convex loss lies below its chords
    assert path["accuracy"] is None  # regression targets
    assert torch.equal(model.state_dict()["w.weight"], a["w.weight"])
    with pytest.raises(ValueError, match="not a state dict"):
        landscape.interpolate(model, a, {"other": torch.zeros(1)}, [(x, y)], loss_fn=_mse)


def test_a_barrier_between_two_minima_of_a_double_well():
    assert landscape.barrier([0.0, 0.5, 1.0], [0.0, 1.0, 0.0]) == pytest.approx(1.0)
    assert landscape.barrier([0.0, 0.5, 1.0], [1.0, 1.5, 2.0]) == pytest.approx(0.0)


def test_loss_surfaces_restore_the_weights_and_see_the_curvature():
    model, data = _model(), _data()
    before = [p.clone() for p in model.parameters()]
    surface = landscape.loss_surface(
        model, data, directions=2, span=0.5, steps=5, generator=torch.Generator().manual_seed(0)
    )
    assert surface["loss"].shape == (5, 5)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with torch.no_grad():
        center = sum(float(nn.functional.cross_entropy(model(x), y)) * len(y) for x, y in data) / 12
    assert abs(float(surface["loss"][2, 2]) - center) < 1e-12
    for normalization in ("layer", None):  # the other random directions
        other = landscape.loss_surface(model, data, steps=3, normalization=normalization)["loss"]
        assert abs(float(other[1]) - center) < 1e-12
    filtered = landscape.loss_surface(model, data, steps=3, generator=torch.Generator().manual_seed(0))[
        "directions"
    ][0]
    biases = torch.cat([torch.zeros(15), torch.ones(5), torch.zeros(15), torch.ones(3)]).bool()
    assert float(filtered[biases].abs().max()) == 0.0  # filter normalisation leaves biases alone
    first = filtered[:15].view(5, 3)
    torch.testing.assert_close(first.norm(dim=1), model[0].weight.detach().norm(dim=1))
    top, _ = landscape.hessian_eigenvalues(model, data, tol=1e-8, dtype=torch.float64)
    h = 1e-3
    line = landscape.loss_surface(model, data, span=h, steps=3, basis="hessian", mode=None)["loss"]
    curvature = float(line[0] - 2 * line[1] + line[2]) / h**2
    assert abs(curvature - float(top[0])) < 1e-3 * abs(float(top[0]))


# ------------------------------------------------------------------------------------ monitor, plots, examples


def test_the_monitor_tracks_the_sharpness_against_the_threshold_warm_started(tmp_path):
    model, data = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    monitor = landscape.SharpnessMonitor(model, data, opt, every=3, tol=1e-6, max_iter=38)
    for _ in range(7):
        opt.zero_grad()
        sum(nn.functional.cross_entropy(model(x), y) * len(y) / 12 for x, y in data).backward()
        opt.step()
        monitor.step()
    assert [row["step"] for row in monitor.history] == [1, 4, 7]
    last = monitor.history[-1]
    exact = float(torch.linalg.eigvalsh(exact_hessian(model, data)).max())
    assert abs(last["sharpness"] - exact) < 1e-4 * exact
    assert last["threshold"] == pytest.approx(2 * 1.9 / 0.5) and last["ratio"] == pytest.approx(
        exact / 7.6, rel=1e-4
    )
    assert not last["preconditioned"] and last["hvps"] > 0
    monitor.plot(tmp_path / "monitor.png")
    assert (tmp_path / "monitor.png").stat().st_size > 1000
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt_step = adam.step
    adam.zero_grad()
    sum(nn.functional.cross_entropy(model(x), y) for x, y in data).backward()
    opt_step()
    row = landscape.SharpnessMonitor(model, data, adam).step()
    assert row["preconditioned"] and row["threshold"] == pytest.approx(38_000.0)


def test_the_plots_are_written(tmp_path):
    from cl_optim.landscape import plots

    model, data = _model(), _data()
    grid, density = landscape.hessian_spectrum(model, data, runs=1, steps=10)
    plots.plot_spectrum(grid, density, tmp_path / "spectrum.png")
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v * 0.5 for k, v in a.items()}
    plots.plot_interpolation(
        {"a to b": landscape.interpolate(model, a, b, data, steps=5)}, tmp_path / "path.png"
    )
    plots.plot_surface(landscape.loss_surface(model, data, directions=2, steps=4), tmp_path / "surface.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("spectrum.png", "path.png", "surface.png"))


@pytest.mark.parametrize("name", ["hvp", "eigen", "trace", "spectrum", "interpolate", "monitor"])
def test_the_docstring_examples_run(name):
    import doctest
    import importlib

    module = importlib.import_module(f"cl_optim.landscape.{name}")
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_lanczos_reaches_an_accuracy_in_clearly_fewer_products_than_power_iteration():
    """A spectrum whose top is not isolated (1, 0.98, 0.96, ... and a negative tail), as trained
    networks have: power iteration converges at the ratio of the top two, Lanczos much faster."""
    from cl_optim.landscape.eigen import _ritz, lanczos

    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    spectrum = torch.cat(
        [
            1.0 - 0.02 * torch.arange(50, dtype=torch.float64),
            -0.5 * torch.rand(150, generator=gen, dtype=torch.float64),
        ]
    )
    h = q @ torch.diag(spectrum) @ q.t()
    start = torch.randn(200, generator=gen, dtype=torch.float64)
    alpha, _, _ = lanczos(
        lambda v: v @ h, start, 200, check=lambda a, b, basis: abs(float(_ritz(a, b)[0].max()) - 1.0) <= 1e-3
    )
    v, power = start / start.norm(), 0
    while abs(float(v @ h @ v) - 1.0) > 1e-3 and power < 5000:
        v = (h @ v) / (h @ v).norm()
        power += 1
    assert 3 * len(alpha) <= power, (len(alpha), power)


# ------------------------------------------------------------------------------------ review cases


def test_interpolating_from_the_models_own_state_dict_without_a_copy():
    model, data = _model(), _data()
    b = {k: v + 0.3 for k, v in model.state_dict().items()}
    cloned = landscape.interpolate(
        model, {k: v.clone() for k, v in model.state_dict().items()}, b, data, steps=5
    )
    shared = landscape.interpolate(model, model.state_dict(), b, data, steps=5)  # tensors of the model itself
    assert shared["loss"] == cloned["loss"]
    frozen = _model()
    for p in frozen.parameters():
        p.requires_grad_(False)  # interpolation takes no derivatives
    assert len(landscape.interpolate(frozen, frozen.state_dict(), b, data, steps=3)["loss"]) == 3


def test_train_mode_dropout_needs_a_mode_and_the_random_state_is_kept():
    model = nn.Sequential(nn.Linear(3, 5), nn.Dropout(0.3), nn.Linear(5, 3)).double()
    data = _data()
    with pytest.raises(ValueError, match="train mode with Dropout"):
        landscape.hessian_trace(model, data, n_probes=2)
    state = torch.get_rng_state()
    landscape.hessian_trace(model, data, n_probes=4, mode="train", generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)


def _adam_steps(model, data, optimizer, steps=3):
    for _ in range(steps):
        optimizer.zero_grad()
        sum(nn.functional.cross_entropy(model(x), y) for x, y in data).backward()
        optimizer.step()


@pytest.mark.parametrize("options", [{"amsgrad": True}, {"weight_decay": 0.5}])
def test_preconditioned_sharpness_with_amsgrad_and_coupled_weight_decay(options):
    model, data = _model(), _data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, **options)
    _adam_steps(model, data, opt)
    key = "max_exp_avg_sq" if options.get("amsgrad") else "exp_avg_sq"
    s = torch.cat([
        (1 / torch.sqrt((opt.state[p][key] / (1 - 0.999 ** float(opt.state[p]["step"]))).sqrt() + 1e-8)).reshape(-1)
        for p in model.parameters()
    ]).double()  # fmt: skip
    h = exact_hessian(model, data) + options.get("weight_decay", 0.0) * torch.eye(38, dtype=torch.float64)
    want = float(torch.linalg.eigvalsh(s[:, None] * h * s[None, :]).max())
    got = landscape.preconditioned_sharpness(model, data, opt, tol=1e-8, dtype=torch.float64)
    assert abs(got - want) <= 1e-4 * abs(want)


def test_thresholds_are_refused_where_they_are_not_derived_and_sgd_decay_lowers_them():
    p = [nn.Parameter(torch.zeros(2))]
    for opt in (torch.optim.RMSprop(p, lr=0.01), torch.optim.Adagrad(p), torch.optim.NAdam(p)):
        with pytest.raises(ValueError, match="no stability threshold is derived"):
            landscape.stability_threshold(opt)
    assert landscape.stability_threshold(torch.optim.SGD(p, lr=0.1, weight_decay=0.5)) == pytest.approx(19.5)


def test_a_sum_reduced_loss_is_refused():
    model, data = _model(), _data()
    with pytest.raises(ValueError, match="sums over its batch"):
        landscape.hessian_trace(
            model, data, loss_fn=lambda o, y: nn.functional.cross_entropy(o, y, reduction="sum")
        )


def test_the_monitor_starts_afresh_after_a_parameter_is_frozen_and_init_is_checked():
    model, data = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = landscape.SharpnessMonitor(model, data, opt, every=1, tol=1e-6, max_iter=38)
    monitor.step()
    model[0].weight.requires_grad_(False)
    assert monitor.step()["sharpness"] > 0
    with pytest.raises(ValueError, match=r"init must be \(n,\) or \(j, n\)"):
        landscape.hessian_eigenvalues(model, data, init=torch.zeros(5))


def test_surfaces_take_one_shot_iterables_and_sequence_logits_are_flattened():
    model, data = _model(), _data()
    line = landscape.loss_surface(model, (b for b in data), steps=3, basis="hessian")
    assert line["loss"].shape == (3,)

    class Tokens(nn.Module):  # (B, T) tokens -> (B, T, V) logits, as a Hugging Face token model
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(7, 4), nn.Linear(4, 7)

        def forward(self, tokens):
            return self.out(torch.tanh(self.emb(tokens)))

    torch.manual_seed(0)
    tokens = Tokens().double()
    batches = [{"tokens": torch.randint(0, 7, (3, 5)), "labels": torch.randint(0, 7, (3, 5))}]
    v = torch.randn(sum(p.numel() for p in tokens.parameters()), dtype=torch.float64)
    flat = landscape.hvp(tokens, batches, v, dtype=torch.float64)

    def explicit(o, y):
        return nn.functional.cross_entropy(o.reshape(-1, 7), y.reshape(-1))

    torch.testing.assert_close(flat, landscape.hvp(tokens, batches, v, loss_fn=explicit, dtype=torch.float64))
