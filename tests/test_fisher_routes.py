"""How cl_optim.fisher routes each layer, and the self-check that moves a wrong route.

Every number is checked against a batch-size-1 loop written here from the definition (the
independent zoo in test_fisher_zoo.py covers the layer catalogue); these tests pin the routes
(fast rules where the issue asks for them), the layouts the probe finds, the self-check, and the
plan kept between estimates on one model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_optim import fisher
from cl_optim.fisher.capture import Layout


def _loop(model, data, estimator="empirical"):
    """Batch-size-1 loop: mean over samples of squared per-sample gradients of log p."""
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    totals = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    seen = 0
    for x, y in data:
        for i in range(y.shape[0]):
            logp = torch.log_softmax(model(x[i : i + 1]).double()[0], 0)
            if estimator == "empirical":
                terms = [(1.0, logp[y[i]])]
            else:
                terms = [(float(logp[c].exp()), logp[c]) for c in range(logp.shape[0])]
            for weight, value in terms:
                grads = torch.autograd.grad(
                    value, [p for _, p in params], retain_graph=True, allow_unused=True
                )
                for (name, _), g in zip(params, grads):
                    if g is not None:
                        totals[name] += weight * g.double() ** 2
            seen += 1
    return {n: (t / seen).float() for n, t in totals.items()}


def _assert_matches(got, want, tol=1e-4):
    assert set(got) == set(want)
    for name in want:
        err = float((got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-30))
        assert err <= tol, f"{name}: relative error {err:.3g}"


def _batches(shape, classes, sizes=(6, 4), seed=0, tokens=None):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        x = (
            torch.randint(0, tokens, (b, *shape), generator=gen)
            if tokens
            else torch.randn(b, *shape, generator=gen)
        )
        out.append((x, torch.randint(0, classes, (b,), generator=gen)))
    return out


# ------------------------------------------------------------------------------------ layouts


def test_layouts_put_each_samples_rows_at_its_index():
    batch, rows = 3, 4
    t = torch.arange(batch * rows * 2).view(batch * rows, 2)  # blocks: sample n owns rows n*R..
    blocks = Layout("blocks").sample_major(t, batch)
    assert torch.equal(blocks[1], t[rows : 2 * rows])
    inter = Layout("interleaved").sample_major(t, batch)  # sample n owns rows n, n+B, ...
    assert torch.equal(inter[1], t[1::batch])
    seq = torch.randn(5, batch, 2)  # (T, B, D)
    assert torch.equal(Layout("axis", 1).sample_major(seq, batch)[2], seq[:, 2])
    c = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(Layout("blocks").per_row(c, (6, 2)).flatten(), torch.tensor([1.0, 1, 2, 2, 3, 3]))
    assert torch.equal(Layout("interleaved").per_row(c, (6, 2)).flatten(), torch.tensor([1.0, 2, 3, 1, 2, 3]))


class Interleaved(nn.Module):
    """Tokens flattened sequence-first, (T*B, D): the rows of a sample are every B-th."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):  # (B, T, 4)
        b, t, _ = x.shape
        h = torch.tanh(self.lin(x.transpose(0, 1).reshape(t * b, -1)))
        return self.head(h.view(t, b, -1).mean(0))


def test_interleaved_tokens_go_through_the_linear_rule():
    torch.manual_seed(0)
    model = Interleaved()
    data = _batches((3, 4), 3)
    got = fisher.estimate(model, data, estimator="exact")
    _assert_matches(got, _loop(model, data, "exact"))
    assert got.meta["per_sample"]["lin"] == "linear (samples as interleaved rows of dim 0)"


# ------------------------------------------------------------------------------------ fast rules


class Encoder(nn.Module):
    def __init__(self, batch_first=True, vocab=11, d=8, length=6, classes=4):
        super().__init__()
        self.batch_first = batch_first
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        self.block = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.1, batch_first=batch_first)
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))  # positions shared: (T, d)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.block(h)
        h = h.mean(1 if self.batch_first else 0)
        return self.head(self.norm(h))


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_transformer_block_runs_on_fast_rules_only(batch_first):
    torch.manual_seed(0)
    model = Encoder(batch_first)
    data = _batches((6,), 4, tokens=11)
    got = fisher.estimate(model, data, estimator="exact")
    _assert_matches(got, _loop(model, data, "exact"))
    routes = got.meta["per_sample"]
    where = "" if batch_first else " (samples on dim 1)"
    assert routes["block.self_attn"] == "attention" + where
    assert routes["block.linear1"] == "linear" + where and routes["block.norm2"] == "layernorm" + where
    assert routes["pos"] == "embedding (expanded: run once for the whole batch)"
    assert routes["norm"] == "rmsnorm" and routes["tok"] == "embedding"


class CrossAttention(nn.Module):
    """Separate key/value widths (q/k/v_proj_weight), a padding mask, and the attention weights
    used by the output (their gradient reaches the projections too)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=3, batch_first=True)
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, x):  # (B, 4, 8 + 5 + 3)
        q, k, v = x[..., :8], x[..., 8:13], x[..., 13:]
        mask = torch.zeros(x.shape[0], 4, dtype=torch.bool)
        mask[:, -1] = True  # the last key is padding
        out, weights = self.attn(q, k, v, key_padding_mask=mask, need_weights=True)
        return self.head(torch.cat([out.mean(1), weights.mean(1)], dim=1))


def test_attention_with_separate_projections_masks_and_used_weights():
    torch.manual_seed(0)
    model = CrossAttention()
    data = _batches((4, 16), 3)
    for estimator in ("empirical", "exact"):
        got = fisher.estimate(model, data, estimator=estimator)
        _assert_matches(got, _loop(model, data, estimator))
        assert got.meta["per_sample"]["attn"] == "attention"


def test_hugging_face_bert_runs_on_fast_rules_only():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 30, (b, 6), generator=gen), "labels": torch.randint(0, 3, (b,), generator=gen)}
        for b in (5, 3)
    ]  # fmt: skip
    got = fisher.estimate(model, batches, estimator="empirical")
    routes = got.meta["per_sample"]
    assert all(r.split(" (")[0] in ("linear", "embedding", "layernorm") for r in routes.values()), routes
    assert "expanded" in routes["bert.embeddings.position_embeddings"]


class Recurrent(nn.Module):
    """An RNN whose last output and last-layer final state (c_n for LSTM) both reach the head."""

    def __init__(self, kind, **options):
        super().__init__()
        self.rnn = kind(3, 4, **options)
        self.batch_first = options.get("batch_first", False)
        width = (options.get("proj_size") or 4) * (2 if options.get("bidirectional") else 1)
        self.head = nn.Linear(width + 4, 3)

    def forward(self, x):  # (B, T, 3)
        out, state = self.rnn(x if self.batch_first else x.transpose(0, 1))
        final = state[1] if isinstance(state, tuple) else state
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(torch.cat([last, final[-1][:, :4]], 1))


RECURRENT = [
    (nn.LSTM, {}),
    (nn.LSTM, {"batch_first": True}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    (nn.LSTM, {"num_layers": 2, "batch_first": True, "bidirectional": True, "bias": False}),
    (nn.LSTM, {"proj_size": 2, "num_layers": 2}),
    (nn.LSTM, {"num_layers": 3}),
    (nn.GRU, {}),
    (nn.GRU, {"num_layers": 2, "bidirectional": True, "batch_first": True}),
]


@pytest.mark.parametrize("kind,options", RECURRENT, ids=[f"{k.__name__}-{o}" for k, o in RECURRENT])
def test_recurrent_layers_take_the_unrolled_rule(kind, options):
    torch.manual_seed(0)
    model = Recurrent(kind, **options)
    data = [
        (torch.randn(6, 5, 3), torch.randint(0, 3, (6,))),
        (torch.randn(4, 5, 3), torch.randint(0, 3, (4,))),
    ]
    got = fisher.estimate(model, data, estimator="exact")
    _assert_matches(got, _loop(model, data, "exact"))
    assert got.meta["per_sample"]["rnn"].startswith("recurrent")


class RecurrentAllStates(nn.Module):
    """An LSTM or GRU from per-sample initial states whose output and final states (h_n, and
    c_n for an LSTM) of every layer and direction all reach the head."""

    def __init__(self, kind=nn.LSTM, **options):
        super().__init__()
        self.lstm = kind is nn.LSTM
        self.rnn = kind(3, 4, **options)
        self.batch_first = options.get("batch_first", False)
        states = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        self.start = nn.Linear(3, 8 * states)
        self.head = nn.Linear(4 * (2 if self.rnn.bidirectional else 1) + 8 * states, 3)

    def forward(self, x):  # (B, T, 3)
        b, states = x.shape[0], self.start.out_features // 8
        h0, c0 = torch.tanh(self.start(x.mean(1))).view(b, 2, states, 4).permute(1, 2, 0, 3)
        sequence = x if self.batch_first else x.transpose(0, 1)
        if self.lstm:
            out, (h_n, c_n) = self.rnn(sequence, (h0.contiguous(), c0.contiguous()))
        else:
            (out, h_n), c_n = self.rnn(sequence, h0.contiguous()), c0  # the GRU's second half unused
        last = out[:, -1] if self.batch_first else out[-1]
        finals = torch.cat([h_n, c_n]).transpose(0, 1).reshape(b, -1)

        return self.head(torch.cat([last, finals], 1))


class RecurrentWithState(nn.Module):
    """An LSTM started from per-sample initial states computed from the input."""

    def __init__(self, **options):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True, **options)
        self.states = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)
        self.start = nn.Linear(3, 8 * self.states)
        self.head = nn.Linear(4 * (2 if self.rnn.bidirectional else 1), 3)

    def forward(self, x):  # (B, T, 3)
        h0, c0 = torch.tanh(self.start(x.mean(1))).view(x.shape[0], 2, self.states, 4).permute(1, 2, 0, 3)
        out, _ = self.rnn(x, (h0.contiguous(), c0.contiguous()))
        return self.head(out.mean(1))


@pytest.mark.parametrize(
    "options",
    [{}, {"batch_first": True}, {"num_layers": 3}, {"num_layers": 2, "bidirectional": True, "bias": False}],
    ids=str,
)
@pytest.mark.parametrize("kind", ["lstm", "lstm_every_state_and_hx", "gru", "gru_every_state_and_hx"])
def test_backward_recurrence_matches_the_unrolled_rule(monkeypatch, options, kind):
    """The analytic LSTM and GRU paths (the backward recurrence written out) against the
    autograd-unrolled recurrence, on every parameter; and it is the path taken. ``..._and_hx``:
    per-sample initial states, and the final states of every layer and direction reach the loss."""
    from cl_optim.fisher import recurrent

    torch.manual_seed(2)
    cell = nn.GRU if kind.startswith("gru") else nn.LSTM
    model = RecurrentAllStates(cell, **options) if kind.endswith("hx") else Recurrent(cell, **options)
    data = [(torch.randn(7, 6, 3), torch.randint(0, 3, (7,)))]
    taken = []
    analytic = recurrent._analytic_squares_
    monkeypatch.setattr(recurrent, "_analytic_squares_", lambda *a: taken.append(1) or analytic(*a))
    got = fisher.estimate(model, data, estimator="exact", verify=False)
    calls = len(taken)
    assert calls == 3  # once per class of the exact Fisher
    monkeypatch.setattr(recurrent, "ANALYTIC", False)
    unrolled = fisher.estimate(model, data, estimator="exact", verify=False)
    assert len(taken) == calls
    for name in unrolled:
        torch.testing.assert_close(got[name], unrolled[name], rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("options", [{}, {"num_layers": 2, "bidirectional": True}], ids=str)
def test_lstm_from_per_sample_initial_states(options):
    """The recurrent rule with initial states computed per sample, against a batch-size-1 loop."""
    torch.manual_seed(1)
    model = RecurrentWithState(**options)
    data = [(torch.randn(5, 6, 3), torch.randint(0, 3, (5,)))]
    got = fisher.estimate(model, data, estimator="exact")
    assert got.meta["per_sample"]["rnn"].startswith("recurrent")
    _assert_matches(got, _loop(model, data, "exact"))


# ------------------------------------------------------------------------------------ self-check


class BatchCentred(nn.Module):
    """Centres the hidden layer with the batch mean, detached: the backward of each sample is its
    own (the probe sees nothing), the forward is not (a batch of one gives zeros)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.head(h - h.mean(0, keepdim=True).detach() + 0.5)


def test_the_self_check_refuses_a_model_whose_samples_interact_in_the_forward():
    """Without the check the number is wrong; with it, a clear refusal."""
    torch.manual_seed(0)
    model = BatchCentred()
    data = _batches((4,), 3)
    want = _loop(model, data)
    unchecked = fisher.estimate(model, data, estimator="empirical", verify=False)
    assert float((unchecked["lin.weight"] - want["lin.weight"]).norm()) > 0.1 * float(
        want["lin.weight"].norm()
    )
    # The same model: its plan was kept unchecked, so this estimate checks it.
    with pytest.raises(ValueError, match="samples interact in the forward"):
        fisher.estimate(model, data, estimator="empirical")


class WrongRule(nn.Linear):
    """A Linear whose rule is forced to be wrong (a bug in a rule, as the check must catch it)."""


def break_the_rule_of_wrong_rule_layers(monkeypatch) -> None:
    """Every ``WrongRule`` layer gets a rule that is wrong: the 2-D identity with x for x**2."""
    from cl_optim.fisher import rules

    original = rules.rule_for

    def broken(module):
        if isinstance(module, WrongRule):

            def apply(module, call, deltas, acc, cap, layout, batch):
                acc["weight"].addmm_(deltas[0].float().square().t(), call.args[0].float())
                acc["bias"].add_(deltas[0].float().square().sum(0))

            return rules.Rule("broken", apply, lambda *a: True)
        return original(module)

    monkeypatch.setattr(rules, "rule_for", broken)
    monkeypatch.setattr("cl_optim.fisher.engine.rule_for", broken)


def test_the_self_check_moves_a_layer_whose_rule_is_wrong(monkeypatch):
    break_the_rule_of_wrong_rule_layers(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(WrongRule(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = _batches((4,), 3)
    with pytest.warns(UserWarning, match=r"`0` \(WrongRule\): its per-sample squares differ") as record:
        got = fisher.estimate(model, data, estimator="exact")
    assert any(r.filename == __file__ for r in record)  # the warning points at the caller's line
    _assert_matches(got, _loop(model, data, "exact"))
    assert got.meta["per_sample"]["0"].startswith("torch.func (layer)")
    assert got.meta["per_sample"]["2"] == "linear"
    assert got.meta["verify"]["samples"] == 2 and got.meta["verify"]["seconds"] > 0


@pytest.mark.parametrize("wrong", [False, True])
def test_the_check_works_in_the_totals_only_while_they_are_empty(monkeypatch, wrong, recwarn):
    """The self-check works in the estimate's totals before the first batch (selfcheck.py), and
    leaves them zeroed; a batch of one sample before the first plan puts its squares there
    first, and they must survive the check (with a wrong rule the check also takes its slow
    path, which settles the layer in buffers of its own)."""
    break_the_rule_of_wrong_rule_layers(monkeypatch)
    torch.manual_seed(0)
    first = WrongRule(4, 5) if wrong else nn.Linear(4, 5)
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(5, 3))
    for sizes in ((1, 6, 4), (6, 4)):
        data = _batches((4,), 3, sizes=sizes)
        got = fisher.estimate(model, data, estimator="exact", reuse_plan=False)
        _assert_matches(got, _loop(model, data, "exact"))
        moved = got.meta["per_sample"]["0"].startswith("torch.func (layer)")
        assert moved == wrong and got.meta["per_sample"]["2"] == "linear"
    assert any("its per-sample squares differ" in str(w.message) for w in recwarn.list) == wrong
    # A kept plan's recheck works in the totals too; its numbers are a fresh plan's.
    data = _batches((4,), 3, sizes=(6, 4))
    kept = fisher.estimate(model, data, estimator="exact")
    assert kept.meta["plan"]["reused"]  # the routes as the check left them
    _assert_matches(kept, _loop(model, data, "exact"))


def test_verify_false_skips_the_check():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    got = fisher.estimate(model, _batches((4,), 3), estimator="exact", verify=False)
    assert got.meta["verify"] is None
    _assert_matches(got, _loop(model, _batches((4,), 3), "exact"))


# ------------------------------------------------------------------------------------ replanning


class Heads(nn.Module):
    """The head is chosen by a task id in the last input column: a head first runs in the second
    batch."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.heads = nn.ModuleList(nn.Linear(6, 2) for _ in range(3))
        self.extra = False

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        out = self.heads[int(x[0, -1])](h)
        if self.extra:  # a path that uses trunk's weight outside trunk's call
            out = out + (h @ self.trunk.weight)[:, :2]
        return out


def _tasks(data):
    """Batch k is task k: its id in the last column."""
    return [
        (torch.cat([x[:, :-1], torch.full((len(x), 1), float(k))], 1), y) for k, (x, y) in enumerate(data)
    ]


def test_a_layer_first_run_in_a_later_batch_is_planned_and_checked_then():
    torch.manual_seed(0)
    model = Heads()
    data = _tasks(_batches((4,), 2))
    got = fisher.estimate(model, data, estimator="exact")
    assert got.meta["per_sample"]["heads.1"] == "linear" and got.meta["per_sample"]["heads.2"] == "not called"
    _assert_matches(got, _loop(model, data, "exact"))


def test_every_estimate_plans_afresh_when_the_forward_changes_between_calls():
    torch.manual_seed(0)
    model = Heads()
    data = _tasks(_batches((4,), 2))
    fisher.estimate(model, data, estimator="exact")
    model.extra = True
    got = fisher.estimate(model, data, estimator="exact")
    _assert_matches(got, _loop(model, data, "exact"))
    assert "torch.func (model)" in got.meta["per_sample"]["trunk"]


# ------------------------------------------------------------------------------------ review cases


def test_weights_tied_by_module_assignment():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.mid = nn.Linear(4, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, tokens):
            return self.head(torch.tanh(self.mid(self.emb(tokens).mean(1))))

    torch.manual_seed(0)
    model = Tied()
    data = _batches((3,), 5, tokens=5)
    got = fisher.estimate(model, data, estimator="exact")
    _assert_matches(got, _loop(model, data, "exact"))
    assert got.meta["per_sample"]["mid"] == "linear"


def test_layers_called_with_keyword_inputs():
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.ln, self.b = nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(input=self.ln(input=torch.tanh(self.a(input=x))))

    torch.manual_seed(0)
    model = Keywords()
    data = _batches((4,), 3)
    got = fisher.estimate(model, data, estimator="exact")
    _assert_matches(got, _loop(model, data, "exact"))
    assert set(got.meta["per_sample"].values()) == {"linear", "layernorm"}


class SharedMask(nn.Module):
    """A layer without a rule that takes a shared (T, T) mask: in the last batch B == T."""

    class Mix(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d, d) / d**0.5)

        def forward(self, x, mask):
            return (x @ self.w @ x.transpose(1, 2) + mask).softmax(-1) @ x

    def __init__(self):
        super().__init__()
        self.inp, self.mix, self.head = nn.Linear(3, 4), self.Mix(4), nn.Linear(4, 3)

    def forward(self, x):
        t = x.shape[1]
        return self.head(self.mix(self.inp(x), torch.full((t, t), float("-inf")).triu(1)).mean(1))


def test_the_sample_axis_of_a_layers_inputs_is_planned_not_guessed_per_batch():
    torch.manual_seed(0)
    model = SharedMask()
    data = [
        (torch.randn(8, 5, 3), torch.randint(0, 3, (8,))),
        (torch.randn(5, 5, 3), torch.randint(0, 3, (5,))),
    ]
    got = fisher.estimate(model, data, estimator="exact")
    _assert_matches(got, _loop(model, data, "exact"))
    assert got.meta["per_sample"]["mix"] == "torch.func (layer)"


def test_a_gru_with_a_hidden_state_of_two_layers_and_a_batch_of_two():
    class GRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.h = nn.Linear(3, 4)
            self.rnn = nn.GRU(3, 4, num_layers=2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h0 = torch.tanh(self.h(x.mean(1))).unsqueeze(0).repeat(2, 1, 1)  # (layers, B, H)
            return self.head(self.rnn(x, h0)[0][:, -1])

    torch.manual_seed(0)
    model = GRUNet()
    data = [
        (torch.randn(6, 5, 3), torch.randint(0, 3, (6,))),
        (torch.randn(2, 5, 3), torch.randint(0, 3, (2,))),
    ]
    got = fisher.estimate(model, data, estimator="exact")
    _assert_matches(got, _loop(model, data, "exact"))
    assert got.meta["per_sample"]["rnn"] == "recurrent"


def test_a_zero_initialised_adapter_contributes_zeros_and_its_layout_is_not_trusted():
    """LoRA-style: ``up`` starts at zero, so no gradient reaches ``down``'s output when probed and
    its layout is a guess; the next estimate (after training moved ``up``) probes it again."""

    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.down, self.up, self.head = (
                nn.Linear(3, 4),
                nn.Linear(4, 2),
                nn.Linear(2, 4),
                nn.Linear(4, 3),
            )
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, x):  # (B, T, 3), tokens flattened sequence-first
            b, t, _ = x.shape
            h = self.inp(x).transpose(0, 1).reshape(t * b, -1)
            h = h + self.up(torch.tanh(self.down(h)))
            return self.head(h.view(t, b, -1).mean(0))

    torch.manual_seed(0)
    model = Adapter()
    data = _batches((3, 3), 3)
    got = fisher.estimate(model, data, estimator="exact")
    _assert_matches(
        {n: v for n, v in got.items() if not n.startswith("down")},
        {n: v for n, v in _loop(model, data, "exact").items() if not n.startswith("down")},
    )
    assert float(got["down.weight"].abs().max()) == 0.0
    nn.init.normal_(model.up.weight)
    got = fisher.estimate(model, data, estimator="exact")
    _assert_matches(got, _loop(model, data, "exact"))
    assert got.meta["per_sample"]["down"] == "linear (samples as interleaved rows of dim 0)"


def test_a_failure_part_way_through_torch_func_is_not_counted_twice():
    from torch._C._functorch import is_batchedtensor

    class Flaky(nn.Module):  # stands in for an out-of-memory error on a later chunk under vmap
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4) / 2)
            self.calls, self.fail_at = 0, None

        def forward(self, x):
            if is_batchedtensor(x) or torch._C._are_functorch_transforms_active():
                self.calls += 1
                if self.calls == self.fail_at:
                    raise RuntimeError("simulated out of memory")
            return torch.tanh(x @ self.w)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Flaky(), nn.Linear(4, 3))
    data = [(torch.randn(6, 4), torch.randint(0, 3, (6,)))]
    want = _loop(model, data, "exact")
    model[1].fail_at = 2
    with pytest.warns(UserWarning, match="torch.func failed"):
        got = fisher.estimate(model, data, estimator="exact", memory_cap=40, verify=False)
    _assert_matches(got, want)


def test_batchnorm_without_parameters_in_train_mode_is_refused_before_any_forward():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 3))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(RuntimeError, match="BatchNorm1d in train mode"):
        fisher.estimate(model, _batches((4,), 3), estimator="exact", eval_mode=False)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def test_a_bf16_model_keeps_its_fast_rules():
    """The probe's per-sample scales are powers of two: exact in bf16, so the rules are proven."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5))
    data = _batches((16,), 5)
    want = fisher.estimate(model, data, estimator="exact")
    low = fisher.estimate(model.bfloat16(), [(x.bfloat16(), y) for x, y in data], estimator="exact")
    assert set(low.meta["per_sample"].values()) == {"linear"}
    for name in want:
        assert float((low[name] - want[name]).norm() / want[name].norm()) < 0.05


def test_the_mc_labels_follow_the_documented_draw():
    """Labels drawn per batch, in data order, by torch.multinomial on the CPU softmax."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = _batches((4,), 3)
    got = fisher.estimate(
        model, data, estimator="mc", mc_samples=2, generator=torch.Generator().manual_seed(7)
    )
    gen = torch.Generator().manual_seed(7)
    drawn = []
    with torch.no_grad():
        for x, _ in data:
            labels = torch.multinomial(torch.softmax(model(x).float(), 1), 2, replacement=True, generator=gen)
            drawn += [(x, labels[:, m]) for m in range(2)]
    want = _loop(model, drawn)  # each draw a separate "sample" with weight 1/2 of a sample...
    _assert_matches(got, want)  # ... and the mean over 2N equals the mc mean over N samples x 2 draws


def test_a_conv_chunk_keeps_its_per_sample_gradients_within_the_memory_cap(monkeypatch):
    """The conv rule forms a chunk's per-sample weight gradients in one grouped convolution
    backward: the chunk's gradients and their squares stay within ``memory_cap``, every sample is
    in one chunk, and the estimate is the same at any cap."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 16 * 16, 2)
    )
    data = [(torch.randn(16, 3, 16, 16), torch.randint(2, (16,)))]
    whole = fisher.estimate(model, data, estimator="empirical", verify=False)
    seen = []
    backward = torch.ops.aten.convolution_backward

    def spy(*args):
        grads = backward(*args)
        seen.append(grads[1].numel() * 4)  # bytes of the chunk's per-sample gradients
        return grads

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", spy)
    grads_per_sample = 4 * 27 * 4
    cap = 5 * 2 * grads_per_sample  # room for 5 samples' gradients and their squares
    capped = fisher.estimate(model, data, estimator="empirical", memory_cap=cap, verify=False)
    assert seen and all(2 * chunk <= cap for chunk in seen)
    assert sum(seen) == 16 * grads_per_sample and max(seen) == 5 * grads_per_sample
    for name in whole:
        torch.testing.assert_close(capped[name], whole[name], rtol=1e-5, atol=1e-8)


class Delta(nn.Module):
    """``x * (base + delta)``: autograd hands one gradient tensor to both parameters."""

    def __init__(self, n):
        super().__init__()
        self.base = nn.Parameter(torch.randn(n))
        self.delta = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        return x * (self.base + self.delta)


class BiasBank(nn.Module):
    """``x + bank.sum(0)``: the bank's gradient is an expanded (stride-0) tensor."""

    def __init__(self, n):
        super().__init__()
        self.bank = nn.Parameter(torch.randn(3, n))

    def forward(self, x):
        return x + self.bank.sum(0)


@pytest.mark.parametrize("layer", [Delta, BiasBank])
def test_the_coverage_check_leaves_autograds_gradients_as_they_are(layer):
    """Review of d952195: the coverage check subtracted in place into autograd's gradients; one
    tensor shared by two parameters then moved the second to the model level, and an expanded
    one raised."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), layer(5), nn.Tanh(), nn.Linear(5, 3))
    data = _batches((4,), 3)
    got = fisher.estimate(model, data, estimator="empirical", reuse_plan=False)
    assert got.meta["per_sample"]["1"] == "torch.func (layer)"
    _assert_matches(got, _loop(model, data))
