"""The plan kept between estimates on one model (cl_optim.fisher.plans).

A reused plan must give the numbers a fresh plan gives, bit for bit, and must never be reused
where the model, its inputs or the path its forward takes changed, or where the plan rested on
the weights (a zero contribution when it was made). Every number is also held to the
batch-size-1 loop of test_fisher_routes.
"""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from test_fisher_routes import _assert_matches, _batches, _loop
from torch import nn

from cl_optim import fisher
from cl_optim.fisher import plans


def _estimate(model, data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fisher.estimate(model, data, estimator=kwargs.pop("estimator", "exact"), **kwargs)


def _assert_equal(a, b):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


class Sequence(nn.Module):
    """Embedding, attention, LSTM and per-token Linear layers: the routes that have layouts."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(7, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.rnn = nn.LSTM(8, 6, batch_first=True)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        h = self.tok(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = torch.tanh(self.mid(self.rnn(h)[0]))
        return self.head(h.mean(1))


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    return {
        "mlp": (mlp, _batches((4,), 3)),
        "cnn": (cnn, _batches((2, 6, 6), 3)),
        "sequence": (Sequence(), _batches((5,), 3, tokens=7)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "sequence"])
def test_a_kept_plan_gives_the_numbers_of_a_fresh_one(name):
    model, data = _models()[name]
    first = _estimate(model, data)
    again = _estimate(model, data)
    fresh = _estimate(model, data, reuse_plan=False)
    assert first.meta["plan"]["reused"] is False and first.meta["plan"]["seconds"] > 0
    assert again.meta["plan"] == {"seconds": 0.0, "reused": True}
    assert again.meta["verify"]["samples"] == 2 and again.meta["verify"]["seconds"] > 0  # checked again
    assert fresh.meta["plan"]["reused"] is False and fresh.meta["plan"]["seconds"] > 0
    assert again.meta["per_sample"] == first.meta["per_sample"]
    _assert_equal(again, first)
    _assert_equal(fresh, first)
    _assert_matches(again, _loop(model, data, "exact"))


def test_new_weights_reuse_the_plan_and_give_their_own_numbers():
    model, data = _models()["sequence"]
    _estimate(model, data)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    got = _estimate(model, data)
    assert got.meta["plan"]["reused"] is True
    _assert_matches(got, _loop(model, data, "exact"))


def _hooked(model):
    model[2].register_forward_hook(lambda m, i, o: o * 2)


def _frozen(model):
    model[0].bias.requires_grad_(False)


def _replaced(model):
    model[2] = nn.Linear(5, 3)


def _cast(model):
    model.double()


def _forward_set(model):
    layer = model[2]
    layer.forward = lambda x: nn.functional.linear(x, layer.weight, layer.bias) * 3


@pytest.mark.parametrize("change", [_hooked, _frozen, _replaced, _cast, _forward_set])
def test_a_changed_model_plans_afresh(change):
    model, data = _models()["mlp"]
    _estimate(model, data)
    change(model)
    if next(model.parameters()).dtype == torch.float64:
        data = [(x.double(), y) for x, y in data]
    got = _estimate(model, data)
    assert got.meta["plan"]["reused"] is False
    _assert_matches(got, _loop(model, data, "exact"))


def test_other_input_shapes_plan_afresh():
    model, data = _models()["sequence"]
    _estimate(model, data)
    longer = _batches((9,), 3, tokens=7)
    got = _estimate(model, longer)
    assert got.meta["plan"]["reused"] is False
    _assert_matches(got, _loop(model, longer, "exact"))
    assert _estimate(model, longer).meta["plan"]["reused"] is True


EXTRA = False


class GlobalPath(nn.Module):
    """The forward reads a global flag: no module attribute changes, only the graph does."""

    def __init__(self):
        super().__init__()
        self.trunk, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        out = self.head(h)
        if EXTRA:  # a second use of trunk's weight, outside its call
            out = out + (h @ self.trunk.weight)[:, :3]
        return out


def test_a_forward_that_takes_another_path_plans_afresh(monkeypatch):
    torch.manual_seed(0)
    model, data = GlobalPath(), _batches((4,), 3)
    _estimate(model, data)
    monkeypatch.setattr(__import__(__name__), "EXTRA", True)
    got = _estimate(model, data)
    assert got.meta["plan"]["reused"] is False
    assert "torch.func (model)" in got.meta["per_sample"]["trunk"]
    _assert_matches(got, _loop(model, data, "exact"))


class ZeroGate(nn.Module):
    """trunk's weight is used a second time through a gate that starts at zero: when the plan is
    made that use contributes nothing, so the numeric coverage check cannot see it."""

    def __init__(self):
        super().__init__()
        self.trunk, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.head(h) + self.gate * (h @ self.trunk.weight)[:, :3]


def test_a_plan_that_rested_on_a_zero_contribution_is_not_kept():
    torch.manual_seed(0)
    model, data = ZeroGate(), _batches((4,), 3)
    first = _estimate(model, data)
    assert first.meta["per_sample"]["trunk"] == "linear"  # right while the gate is zero
    _assert_matches(first, _loop(model, data, "exact"))
    with torch.no_grad():
        model.gate.fill_(1.0)
    got = _estimate(model, data)
    assert got.meta["plan"]["reused"] is False
    _assert_matches(got, _loop(model, data, "exact"))


def test_a_zero_initialised_adapter_is_probed_again():
    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up, self.head = nn.Linear(4, 2), nn.Linear(2, 4), nn.Linear(4, 3)
            nn.init.zeros_(self.up.weight)

        def forward(self, x):
            return self.head(x + self.up(torch.tanh(self.down(x))))

    torch.manual_seed(0)
    model, data = Adapter(), _batches((4,), 3)
    _estimate(model, data)
    nn.init.normal_(model.up.weight)
    got = _estimate(model, data)
    assert got.meta["plan"]["reused"] is False
    _assert_matches(got, _loop(model, data, "exact"))


def test_an_lstms_unused_final_states_do_not_stop_the_reuse():
    model, data = _models()["sequence"]
    _estimate(model, data)
    assert _estimate(model, data).meta["plan"]["reused"] is True


def test_only_a_checked_estimate_reuses_a_plan():
    """Reuse rests on the self-check running again: ``verify=False`` probes afresh every time; a
    plan it made serves a later checked estimate, which checks it."""
    model, data = _models()["mlp"]
    _estimate(model, data, verify=False)
    unchecked = _estimate(model, data, verify=False)
    assert unchecked.meta["plan"]["reused"] is False and unchecked.meta["verify"] is None
    checked = _estimate(model, data)
    assert checked.meta["plan"]["reused"] is True and checked.meta["verify"]["seconds"] > 0
    _assert_equal(checked, _estimate(model, data, reuse_plan=False))


def test_a_demotion_by_the_self_check_is_kept(monkeypatch):
    from test_fisher_routes import WrongRule, break_the_rule_of_wrong_rule_layers

    break_the_rule_of_wrong_rule_layers(monkeypatch)
    torch.manual_seed(0)
    model, data = nn.Sequential(WrongRule(4, 5), nn.Tanh(), nn.Linear(5, 3)), _batches((4,), 3)
    with pytest.warns(UserWarning, match="its per-sample squares differ"):
        _estimate_warning = fisher.estimate(model, data, estimator="exact")
    got = _estimate(model, data)
    assert got.meta["plan"]["reused"] is True
    assert got.meta["per_sample"]["0"] == _estimate_warning.meta["per_sample"]["0"]
    assert got.meta["per_sample"]["0"].startswith("torch.func (layer)")
    _assert_matches(got, _loop(model, data, "exact"))


def test_a_kept_plan_does_not_keep_its_model_alive():
    model, data = _models()["mlp"]
    _estimate(model, data)
    assert model in plans._KEPT
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_forget_drops_the_plan():
    model, data = _models()["mlp"]
    _estimate(model, data)
    plans.forget(model)
    assert _estimate(model, data).meta["plan"]["reused"] is False


class Positions(nn.Module):
    """Token and position embeddings; the positions come in as an input, shared ``(1, T)`` in
    one call and per sample ``(B, T)`` in the next."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(6, 4), nn.Linear(4, 3)

    def forward(self, tokens, positions):
        return self.head(torch.tanh(self.tok(tokens) + self.pos(positions)).mean(1))


def _positions_loop(model, data):
    """The batch-size-1 loop of the empirical Fisher for ``Positions`` (two inputs)."""
    params = dict(model.named_parameters())
    totals = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    seen = 0
    for (tokens, positions), y in data:
        for i in range(y.shape[0]):
            pos = positions if positions.shape[0] == 1 else positions[i : i + 1]
            logp = torch.log_softmax(model(tokens[i : i + 1], pos).double()[0], 0)
            grads = torch.autograd.grad(logp[y[i]], list(params.values()))
            for name, g in zip(params, grads):
                totals[name] += g.double() ** 2
            seen += 1
    return {n: (t / seen).float() for n, t in totals.items()}


def test_position_ids_that_become_per_sample_plan_afresh():
    torch.manual_seed(0)
    model, gen = Positions(), torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 7, (b, 5), generator=gen) for b in (6, 4)]
    labels = [torch.randint(0, 3, (b,), generator=gen) for b in (6, 4)]
    shared = [((t, torch.arange(5).unsqueeze(0)), y) for t, y in zip(tokens, labels)]
    own = [((t, torch.randint(0, 6, t.shape, generator=gen)), y) for t, y in zip(tokens, labels)]
    first = _estimate(model, shared, estimator="empirical")
    _assert_matches(first, _positions_loop(model, shared))
    got = _estimate(model, own, estimator="empirical")
    assert got.meta["plan"]["reused"] is False
    _assert_matches(got, _positions_loop(model, own))


def test_weights_tied_after_the_first_estimate_plan_afresh():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(5, 4), nn.Linear(4, 5, bias=False)

        def forward(self, tokens):
            return self.head(torch.tanh(self.emb(tokens).mean(1)))

    torch.manual_seed(0)
    model, data = Tied(), _batches((3,), 5, tokens=5)
    _estimate(model, data)
    model.head.weight = model.emb.weight
    got = _estimate(model, data)
    assert got.meta["plan"]["reused"] is False
    assert "torch.func (model)" in got.meta["per_sample"]["head"]
    _assert_matches(got, _loop(model, data, "exact"))


def _empirical_loop(model, data):
    """The batch-size-1 loop of the empirical Fisher for models with several inputs."""
    params = dict(model.named_parameters())
    totals = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    seen = 0
    for inputs, y in data:
        for i in range(y.shape[0]):
            one = [t[i : i + 1] if t.dim() and t.shape[0] == y.shape[0] else t for t in inputs]
            logp = torch.log_softmax(model(*one).double()[0], 0)
            grads = torch.autograd.grad(logp[y[i]], list(params.values()), allow_unused=True)
            for name, g in zip(params, grads):
                if g is not None:
                    totals[name] += g.double() ** 2
            seen += 1
    return {n: (t / seen).float() for n, t in totals.items()}


class Permuted(nn.Module):
    """Tokens flattened after a permutation read from an attribute: (0, 1, 2) gives each sample a
    block of rows, (1, 0, 2) interleaved rows. The graph has the same operations either way."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.order = (0, 1, 2)

    def forward(self, x):  # (B, T, 4)
        h = x.permute(self.order)
        y = torch.tanh(self.lin(h.reshape(-1, 4))).reshape(*h.shape[:2], 6).permute(self.order)
        return self.head(y.mean(1))


def test_an_argument_read_from_an_attribute_is_caught_by_the_check_again():
    torch.manual_seed(0)
    model, data = Permuted(), _batches((5, 4), 3)
    _estimate(model, data, estimator="empirical")
    model.order = (1, 0, 2)
    got = _estimate(model, data, estimator="empirical")
    assert got.meta["plan"]["reused"] is False  # the self-check moved lin: planned afresh
    assert "interleaved" in got.meta["per_sample"]["lin"]
    _assert_equal(got, _estimate(model, data, estimator="empirical", reuse_plan=False))
    _assert_matches(got, _loop(model, data))


def test_samples_that_start_to_interact_are_refused_on_reuse():
    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
            self.scale = nn.Parameter(torch.zeros(()))  # the batch-mean term starts at zero

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.head(h + self.scale * h.mean(0, keepdim=True))

    torch.manual_seed(0)
    model, data = Mixing(), _batches((4,), 3)
    _estimate(model, data)
    with torch.no_grad():
        model.scale.fill_(0.7)
    with pytest.raises(ValueError, match="samples interact in the forward"):
        _estimate(model, data)


def test_a_cut_recurrent_weight_used_outside_its_layer_is_not_reused():
    class Side(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.rnn, self.head = nn.Embedding(9, 5), nn.LSTM(5, 4), nn.Linear(4, 3)
            self.gate = nn.Linear(16, 3)
            nn.init.zeros_(self.gate.weight)  # the outside use contributes nothing at first
            nn.init.zeros_(self.gate.bias)

        def forward(self, tokens):
            h = self.tok(tokens.t())
            out, _ = self.rnn(h)
            side = nn.functional.linear(h.mean(0), self.rnn.weight_ih_l0)
            return self.head(out.mean(0)) + self.gate(side)

    torch.manual_seed(0)
    model, data = Side(), _batches((5,), 3, tokens=9)
    _estimate(model, data)
    assert model not in plans._KEPT
    with torch.no_grad():
        model.gate.weight.normal_()
    got = _estimate(model, data)
    assert got.meta["plan"]["reused"] is False
    _assert_matches(got, _loop(model, data, "exact"))


class LastStep(nn.Module):
    """A Linear over sequence-first tokens (T, B), read at each sample's last valid step."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, lengths):  # x (B, T, 4), T == B
        h = torch.tanh(self.lin(x.transpose(0, 1)))
        return self.head(h[lengths - 1, torch.arange(x.shape[0])])


def test_rows_that_fit_two_layouts_prove_neither():
    """Lengths 1..5 with T = B = 5 put the gradient on the diagonal of (T, B), which fits the
    samples on dim 0 as well as on dim 1: no layout is taken from it, within one estimate (the
    second batch's lengths read the other rows) or across estimates."""
    torch.manual_seed(0)
    model, gen = LastStep(), torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 5, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen)
    diagonal, last = [((x, torch.arange(1, 6)), y)], [((x, torch.full((5,), 5)), y)]
    both = _estimate(model, diagonal + last, estimator="empirical", reuse_plan=False)
    _assert_matches(both, _empirical_loop(model, diagonal + last))
    _estimate(model, diagonal, estimator="empirical")
    _assert_matches(_estimate(model, last, estimator="empirical"), _empirical_loop(model, last))


def test_a_layer_never_called_whose_weight_is_used_goes_to_the_model_level():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):  # b is never called: its weight is used through F.linear
            return nn.functional.linear(torch.tanh(self.a(x)), self.b.weight, self.b.bias)

    torch.manual_seed(0)
    model, data = Functional(), _batches((4,), 3)
    got = _estimate(model, data, reuse_plan=False)
    assert "torch.func (model)" in got.meta["per_sample"]["b"]
    _assert_matches(got, _loop(model, data, "exact"))
