"""The forloop oracle against the independent fp64 textbook (tests/textbook.py)."""

from __future__ import annotations

import numpy as np
import pytest
import textbook as tb
import torch

import cl_optim
from cl_optim._terms import StepTerms
from cl_optim.adamw import adamw_step_
from cl_optim.sgd import sgd_step_

SIZES = (1, 97, 1025)
STEPS = 10
TOL = dict(rtol=2e-5, atol=2e-6)

SGD_CONFIGS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False),
    dict(lr=0.05, momentum=0.8, dampening=0.3, nesterov=False, weight_decay=1e-3, maximize=True),
]
ADAMW_CONFIGS = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False),
    dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.0, amsgrad=True, maximize=False),
    dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=True),
]
TERM_CONFIGS = ["none", "amp", "fisher", "clip", "ewc", "restore", "all"]


class Run:
    """Drives the torch forloop and the NumPy textbook through the same inputs."""

    def __init__(self, terms_name: str, seed: int = 0):
        self.name = terms_name
        self.gen = torch.Generator().manual_seed(seed)
        self.params = [torch.randn(n, generator=self.gen) for n in SIZES]
        self.book = [tb.TensorState(p=p.double().numpy().copy()) for p in self.params]
        on = lambda t: terms_name in (t, "all")
        self.fisher = [torch.rand(n, generator=self.gen) for n in SIZES] if on("fisher") else None
        self.ewc = on("ewc")
        if self.ewc:
            self.precision = [torch.rand(n, generator=self.gen) * 3 for n in SIZES]
            self.anchor = [torch.randn(n, generator=self.gen) for n in SIZES]
        for i, s in enumerate(self.book):
            if self.fisher is not None:
                s.fisher = self.fisher[i].double().numpy().copy()
            if self.ewc:
                s.precision = self.precision[i].double().numpy()
                s.anchor = self.anchor[i].double().numpy()

    def step_inputs(self, step: int):
        grads = [torch.randn(n, generator=self.gen) for n in SIZES]
        on = lambda t: self.name in (t, "all")
        scale = 1024.0 if on("amp") else None
        found_inf = on("amp") and step == 3
        terms = StepTerms(
            grad_scale=torch.tensor(scale) if scale else None,
            found_inf=torch.tensor(float(found_inf)) if on("amp") else None,
            fisher=self.fisher,
            fisher_beta=0.9,
            clip_coef=torch.tensor(0.5) if on("clip") else None,
            ewc_precision=self.precision if self.ewc else None,
            ewc_anchor=self.anchor if self.ewc else None,
            ewc_lam=2.0,
        )
        book_terms = tb.Terms(
            grad_scale=scale,
            found_inf=found_inf,
            fisher_beta=0.9 if self.fisher is not None else None,
            clip_coef=0.5 if on("clip") else None,
            ewc_lam=2.0 if self.ewc else None,
            restore=on("restore"),
        )
        if on("restore"):
            # A SAM-like round trip: save, perturb, and the step must start from the saved weights.
            terms.restore_from = [p.clone() for p in self.params]
            for p in self.params:
                p.add_(torch.randn(p.shape, generator=self.gen) * 0.01)
            for s, saved in zip(self.book, terms.restore_from):
                s.save = saved.double().numpy().copy()
        scaled = [g * scale if scale else g for g in grads]
        return scaled, terms, [g.double().numpy() * (scale or 1.0) for g in grads], book_terms

    def check(self, extra_state):
        for i, s in enumerate(self.book):
            np.testing.assert_allclose(self.params[i].double().numpy(), s.p, **TOL)
            for name, tensors in extra_state.items():
                if tensors is not None and getattr(s, name) is not None:
                    np.testing.assert_allclose(tensors[i].double().numpy(), getattr(s, name), **TOL)
            if self.fisher is not None:
                np.testing.assert_allclose(self.fisher[i].double().numpy(), s.fisher, **TOL)


@pytest.mark.parametrize("terms_name", TERM_CONFIGS)
@pytest.mark.parametrize("cfg", SGD_CONFIGS)
def test_sgd_forloop_matches_textbook(cfg, terms_name):
    run = Run(terms_name)
    buffers = [None] * len(SIZES) if cfg["momentum"] != 0 else None
    for step in range(STEPS):
        grads, terms, book_grads, book_terms = run.step_inputs(step)
        sgd_step_(run.params, grads, buffers, terms, backend="forloop", **cfg)
        for s, g in zip(run.book, book_grads):
            tb.sgd_step(s, g, book_terms, **cfg)
    run.check({"buf": buffers})


@pytest.mark.parametrize("terms_name", TERM_CONFIGS)
@pytest.mark.parametrize("cfg", ADAMW_CONFIGS)
def test_adamw_forloop_matches_textbook(cfg, terms_name):
    run = Run(terms_name)
    m = [torch.zeros(n) for n in SIZES]
    v = [torch.zeros(n) for n in SIZES]
    vmax = [torch.zeros(n) for n in SIZES] if cfg["amsgrad"] else None
    steps = [torch.tensor(0.0) for _ in SIZES]
    kw = {k: v_ for k, v_ in cfg.items() if k != "amsgrad"}
    for step in range(STEPS):
        grads, terms, book_grads, book_terms = run.step_inputs(step)
        adamw_step_(run.params, grads, m, v, vmax, steps, terms, backend="forloop", **kw)
        for s, g in zip(run.book, book_grads):
            tb.adamw_step(s, g, book_terms, **cfg)
    run.check({"m": m, "v": v, "vmax": vmax})
    expected_steps = STEPS - (1 if terms_name in ("amp", "all") else 0)
    assert [int(t.item()) for t in steps] == [expected_steps] * len(SIZES)


# --------------------------------------------------------------------------- SAM / ASAM, whole steps

# A separable quadratic loss, L = sum_i 0.5 * a_i * (w_i - c_i)**2, whose gradient both sides
# compute exactly in their own precision.
SHAPES = [(6, 5), (5,), (3, 6)]


def _quadratic():
    gen = torch.Generator().manual_seed(7)
    a = [torch.rand(s, generator=gen) * 2 + 0.1 for s in SHAPES]
    c = [torch.randn(s, generator=gen) for s in SHAPES]
    w = [torch.randn(s, generator=gen) for s in SHAPES]
    return a, c, w


@pytest.mark.parametrize("adaptive", [False, True, "official", "fisher", "fisher_ema"])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_sam_forloop_matches_textbook(adaptive, base):
    a, c, w0 = _quadratic()
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    groups = [{"params": params[:2], "rho": 0.1}, {"params": params[2:], "rho": 0.3}]
    beta = 0.8 if adaptive == "fisher_ema" else None
    eta = 2.0 if adaptive == "fisher_ema" else None  # eta given, or the convention's default
    if base == "sgd":
        opt = cl_optim.SAM(groups, cl_optim.SGD, adaptive=adaptive, eta=eta, lr=0.1, momentum=0.9,
                           backend="forloop", fisher_ema=beta)  # fmt: skip
    else:
        opt = cl_optim.SAM(groups, cl_optim.AdamW, adaptive=adaptive, eta=eta, lr=0.05, weight_decay=0.01,
                           backend="forloop", fisher_ema=beta)  # fmt: skip
    rhos = [0.1, 0.1, 0.3]
    book = [tb.TensorState(p=w.double().numpy().copy()) for w in w0]
    an, cn = [x.double().numpy() for x in a], [x.double().numpy() for x in c]

    if adaptive is False:
        modes, etas = [None] * 3, [0.0] * 3
    elif adaptive is True:  # davda54: |w| on every tensor
        modes, etas = ["all"] * 3, [0.0] * 3
    elif adaptive == "official":  # |w| + 0.01 on tensors with 2+ dimensions only
        modes = ["all" if len(s) >= 2 else None for s in SHAPES]
        etas = [0.01] * 3
    elif adaptive == "fisher":  # Kim et al.: T**2 = 1/(1 + g**2), every tensor
        modes, etas = ["fisher"] * 3, [1.0] * 3
    else:  # the running Fisher (EMA of the first-pass gradient), before this step's update
        modes, etas = ["fisher_ema"] * 3, [2.0] * 3
    fishers = [np.zeros(s) for s in SHAPES]

    for _ in range(STEPS):
        for p, ai, ci in zip(params, a, c):
            p.grad = ai * (p.detach() - ci)
        before = [p.detach().clone() for p in params]
        opt.first_step(zero_grad=True)
        g1 = [ai * (s.p - ci) for s, ai, ci in zip(book, an, cn)]
        e = tb.sam_perturbation([s.p for s in book], g1, rhos, modes, etas, fishers=fishers)
        if beta is not None:
            fishers = [beta * f + (1 - beta) * g * g for f, g in zip(fishers, g1)]
        for p, s, ei in zip(params, book, e):
            np.testing.assert_allclose(p.detach().double().numpy(), s.p + ei, rtol=1e-6, atol=1e-6)
        for p, ai, ci in zip(params, a, c):
            p.grad = ai * (p.detach() - ci)
        g2 = [ai * (s.p + ei - ci) for s, ai, ci, ei in zip(book, an, cn, e)]
        opt.second_step(zero_grad=True)
        for s, g in zip(book, g2):
            if base == "sgd":
                tb.sgd_step(s, g, tb.Terms(), lr=0.1, momentum=0.9, dampening=0.0, nesterov=False,
                            weight_decay=0.0, maximize=False)  # fmt: skip
            else:
                tb.adamw_step(s, g, tb.Terms(), lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8,
                              weight_decay=0.01, amsgrad=False, maximize=False)  # fmt: skip
        assert not any(torch.equal(p, b) for p, b in zip(params, before))
    for p, s in zip(params, book):
        np.testing.assert_allclose(p.detach().double().numpy(), s.p, rtol=1e-5, atol=1e-6)
    if beta is not None:
        for p, f in zip(params, fishers):
            np.testing.assert_allclose(opt.state[p]["fisher_ema"].double().numpy(), f, rtol=1e-5, atol=1e-7)
