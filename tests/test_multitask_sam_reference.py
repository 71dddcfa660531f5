"""MultiTaskSAM (F-MTL, Phan et al. 2022, arXiv 2211.13723) against an independent reference.

The reference here is written from the paper's definitions (and the official FS-MTL scripts' norm
conventions), not from the library's code:

* one forward gives the task losses ``L_1..L_T``;
* stage 1: ``g_t = d L_t / d theta_s`` and ``gh_t = d L_t / d theta_t`` (the task's own head) at ``w``;
* per task, the SAM perturbation ``e_t = rho g_t / (||g_t|| + 1e-12)`` over the shared parameters and
  ``eh_t = rho gh_t / (||gh_t|| + 1e-12)`` over the head (``norm_scope="separate"``), or one norm over
  both (``"joint"``); ASAM (``adaptive=True``, davda54): ``rho |w|^2 g / (|| |w| g || + 1e-12)``;
* stage 2: at ``w + (e_t, eh_t)`` another forward, ``ghat_t`` and ``ghhat_t``; the normalisation
  running statistics are those of the stage-1 forward only;
* ``grad(theta_s) = Agg(g) + Agg(ghat - g)`` (``"split"``) or ``Agg(ghat)`` (``"sam_then_agg"``),
  ``grad(theta_t) = ghhat_t``; the base optimizer steps at the restored ``w``.

``Agg`` is ``cl_optim.multitask.combine`` (tested on its own elsewhere); the reference calls it on
flattened (``torch.cat``) gradients, one tensor per task, while the optimizer works per parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import cl_optim
from cl_optim.multitask import combine

D_IN, HIDDEN, FEAT, CLASSES, BATCH = 5, 7, 6, 3, 16
RTOL, ATOL = 1e-10, 1e-12
AGGREGATORS = ["sum", "mean", "pcgrad", "cagrad", "mgda", "imtl"]
BASES = [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    (torch.optim.Adam, dict(lr=1e-2)),
]
BASE_IDS = ["torch.SGD-momentum", "torch.Adam"]


@pytest.fixture(autouse=True)
def _fp64_default():
    """Every model and batch of this module is fp64; the global default is put back afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class MultiHead(torch.nn.Module):
    """A shared trunk (Linear, BatchNorm1d, Tanh, Linear, Tanh) and one linear head per task.

    The first Linear has no bias: before a train-mode BatchNorm a bias gets an exactly zero gradient,
    whose rounding noise (1e-19) Adam would scale up to lr / eps times, a difference of summation
    order rather than of the method."""

    def __init__(self, tasks: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.trunk = torch.nn.Sequential(
            torch.nn.Linear(D_IN, HIDDEN, bias=False),
            torch.nn.BatchNorm1d(HIDDEN),
            torch.nn.Tanh(),
            torch.nn.Linear(HIDDEN, FEAT),
            torch.nn.Tanh(),
        )
        self.heads = torch.nn.ModuleList(torch.nn.Linear(FEAT, CLASSES) for _ in range(tasks))
        self.double()
        with torch.no_grad():
            for p in self.parameters():  # deterministic, independent of the global RNG
                p.copy_(0.6 * torch.randn(p.shape, generator=gen, dtype=torch.float64))

    def forward(self, x):
        z = self.trunk(x)
        return [head(z) for head in self.heads]


def batch(step: int, tasks: int):
    """The inputs and one label vector per task of step ``step`` (the same for every optimizer)."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, D_IN, generator=gen, dtype=torch.float64)
    ys = [torch.randint(0, CLASSES, (BATCH,), generator=gen) for _ in range(tasks)]
    return x, ys


def make_closure(model: MultiHead, step: int, counter: list | None = None):
    """A closure of one forward that returns the T cross-entropy losses, as a list."""
    x, ys = batch(step, len(model.heads))

    def closure():
        if counter is not None:
            counter[0] += 1
        return [F.cross_entropy(out, y) for out, y in zip(model(x), ys)]

    return closure


# --------------------------------------------------------------------------------------------------
# The unfused reference.
# --------------------------------------------------------------------------------------------------


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(flat, like):
    out, i = [], 0
    for p in like:
        out.append(flat[i : i + p.numel()].view_as(p))
        i += p.numel()
    return out


class ReferenceFMTL:
    """F-MTL step by the definitions: flattened vectors, one ``autograd.grad`` per task and stage."""

    def __init__(
        self,
        shared,
        heads,
        base_optimizer,
        *,
        rho=0.05,
        adaptive=False,
        aggregator="sum",
        aggregate="split",
        aggregator_options=None,
        norm_scope="separate",
        norm_modules=(),
    ):
        self.shared = list(shared)
        self.heads = [list(h) for h in heads]
        self.base = base_optimizer
        self.rho, self.adaptive = rho, adaptive
        self.aggregator, self.aggregate = aggregator, aggregate
        self.options = dict(aggregator_options or {})
        self.norm_scope = norm_scope
        self.norm_modules = list(norm_modules)

    def _perturbation(self, g_s, g_h, w_s, w_h):
        """``(e_t, eh_t)`` as flat vectors, from flat gradients and weights."""
        scale_s = w_s.abs() if self.adaptive else torch.ones_like(w_s)
        scale_h = w_h.abs() if self.adaptive else torch.ones_like(w_h)
        if self.norm_scope == "separate":
            n_s = torch.linalg.vector_norm(scale_s * g_s)
            n_h = torch.linalg.vector_norm(scale_h * g_h)
        else:
            n_s = n_h = torch.linalg.vector_norm(torch.cat([scale_s * g_s, scale_h * g_h]))
        e_s = self.rho * scale_s**2 * g_s / (n_s + 1e-12)
        e_h = self.rho * scale_h**2 * g_h / (n_h + 1e-12)
        return e_s, e_h

    def _agg(self, flats):
        # forloop: combine's plain-PyTorch oracle path, not the fused kernels under test
        return combine([[f] for f in flats], self.aggregator, backend="forloop", **self.options)[0]

    def step(self, closure):
        with torch.enable_grad():
            losses = closure()
        T = len(losses)
        g_s, g_h = [], []
        for t in range(T):
            grads = torch.autograd.grad(losses[t], self.shared + self.heads[t], retain_graph=True)
            g_s.append(_flat(grads[: len(self.shared)]))
            g_h.append(_flat(grads[len(self.shared) :]))
        saved = {id(p): p.detach().clone() for p in self.shared + [q for h in self.heads for q in h]}
        buffers = [[b.clone() for b in m.buffers()] for m in self.norm_modules]
        ghat_s, ghat_h = [], []
        for t in range(T):
            w_s, w_h = _flat(self.shared).detach(), _flat(self.heads[t]).detach()
            e_s, e_h = self._perturbation(g_s[t], g_h[t], w_s, w_h)
            with torch.no_grad():
                for p, e in zip(self.shared, _unflat(e_s, self.shared)):
                    p.add_(e)
                for p, e in zip(self.heads[t], _unflat(e_h, self.heads[t])):
                    p.add_(e)
            with torch.enable_grad():
                loss = closure()[t]
                grads = torch.autograd.grad(loss, self.shared + self.heads[t])
            ghat_s.append(_flat(grads[: len(self.shared)]))
            ghat_h.append(_flat(grads[len(self.shared) :]))
            with torch.no_grad():
                for p in self.shared + [q for h in self.heads for q in h]:
                    p.copy_(saved[id(p)])
                for m, bs in zip(self.norm_modules, buffers):  # stage 2 leaves no statistics
                    for b, v in zip(m.buffers(), bs):
                        b.copy_(v)
        if self.aggregate == "split":
            shared_grad = self._agg(g_s) + self._agg([gh - g for gh, g in zip(ghat_s, g_s)])
        else:
            shared_grad = self._agg(ghat_s)
        for p, g in zip(self.shared, _unflat(shared_grad, self.shared)):
            p.grad = g.clone()
        for t in range(T):
            for p, g in zip(self.heads[t], _unflat(ghat_h[t], self.heads[t])):
                p.grad = g.clone()
        self.base.step()
        return [loss.detach() for loss in losses]


def bn_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def run_reference(tasks, steps, base, base_kwargs, **options):
    model = MultiHead(tasks)
    opt = ReferenceFMTL(
        model.trunk.parameters(),
        [h.parameters() for h in model.heads],
        base(model.parameters(), **base_kwargs),
        norm_modules=bn_modules(model),
        **options,
    )
    for i in range(steps):
        opt.step(make_closure(model, i))
    return model


def run_library(tasks, steps, base, base_kwargs, **options):
    model = MultiHead(tasks)
    opt = cl_optim.MultiTaskSAM(model.parameters(), base, **options, **base_kwargs)
    for i in range(steps):
        opt.step(make_closure(model, i))
    return model


def assert_models_close(actual, expected, rtol=RTOL, atol=ATOL):
    """Every parameter and every buffer (BN running mean, variance and batch count)."""
    for (name, a), (_, e) in zip(actual.named_parameters(), expected.named_parameters()):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for (name, a), (_, e) in zip(actual.named_buffers(), expected.named_buffers()):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# --------------------------------------------------------------------------------------------------
# 1. The closed form of one step with sum and plain SGD.
# --------------------------------------------------------------------------------------------------


def _functional_losses(w: dict, x, ys):
    """The model of ``MultiHead`` written out: batch statistics in the norm layer, no buffers."""
    z = x @ w["trunk.0.weight"].T
    z = F.batch_norm(z, None, None, w["trunk.1.weight"], w["trunk.1.bias"], training=True, eps=1e-5)
    z = torch.tanh(torch.tanh(z) @ w["trunk.3.weight"].T + w["trunk.3.bias"])
    heads = sorted({k.split(".")[1] for k in w if k.startswith("heads.")}, key=int)
    return [
        F.cross_entropy(z @ w[f"heads.{h}.weight"].T + w[f"heads.{h}.bias"], y) for h, y in zip(heads, ys)
    ]


def closed_form_step(tasks, rho, lr, norm_scope, adaptive):
    """``w - lr sum_t grad L_t(w + eps_t)`` on the functional model, and the BN module after one
    train-mode forward at ``w``. ``eps_t``: ``e_t`` on the trunk, ``eh_t`` on head ``t``, zero on the
    other heads; the sum runs over the full parameter vector (``L_t`` gives the other heads nothing)."""
    model = MultiHead(tasks)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, ys = batch(0, tasks)
    shared = [k for k in w0 if k.startswith("trunk.")]
    total = {k: torch.zeros_like(v) for k, v in w0.items()}
    for t in range(tasks):
        own = [f"heads.{t}.weight", f"heads.{t}.bias"]
        w = {k: v.clone().requires_grad_() for k, v in w0.items()}
        grads = torch.autograd.grad(_functional_losses(w, x, ys)[t], [w[k] for k in shared + own])
        g = dict(zip(shared + own, grads))

        def size(keys, g=g):
            s = [w0[k].abs() * g[k] if adaptive else g[k] for k in keys]
            return torch.sqrt(sum((v * v).sum() for v in s))

        n_s, n_h = (size(shared), size(own)) if norm_scope == "separate" else (size(shared + own),) * 2
        wp = dict(w0)
        for keys, n in ((shared, n_s), (own, n_h)):
            for k in keys:
                wp[k] = w0[k] + rho * (w0[k] ** 2 if adaptive else 1.0) * g[k] / (n + 1e-12)
        wp = {k: v.clone().requires_grad_() for k, v in wp.items()}
        grads = torch.autograd.grad(_functional_losses(wp, x, ys)[t], list(wp.values()), allow_unused=True)
        for k, gk in zip(wp, grads):
            if gk is not None:
                total[k] += gk
    stats = copy.deepcopy(model.trunk[1])
    stats(x @ w0["trunk.0.weight"].T)
    return {k: w0[k] - lr * total[k] for k in w0}, stats


def assert_is_closed_form(model, expected, stats):
    for k, p in model.named_parameters():
        torch.testing.assert_close(p, expected[k], rtol=RTOL, atol=ATOL, msg=lambda s, k=k: f"{k}: {s}")
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model.trunk[1], k), getattr(stats, k), rtol=RTOL, atol=ATOL)


CLOSED_FORM_CASES = pytest.mark.parametrize(
    ("tasks", "norm_scope", "adaptive"),
    [(t, n, a) for t in (2, 3) for n in ("separate", "joint") for a in (False, True)],
)


@CLOSED_FORM_CASES
def test_one_sum_sgd_step_is_the_closed_form(tasks, norm_scope, adaptive):
    """aggregator="sum", plain SGD: one MultiTaskSAM step is exactly ``w - lr sum_t grad L_t(w + eps_t)``
    (``closed_form_step``, written on a functional model, independent of ``ReferenceFMTL``), in both
    aggregate modes (with "sum" both reduce to it), SAM and ASAM, separate and joint norms; the BN
    running statistics are those of one train-mode forward at ``w``."""
    rho, lr = 0.1, 0.07
    expected, stats = closed_form_step(tasks, rho, lr, norm_scope, adaptive)
    for aggregate in ("split", "sam_then_agg"):
        m = MultiHead(tasks)
        opt = cl_optim.MultiTaskSAM(
            m.parameters(),
            torch.optim.SGD,
            rho=rho,
            adaptive=adaptive,
            aggregator="sum",
            aggregate=aggregate,
            norm_scope=norm_scope,
            lr=lr,
        )
        opt.step(make_closure(m, 0))
        assert_is_closed_form(m, expected, stats)


@CLOSED_FORM_CASES
def test_reference_is_the_closed_form(tasks, norm_scope, adaptive):
    """The reference itself satisfies the closed form, so that agreeing with it means something
    without the library."""
    rho, lr = 0.1, 0.07
    expected, stats = closed_form_step(tasks, rho, lr, norm_scope, adaptive)
    for aggregate in ("split", "sam_then_agg"):
        m = MultiHead(tasks)
        opt = ReferenceFMTL(
            m.trunk.parameters(),
            [h.parameters() for h in m.heads],
            torch.optim.SGD(m.parameters(), lr=lr),
            rho=rho,
            adaptive=adaptive,
            aggregator="sum",
            aggregate=aggregate,
            norm_scope=norm_scope,
            norm_modules=bn_modules(m),
        )
        opt.step(make_closure(m, 0))
        assert_is_closed_form(m, expected, stats)


# --------------------------------------------------------------------------------------------------
# 2. The reference vs MultiTaskSAM over 5 steps.
# --------------------------------------------------------------------------------------------------


def _options(aggregator):
    return {"shuffle": False} if aggregator == "pcgrad" else None


@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("aggregate", ["split", "sam_then_agg"])
@pytest.mark.parametrize("aggregator", AGGREGATORS)
@pytest.mark.parametrize(("base", "base_kwargs"), BASES, ids=BASE_IDS)
def test_matches_reference_five_steps(base, base_kwargs, aggregator, aggregate, tasks):
    """Five steps of MultiTaskSAM equal the unfused reference: every parameter (trunk, BN affine,
    heads) and the BN running statistics, which must be those of one forward per step (stage 1)."""
    options = dict(
        rho=0.08, aggregator=aggregator, aggregate=aggregate, aggregator_options=_options(aggregator)
    )
    expected = run_reference(tasks, 5, base, base_kwargs, **options)
    actual = run_library(tasks, 5, base, base_kwargs, **options)
    assert_models_close(actual, expected)
    assert int(actual.trunk[1].num_batches_tracked) == 5


@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize(
    ("adaptive", "norm_scope", "aggregator", "aggregate"),
    [
        (True, "separate", "pcgrad", "split"),
        (True, "separate", "mgda", "sam_then_agg"),
        (False, "joint", "pcgrad", "split"),
        (False, "joint", "cagrad", "sam_then_agg"),
        (True, "joint", "imtl", "split"),
        (True, "joint", "mean", "sam_then_agg"),
    ],
)
@pytest.mark.parametrize(("base", "base_kwargs"), BASES, ids=BASE_IDS)
def test_asam_and_joint_norm_match_reference(
    base, base_kwargs, adaptive, norm_scope, aggregator, aggregate, tasks
):
    """ASAM (``|w|`` scaling, davda54) and the joint norm (shared + own head, the Multi-MNIST form)
    equal the reference over five steps."""
    options = dict(
        rho=0.08,
        adaptive=adaptive,
        norm_scope=norm_scope,
        aggregator=aggregator,
        aggregate=aggregate,
        aggregator_options=_options(aggregator),
    )
    expected = run_reference(tasks, 5, base, base_kwargs, **options)
    actual = run_library(tasks, 5, base, base_kwargs, **options)
    assert_models_close(actual, expected)


@pytest.mark.parametrize("backend", ["auto", "forloop", "foreach", "cpp"])
def test_every_cpu_backend_matches_reference(backend):
    """Each CPU backend of the optimizer, chosen explicitly, equals the reference (T=3, pcgrad, split,
    SGD with momentum): a failure of ``auto`` alone is then traced to the backend it picks."""
    options = dict(rho=0.08, aggregator="pcgrad", aggregator_options={"shuffle": False})
    kwargs = dict(lr=0.05, momentum=0.9)
    expected = run_reference(3, 5, torch.optim.SGD, kwargs, **options)
    actual = run_library(3, 5, torch.optim.SGD, kwargs, backend=backend, **options)
    assert_models_close(actual, expected)


@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("aggregator", ["pcgrad", "imtl"])
def test_explicit_shared_equals_inferred(aggregator, tasks):
    """``shared=`` given as the trunk's parameters gives the same steps as the reachability inference
    (the trunk is reached by every task, each head by its own task only)."""
    options = dict(
        rho=0.08, aggregator=aggregator, aggregator_options=_options(aggregator), lr=0.05, momentum=0.9
    )
    inferred = run_library(tasks, 5, torch.optim.SGD, {}, **options)
    model = MultiHead(tasks)
    opt = cl_optim.MultiTaskSAM(
        model.parameters(), torch.optim.SGD, shared=model.trunk.parameters(), **options
    )
    for i in range(5):
        opt.step(make_closure(model, i))
    assert_models_close(model, inferred, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# 3. Closure calls and the return value.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [2, 3, 4])
def test_closure_called_one_plus_t_times(tasks):
    """Each step calls the closure 1 + T times (one stage-1 forward, one per task in stage 2) and
    returns the losses of the first call, at the weights before the step."""
    model = MultiHead(tasks)
    opt = cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, lr=0.05)
    counter = [0]
    for i in range(3):
        closure = make_closure(model, i, counter)
        with torch.no_grad():  # on a copy: a train-mode forward moves the BN statistics
            before = [float(v) for v in make_closure(copy.deepcopy(model), i)()]
        losses = opt.step(closure)
        assert counter[0] == (i + 1) * (1 + tasks)
        assert isinstance(losses, (list, tuple)) and len(losses) == tasks
        torch.testing.assert_close([float(v) for v in losses], before, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------------
# 4. The library's fused SGD as the base.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tasks", [2, 3])
def test_cl_optim_sgd_base_equals_torch_sgd(tasks):
    """``cl_optim.SGD`` (fused) as the base optimizer gives torch.optim.SGD's numbers within 1e-12."""
    options = dict(rho=0.08, aggregator="pcgrad", aggregator_options={"shuffle": False})
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
    expected = run_library(tasks, 5, torch.optim.SGD, kwargs, **options)
    actual = run_library(tasks, 5, cl_optim.SGD, kwargs, **options)
    assert_models_close(actual, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# 5. Bad input.
# --------------------------------------------------------------------------------------------------


def _snapshot(model, opt):
    """The parameters and the optimizer's state. Not the BN buffers: the closure's own forward (user
    code, run before its return value can be checked) has moved them, as with any torch optimizer."""
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_same(a, b):
    """Bit-exact equality of nested structures of tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert (
            torch.equal(a, b)
            or (a.isnan() == b.isnan()).all()
            and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b or (a != a and b != b)


def _warm(tasks=2):
    """A model and an optimizer (SGD with momentum, so there is state) after one normal step."""
    model = MultiHead(tasks)
    opt = cl_optim.MultiTaskSAM(
        model.parameters(),
        torch.optim.SGD,
        aggregator="pcgrad",
        aggregator_options={"shuffle": False},
        lr=0.05,
        momentum=0.9,
    )
    opt.step(make_closure(model, 0))
    return model, opt


def test_scalar_closure_is_refused_and_nothing_moves():
    """A closure returning one scalar tensor (the summed loss) instead of the list of task losses is an
    error that mentions the list; parameters and optimizer state are bit-exact unchanged."""
    model, opt = _warm()
    before = _snapshot(model, opt)
    inner = make_closure(model, 1)
    with pytest.raises((TypeError, ValueError), match="(?i)list"):
        opt.step(lambda: sum(inner()))
    _assert_same(_snapshot(model, opt), before)


def test_empty_list_is_refused_and_nothing_moves():
    """A closure returning ``[]`` is an error; nothing changes."""
    model, opt = _warm()
    before = _snapshot(model, opt)
    with pytest.raises((TypeError, ValueError)):
        opt.step(lambda: [])
    _assert_same(_snapshot(model, opt), before)


@pytest.mark.parametrize("bad_task", [0, 1])
def test_nan_loss_skips_the_step_then_training_goes_on(bad_task):
    """A NaN in one task's loss skips the whole step: parameters bit-exact unchanged, no state touched
    (the momentum buffers are as before, so the next steps equal those of a run that never saw the
    bad batch), and normal steps work afterwards."""
    options = dict(aggregator="pcgrad", aggregator_options={"shuffle": False}, lr=0.05, momentum=0.9)
    model = MultiHead(2)
    opt = cl_optim.MultiTaskSAM(model.parameters(), torch.optim.SGD, **options)
    opt.step(make_closure(model, 0))
    before = [p.detach().clone() for p in model.parameters()]
    inner = make_closure(model, 1)

    def poisoned():
        losses = inner()
        losses[bad_task] = losses[bad_task] * float("nan")
        return losses

    opt.step(poisoned)
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    for i in (2, 3):
        opt.step(make_closure(model, i))
    assert all(torch.isfinite(p).all() for p in model.parameters())

    clean = MultiHead(2)
    clean_opt = cl_optim.MultiTaskSAM(clean.parameters(), torch.optim.SGD, **options)
    for i in (0, 2, 3):
        clean_opt.step(make_closure(clean, i))
    for p, q in zip(model.parameters(), clean.parameters()):
        torch.testing.assert_close(p, q, rtol=RTOL, atol=ATOL)


def test_non_shared_parameter_reached_by_two_tasks_is_refused():
    """``shared=`` given explicitly without the second trunk layer, which both tasks' losses reach, is
    an error naming the problem (a parameter outside ``shared`` reached by more than one task)."""
    model = MultiHead(2)
    opt = cl_optim.MultiTaskSAM(
        model.parameters(), torch.optim.SGD, shared=list(model.trunk[:2].parameters()), lr=0.05, momentum=0.9
    )
    before = _snapshot(model, opt)
    with pytest.raises((TypeError, ValueError, RuntimeError), match="(?i)shared") as info:
        opt.step(make_closure(model, 0))
    assert "task" in str(info.value).lower()
    _assert_same(_snapshot(model, opt), before)
