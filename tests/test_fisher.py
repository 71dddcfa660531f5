"""cl_optim.fisher.estimate against batch-size-1 reference loops and the closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cl_optim
from cl_optim import fisher

CLASSES = 3


class Scale(nn.Module):
    """A layer without a per-sample rule: goes through the torch.func fallback."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.scale


class SequenceModel(nn.Module):
    """Embedding (repeated tokens, padding row) -> Conv1d -> sequence Linear -> LayerNorm -> head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 6, 3, padding=1)
        self.proj = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, tokens):
        h = self.embed(tokens)  # (B, T, 6)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = torch.tanh(self.norm(self.proj(h)))  # (B, T, 5)
        return self.head(h.mean(1))


class TiedModel(nn.Module):
    """The output layer shares the embedding matrix (weight tying)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(CLASSES, 4)
        self.inner = nn.Linear(4, 4)

    def forward(self, tokens):
        h = torch.tanh(self.inner(self.embed(tokens).mean(1)))
        return h @ self.embed.weight.t()


def _mlp():
    return nn.Sequential(
        nn.Linear(5, 8), Scale(8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, CLASSES)
    )


def _cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2, dilation=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, CLASSES),
    )


def _data(kind, batches=2, batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        if kind == "mlp":
            x = torch.randn(batch, 5, generator=gen)
        elif kind == "cnn":
            x = torch.randn(batch, 2, 6, 6, generator=gen)
        else:
            x = torch.randint(0, 7, (batch, 5), generator=gen)
            x[:, 0] = x[:, 1]  # a repeated token in every sample
            x[0, 2] = 0  # and a padding token
        out.append((x, torch.randint(0, CLASSES, (batch,), generator=gen)))
    return out


def _model(kind):
    torch.manual_seed(1)
    model = {"mlp": _mlp, "cnn": _cnn, "seq": SequenceModel, "tied": TiedModel}[kind]()
    if kind == "cnn":  # non-trivial running statistics for the eval-mode BatchNorm
        model[4].running_mean.uniform_(-0.5, 0.5)
        model[4].running_var.uniform_(0.5, 2.0)
    return model


def _reference(model, data, estimator, mc_labels=None, loss_scale_sum=False):
    """Batch-size-1 loops: per sample (and label), autograd of log p, squared."""
    model.eval()
    params = list(model.named_parameters())
    totals = {n: torch.zeros_like(p) for n, p in params}
    seen = 0
    for b, (x, y) in enumerate(data):
        for n in range(x.shape[0]):
            logp = torch.log_softmax(model(x[n : n + 1])[0], 0)
            probs = logp.exp().detach()
            if estimator == "exact":
                terms = [(probs[c], logp[c]) for c in range(CLASSES)]
            elif estimator == "empirical":
                terms = [(1.0, logp[y[n]])]
            else:
                labels = mc_labels[b][n]
                terms = [(1.0 / len(labels), logp[c]) for c in labels]
            for weight, value in terms:
                grads = torch.autograd.grad(value, [p for _, p in params], retain_graph=True)
                for (name, _), g in zip(params, grads):
                    totals[name] += weight * g**2
            seen += 1
    return {n: t / seen for n, t in totals.items()}


def _mc_labels(model, data, mc_samples, seed):
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        return [
            torch.multinomial(torch.softmax(model(x).float(), 1), mc_samples, replacement=True, generator=gen)
            for x, _ in data
        ]


def _assert_relative(got, want, tol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == torch.float32
        err = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert err < tol, f"{name}: relative error {err:.3g}"
        assert want[name].norm() > 0


@pytest.mark.parametrize("estimator", ["exact", "mc", "empirical"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq", "tied"])
def test_estimators_match_batch_size_one_loops(kind, estimator):
    model = _model(kind)
    data = _data("seq" if kind == "tied" else kind)
    if kind == "tied":
        data = [(x.clamp(max=CLASSES - 1), y) for x, y in data]
    kwargs, labels = {}, None
    if estimator == "mc":
        kwargs = dict(mc_samples=3, generator=torch.Generator().manual_seed(5))
        labels = _mc_labels(model, data, 3, 5)
    got = fisher.estimate(model, data, estimator=estimator, **kwargs)
    _assert_relative(got, _reference(model, data, estimator, labels))
    rules = got.meta["per_sample"]
    if kind == "mlp":
        assert rules == {"0": "linear", "1": "torch.func (layer)", "3": "linear", "5": "linear"}
    elif kind == "cnn":
        assert set(rules.values()) == {"conv", "groupnorm", "batchnorm-eval", "linear"}
    elif kind == "seq":
        assert rules == {
            "embed": "embedding",
            "conv": "conv",
            "proj": "linear",
            "norm": "layernorm",
            "head": "linear",
        }
    else:  # the tied matrix goes through the whole model; the inner Linear keeps its rule
        assert rules["inner"] == "linear" and rules["embed"].startswith("torch.func (model)")
    assert got.meta["verify"]["samples"] == 2
    assert got.meta["samples"] == 12 and got.meta["estimator"] == estimator


def test_exact_equals_the_closed_form():
    """F = 1/N sum_n diag(J_n^T (diag p_n - p_n p_n^T) J_n), J_n from torch.func.jacrev."""
    from torch.func import functional_call, jacrev

    model = _model("mlp")
    data = _data("mlp", batches=1, batch=4)
    got = fisher.estimate(model, data, estimator="exact")
    params = {n: p.detach() for n, p in model.named_parameters()}
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    x = data[0][0]
    for n in range(x.shape[0]):
        jac = jacrev(lambda p, xi=x[n : n + 1]: functional_call(model, p, (xi,))[0])(params)
        probs = torch.softmax(model(x[n : n + 1])[0], 0).detach()
        middle = torch.diag(probs) - torch.outer(probs, probs)
        for name, j in jac.items():
            flat = j.reshape(CLASSES, -1)  # (C, numel)
            expected[name] += torch.einsum("ci,cd,di->i", flat, middle, flat).view_as(params[name])
    _assert_relative(got, {n: e / x.shape[0] for n, e in expected.items()})


def test_batched_is_the_squared_batch_mean_gradient_with_a_warning():
    model = _model("mlp")
    data = _data("mlp", batches=3, batch=8)
    with pytest.warns(UserWarning, match="1/batch_size"):
        got = fisher.estimate(model, data, estimator="batched")
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in data:
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads):
            expected[name] += g**2 / len(data)
    _assert_relative(got, expected)
    empirical = fisher.estimate(model, data, estimator="empirical")
    ratio = sum(empirical[n].sum() for n in empirical) / sum(got[n].sum() for n in got)
    assert ratio > 2.0  # about the batch size (8) away from the optimum; far from 1


def test_gaussian_likelihood_for_regression():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(5, 3, generator=gen), torch.randn(5, 2, generator=gen)) for _ in range(2)]
    sigma = 0.5
    exact = fisher.estimate(model, data, estimator="exact", likelihood="gaussian", sigma=sigma)
    empirical = fisher.estimate(model, data, estimator="empirical", likelihood="gaussian", sigma=sigma)
    ref_exact = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    ref_emp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in data:
        for n in range(x.shape[0]):
            out = model(x[n : n + 1])[0]
            for o in range(2):
                grads = torch.autograd.grad(out[o], list(model.parameters()), retain_graph=True)
                for (name, _), g in zip(model.named_parameters(), grads):
                    ref_exact[name] += g**2 / sigma**2 / 10
            nll = 0.5 * ((out - y[n]) ** 2).sum() / sigma**2
            grads = torch.autograd.grad(nll, list(model.parameters()))
            for (name, _), g in zip(model.named_parameters(), grads):
                ref_emp[name] += g**2 / 10
    _assert_relative(exact, ref_exact)
    _assert_relative(empirical, ref_emp)
    mc = fisher.estimate(model, data * 200, estimator="mc", likelihood="gaussian", sigma=sigma, mc_samples=4)
    _assert_relative(mc, ref_exact, tol=0.1)  # unbiased: 8000 draws; exact within 10 %


def test_result_does_not_depend_on_loss_reduction_or_loss_scale():
    model = _model("mlp")
    data = _data("mlp")
    base = fisher.estimate(model, data, estimator="empirical")
    summed = fisher.estimate(
        model,
        data,
        estimator="empirical",
        loss_fn=lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"),
    )
    scaled = fisher.estimate(model, data, estimator="empirical", loss_scale=1024.0)
    for name in base:
        torch.testing.assert_close(summed[name], base[name])
        torch.testing.assert_close(scaled[name], base[name])
    with pytest.raises(ValueError, match="neither a mean nor a sum"):
        fisher.estimate(model, data, estimator="empirical", loss_fn=lambda o, t: o.square().sum().sqrt())


def test_default_nll_closed_form_matches_autograd():
    """DefaultNLL's per-sample output gradient (softmax - onehot; (output - target) / sigma^2)
    against autograd on the same loss (mean reduction undone), and the fall-back cases where the
    closed form does not hold as written: the autograd path's numbers (or its error)."""
    from cl_optim.fisher.seeds import DefaultNLL, per_sample_loss_grad

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 5, generator=gen) * 4
    labels = torch.randint(0, 5, (9,), generator=gen)
    categorical = DefaultNLL("categorical", 1.0)
    closed = categorical.per_sample_grad(logits, labels)
    assert closed is not None
    out = logits.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(nn.functional.cross_entropy(out, labels), out)
    torch.testing.assert_close(closed, autograd * 9, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(closed.sum(1), torch.zeros(9), rtol=0, atol=1e-6)  # rows of p - e_y
    # Not as written: probabilities as targets, an ignored -100, int32 labels, wrong length.
    ignored = labels.clone()
    ignored[2] = -100
    probabilities = torch.softmax(torch.randn(9, 5, generator=gen), 1)
    for targets in (probabilities, ignored, labels.int(), labels[:4]):
        assert categorical.per_sample_grad(logits, targets) is None
    with_ignored = per_sample_loss_grad(logits, ignored, categorical)  # the autograd path
    assert with_ignored[2].abs().sum() == 0 and with_ignored[0].abs().sum() > 0
    with pytest.raises(RuntimeError):
        per_sample_loss_grad(logits, labels.int(), categorical)  # cross_entropy's own refusal
    gaussian = DefaultNLL("gaussian", 0.5)
    target = torch.randn(9, 5, generator=gen)
    out = logits.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(gaussian(out, target), out)
    torch.testing.assert_close(gaussian.per_sample_grad(logits, target), autograd, rtol=1e-6, atol=1e-6)
    assert gaussian.per_sample_grad(logits, target[:, :1]) is None  # broadcast: autograd's path
    torch.testing.assert_close(
        per_sample_loss_grad(logits, target[:, :1], gaussian), (logits - target[:, :1]) / 0.25
    )
    # The whole estimate: the default loss and the same loss as a plain function agree.
    model, data = _model("mlp"), _data("mlp")
    default = fisher.estimate(model, data, estimator="empirical")
    plain = fisher.estimate(
        model, data, estimator="empirical", loss_fn=lambda o, t: nn.functional.cross_entropy(o.float(), t)
    )
    for name in default:
        torch.testing.assert_close(default[name], plain[name], rtol=1e-5, atol=1e-8)


def test_modes_are_restored_and_batchnorm_buffers_untouched():
    model = _model("cnn")
    model.train()
    model[5].eval()  # a module the user had in eval mode stays so
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    fisher.estimate(model, _data("cnn"), estimator="exact")
    assert model.training and model[4].training and not model[5].training
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name])


def test_batchnorm_in_train_mode_is_refused():
    model = _model("cnn")
    with pytest.raises(RuntimeError, match="BatchNorm2d in train mode"):
        fisher.estimate(model, _data("cnn"), estimator="exact", eval_mode=False)


def test_n_samples_and_bf16_model():
    model = _model("mlp")
    data = _data("mlp", batches=3, batch=6)
    got = fisher.estimate(model, data, estimator="exact", n_samples=8)
    assert got.meta["samples"] == 8 and got.meta["batches"] == 2
    _assert_relative(got, _reference(model, [data[0], (data[1][0][:2], data[1][1][:2])], "exact"))
    low = fisher.estimate(
        _model("mlp").to(torch.bfloat16), [(x.bfloat16(), y) for x, y in data], estimator="exact"
    )
    full = fisher.estimate(model, data, estimator="exact")
    for name in full:
        assert low[name].dtype == torch.float32
        assert ((low[name] - full[name]).norm() / full[name].norm()) < 0.1  # bf16 forward, fp32 squares


def test_bad_arguments():
    model = _model("mlp")
    with pytest.raises(ValueError, match="unknown estimator"):
        fisher.estimate(model, _data("mlp"), estimator="sqrt")
    with pytest.raises(ValueError, match="no samples"):
        fisher.estimate(model, [], estimator="exact")
    frozen = _model("mlp").requires_grad_(False)
    for estimator in ("empirical", "batched"):
        with pytest.raises(ValueError, match="no parameters that require grad"):
            fisher.estimate(frozen, _data("mlp"), estimator=estimator)
    assert cl_optim.fisher is fisher


def test_estimate_leaves_the_collector_as_it_found_it():
    """estimate() freezes the objects that exist before it (full collections would walk them every
    few batches) and unfreezes them at the end, also when it raises; a caller's own freeze is
    left alone."""
    import gc

    model = torch.nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    assert gc.isenabled() and gc.get_freeze_count() == 0
    fisher.estimate(model, data)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with pytest.raises(ValueError):
        fisher.estimate(model, [(torch.randn(4, 5), torch.randint(0, 2, (4,)))] * 0)
    bad = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Flatten(0))  # one output row for the batch
    with pytest.raises(ValueError, match="one row of outputs per sample"):
        fisher.estimate(bad, data)
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        fisher.estimate(model, data)
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        lambda: nn.Conv2d(3, 5, 1, bias=False),
        lambda: nn.Conv1d(3, 5, 4, stride=3, padding=2, dilation=2),
        lambda: nn.Conv1d(3, 5, 3, padding=1, bias=False),
    ],
    ids=["conv2d_strided_dilated", "conv2d_1x1", "conv1d_strided_dilated", "conv1d_no_bias"],
)
def test_conv_rule_matches_the_loop(conv):
    """The grouped-backward conv rule against a batch-size-1 loop, with strides, dilations,
    asymmetric padding and kernels, and without bias (no self-check: the rule alone)."""
    torch.manual_seed(3)
    layer = conv()
    spatial = (9, 8) if isinstance(layer, nn.Conv2d) else (11,)
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(CLASSES))
    gen = torch.Generator().manual_seed(4)
    data = [(torch.randn(7, 3, *spatial, generator=gen), torch.randint(0, CLASSES, (7,), generator=gen))]
    model(data[0][0])  # materialise the lazy head
    got = fisher.estimate(model, data, estimator="exact", verify=False)
    assert got.meta["per_sample"]["0"].startswith("conv")
    want = _reference(model, data, "exact")
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-7)


class _Attention(nn.Module):
    """One attention call of a given kind, sequence-first or batch-first, and a head."""

    def __init__(self, kind, batch_first, kdim=None):
        super().__init__()
        self.kind, self.batch_first = kind, batch_first
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x, y):
        q, kv = (x, y) if self.batch_first else (x.transpose(0, 1), y.transpose(0, 1))
        if self.kind == "self":
            out, _ = self.attn(q, q, q, need_weights=False)
        elif self.kind == "cross":
            out, _ = self.attn(q, kv, kv)
        elif self.kind == "masked":
            mask = torch.triu(
                torch.ones(
                    q.shape[0 if not self.batch_first else 1],
                    kv.shape[1 if self.batch_first else 0],
                    dtype=torch.bool,
                ),
                1,
            )
            out, _ = self.attn(q, kv, kv, attn_mask=mask, need_weights=True)
        else:  # key and value different tensors: three separate projections
            out, _ = self.attn(q, kv, kv.flip(-1))
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1))


@pytest.mark.parametrize(
    "kind,batch_first,kdim",
    [("self", True, None), ("self", False, None), ("cross", True, None), ("masked", True, None),
     ("separate", False, None), ("cross", True, 6)],
)  # fmt: skip
def test_attention_projections_recorded_in_the_forward(monkeypatch, kind, batch_first, kdim):
    """The attention rule takes the q/k/v and output projections' gradients from the estimate's own
    backward (recorded inside the forward): against a batch-size-1 loop, for self-, cross- and
    masked attention, separate key/value, separate projection weights (kdim), both layouts; the
    recorded path is the one taken, and F.linear and the module's forward are restored."""
    import torch.nn.functional as F

    from cl_optim.fisher import rules

    taken = []
    recorded = rules._recorded_projections
    monkeypatch.setattr(
        rules, "_recorded_projections", lambda *a: taken.append(recorded(*a) is not None) or recorded(*a)
    )
    torch.manual_seed(5)
    model = _Attention(kind, batch_first, kdim).eval()
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(6, 5, 8, generator=gen)
    y = torch.randn(6, 5 if kind == "masked" else 4, kdim or 8, generator=gen)
    targets = torch.randint(0, CLASSES, (6,), generator=gen)
    linear = F.linear
    got = fisher.estimate(model, [((x, y), targets)], estimator="empirical")
    assert taken and all(taken)
    assert F.linear is linear and "forward" not in vars(model.attn)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(6):
        logp = torch.log_softmax(model(x[i : i + 1], y[i : i + 1])[0], 0)[targets[i]]
        for (name, _), g in zip(
            model.named_parameters(), torch.autograd.grad(logp, list(model.parameters()))
        ):
            want[name] += g.square() / 6
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-8)


def test_attention_capture_restores_linear_when_the_forward_raises():
    import torch.nn.functional as F

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            self.attn(x, x, x[:, :1, :3])  # a value of the wrong width: raises inside the attention
            return x.sum(1)

    model = Broken().eval()
    linear = F.linear
    with pytest.raises(Exception):  # noqa: B017 - torch's own error, whatever its type
        fisher.estimate(model, [(torch.randn(3, 2, 4), torch.randint(0, 2, (3,)))])
    assert F.linear is linear and "forward" not in vars(model.attn)


def test_attention_with_a_frozen_in_projection():
    """Projections whose output needs no gradient are not asked for one (the in-projection frozen,
    the output projection trained, as in fine-tuning)."""
    torch.manual_seed(7)
    model = _Attention("self", True).eval()
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.in_proj_bias.requires_grad_(False)
    gen = torch.Generator().manual_seed(8)
    x, y = torch.randn(5, 4, 8, generator=gen), torch.randn(5, 4, 8, generator=gen)
    targets = torch.randint(0, CLASSES, (5,), generator=gen)
    got = fisher.estimate(model, [((x, y), targets)], estimator="empirical")
    assert got.meta["per_sample"]["attn"].startswith("attention")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    want = {n: torch.zeros_like(p) for n, p in params}
    for i in range(5):
        logp = torch.log_softmax(model(x[i : i + 1], y[i : i + 1])[0], 0)[targets[i]]
        for (name, _), g in zip(params, torch.autograd.grad(logp, [p for _, p in params])):
            want[name] += g.square() / 5
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-8)


def test_attention_the_rule_refuses_is_not_wrapped(recwarn):
    """An attention with bias_k/bias_v goes to torch.func on the layer, as before, without a
    recorder in its forward and without a demotion warning."""
    import torch.nn.functional as F

    class BiasKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
            self.head = nn.Linear(8, CLASSES)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    model = BiasKV().eval()
    linear = F.linear
    got = fisher.estimate(model, [(torch.randn(5, 4, 8), torch.randint(0, CLASSES, (5,)))])
    assert got.meta["per_sample"]["attn"].startswith("torch.func (layer)"), got.meta["per_sample"]
    assert not [w for w in recwarn if "fisher.estimate" in str(w.message)]
    assert F.linear is linear


def test_linear_recorder_restores_the_original_after_overlapping_uses():
    """The recorder is installed once for overlapping users (threads) and the original put back
    after the last, whatever order they leave in; records go to the thread that set them."""
    import threading

    import torch.nn.functional as F

    from cl_optim.fisher.capture import _LinearRecorder

    recorder, original = _LinearRecorder(), F.linear
    recorder.__enter__()
    recorder.__enter__()  # a second user, as a second thread
    recorder.__exit__()  # the first leaves first
    assert F.linear is not original
    mine, seen_elsewhere = [], []
    recorder.local.records = mine

    def other_thread():
        F.linear(torch.ones(1, 2), torch.ones(3, 2))
        seen_elsewhere.append(getattr(recorder.local, "records", None))

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join()
    F.linear(torch.ones(1, 2), torch.ones(3, 2))
    recorder.__exit__()
    assert F.linear is original
    assert len(mine) == 1 and seen_elsewhere == [None]


def test_attention_run_without_grad_inside_the_forward():
    """A frozen attention run under no_grad inside the model (its outputs need no gradient)."""

    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, CLASSES)

        def forward(self, x):
            with torch.no_grad():
                h = self.attn(x, x, x, need_weights=False)[0]
            return self.head(h.mean(1))

    model = Frozen().eval()
    x, targets = torch.randn(5, 4, 8), torch.randint(0, CLASSES, (5,))
    got = fisher.estimate(model, [(x, targets)])
    assert torch.count_nonzero(got["attn.in_proj_weight"]) == 0  # no gradient reaches them
    assert torch.count_nonzero(got["head.weight"]) > 0
