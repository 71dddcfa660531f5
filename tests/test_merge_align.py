"""cl_optim.merge.align: Git Re-Basin's weight matching (Ainsworth et al., ICLR 2023).

The permutations here are applied by hand (explicit keys and axes, not through the spec), so a
wrong spec, a wrong direction of the returned permutations or a wrong cost all show up as a
model that does not come back to the reference."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

from cl_optim.landscape import interpolate
from cl_optim.merge.align import mlp_chain, weight_matching

needs_scipy = pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="needs scipy")


def _mlp(seed: int, bn: bool = False, sizes=(5, 12, 10, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    d, h1, h2, k = sizes
    first = [nn.Linear(d, h1), nn.BatchNorm1d(h1)] if bn else [nn.Linear(d, h1)]
    return nn.Sequential(*first, nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, k))


def _state(net: nn.Module, bn_warmup: bool = True) -> dict:
    if bn_warmup and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        # Moves the running statistics away from 0 and 1, so that permuting them matters.
        net.train()
        with torch.no_grad():
            for _ in range(3):
                net(2 * torch.randn(16, net[0].in_features) + 1)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _permute_mlp(state: dict, bn: bool, p1: torch.Tensor, p2: torch.Tensor) -> dict:
    """The MLP relabelled by hand: hidden layer 1 by p1, hidden layer 2 by p2 (new[i] = old[p[i]])."""
    first, second, last = ("0", "3", "5") if bn else ("0", "2", "4")
    out = {k: v.clone() for k, v in state.items()}
    out[f"{first}.weight"] = state[f"{first}.weight"][p1]
    out[f"{first}.bias"] = state[f"{first}.bias"][p1]
    if bn:
        for key in ("weight", "bias", "running_mean", "running_var"):
            out[f"1.{key}"] = state[f"1.{key}"][p1]
    out[f"{second}.weight"] = state[f"{second}.weight"][p2][:, p1]
    out[f"{second}.bias"] = state[f"{second}.bias"][p2]
    out[f"{last}.weight"] = state[f"{last}.weight"][:, p2]
    return out


def _outputs(net: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    net.load_state_dict(state)
    net.eval()
    with torch.no_grad():
        return net(x)


def _objective(reference: dict, state: dict, spec: list) -> float:
    """sum over every permuted entry of <reference[k], state[k]>, each key once, in fp64."""
    keys = {key for entry in spec for key in entry["axes"]}
    return sum(float((reference[k].double() * state[k].double()).sum()) for k in keys)


def _snapshot(*states):
    return [{k: v.clone() for k, v in s.items()} for s in states]


def _assert_same(states, snapshot):
    for s, t in zip(states, snapshot):
        assert list(s) == list(t) and all(torch.equal(s[k], t[k]) for k in s)


# ------------------------------------------------------------------------------------------------
# mlp_chain


def test_mlp_chain_spec_of_an_mlp():
    assert mlp_chain(_mlp(0)) == [
        {"name": "0->2", "size": 12, "axes": {"0.weight": 0, "0.bias": 0, "2.weight": 1}},
        {"name": "2->4", "size": 10, "axes": {"2.weight": 0, "2.bias": 0, "4.weight": 1}},
    ]
    bn = mlp_chain(_mlp(0, bn=True))
    assert bn[0] == {
        "name": "0->3",
        "size": 12,
        "axes": {
            "0.weight": 0,
            "0.bias": 0,
            "1.weight": 0,
            "1.bias": 0,
            "1.running_mean": 0,
            "1.running_var": 0,
            "3.weight": 1,
        },
    }
    assert bn[1] == {"name": "3->5", "size": 10, "axes": {"3.weight": 0, "3.bias": 0, "5.weight": 1}}


def test_mlp_chain_edges():
    # Nested containers, bias-free layers, a BatchNorm on the input and one on the output (neither
    # permuted), BatchNorm without affine parameters.
    net = nn.Sequential(
        nn.BatchNorm1d(4),
        nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6, affine=False), nn.Tanh()),
        nn.Dropout(0.1),
        nn.Linear(6, 2),
        nn.BatchNorm1d(2),
    )
    assert mlp_chain(net) == [
        {
            "name": "1.0->3",
            "size": 6,
            "axes": {"1.0.weight": 0, "1.1.running_mean": 0, "1.1.running_var": 0, "3.weight": 1},
        }
    ]
    assert mlp_chain(nn.Linear(3, 2)) == []  # no hidden boundary
    assert mlp_chain(nn.Sequential(nn.ReLU())) == []


def test_mlp_chain_refuses_what_it_cannot_describe():
    with pytest.raises(ValueError, match=r"module '2' \(Linear\).*takes 6 inputs.*'0' gives 5"):
        mlp_chain(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(6, 2)))
    with pytest.raises(ValueError, match=r"module '1' \(BatchNorm1d\): 4 features.*5 outputs"):
        mlp_chain(nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(4), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match=r"module '1' \(LayerNorm\)"):
        mlp_chain(nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match="grouped convolution"):
        mlp_chain(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1)))
    # A flatten of 8 channels x 4 x 4 positions into a Linear: not one unit per channel.
    with pytest.raises(ValueError, match=r"module '3' \(Linear\): it takes 128 inputs.*gives 8"):
        mlp_chain(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 2)))
    # A layer with an entry of its own (a mask) is not the plain layer the spec describes.
    masked = nn.Linear(4, 5)
    masked.register_buffer("mask", torch.ones(5, 4))
    with pytest.raises(ValueError, match=r"module '0' \(Linear\): expected entries weight and bias"):
        mlp_chain(nn.Sequential(masked, nn.Linear(5, 2)))
    # A parametrized layer: its weight lives in a child module.
    normed = torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 5))
    with pytest.raises(ValueError, match=r"module '0' \(ParametrizedLinear\): it has children"):
        mlp_chain(nn.Sequential(normed, nn.Linear(5, 2)))
    with pytest.raises(TypeError, match="nn.Module"):
        mlp_chain({"0.weight": torch.zeros(2, 2)})


# ------------------------------------------------------------------------------------------------
# weight_matching recovers a hand-applied permutation


@needs_scipy
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_a_hand_applied_permutation(bn, seed):
    net = _mlp(seed, bn)
    reference = _state(net)
    gen = torch.Generator().manual_seed(100 + seed)
    p1, p2 = torch.randperm(12, generator=gen), torch.randperm(10, generator=gen)
    other = _permute_mlp(reference, bn, p1, p2)
    assert not torch.equal(other["0.weight"], reference["0.weight"])

    # The relabelled model is the same function.
    x = torch.randn(32, 5)
    torch.testing.assert_close(_outputs(net, other, x), _outputs(net, reference, x), rtol=1e-5, atol=1e-6)

    aligned, perms = weight_matching(reference, other, mlp_chain(net), seed=seed)
    assert list(aligned) == list(other)
    for key in reference:
        assert aligned[key].dtype == reference[key].dtype, key
        torch.testing.assert_close(aligned[key], reference[key], rtol=0, atol=1e-6, msg=key)
    # other[k][perm] = reference[k][p][perm] = reference[k]: perm is p's inverse.
    assert [p.tolist() for p in perms] == [torch.argsort(p1).tolist(), torch.argsort(p2).tolist()]
    assert all(p.dtype == torch.int64 for p in perms)


@needs_scipy
def test_conv_chain_recovers_a_hand_applied_permutation():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 4, 1),
    )
    reference = _state(net, bn_warmup=False)
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 3, 5, 5) + 1)
    reference = _state(net, bn_warmup=False)

    spec = mlp_chain(net)
    hand_spec = [
        {"axes": {"0.weight": 0, "0.bias": 0, "1.weight": 0, "1.bias": 0, "1.running_mean": 0,
                  "1.running_var": 0, "3.weight": 1}},
        {"axes": {"3.weight": 0, "3.bias": 0, "5.weight": 1}},
    ]  # fmt: skip
    assert [s["axes"] for s in spec] == [s["axes"] for s in hand_spec]
    assert [s["size"] for s in spec] == [8, 6]

    gen = torch.Generator().manual_seed(7)
    p1, p2 = torch.randperm(8, generator=gen), torch.randperm(6, generator=gen)
    other = {k: v.clone() for k, v in reference.items()}
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        other[key] = reference[key][p1]
    other["3.weight"] = reference["3.weight"][p2][:, p1]
    other["3.bias"] = reference["3.bias"][p2]
    other["5.weight"] = reference["5.weight"][:, p2]

    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(_outputs(net, other, x), _outputs(net, reference, x), rtol=1e-5, atol=1e-6)
    for s in (spec, hand_spec):
        aligned, perms = weight_matching(reference, other, s)
        for key in reference:
            torch.testing.assert_close(aligned[key], reference[key], rtol=0, atol=1e-6, msg=key)
        assert [p.tolist() for p in perms] == [torch.argsort(p1).tolist(), torch.argsort(p2).tolist()]


# ------------------------------------------------------------------------------------------------
# independent models: same function, higher objective, a local optimum


@needs_scipy
@pytest.mark.parametrize("bn", [False, True])
def test_aligned_model_computes_the_same_function(bn):
    net = _mlp(0, bn)
    reference = _state(net)
    other = _state(_mlp(1, bn))
    aligned, perms = weight_matching(reference, other, mlp_chain(net))
    # Independent inits differ by more than a relabelling: something must have moved.
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms)
    assert not torch.equal(aligned["0.weight"], other["0.weight"])
    x = 3 * torch.randn(64, 5)
    torch.testing.assert_close(_outputs(net, aligned, x), _outputs(net, other, x), rtol=1e-5, atol=1e-6)
    if bn:
        assert torch.equal(aligned["1.num_batches_tracked"], other["1.num_batches_tracked"])


@needs_scipy
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_rises_and_ends_at_a_coordinate_optimum(seed):
    from scipy.optimize import linear_sum_assignment

    net = _mlp(seed, bn=True, sizes=(5, 16, 12, 3))
    reference, other = _state(net), _state(_mlp(seed + 50, bn=True, sizes=(5, 16, 12, 3)))
    spec = mlp_chain(net)
    aligned, perms = weight_matching(reference, other, spec, seed=seed)
    before, after = _objective(reference, other, spec), _objective(reference, aligned, spec)
    assert after >= before
    assert after > before + 1e-3  # independent random weights: the identity is not the optimum

    # No single boundary can be improved on its own any more (what the stopping rule promises):
    # for each one, the best relabelling of `aligned` along it, the others fixed, is the identity.
    for entry in spec:
        n = entry["size"]
        cost = torch.zeros(n, n, dtype=torch.float64)
        for key, axis in entry["axes"].items():
            r = reference[key].double().movedim(axis, 0).reshape(n, -1)
            w = aligned[key].double().movedim(axis, 0).reshape(n, -1)
            cost += r @ w.T
        rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
        assert cost[rows, cols].sum() <= cost.trace() + 1e-9 * abs(float(cost.trace()))

    # max_iter=1 stops after one sweep: never above the converged objective here, never below identity.
    one, _ = weight_matching(reference, other, spec, seed=seed, max_iter=1)
    assert before <= _objective(reference, one, spec) <= after + 1e-9
    # Deterministic for a seed.
    again, perms_again = weight_matching(reference, other, spec, seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(perms, perms_again))


# ------------------------------------------------------------------------------------------------
# the interpolation barrier


def _blobs(seed: int = 0, per_class: int = 64, classes: int = 4, dim: int = 2):
    gen = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(classes, dim, generator=gen)
    x = torch.cat([centres[c] + torch.randn(per_class, dim, generator=gen) for c in range(classes)])
    return x, torch.arange(classes).repeat_interleave(per_class)


def _train(seed: int, x, y, steps: int = 300) -> dict:
    net = _mlp(seed, sizes=(2, 32, 32, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed + 1000)
    for _ in range(steps):
        i = torch.randint(0, len(x), (32,), generator=gen)
        loss = nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@needs_scipy
def test_alignment_lowers_the_interpolation_barrier():
    x, y = _blobs()
    a, b = _train(1, x, y), _train(2, x, y)
    net = _mlp(0, sizes=(2, 32, 32, 4))
    data = [(x, y)]
    before = interpolate(net, a, b, data, steps=11)["barrier"]
    aligned, _ = weight_matching(a, b, mlp_chain(net))
    after = interpolate(net, a, aligned, data, steps=11)["barrier"]
    print(f"interpolation barrier: before alignment {before:.4f}, after {after:.4f}")
    # The endpoints are the same functions, so the chord is unchanged; only the middle moves.
    assert interpolate(net, a, aligned, data, steps=2)["loss"] == pytest.approx(
        interpolate(net, a, b, data, steps=2)["loss"], rel=1e-5
    )
    assert before > 0.05  # independent solutions: a real barrier to remove
    assert after < before


# ------------------------------------------------------------------------------------------------
# errors and inputs


@needs_scipy
def test_inputs_unchanged_and_nothing_aliased():
    net = _mlp(0, bn=True)
    reference, other = _state(net), _state(_mlp(1, bn=True))
    snapshot = _snapshot(reference, other)
    spec = mlp_chain(net)
    spec_copy = [{**s, "axes": dict(s["axes"])} for s in spec]
    aligned, _ = weight_matching(reference, other, spec)
    _assert_same([reference, other], snapshot)
    assert spec == spec_copy
    inputs = {t.data_ptr() for s in (reference, other) for t in s.values()}
    assert not inputs & {t.data_ptr() for t in aligned.values()}
    # Copied entries: writing to them leaves other alone.
    aligned["5.bias"].add_(1)
    aligned["1.num_batches_tracked"].add_(1)
    _assert_same([other], snapshot[1:])


@needs_scipy
def test_bad_inputs_are_refused_with_the_key_named():
    net = _mlp(0)
    reference = _state(net)
    spec = mlp_chain(net)

    missing = {k: v for k, v in reference.items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"missing \['2.bias'\]"):
        weight_matching(reference, missing, spec)
    extra = {**reference, "extra.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        weight_matching(reference, extra, spec)
    shaped = {**reference, "2.weight": torch.zeros(10, 11)}
    with pytest.raises(
        ValueError, match=r"other\['2.weight'\] has shape \(10, 11\), reference\['2.weight'\] \(10, 12\)"
    ):
        weight_matching(reference, shaped, spec)
    with pytest.raises(TypeError, match=r"other\['0.bias'\] is a list"):
        weight_matching(reference, {**reference, "0.bias": [0.0]}, spec)

    with pytest.raises(ValueError, match="'nope.weight', which is not in the state_dicts"):
        weight_matching(reference, reference, [{"axes": {"nope.weight": 0}}])
    with pytest.raises(ValueError, match="permutes 12 units but '2.weight' has 10 along axis 0"):
        weight_matching(reference, reference, [{"axes": {"0.weight": 0, "2.weight": 0}}])
    with pytest.raises(ValueError, match="'0.bias' along axis 1; it has 1 dims"):
        weight_matching(reference, reference, [{"axes": {"0.bias": 1}}])
    with pytest.raises(ValueError, match="'0.weight' axis 0 is permuted by both a and b"):
        weight_matching(
            reference,
            reference,
            [{"name": "a", "axes": {"0.weight": 0}}, {"name": "b", "axes": {"0.weight": -2}}],
        )
    with pytest.raises(ValueError, match="non-empty 'axes'"):
        weight_matching(reference, reference, [{"size": 3}])
    with pytest.raises(ValueError, match="max_iter must be a positive int"):
        weight_matching(reference, reference, spec, max_iter=0)
    nan = {**reference, "0.weight": torch.full_like(reference["0.weight"], float("nan"))}
    with pytest.raises(ValueError, match="cost of 0->2 is not finite"):
        weight_matching(reference, nan, spec)


def test_missing_scipy_names_the_install(monkeypatch):
    # A None entry in sys.modules makes the import fail as if scipy were not installed.
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    net = _mlp(0)
    state = _state(net)
    with pytest.raises(ImportError, match="pip install scipy"):
        weight_matching(state, state, mlp_chain(net))


def test_the_docstring_examples_run():
    import doctest
    import importlib

    module = importlib.import_module("cl_optim.merge.align")
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0
