"""A recurrent layer on its analytic rule takes the rule's recurrence as its backward.

With a layer below it that needs its delta (an embedding), the estimate's backward would run
torch's fused RNN backward to get there and the rule would run the recurrence again; the cut
(cl_optim.fisher.recurrent.cut_recurrent) makes the rule's recurrence the backward, giving the
input's gradient too. Checked against the batch-size-1 loop of test_fisher_routes, against the
estimate without the cut, for the fused backward never running, and for the self-check seeing a
wrong cut.
"""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch
from test_fisher_routes import _assert_matches, _batches, _loop
from torch import nn

from cl_optim import fisher
from cl_optim.fisher import lstm_steps, recurrent


class Tokens(nn.Module):
    """Embedding, then an LSTM or GRU, then a head on the mean of the sequence (and, with
    ``finals``, on the last layer's final state too)."""

    def __init__(self, cell, finals=False, **options):
        super().__init__()
        self.tok = nn.Embedding(9, 5)
        self.rnn = cell(5, 4, **options)
        self.finals, self.batch_first = finals, options.get("batch_first", False)
        width = 4 * (2 if options.get("bidirectional") else 1)
        self.head = nn.Linear(width + (4 if finals else 0), 3)

    def forward(self, tokens):  # (B, T)
        h = self.tok(tokens if self.batch_first else tokens.t())
        out, state = self.rnn(h)
        pooled = out.mean(1 if self.batch_first else 0)
        if self.finals:
            last = (state[0] if isinstance(state, tuple) else state)[-1]
            pooled = torch.cat([pooled, last], 1)
        return self.head(pooled)


OPTIONS = [
    {},
    {"batch_first": True},
    {"num_layers": 2, "bidirectional": True},
    {"num_layers": 2, "batch_first": True, "bias": False},
]


def _no_cut(monkeypatch):
    monkeypatch.setattr(recurrent, "cut_recurrent", lambda module, args, kwargs, output: (output, None))


@pytest.mark.parametrize("finals", [False, True], ids=["sequence", "and_final_state"])
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_the_cut_gives_the_loops_numbers_and_those_without_it(monkeypatch, cell, options, finals):
    torch.manual_seed(3)
    model = Tokens(cell, finals, **options)
    data = _batches((6,), 3, tokens=9)
    backward = []
    through = recurrent._ThroughTheRule.backward
    monkeypatch.setattr(
        recurrent._ThroughTheRule,
        "backward",
        staticmethod(lambda ctx, *g: backward.append(1) or through(ctx, *g)),
    )
    got = fisher.estimate(model, data, estimator="exact", reuse_plan=False)
    assert got.meta["per_sample"]["rnn"].startswith("recurrent")
    assert got.meta["per_sample"]["tok"].startswith("embedding")
    assert backward  # the cut ran
    _assert_matches(got, _loop(model, data, "exact"))
    _no_cut(monkeypatch)
    uncut = fisher.estimate(model, data, estimator="exact", reuse_plan=False)
    for name in got:
        torch.testing.assert_close(got[name], uncut[name], rtol=1e-5, atol=1e-9)


def test_the_fused_rnn_backward_does_not_run(monkeypatch):
    """With the cut, torch's fused RNN backward runs only in the self-check's batch-size-1 loop
    (the reference), so its count does not grow with the batches; without it, it does."""
    torch.manual_seed(0)
    model = Tokens(nn.LSTM, num_layers=2)
    data = _batches((6,), 3, tokens=9)
    fisher.estimate(model, data, estimator="empirical")  # planned (uncut forwards) and kept

    def rnn_backwards(batches):
        with torch.profiler.profile() as prof:
            fisher.estimate(model, batches, estimator="empirical")
        return sum(  # torch's fused kernels, not the rule's own step op (cl_optim::lstm_backward_steps_)
            bool(re.search(r"rnn.*backward|lstm.*backward", e.name, re.I)) and "cl_optim" not in e.name
            for e in prof.events()
        )

    assert rnn_backwards(data) == rnn_backwards(data * 3)
    _no_cut(monkeypatch)
    assert rnn_backwards(data) < rnn_backwards(data * 3)  # the probe sees it where it runs


def test_initial_states_that_need_a_gradient_are_not_cut():
    class Started(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.start = nn.Embedding(9, 5), nn.Linear(5, 4)
            self.rnn, self.head = nn.GRU(5, 4, batch_first=True), nn.Linear(4, 3)

        def forward(self, tokens):
            h = self.tok(tokens)
            out, _ = self.rnn(h, torch.tanh(self.start(h.mean(1))).unsqueeze(0))
            return self.head(out.mean(1))

    torch.manual_seed(0)
    model = Started()
    data = _batches((6,), 3, tokens=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no demotion
        got = fisher.estimate(model, data, estimator="exact")
    assert got.meta["per_sample"]["rnn"].startswith("recurrent")
    _assert_matches(got, _loop(model, data, "exact"))


def test_the_self_check_sees_a_wrong_cut(monkeypatch):
    """A cut whose input gradient is off by a factor: the self-check runs the cut layers as the
    estimate does, so the embedding's squares disagree, it is moved down until it agrees, and the
    number is right."""
    through = recurrent._ThroughTheRule.backward

    def doubled(ctx, *grads):
        out = through(ctx, *grads)
        return (out[0], 2 * out[1], *out[2:])

    monkeypatch.setattr(recurrent._ThroughTheRule, "backward", staticmethod(doubled))
    torch.manual_seed(1)
    model = Tokens(nn.LSTM)
    data = _batches((6,), 3, tokens=9)
    with pytest.warns(UserWarning, match="`tok`"):
        got = fisher.estimate(model, data, estimator="exact", reuse_plan=False)
    assert "torch.func (model)" in got.meta["per_sample"]["tok"]
    _assert_matches(got, _loop(model, data, "exact"))


@pytest.mark.parametrize("layers,batch", [(3, 6), (3, 5), (2, 6)])
def test_given_states_of_as_many_rows_as_samples_keep_the_rule(layers, batch):
    """hx of shape (layers * directions, B, H) with layers * directions == B: the unused final
    states' layout was guessed on dim 0, which refused the rule and cut hx on dim 0 in the
    per-sample loop (a crash)."""

    class Given(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.head = nn.Embedding(9, 5), nn.Linear(8, 3)
            self.rnn = nn.LSTM(5, 4, num_layers=layers, bidirectional=True, batch_first=True)

        def forward(self, tokens):
            states = self.rnn.num_layers * 2
            h0 = torch.linspace(-1, 1, states * 4).view(states, 1, 4).expand(states, tokens.shape[0], 4)
            out, _ = self.rnn(self.tok(tokens), (h0.contiguous(), 0.5 * h0.contiguous()))
            return self.head(out.mean(1))

    torch.manual_seed(0)
    model = Given()
    data = _batches((5,), 3, sizes=(batch,), tokens=9)
    got = fisher.estimate(model, data, estimator="exact")
    assert got.meta["per_sample"]["rnn"].startswith("recurrent")
    _assert_matches(got, _loop(model, data, "exact"))


class TwoLSTMs(nn.Module):
    """Two LSTMs of the same shapes, one above the other: their kept buffers
    (cl_optim.fisher.workspace) share every key but the module's, and both cuts write theirs in
    one backward before either is squared."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(9, 4)
        self.low, self.high = nn.LSTM(4, 4), nn.LSTM(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens):
        h, _ = self.low(self.tok(tokens.t()))
        h, _ = self.high(h)
        return self.head(h.mean(0))


def test_two_recurrent_layers_of_the_same_shapes_keep_their_own_buffers():
    torch.manual_seed(4)
    model = TwoLSTMs()
    data = _batches((6,), 3, sizes=(6, 4, 6), tokens=9)  # the last batch takes the first's buffers again
    got = fisher.estimate(model, data, estimator="exact", reuse_plan=False)
    assert got.meta["per_sample"]["low"].startswith("recurrent")
    assert got.meta["per_sample"]["high"].startswith("recurrent")
    _assert_matches(got, _loop(model, data, "exact"))


def test_workspace_reuses_a_buffer_only_inside_kept_and_for_the_same_shape():
    from cl_optim.fisher import workspace

    like = torch.zeros(2, dtype=torch.float64)
    assert workspace.take(("a",), (3,), like) is not workspace.take(("a",), (3,), like)  # outside
    with workspace.kept():
        first = workspace.take(("a",), (3,), like)
        assert first.dtype == torch.float64 and first.shape == (3,)
        assert workspace.take(("a",), (3,), like) is first
        assert workspace.take(("b",), (3,), like) is not first  # another key
        other = workspace.take(("a",), (4,), like)  # another shape: a new one, kept from now on
        assert other.shape == (4,) and workspace.take(("a",), (4,), like) is other
        assert workspace.take(("a",), (4,), like.float()).dtype == torch.float32
    assert workspace.take(("a",), (4,), like) is not other  # freed with the estimate


@pytest.mark.parametrize("own_forward", [True, False], ids=["own_forward", "torchs_forward"])
@pytest.mark.parametrize("hooked", [False, True], ids=["bare", "with_a_user_hook"])
def test_a_cut_layer_runs_torchs_forward_without_a_graph(monkeypatch, hooked, own_forward):
    """The estimate's cut forwards run without a graph (it would never be used): the rule's own
    forward that keeps the gates (lstm_steps.py, where the cpp op runs) or else torch's fused
    kernel under no_grad; a layer with someone else's hook keeps torch's forward and its graph
    (the hook sees the outputs). The numbers are the loop's either way."""
    seen, own = [], []
    original = nn.LSTM.forward

    @functools.wraps(original)  # its signature: the rule binds input and hx by it
    def spy(self, *args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.LSTM, "forward", spy)
    keeping = recurrent.lstm_forward_keeping_gates

    def counted(*args, **kwargs):
        own.append(torch.is_grad_enabled())
        return keeping(*args, **kwargs)

    monkeypatch.setattr(recurrent, "lstm_forward_keeping_gates", counted)
    if not own_forward:
        monkeypatch.setattr(recurrent, "keeps_gates", lambda module, x: False)
    torch.manual_seed(3)
    model = Tokens(nn.LSTM)
    if hooked:
        model.rnn.register_forward_hook(lambda module, args, output: None)
    data = _batches((6,), 3, tokens=9)
    got = fisher.estimate(model, data, estimator="exact", reuse_plan=False)
    _assert_matches(got, _loop(model, data, "exact"))
    expected = 0 if hooked else 3  # the self-check's forward and the two batches'
    if own_forward and lstm_steps.backend_for(torch.zeros(1)) == "cpp":
        assert (len(own), seen.count(False)) == (expected, 0)
    else:
        assert (len(own), seen.count(False)) == (0, expected)
    assert "forward" not in vars(model.rnn)  # the capture's own forward is gone again


class Checkpointed(nn.Module):
    """The LSTM inside a non-reentrant activation checkpoint: its recomputation in the backward
    runs torch's forward with its graph, and the checkpoint matches what each pass saved."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.tok, self.rnn = nn.Embedding(9, 5), nn.LSTM(5, 4)
        self.proj, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def block(self, h):
        out, _ = self.rnn(h)
        return torch.tanh(self.proj(out))

    def forward(self, tokens):
        out = torch.utils.checkpoint.checkpoint(
            self.block, self.tok(tokens.t()), use_reentrant=self.reentrant
        )
        return self.head(out.mean(0))


@pytest.mark.parametrize("verify", [True, False])
def test_a_checkpointed_recurrent_layer_keeps_its_graph(verify):
    """Review of e9d58a4: the forward without a graph inside a non-reentrant checkpoint crashed
    the recomputation (CheckpointError: the saved tensors differ)."""
    torch.manual_seed(0)
    model = Checkpointed(reentrant=False)
    data = _batches((6,), 3, sizes=(5, 5), tokens=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fisher.estimate(model, data, estimator="exact", reuse_plan=False, verify=verify)
    _assert_matches(got, _loop(model, data, "exact"))
