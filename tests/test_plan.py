"""Bucket plans kept between steps (cl_optim/_plan.py): the same numbers as planning every step,
and every input that a reused plan leaves to the ops still refused by name, with nothing changed.

The reference for each run is the same run with plans that are never reused (each step planned
and checked parameter by parameter, as before the plans existed).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_op_checks import AVAILABLE

import cl_optim
import cl_optim._sam_ascent as sam_ascent
import cl_optim.sam as sam_module
from cl_optim._plan import Bucket, BucketPlans
from cl_optim._sam_passes import kept_buffers

BACKENDS = [b for b in AVAILABLE if b != "triton"]


def _params(n: int, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3 + i % 4, 2, generator=g)) for i in range(n)]


def _grads(params, step: int, skip_every: int = 0) -> None:
    """A gradient per parameter, a fixed function of the step; with ``skip_every``, every
    ``skip_every``-th parameter has none, another set each pass (the graded set changes)."""
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        if skip_every and (i + step) % skip_every == 0:
            p.grad = None
        else:
            p.grad = torch.randn(p.shape, generator=g)


def _sam_run(backend: str, base, groups: int, skip_every: int, steps: int = 5):
    params = _params(12)
    param_groups = [{"params": params[i::groups]} for i in range(groups)]
    if groups > 1:
        param_groups[1]["rho"] = 0.1
    opt = cl_optim.SAM(param_groups, base, rho=0.05, backend=backend, lr=0.1, **_BASE_KWARGS[base])
    for step in range(steps):
        _grads(params, 2 * step, skip_every)
        opt.first_step(zero_grad=True)
        _grads(params, 2 * step + 1, skip_every)
        opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in params], opt


_BASE_KWARGS = {cl_optim.AdamW: dict(weight_decay=0.01), cl_optim.SGD: dict(momentum=0.9)}


def _state_tensors(opt, params_count):
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in sorted(opt.state.get(p, {}).items()):
                out.append((key, value.clone()))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base", [cl_optim.AdamW, cl_optim.SGD], ids=["adamw", "sgd"])
@pytest.mark.parametrize("groups,skip_every", [(1, 0), (1, 3), (2, 0)])
def test_reused_plans_give_the_numbers_of_planning_every_step(backend, base, groups, skip_every, monkeypatch):
    """One group (the trusted single call), gradients missing on some passes (a new plan each
    time the set changes), two groups (reused plans, checked in Python): no op refuses a call,
    and parameters and every state tensor equal bit for bit to the same run planned every step."""
    refusals = []  # a trusted call refused (the plans dropped): none in a valid run
    original_clear = BucketPlans.clear
    monkeypatch.setattr(BucketPlans, "clear", lambda self: (refusals.append(1), original_clear(self)))
    params, opt = _sam_run(backend, base, groups, skip_every)
    assert not refusals
    monkeypatch.setattr(BucketPlans, "clear", original_clear)
    state = _state_tensors(opt, len(params))
    with monkeypatch.context() as patch:
        patch.setattr(BucketPlans, "group_buckets", _never(BucketPlans.group_buckets))
        reference, reference_opt = _sam_run(backend, base, groups, skip_every)
    for p, r in zip(params, reference):
        assert torch.equal(p, r)
    for (key, value), (ref_key, ref_value) in zip(
        state, _state_tensors(reference_opt, len(params)), strict=True
    ):
        assert key == ref_key and torch.equal(value, ref_value), key


def test_a_single_group_step_leaves_the_gradient_checks_to_its_op(monkeypatch):
    """After the first step the plan is reused and one call makes each pass: SAM's and the base's
    per-parameter gradient checks no longer run (what the plans save), two groups still run them."""
    calls = []
    sam_check, base_check = sam_ascent.check_sam_params, cl_optim._optimizer._check_params
    monkeypatch.setattr(sam_ascent, "check_sam_params", lambda ps: (calls.append("sam"), sam_check(ps)))
    monkeypatch.setattr(
        cl_optim._optimizer, "_check_params", lambda ps: (calls.append("base"), base_check(ps))
    )
    for groups, expected in ((1, ["sam", "base"]), (2, ["sam", "sam", "base", "base"] * 3)):
        calls.clear()
        _sam_run("cpp" if "cpp" in BACKENDS else "foreach", cl_optim.AdamW, groups, 0, steps=4)
        first_step = ["sam"] * groups + ["base"] * groups
        assert calls[: len(first_step)] == first_step
        assert calls[len(first_step) :] == ([] if groups == 1 else expected), groups


def _trained_sam(backend: str, base=cl_optim.AdamW):
    layer = torch.nn.Linear(4, 3)
    opt = cl_optim.SAM(layer.parameters(), base, rho=0.05, lr=0.1, backend=backend, **_BASE_KWARGS[base])
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        layer(x).square().sum().backward()
        opt.first_step(zero_grad=True)
        layer(x).square().sum().backward()
        opt.second_step(zero_grad=True)
    return layer, opt, x


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_gradient_swapped_behind_a_reused_plan_is_refused_by_name(backend):
    """A gradient whose shape changed after backward (``.grad.data`` replaced): the reused plan did
    not look, the op refuses, and the step made again with the Python checks names it — weights,
    restore buffers and state untouched, on both passes and on a plain base step."""
    layer, opt, x = _trained_sam(backend)
    weight, state = layer.weight.detach().clone(), copy.deepcopy(opt.state[layer.weight])
    layer(x).square().sum().backward()
    layer.weight.grad.data = torch.randn(6, 2)
    with pytest.raises(RuntimeError, match=r"SAM: a gradient of shape \[6, 2\]"):
        opt.first_step()
    assert torch.equal(layer.weight.detach(), weight) and opt._run["pending"] is None
    layer.weight.grad = torch.randn(3, 4)
    opt.first_step()
    layer.weight.grad.data = torch.randn(6, 2)
    with pytest.raises(RuntimeError, match=r"gradient of shape \(6, 2\) for a parameter of shape \(3, 4\)"):
        opt.second_step()
    assert torch.equal(layer.weight.detach(), weight)  # put back, no update
    for key, value in opt.state[layer.weight].items():
        assert torch.equal(value, state[key]), key
    base = cl_optim.AdamW(layer.parameters(), backend=backend)
    for _ in range(2):
        layer.weight.grad, layer.bias.grad = torch.ones(3, 4), torch.ones(3)
        base.step()
    before = layer.weight.detach().clone()
    layer.weight.grad.data = torch.randn(12)
    with pytest.raises(RuntimeError, match=r"gradient of shape \(12,\)"):
        base.step()
    assert torch.equal(layer.weight.detach(), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_grown_layer_behind_a_reused_plan_gets_new_buffers(backend):
    """A head grown in place (same Parameter object, so the plan is reused) with its state padded:
    the kept restore buffers no longer fit, the op refuses, and the step made again gives the
    numbers of a run whose plans were never reused."""
    results = []
    for reuse in (True, False):
        torch.manual_seed(0)
        layer, opt, x = _trained_sam(backend)
        if not reuse:
            for plans in (opt._plans, opt.base_optimizer._plans):
                plans.group_buckets = _never(BucketPlans.group_buckets).__get__(plans)
        layer.weight.data = torch.cat([layer.weight.data, torch.zeros(2, 4)])
        layer.bias.data = torch.cat([layer.bias.data, torch.zeros(2)])
        opt.pad_state_(layer.weight)
        opt.pad_state_(layer.bias)
        for _ in range(2):
            layer(x).square().sum().backward()
            opt.first_step(zero_grad=True)
            layer(x).square().sum().backward()
            opt.second_step(zero_grad=True)
        results.append([t.detach().clone() for t in (layer.weight, layer.bias)])
    for reused, fresh in zip(*results):
        assert reused.shape[0] == 5 and torch.equal(reused, fresh)


def test_a_reused_plan_of_two_groups_still_names_a_sparse_gradient():
    """Several calls per pass: every gradient is checked in Python before the first call, so a
    refusal never comes half-way (the first group stepped, the second not)."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))
    opt = cl_optim.AdamW([{"params": [a]}, {"params": [b], "lr": 0.5}])
    for _ in range(2):
        a.grad, b.grad = torch.ones(3), torch.ones(4)
        opt.step()
    before = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = torch.ones(3), torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])


def test_kept_buffers_reuses_a_buckets_buffers_only_while_they_are_the_stores():
    params = [torch.zeros(3), torch.zeros(2)]
    bucket, store = Bucket(params, [0, 1], 2, sharded=False), {}
    first = kept_buffers(store, bucket, torch.device("cpu"), torch.float32)
    assert kept_buffers(store, bucket, torch.device("cpu"), torch.float32, trusted=True) is first
    store[id(params[1])] = torch.empty(2)  # another path replaced one (a grown, then shrunk, layer)
    again = kept_buffers(store, bucket, torch.device("cpu"), torch.float32, trusted=True)
    assert again is not first and again[1] is store[id(params[1])] and again[0] is first[0]
    # Untrusted calls always check each buffer against its parameter.
    params[0].data = torch.zeros(5)
    checked = kept_buffers(store, bucket, torch.device("cpu"), torch.float32)
    assert checked[0].shape == (5,) and store[id(params[0])] is checked[0]


def test_plans_follow_new_groups_loaded_state_and_copies():
    """add_param_group, load_state_dict (new group dicts) and a deepcopy each plan afresh."""
    layer, opt, x = _trained_sam("foreach")
    extra = torch.nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [extra]})
    layer(x).square().sum().backward()
    extra.grad = torch.ones(2)
    opt.step(lambda: (opt.zero_grad(), layer(x).square().sum().backward(), extra.square().sum().backward()))
    assert not torch.equal(extra.detach(), torch.ones(2))
    clone = copy.deepcopy(opt)
    assert clone._plans is not opt._plans and not clone._plans._plans
    state = opt.state_dict()
    opt.load_state_dict(state)
    layer.zero_grad()
    layer(x).square().sum().backward()
    extra.grad = torch.ones(2)
    opt.step(lambda: (opt.zero_grad(), layer(x).square().sum().backward(), extra.square().sum().backward()))
    assert all(torch.isfinite(p).all() for p in layer.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_perturb_selection_changed_in_place_is_followed(backend, monkeypatch):
    """SAM-ON's per-parameter ``perturb`` flags edited in place between steps: the plan keeps a
    copy of the selection, so the next ascent moves the new selection (as planned afresh)."""

    def run():
        params = _params(6)
        opt = cl_optim.SAM(params, cl_optim.SGD, rho=0.5, backend=backend, lr=0.1, momentum=0.9)
        flags = opt.param_groups[0]["perturb"] = [True, False] * 3
        moved = []
        for step in range(4):
            _grads(params, step)
            before = [p.detach().clone() for p in params]
            opt.first_step()
            moved.append([not torch.equal(p, b) for p, b in zip(params, before)])
            _grads(params, step + 10)
            opt.second_step(zero_grad=True)
            flags.reverse()  # in place: the same list object, other flags
        return moved, [p.detach().clone() for p in params]

    moved, params = run()
    assert moved[0] == [True, False] * 3 and moved[1] == [False, True] * 3
    monkeypatch.setattr(BucketPlans, "group_buckets", _never(BucketPlans.group_buckets))
    reference_moved, reference = run()
    assert moved == reference_moved and all(torch.equal(p, r) for p, r in zip(params, reference))


def _never(group_buckets):
    def fresh(self, *args, **kwargs):
        self.clear()
        return group_buckets(self, *args, **kwargs)

    return fresh


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_ewc_buffer_that_no_longer_fits_is_named_behind_a_reused_plan(backend):
    """A trusted step takes the EWC lists without the per-parameter shape check; a layer grown
    without ``ewc.pad_`` makes the op refuse, and the step made again names EWC's remedy."""
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    ewc = cl_optim.EWC(head, lam=1.0)
    ewc.consolidate({n: torch.ones_like(p) for n, p in head.named_parameters()})
    opt = cl_optim.AdamW(head.parameters(), lr=0.1, ewc=ewc, backend=backend)
    for _ in range(2):
        head(torch.randn(2, 4)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    head.weight.data = torch.cat([head.weight.data, torch.zeros(1, 4)])
    head.bias.data = torch.cat([head.bias.data, torch.zeros(1)])
    opt.pad_state_(head.weight)
    opt.pad_state_(head.bias)
    head(torch.randn(2, 4)).square().sum().backward()
    before = head.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"call ewc.pad_\('weight', new_param\)"):
        opt.step()
    assert torch.equal(head.weight.detach(), before)
    ewc.pad_("weight")
    ewc.pad_("bias")
    opt.step()  # runs once EWC has the grown shapes
    assert not torch.equal(head.weight.detach(), before)


@pytest.mark.parametrize("base", [cl_optim.SGD, cl_optim.AdamW], ids=["sgd", "adamw"])
def test_a_multi_group_step_checks_every_group_before_the_first_call(base):
    """One group re-planned (its graded set changed) and one reused: the step is several calls, so
    every gradient is checked first, and a sparse one in the reused group is named with the other
    group untouched (review finding: the reused group went unchecked, the first group was stepped)."""
    a1, a2, b = (torch.nn.Parameter(torch.ones(n)) for n in (3, 2, 4))
    opt = base([{"params": [a1, a2]}, {"params": [b]}], lr=0.1, **_BASE_KWARGS[base])
    a1.grad, a2.grad, b.grad = torch.ones(3), torch.ones(2), torch.ones(4)
    opt.step()
    before, state = a1.detach().clone(), copy.deepcopy(opt.state[a1])
    a1.grad, a2.grad, b.grad = torch.ones(3), None, torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(a1.detach(), before)
    for key, value in opt.state[a1].items():
        assert torch.equal(value, state[key]), key


def test_a_parameter_that_changed_dtype_gets_a_new_bucket_on_a_multi_call_step(monkeypatch):
    """``param.data = param.data.double()`` keeps the object (``module.double()`` does this): the kept
    bucket is of the old dtype; a step of several calls plans anew and equals a fresh plan."""

    def run():
        a, b1, b2 = (torch.nn.Parameter(torch.ones(n)) for n in (3, 4, 2))
        opt = cl_optim.SGD([{"params": [a]}, {"params": [b1, b2]}], lr=0.1, momentum=0.0)
        for p in (a, b1, b2):
            p.grad = torch.ones_like(p)
        opt.step()
        b2.data = b2.data.double()
        for p in (a, b1, b2):
            p.grad = torch.ones_like(p)
        opt.step()
        return [p.detach().clone() for p in (a, b1, b2)]

    reused = run()
    monkeypatch.setattr(BucketPlans, "group_buckets", _never(BucketPlans.group_buckets))
    for r, f in zip(reused, run(), strict=True):
        assert r.dtype == f.dtype and torch.equal(r, f)


def test_a_trusted_sam_on_ascent_still_names_a_gradient_it_does_not_move():
    """SAM-ON: the one bucket holds the selected parameters only, so the pass is not trusted and
    the unselected parameter's sparse gradient is named before anything moves (review finding)."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = cl_optim.SAM([a, b], cl_optim.SGD, rho=0.05, lr=0.1)
    opt.param_groups[0]["perturb"] = (True, False)  # a tuple: kept as a list, the plan reused
    for _ in range(2):
        a.grad, b.grad = torch.ones(3), torch.ones(3)
        opt.first_step()
        a.grad, b.grad = torch.ones(3), torch.ones(3)
        opt.second_step()
    a.grad, b.grad = torch.ones(3), torch.ones(3).to_sparse()
    before = a.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.first_step()
    assert torch.equal(a.detach(), before) and opt._run["pending"] is None


def test_only_an_input_refusal_is_made_again(monkeypatch):
    """A failure that may come after a write (here an update that wrote, then raised) is raised as
    it is, never retried: the update is not applied twice (review finding)."""
    import cl_optim.adamw as adamw_module

    original, calls = adamw_module.adamw_step_, []

    def writes_then_fails(*args, **kwargs):
        calls.append(1)
        original(*args, **kwargs)
        if len(calls) == 3:
            raise RuntimeError("something after the write")

    monkeypatch.setattr(adamw_module, "adamw_step_", writes_then_fails)
    monkeypatch.setattr(adamw_module, "held", lambda *args: None)  # the list call (held: below)
    p = torch.nn.Parameter(torch.ones(3))
    opt = cl_optim.AdamW([p], lr=0.1)
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="after the write"):
        opt.step()
    assert len(calls) == 3 and float(opt.state[p]["step"]) == 3.0


def test_only_an_input_refusal_is_made_again_held():
    """The same through the lists held in C++ (``_held.py``, the default trusted CPU step): a
    failure after the held call wrote is raised as it is, and the step is not made twice."""
    from cl_optim._held import Held

    p = torch.nn.Parameter(torch.ones(3))
    opt = cl_optim.AdamW([p], lr=0.1, backend="cpp")
    for _ in range(2):
        p.grad = torch.ones(3)
        opt.step()
    (held,) = [
        b.buffers[("held", "adamw_step_")] for plan in opt._plans._plans.values() for _, b in plan.buckets
    ]
    assert isinstance(held, Held)

    class WritesThenFails:
        def __init__(self, calls):
            self.calls, self.count = calls, 0

        def __getattr__(self, name):
            return getattr(self.calls, name)

        def adamw_step(self, *args):
            self.count += 1
            self.calls.adamw_step(*args)
            raise RuntimeError("something after the write")

    held.calls = proxy = WritesThenFails(held.calls)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="after the write"):
        opt.step()
    assert proxy.count == 1 and float(opt.state[p]["step"]) == 3.0


def test_a_plan_is_used_again_for_the_same_parameter_objects_only():
    """The plan's check is by identity: a new list of the same tensors reuses it; a list in which
    one tensor is another object (even one equal in value) plans anew."""
    params = _params(4)
    _grads(params, 0)
    plans, group = BucketPlans(), {"params": params}
    first, reused, _ = plans.group_buckets(0, group, lambda ps: None)
    assert not reused
    group["params"] = list(params)  # another list, the same objects
    again, reused, grads = plans.group_buckets(0, group, lambda ps: None)
    assert reused and again is first and all(g is p.grad for g, p in zip(grads, params))
    replacement = torch.nn.Parameter(params[2].detach().clone())
    replacement.grad = params[2].grad.clone()
    group["params"] = params[:2] + [replacement] + params[3:]
    anew, reused, _ = plans.group_buckets(0, group, lambda ps: None)
    assert not reused and any(p is replacement for _, bucket in anew for p in bucket)


def test_the_restore_reads_the_save_buffers_the_ascent_wrote():
    """second_step restores from the list the ascent filled (no lookup per parameter) only while
    the pending weights are the ones it moved into SAM's own store; otherwise one lookup each.
    Both give each parameter its own buffer, holding its weights from before the ascent."""
    params = _params(6)
    opt = sam_module.SAM(params, cl_optim.AdamW, rho=0.5, lr=0.1, backend="cpp")
    for step in range(3):
        _grads(params, step)
        before = [p.detach().clone() for p in params]
        opt.first_step()
        pending = opt._run["pending"]
        store, moved, saved = opt._run["ascent_saves"]
        assert store is opt._saved and moved is pending
        listed = opt._pending_saves()
        assert listed is saved
        assert all(s is opt._saved[id(p)] for s, p in zip(listed, pending))
        assert all(torch.equal(s, b) for s, b in zip(listed, before))
        opt._run["ascent_saves"] = ({}, pending, saved[::-1])  # another store's: not used
        looked_up = opt._pending_saves()
        assert looked_up is not saved and all(s is opt._saved[id(p)] for s, p in zip(looked_up, pending))
        _grads(params, step + 10)
        opt.second_step()
    assert copy.deepcopy(opt)._run["ascent_saves"] is None  # the buffers are not part of a copy
