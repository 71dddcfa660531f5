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
