"""An independent zoo of models for ``cl_optim.fisher.estimate`` against a batch-size-1 reference.

The reference below is written from the definitions, not from the library: the diagonal Fisher is
the MEAN over samples of per-sample squared gradients of log-likelihoods, each per-sample gradient
computed by running an fp64 copy of the model (eval mode) on that sample alone.

- empirical: F = 1/N sum_n (d log p(y_n|x_n)/d theta)^2 with the observed label y_n.
- exact:     F = 1/N sum_n sum_c p_n(c) (d log p(c|x_n)/d theta)^2.
- mc:        F = 1/(N M) sum_n sum_m (d log p(y_nm|x_n)/d theta)^2, the labels y_nm drawn batch by
             batch in data order as ``torch.multinomial(softmax(logits.float(), 1).cpu(), M,
             replacement=True, generator=g)`` on each (cut) batch's fp32 eval-mode logits.

Accepted outcome: the reference number within a relative error of 1e-4 per parameter (exact zeros
must be zero). ``check_case`` can accept an exception whose message names the offending layer where
a case says so (none does today). Never a wrong number.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from cl_optim.fisher import estimate

RTOL = 1e-4
ZERO_ATOL = 1e-8
# Absolute floor, as a fraction of the largest per-parameter Fisher norm of the model: a parameter
# whose Fisher is zero in exact arithmetic but not structurally (BERT's key bias: it shifts every
# score of a query by the same amount, which softmax ignores) comes out as rounding noise, ~1e-46
# in the fp64 reference and 0 or fp32 noise (squared: ~1e-14 at most) from the library, so its
# relative error is meaningless; 1e-11 leaves a wide margin above that noise.
FLOOR = 1e-11
MC_SAMPLES = 2
MC_SEED = 1234
SIZES = (5, 7, 3)  # uneven batches


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------


def _split(batch):
    """(kind, inputs, targets) of a batch as the API documents it."""
    if isinstance(batch, dict):
        return "kw", {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    inputs, targets = batch
    if isinstance(inputs, torch.Tensor):
        return "one", inputs, targets
    if isinstance(inputs, (tuple, list)):
        return "pos", list(inputs), targets
    if isinstance(inputs, dict):
        return "kw", dict(inputs), targets
    raise TypeError(type(inputs))


def _take(obj, sl, batch):
    """Slice every tensor whose dim 0 is the batch; leave the others (e.g. (1, T) position ids)."""
    if isinstance(obj, torch.Tensor):
        return obj[sl] if obj.dim() >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_take(o, sl, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _take(v, sl, batch) for k, v in obj.items()}
    return obj


def _to64(obj):
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to64(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to64(v) for k, v in obj.items()}
    return obj


def _logits(model, kind, inputs):
    if kind == "one":
        out = model(inputs)
    elif kind == "pos":
        out = model(*inputs)
    else:
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def reference_fisher(model, data, estimator, n_samples=None, mc_samples=MC_SAMPLES, seed=MC_SEED):
    """Batch-size-1 fp64 reference. Returns ({name: fp64 tensor}, number of samples)."""
    m32 = copy.deepcopy(model).float().eval()  # only to draw the mc labels like the library does
    m64 = copy.deepcopy(model).double().eval()
    named = [(n, p) for n, p in m64.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    acc = {n: torch.zeros_like(p) for n, p in named}
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for batch in data:
        if n_samples is not None and total >= n_samples:
            break
        kind, inputs, targets = _split(batch)
        size = targets.shape[0]
        take = size if n_samples is None else min(size, n_samples - total)
        inputs = _take(inputs, slice(0, take), size)
        targets = targets[:take]
        if estimator == "mc":
            with torch.no_grad():
                logits = _logits(m32, kind, inputs)
            labels = torch.multinomial(
                torch.softmax(logits.float(), 1).cpu(), mc_samples, replacement=True, generator=gen
            )
        for i in range(take):
            xi = _to64(_take(inputs, slice(i, i + 1), take))
            logp = torch.log_softmax(_logits(m64, kind, xi), -1)
            assert logp.shape[0] == 1
            logp = logp[0]
            if estimator == "empirical":
                terms = [(1.0, int(targets[i]))]
            elif estimator == "exact":
                prob = logp.detach().exp()
                terms = [(prob[c], c) for c in range(logp.shape[0])]
            elif estimator == "mc":
                terms = [(1.0 / mc_samples, int(c)) for c in labels[i]]
            else:
                raise ValueError(estimator)
            for weight, c in terms:
                grads = torch.autograd.grad(logp[c], params, retain_graph=True, allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        acc[n] += weight * g.double() ** 2
        total += take
    return {n: a / total for n, a in acc.items()}, total


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


def _snapshot(model):
    state = {n: (t.detach().clone(), t.dtype) for n, t in model.state_dict(keep_vars=True).items()}
    flags = {n: m.training for n, m in model.named_modules()}
    grads_req = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, flags, grads_req


def _assert_untouched(model, snap):
    state, flags, grads_req = snap
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(state)
    for n, (t, dtype) in state.items():
        assert now[n].dtype == dtype, f"{n}: dtype changed"
        assert torch.equal(now[n].detach(), t), f"{n}: parameter/buffer changed by estimate"
    assert {n: m.training for n, m in model.named_modules()} == flags, "train/eval flags not restored"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_req


def check_case(model, data, estimator, *, n_samples=None, allow_error=(), memory_cap=None):
    """Compare estimate() with the reference. ``allow_error``: names (class or attribute) of layers
    an exception may name instead of returning the number."""
    # Mixed flags: everything in train mode (dropout on, BatchNorm in train mode) except the last
    # child; estimate must compute in eval mode and restore exactly this.
    model.train()
    children = list(model.children())
    if children:
        children[-1].eval()
    want, total = reference_fisher(model, data, estimator, n_samples=n_samples)
    snap = _snapshot(model)
    kwargs = {}
    if n_samples is not None:
        kwargs["n_samples"] = n_samples
    if memory_cap is not None:
        kwargs["memory_cap"] = memory_cap
    if estimator == "mc":
        kwargs["mc_samples"] = MC_SAMPLES
        kwargs["generator"] = torch.Generator().manual_seed(MC_SEED)
    try:
        got = estimate(model, data, estimator, **kwargs)
    except Exception as exc:  # noqa: BLE001 - judged below
        _assert_untouched(model, snap)
        if allow_error and any(name in str(exc) for name in allow_error):
            warnings.warn(f"accepted error ({estimator}): {type(exc).__name__}: {exc}", stacklevel=2)
            return None
        raise
    _assert_untouched(model, snap)
    assert got.meta["samples"] == total
    assert set(got) == set(want), f"keys {sorted(got)} != {sorted(want)}"
    errors = {}
    floor = FLOOR * max(w.norm().item() for w in want.values())
    for n, w in want.items():
        g = got[n]
        assert g.dtype == torch.float32, f"{n}: {g.dtype}"
        assert g.shape == w.shape, f"{n}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        g = g.detach().double()
        assert torch.isfinite(g).all(), f"{n}: non-finite"
        zeros = w == 0
        if zeros.any():
            worst = g[zeros].abs().max().item()
            assert worst <= ZERO_ATOL, f"{n}: {worst:.3g} where the reference is exactly zero"
        wn, diff = w.norm().item(), (g - w).norm().item()
        if wn > 0 and diff > floor:
            errors[n] = diff / wn
    bad = {n: e for n, e in errors.items() if not e <= RTOL}
    assert not bad, "relative errors above {:g}: {}".format(
        RTOL,
        ", ".join(f"{n}={e:.3g}" for n, e in sorted(bad.items(), key=lambda kv: -kv[1])),
    )
    return got


# --------------------------------------------------------------------------------------------
# The zoo
# --------------------------------------------------------------------------------------------

V, D, C3, C5 = 11, 8, 3, 5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def float_batches(shape, classes, seed, sizes=SIZES):
    g = _gen(seed)
    return [
        (torch.randn(b, *shape, generator=g), torch.randint(0, classes, (b,), generator=g)) for b in sizes
    ]


def token_batches(t, vocab, classes, seed, sizes=SIZES):
    g = _gen(seed)
    return [
        (torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, classes, (b,), generator=g))
        for b in sizes
    ]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, D), nn.Tanh(), nn.Linear(D, C3))

    def forward(self, x):
        return self.net(x)


class TokPos(nn.Module):
    def __init__(self, t, unsqueeze):
        super().__init__()
        self.unsqueeze = unsqueeze
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(t, D)
        self.head = nn.Linear(D, C5)

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        if self.unsqueeze:
            pos = pos.unsqueeze(0)  # (1, T)
        h = self.tok(tokens) + self.pos(pos)
        return self.head(h.mean(1))


class Flatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, 6)
        self.head = nn.Linear(6, C3)

    def forward(self, x):
        b, t, d = x.shape
        h = nn.functional.gelu(self.lin(x.reshape(b * t, d)))
        return self.head(h.reshape(b, t, -1).mean(1))


class SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, C5)

    def forward(self, x):
        h = torch.tanh(self.lin(x.permute(1, 0, 2)))  # (T, B, D)
        return self.head(h.mean(0))


class EmbFreq(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4, D, scale_grad_by_freq=True)
        self.head = nn.Linear(D, C3)

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens).sum(1)))


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, *, gate):
        return self.lin(x) * gate


class GateParent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, D)
        self.gproj = nn.Linear(6, D)
        self.sub = Gated()
        self.head = nn.Linear(D, C3)

    def forward(self, x):
        g = torch.sigmoid(self.gproj(x))
        h = torch.tanh(self.inp(x))
        return self.head(torch.tanh(self.sub(h, gate=g)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, D)
        self.l2 = nn.Linear(3, D)
        self.head = nn.Linear(D, C3)

    def forward(self, x1, x2):
        return self.head(torch.tanh(self.l1(x1) + self.l2(x2)))


class NormNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(6 if kind != "rms3d" else D, D)
        self.norm = nn.LayerNorm(D) if kind == "layernorm" else nn.RMSNorm(D, eps=1e-5)
        self.head = nn.Linear(D, C3)

    def forward(self, x):
        h = torch.tanh(self.norm(self.lin(x)))
        if self.kind == "rms3d":
            h = h.mean(1)
        return self.head(h)


class RNNNet(nn.Module):
    def __init__(self, cls, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(D, D, batch_first=batch_first)
        self.head = nn.Linear(D, C3)

    def forward(self, x):  # x: (B, T, D)
        if self.batch_first:
            out, _ = self.rnn(x)
            last = out[:, -1]
        else:
            out, _ = self.rnn(x.transpose(0, 1))
            last = out[-1]
        return self.head(last)


class MHANet(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(D, 2, batch_first=batch_first)
        self.head = nn.Linear(D, C5)

    def forward(self, x):  # (B, T, D)
        if self.batch_first:
            out, _ = self.attn(x, x, x, need_weights=False)
            h = out.mean(1)
        else:
            xt = x.transpose(0, 1)
            out, _ = self.attn(xt, xt, xt, need_weights=False)
            h = out.mean(0)
        return self.head(h)


class EncoderNet(nn.Module):
    def __init__(self, batch_first, t=6):
        super().__init__()
        self.batch_first = batch_first
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(t, D)
        self.layer = nn.TransformerEncoderLayer(
            d_model=D, nhead=2, dim_feedforward=16, dropout=0.1, batch_first=batch_first
        )
        self.head = nn.Linear(D, C5)

    def forward(self, tokens):
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        if self.batch_first:
            h = self.layer(h).mean(1)
        else:
            h = self.layer(h.transpose(0, 1)).mean(0)
        return self.head(h)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2, padding_mode="reflect")
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, groups=6, padding=1)
        self.gn = nn.GroupNorm(2, 6)
        self.head = nn.Linear(6, C3)
        g = _gen(77)
        with torch.no_grad():  # non-trivial BatchNorm state
            self.bn.running_mean.copy_(torch.randn(6, generator=g) * 0.3)
            self.bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)
            self.bn.weight.copy_(torch.rand(6, generator=g) + 0.5)
            self.bn.bias.copy_(torch.randn(6, generator=g) * 0.1)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        h = torch.tanh(self.gn(self.dw(h)))
        return self.head(h.mean((2, 3)))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, C5)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(2))


class ConvTNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.convt = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(4, C3)

    def forward(self, x):
        return self.head(torch.tanh(self.convt(x)).mean((2, 3)))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.proj = nn.Linear(D, D)

    def forward(self, tokens):
        h = torch.tanh(self.proj(self.emb(tokens).mean(1)))
        return h @ self.emb.weight.t()  # (B, V): the embedding is the output projection


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, D)
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, C3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.lin(h))
        h = torch.tanh(self.lin(h))  # the same module a second time
        return self.head(h)


class FrozenUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, D)
        self.inp.weight.requires_grad_(False)  # frozen: absent from the result
        self.unused = nn.Linear(D, D)  # never called: zero Fisher
        self.head = nn.Linear(D, C3)

    def forward(self, x):
        return self.head(torch.tanh(self.inp(x)))


def _seeded(fn, seed=0):
    torch.manual_seed(seed)
    return fn()


def _bert_batches(cut_seed, t=6, sizes=SIZES):
    g = _gen(cut_seed)
    batches = []
    for b in sizes:
        ids = torch.randint(1, 30, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        lengths = torch.randint(3, t + 1, (b,), generator=g)
        for i, n in enumerate(lengths.tolist()):
            mask[i, n:] = 0
            ids[i, n:] = 0
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "position_ids": torch.arange(t).unsqueeze(0),  # (1, T), shared by the batch
                "labels": torch.randint(0, 3, (b,), generator=g),
            }
        )
    return batches


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification._from_config(cfg, attn_implementation="eager")


def _loader_case():
    g = _gen(9)
    x1, x2 = torch.randn(12, 4, generator=g), torch.randn(12, 3, generator=g)
    y = torch.randint(0, C3, (12,), generator=g)
    dataset = [((x1[i], x2[i]), y[i]) for i in range(12)]
    loader = DataLoader(dataset, batch_sampler=[list(range(5)), list(range(5, 12))])
    first = next(iter(loader))
    # What the loader yields: [[x1, x2], y].
    assert isinstance(first, list) and isinstance(first[0], list) and len(first[0]) == 2
    assert first[0][0].shape == (5, 4) and first[0][1].shape == (5, 3) and first[1].shape == (5,)
    return _seeded(TwoInputs), loader, dict(n_samples=9, expect_samples=9)


# id -> builder returning (model, data, options). Every case here must MATCH the reference.
CASES = {
    "a_mlp": lambda: (_seeded(MLP), float_batches((6,), C3, 1), {}),
    "b_tokpos_arange": lambda: (_seeded(lambda: TokPos(4, False)), token_batches(4, V, C5, 2), {}),
    "c_tokpos_arange_1T": lambda: (_seeded(lambda: TokPos(6, True)), token_batches(6, V, C5, 3), {}),
    "d_flatten_BT": lambda: (_seeded(Flatten), float_batches((4, D), C3, 4), {}),
    "e_seq_first_T5": lambda: (_seeded(SeqFirst), float_batches((5, D), C5, 5), {}),  # T == B for B=5
    "e_seq_first_T7": lambda: (_seeded(SeqFirst), float_batches((7, D), C5, 6), {}),  # T == B for B=7
    "f_emb_scale_grad_by_freq": lambda: (_seeded(EmbFreq), token_batches(6, 4, C3, 7), {}),
    "g_keyword_gate": lambda: (_seeded(GateParent), float_batches((6,), C3, 8), {}),
    "h_loader_list_inputs_cut9": _loader_case,
    "i_layernorm_2d": lambda: (_seeded(lambda: NormNet("layernorm")), float_batches((6,), C3, 10), {}),
    "i_rmsnorm_2d": lambda: (_seeded(lambda: NormNet("rms2d")), float_batches((6,), C3, 11), {}),
    "i_rmsnorm_3d": lambda: (_seeded(lambda: NormNet("rms3d")), float_batches((4, D), C3, 12), {}),
    "k_mha_batch_first": lambda: (_seeded(lambda: MHANet(True)), float_batches((4, D), C5, 13), {}),
    "k_mha_seq_first": lambda: (_seeded(lambda: MHANet(False)), float_batches((5, D), C5, 14), {}),
    "l_encoder_batch_first": lambda: (_seeded(lambda: EncoderNet(True)), token_batches(6, V, C5, 15), {}),
    "l_encoder_seq_first": lambda: (_seeded(lambda: EncoderNet(False)), token_batches(6, V, C5, 16), {}),
    "m_bert": lambda: (_bert(), _bert_batches(17), {}),
    "m_bert_cut9": lambda: (_bert(), _bert_batches(18), dict(n_samples=9)),
    "n_conv2d_bn_gn_depthwise": lambda: (_seeded(ConvNet), float_batches((4, 9, 9), C3, 19), {}),
    "n_conv1d": lambda: (_seeded(Conv1dNet), float_batches((3, 7), C5, 20), {}),
    "n_convtranspose2d": lambda: (_seeded(ConvTNet), float_batches((3, 4, 4), C3, 21), {}),
    "n_tied_embedding": lambda: (_seeded(Tied), token_batches(4, V, V, 22), {}),
    "n_module_twice": lambda: (_seeded(Twice), float_batches((6,), C3, 23), {}),
    "n_frozen_unused": lambda: (_seeded(FrozenUnused), float_batches((6,), C3, 24), {}),
    # o: a tiny memory cap must not change the numbers.
    "o_cap_encoder": lambda: (
        _seeded(lambda: EncoderNet(True)),
        token_batches(6, V, C5, 25),
        dict(memory_cap=4096),
    ),
    "o_cap_conv2d": lambda: (_seeded(ConvNet), float_batches((4, 9, 9), C3, 26), dict(memory_cap=4096)),
    "o_cap_tokpos": lambda: (
        _seeded(lambda: TokPos(4, True)),
        token_batches(4, V, C5, 27),
        dict(memory_cap=4096),
    ),
}

ESTIMATORS = ("empirical", "exact", "mc")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", list(CASES))
def test_zoo_matches_reference(case, estimator):
    model, data, opts = CASES[case]()
    opts = dict(opts)
    expect = opts.pop("expect_samples", None)
    got = check_case(model, data, estimator, **opts)
    if expect is not None:
        assert got.meta["samples"] == expect


# j: recurrent layers (tuple outputs; samples on dim 1 of h_n; GRU cannot be traced by vmap).
RNN_CASES = {
    "j_lstm_seq_first": lambda: _seeded(lambda: RNNNet(nn.LSTM, False)),
    "j_lstm_batch_first": lambda: _seeded(lambda: RNNNet(nn.LSTM, True)),
    "j_gru_batch_first": lambda: _seeded(lambda: RNNNet(nn.GRU, True)),
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("case", list(RNN_CASES))
def test_rnn_zoo(case, estimator):
    model = RNN_CASES[case]()
    data = float_batches((4, D), C3, 30)
    check_case(model, data, estimator)


def test_reference_sanity():
    """The reference itself: on a linear softmax model the empirical Fisher has a closed form."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    data = float_batches((4,), 3, 99)
    want, total = reference_fisher(lin, data, "empirical")
    assert total == sum(SIZES)
    acc = torch.zeros(3, 4, dtype=torch.float64)
    w, b = lin.weight.double().detach(), lin.bias.double().detach()
    for x, y in data:
        for xi, yi in zip(x.double(), y):
            p = torch.softmax(w @ xi + b, 0)
            err = -p
            err[yi] += 1
            acc += torch.outer(err, xi) ** 2
    torch.testing.assert_close(want["weight"], acc / total)
