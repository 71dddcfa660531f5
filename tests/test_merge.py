"""cl_optim.merge against an independent fp64 reference written from the papers
(tests/merge_reference.py), on a small MLP's state_dicts with a BatchNorm buffer; inputs never
modified, every bad input refused with a message that names it."""

from __future__ import annotations

import pytest
import torch
from merge_reference import fisher_merge_ref, task_arithmetic_ref, ties_ref

from cl_optim.merge import fisher_merge, task_arithmetic, ties


def _model(seed: int, dtype=torch.float64) -> dict:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    net.train()
    net(torch.randn(4, 6))  # moves the BatchNorm statistics and num_batches_tracked
    return {
        k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in net.state_dict().items()
    }


def _experts(k=3, dtype=torch.float64):
    base = _model(0, dtype)
    experts = []
    for i in range(k):
        gen = torch.Generator().manual_seed(10 + i)
        experts.append({key: (v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.dtype))
                        if v.is_floating_point() else v.clone() for key, v in base.items()})  # fmt: skip
    return base, experts


def _snapshot(*models):
    return [{k: v.clone() for k, v in m.items()} for m in models]


def _assert_same(models, snapshot):
    for m, s in zip(models, snapshot):
        assert m.keys() == s.keys() and all(torch.equal(m[k], s[k]) for k in m)


def _assert_close(got: dict, want: dict, **tol):
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        if want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], **tol)
        else:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("backend", ["forloop", "foreach", "cpp"])
@pytest.mark.parametrize("scale", [0.3, [0.2, 0.5, 1.1]])
def test_task_arithmetic_matches_the_reference(scale, backend):
    base, experts = _experts()
    before = _snapshot(base, *experts)
    got = task_arithmetic(base, experts, scale, backend=backend)
    _assert_close(got, task_arithmetic_ref(base, experts, scale), rtol=1e-12, atol=1e-12)
    _assert_same([base, *experts], before)
    assert all(got[k].data_ptr() != base[k].data_ptr() for k in got)  # new tensors, no aliasing


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_ties_matches_the_reference(density, scale):
    base, experts = _experts(k=4)
    before = _snapshot(base, *experts)
    got = ties(base, experts, density=density, scale=scale)
    _assert_close(got, ties_ref(base, experts, density, scale), rtol=1e-12, atol=1e-12)
    _assert_same([base, *experts], before)


def test_ties_with_low_precision_entries_stays_close_to_the_fp64_rule():
    base, experts = _experts(k=3, dtype=torch.bfloat16)
    got = ties(base, experts, density=0.3)
    want = ties_ref(base, experts, 0.3, 1.0)
    _assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["forloop", "cpp"])
@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 0.5]])
def test_fisher_merge_matches_the_reference(weights, backend):
    _, experts = _experts()
    gen = torch.Generator().manual_seed(3)
    fishers = []
    for e in experts:
        f = {
            k: torch.rand(v.shape, generator=gen)
            for k, v in e.items()
            if v.is_floating_point() and "running" not in k
        }
        f["0.weight"][0] = 0.0  # a row no expert's Fisher covers: the weighted plain average there
        fishers.append(f)
    before = _snapshot(*experts, *fishers)
    got = fisher_merge(experts, fishers, weights, backend=backend)
    # fp32 arithmetic (as EWC's buffers) against the fp64 rule
    _assert_close(got, fisher_merge_ref(experts, fishers, weights), rtol=1e-6, atol=1e-6)
    _assert_same([*experts, *fishers], before)


def test_fisher_merge_is_the_anchor_of_separate_mode_ewc():
    """EWC (separate mode) consolidating each expert with its Fisher holds the Fisher merge."""
    import cl_optim

    _, experts = _experts(dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
    names = [n for n, _ in net.named_parameters()]
    gen = torch.Generator().manual_seed(4)
    fishers = [{n: torch.rand(e[n].shape, generator=gen) + 0.01 for n in names} for e in experts]
    ewc = cl_optim.EWC(net, lam=1.0, mode="separate")
    for e, f in zip(experts, fishers):
        net.load_state_dict(e)
        ewc.consolidate({p: f[n] for n, p in net.named_parameters()})
    merged = fisher_merge(experts, fishers)
    params = list(net.parameters())
    _, anchors, _ = ewc.step_terms(params)
    for n, anchor in zip(names, anchors):
        torch.testing.assert_close(merged[n], anchor, rtol=1e-6, atol=1e-6)


def test_bad_inputs_are_refused_with_their_names():
    base, experts = _experts(k=2)
    with pytest.raises(ValueError, match=r"experts\[1\]\['0.weight'\]"):
        task_arithmetic(base, [experts[0], {**experts[1], "0.weight": torch.zeros(2)}])
    with pytest.raises(ValueError, match=r"experts\[0\] does not have the keys"):
        ties(base, [{k: v for k, v in experts[0].items() if k != "2.bias"}])
    with pytest.raises(ValueError, match=r"scale has 1 values for 2 experts"):
        task_arithmetic(base, experts, [0.5])
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        ties(base, experts, density=0.0)
    with pytest.raises(ValueError, match="at least one expert"):
        task_arithmetic(base, [])
    with pytest.raises(ValueError, match=r"2 Fisher dicts for 1 experts"):
        fisher_merge(experts[:1], [{}, {}])
    with pytest.raises(ValueError, match=r"fishers\[0\]\['0.weight'\] has negative"):
        fisher_merge(experts, [{"0.weight": -torch.ones(5, 6)}, {}])
    with pytest.raises(ValueError, match=r"fishers\[1\]\['nope'\] names no floating entry"):
        fisher_merge(experts, [{}, {"nope": torch.ones(1)}])
    with pytest.raises(ValueError, match="weights must be non-negative"):
        fisher_merge(experts, [{}, {}], weights=[0.0, 0.0])
    with pytest.raises(TypeError, match="base must be a state_dict"):
        task_arithmetic([1, 2], experts)


@pytest.mark.parametrize("name", ["arithmetic", "ties", "fisher", "learned", "align"])
def test_the_docstring_examples_run(name):
    import doctest
    import importlib

    module = importlib.import_module(f"cl_optim.merge.{name}")
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def _tiny_task(seed=0, k=2):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    base = {key: v.detach().clone() for key, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    experts = [
        {key: v + 0.3 * torch.randn(v.shape, generator=gen) for key, v in base.items()} for _ in range(k)
    ]
    inputs = [[torch.randn(16, 4, generator=gen)] for _ in range(k)]
    return net, base, experts, inputs


def _objective(net, base, experts, inputs, lam, temperature=2.0):
    """The learned-merge loss written directly: theta0 + sum_k lam_k (theta_k - theta0), then the
    KL from each expert's softened outputs on its task's inputs."""
    from torch.func import functional_call

    merged = {key: base[key] + sum(lam[k] * (experts[k][key] - base[key]) for k in range(len(experts)))
              for key in base}  # fmt: skip
    loss = 0.0
    for t, (x,) in enumerate(inputs):
        target = torch.log_softmax(functional_call(net, experts[t], (x,)) / temperature, -1)
        mine = torch.log_softmax(functional_call(net, merged, (x,)) / temperature, -1)
        loss = loss + (target.exp() * (target - mine)).sum(-1).mean()
    return loss


def test_learn_merge_takes_sam_steps_at_the_perturbed_merge():
    """One step with an SGD base against the rule written out: g1 at lambda0, e = rho g1/||g1||,
    g2 at lambda0 + e (the merge rebuilt there), lambda1 = lambda0 - lr g2. The cached merge of the
    SAMerging code would give lambda0 - lr g1."""
    from cl_optim.merge import learn_merge

    net, base, experts, inputs = _tiny_task()
    lr, rho = 0.5, 0.2
    _, got = learn_merge(net, base, experts, inputs, granularity="task", steps=1, lr=lr, rho=rho,
                         base_optimizer=torch.optim.SGD, init=0.3)  # fmt: skip
    lam0 = torch.full((2,), 0.3, requires_grad=True)
    (g1,) = torch.autograd.grad(_objective(net, base, experts, inputs, lam0), lam0)
    lam_adv = (lam0 + rho * g1 / g1.norm()).detach().requires_grad_(True)
    (g2,) = torch.autograd.grad(_objective(net, base, experts, inputs, lam_adv), lam_adv)
    torch.testing.assert_close(got, (lam0 - lr * g2).detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, (lam0 - lr * g1).detach(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_learn_merge_lowers_the_objective_and_returns_its_merge(granularity):
    from cl_optim.merge import learn_merge

    net, base, experts, inputs = _tiny_task(seed=3)
    before = _snapshot(base, *experts)
    own = {k: v.clone() for k, v in net.state_dict().items()}
    merged, lam = learn_merge(net, base, experts, inputs, granularity=granularity, steps=60, lr=0.05)
    assert lam.shape == ((2,) if granularity == "task" else (2, 4))
    start = float(_objective(net, base, experts, inputs, torch.full((2,), 0.3)))
    if granularity == "task":
        end = float(_objective(net, base, experts, inputs, lam))
        want = task_arithmetic(base, experts, lam.tolist())  # the returned merge is theta(lambda)
        _assert_close(merged, want, rtol=1e-5, atol=1e-6)
        # two conflicting experts: the best task-wise pair is close to the start here, so the test
        # is that it is found (a grid over [0, 1]^2), not a large drop
        grid = [i / 10 for i in range(11)]
        best = min(
            float(_objective(net, base, experts, inputs, torch.tensor([a, b]))) for a in grid for b in grid
        )
        assert end <= best + 1e-4 and end < start
    else:
        from torch.func import functional_call

        end = 0.0
        for t, (x,) in enumerate(inputs):
            target = torch.log_softmax(functional_call(net, experts[t], (x,)) / 2.0, -1)
            mine = torch.log_softmax(functional_call(net, merged, (x,)) / 2.0, -1)
            end += float((target.exp() * (target - mine)).sum(-1).mean())
    if granularity == "layer":  # a coefficient per expert and entry: much more freedom
        assert end < 0.9 * start
    _assert_same([base, *experts], before)
    assert all(torch.equal(v, own[k]) for k, v in net.state_dict().items())  # the model is untouched


def test_learn_merge_refuses_bad_inputs():
    from cl_optim.merge import learn_merge

    net, base, experts, inputs = _tiny_task()
    with pytest.raises(ValueError, match="granularity"):
        learn_merge(net, base, experts, inputs, granularity="row")
    with pytest.raises(ValueError, match="non-empty list of batches for each of the 2 experts"):
        learn_merge(net, base, experts, inputs[:1])
    with pytest.raises(ValueError, match="not a state_dict of model"):
        learn_merge(torch.nn.Linear(4, 3), base, experts, inputs)


def test_learn_merge_with_rho_zero_is_the_base_optimizer_alone():
    """AdaMerging: one SGD step is lambda0 - lr g at lambda0."""
    from cl_optim.merge import learn_merge

    net, base, experts, inputs = _tiny_task()
    _, got = learn_merge(net, base, experts, inputs, granularity="task", steps=1, lr=0.5, rho=0.0,
                         base_optimizer=torch.optim.SGD)  # fmt: skip
    lam0 = torch.full((2,), 0.3, requires_grad=True)
    (g,) = torch.autograd.grad(_objective(net, base, experts, inputs, lam0), lam0)
    torch.testing.assert_close(got, (lam0 - 0.5 * g).detach(), rtol=1e-5, atol=1e-6)
