"""Reference implementation of SAM variants, written from the papers' rules. Tests compare the library with it.

It is written for correctness, not speed: plain Python loops over a list of tensors, out-of-place arithmetic,
and no fused ops. It does not use ``cl_optim`` or ``torch.optim``.

Conventions (every variant):

* ``w`` is the list of weights at the start of a step. ``g0`` is the gradient at ``w``, the step's first pass.
  A *pass* is one gradient evaluation. ``loss_at(params, t)`` is called on fresh leaf copies, and the gradient
  comes from ``torch.autograd.grad``. A tensor the loss does not use gets a zero gradient.
* ``||.||`` and ``<., .>`` are global: one number over all tensors. The exception is LookSAM with
  ``layerwise=True``, which uses one number per tensor.
* SAM ascent of ``v`` with radius ``r``: ``e = r * v / (||v|| + eps)``, where ``eps = perturb_eps``
  (default 1e-12).
* The base optimizer ("sgd" or "adamw", written out by hand with torch.optim's rules) steps once per training
  step. It steps from the unperturbed weights, using the final gradient the variant produces.
* Everything runs in the dtype of ``params0``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

__all__ = ["VARIANTS", "fisher_mask", "run_reference"]


# ----------------------------------------------------------------------------------------------------------
# List arithmetic


def _norm(xs: list[Tensor]) -> Tensor:
    """Global L2 norm over all tensors, as a 0-d tensor."""
    total = torch.zeros((), dtype=xs[0].dtype)
    for x in xs:
        total = total + (x * x).sum()
    return total.sqrt()


def _dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    total = torch.zeros((), dtype=xs[0].dtype)
    for x, y in zip(xs, ys):
        total = total + (x * y).sum()
    return total


def _add(xs: list[Tensor], ys: list[Tensor], alpha=1.0) -> list[Tensor]:
    """xs + alpha * ys."""
    return [x + alpha * y for x, y in zip(xs, ys)]


def _scale(xs: list[Tensor], a) -> list[Tensor]:
    return [a * x for x in xs]


def _ascent(v: list[Tensor], r, eps: float) -> list[Tensor]:
    """SAM ascent with a global norm: e = r * v / (||v|| + eps)."""
    n = _norm(v)
    return [r * x / (n + eps) for x in v]


# ----------------------------------------------------------------------------------------------------------
# Base optimizers (torch.optim.SGD / torch.optim.AdamW rules, written out)


class _BaseOptimizer:
    """The base optimizer's state, and one update of the weights with a given gradient.

    * "sgd" follows torch.optim.SGD with dampening=0 and nesterov=False:
      ``d = g + wd*w``, then ``buf = d`` on the first step and ``buf = mu*buf + d`` after it (only when
      mu != 0), then ``w <- w - lr*buf`` (or ``w - lr*d`` when mu == 0; the buffer then stays None).
    * "adamw" follows torch.optim.AdamW with amsgrad=False:
      ``w <- w*(1 - lr*wd)``; ``m = b1*m + (1-b1)*g``; ``v = b2*v + (1-b2)*g^2``; with ``k`` the step count,
      ``w <- w - (lr/(1-b1^k)) * m / (sqrt(v)/sqrt(1-b2^k) + eps)``.

    Keyword defaults are torch's (lr 1e-3; SGD momentum 0, weight_decay 0; AdamW betas (0.9, 0.999),
    eps 1e-8, weight_decay 1e-2).
    """

    def __init__(self, name: str, kwargs: dict, params: list[Tensor]):
        self.name = name
        if name == "sgd":
            known = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}
        elif name == "adamw":
            known = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False}
        else:
            raise ValueError(f"unknown base optimizer {name!r}; expected 'sgd' or 'adamw'")
        unknown = set(kwargs) - set(known)
        if unknown:
            raise ValueError(f"unknown {name} keyword(s): {sorted(unknown)}")
        self.h = {**known, **kwargs}
        if name == "sgd" and (self.h["dampening"] != 0 or self.h["nesterov"]):
            raise ValueError("the reference SGD supports only dampening=0 and nesterov=False")
        if name == "adamw" and self.h["amsgrad"]:
            raise ValueError("the reference AdamW supports only amsgrad=False")
        self.lr = self.h["lr"]
        if name == "sgd":
            self.state = [{"momentum_buffer": None} for _ in params]
        else:
            self.state = [
                {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "step": 0} for p in params
            ]

    def step(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Returns the updated weights and updates the state. ``params`` and ``grads`` are not modified."""
        new = []
        for i, (p, g) in enumerate(zip(params, grads)):
            st = self.state[i]
            if self.name == "sgd":
                mu, wd = self.h["momentum"], self.h["weight_decay"]
                d = g + wd * p if wd != 0 else g
                if mu != 0:
                    buf = st["momentum_buffer"]
                    buf = d.clone() if buf is None else mu * buf + d
                    st["momentum_buffer"] = buf
                    d = buf
                new.append(p - self.lr * d)
            else:
                (b1, b2), eps, wd = self.h["betas"], self.h["eps"], self.h["weight_decay"]
                st["step"] += 1
                k = st["step"]
                p = p * (1 - self.lr * wd)
                st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
                st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
                bc1 = 1 - b1**k
                bc2 = 1 - b2**k
                denom = st["exp_avg_sq"].sqrt() / math.sqrt(bc2) + eps
                new.append(p - (self.lr / bc1) * st["exp_avg"] / denom)
        return new

    def momentum(self) -> list[Tensor]:
        """MSAM's direction v: SGD's momentum_buffer, or AdamW's exp_avg (not bias-corrected)."""
        if self.name == "sgd":
            return [st["momentum_buffer"] for st in self.state]
        return [st["exp_avg"] for st in self.state]


# ----------------------------------------------------------------------------------------------------------
# Variants. Each takes (w, t, grad, opt, vs, h, eps) and returns the weights after step t, where
# grad(point) is one pass, opt the base optimizer, vs the variant_state dict and h the hyper-parameters.


def _sam(w, t, grad, opt, vs, h, eps):
    """SAM (Foret et al., ICLR 2021): g1 = grad(w + rho*g0/(||g0|| + eps)); base step at w with g1."""
    g0 = grad(w)
    g1 = grad(_add(w, _ascent(g0, h["rho"], eps)))
    return opt.step(w, g1)


def _wsam(w, t, grad, opt, vs, h, eps):
    """WSAM (Yue et al., KDD 2023). Here a = gamma/(1-gamma) and g1 is SAM's gradient.

    decouple=False: base step with g0 + a*(g1 - g0).
    decouple=True (Algorithm 1): base step with g0, then w <- w - lr*a*(g1 - g0), with lr the base lr.
    """
    a = h["gamma"] / (1 - h["gamma"])
    g0 = grad(w)
    g1 = grad(_add(w, _ascent(g0, h["rho"], eps)))
    diff = _add(g1, g0, -1.0)
    if not h["decouple"]:
        return opt.step(w, _add(g0, diff, a))
    w_new = opt.step(w, g0)
    return _add(w_new, diff, -opt.lr * a)


def _looksam(w, t, grad, opt, vs, h, eps):
    """LookSAM (Liu et al., CVPR 2022, Algorithm 2). It reuses SAM's direction every k steps.

    When t % k == 0 (a SAM step, 2 passes):
      g_s = grad(w + rho*g0/(||g0|| + eps));
      g_v = g_s - (<g0, g_s>/(||g0||^2 + eps)) * g0, the part of g_s orthogonal to g0, which is stored;
      base step with g_s.
    Otherwise (1 pass): base step with g0 + alpha*(||g0||/(||g_v|| + eps))*g_v, using the stored g_v.

    layerwise=True: every norm and inner product, the ascent's norm included, is per tensor.
    """
    rho, alpha, layerwise = h["rho"], h["alpha"], h["layerwise"]
    g0 = grad(w)
    # Groups over which norms are taken: the whole list, or each tensor alone.
    groups = [[i] for i in range(len(w))] if layerwise else [list(range(len(w)))]
    if t % h["k"] == 0:
        e = [None] * len(w)
        for idx in groups:
            for i, ei in zip(idx, _ascent([g0[i] for i in idx], rho, eps)):
                e[i] = ei
        gs = grad(_add(w, e))
        gv = [None] * len(w)
        for idx in groups:
            a, b = [g0[i] for i in idx], [gs[i] for i in idx]
            coef = _dot(a, b) / (_norm(a) ** 2 + eps)
            for i in idx:
                gv[i] = gs[i] - coef * g0[i]
        vs["g_v"] = gv
        return opt.step(w, gs)
    gv = vs["g_v"]
    g = [None] * len(w)
    for idx in groups:
        ratio = _norm([g0[i] for i in idx]) / (_norm([gv[i] for i in idx]) + eps)
        for i in idx:
            g[i] = g0[i] + alpha * ratio * gv[i]
    return opt.step(w, g)


def _msam(w, t, grad, opt, vs, h, eps):
    """Momentum-SAM (Becker et al., "Momentum-SAM: Sharpness Aware Minimization without Computational Overhead").

    The stored weights are the perturbed point p~ = theta - c*v. Here v is the base optimizer's momentum
    (SGD's momentum_buffer, AdamW's exp_avg) and c = rho/(||v|| + eps). Before the first step p~ = theta.
    Each step uses 1 pass:
      g = grad(p~); theta = p~ + c_old*v_old; base step on theta with g gives theta' and v';
      c_new = rho/(||v'|| + eps); the stored weights become theta' - c_new*v'.
    The step uses perturb_eps (default 1e-12) as eps.
    """
    g = grad(w)
    if t == 0:
        theta = list(w)  # there is no v yet: p~ = theta
    else:
        theta = _add(w, opt.momentum(), vs["c"])
    theta_new = opt.step(theta, g)
    v = opt.momentum()
    c = float(h["rho"] / (_norm(v) + eps))
    vs["theta"], vs["c"] = theta_new, c
    return _add(theta_new, v, -c)


def _friendly_sam(w, t, grad, opt, vs, h, eps):
    """Friendly-SAM (Li et al., CVPR 2024), in the official code's order (nblt/F-SAM utils.py).

    First step: m = g0 and d = g0. Later steps: d = g0 - sigma*m_old, then m = lmbda*m_old + (1-lmbda)*g0,
    using the raw g0. Then g1 = grad(w + rho*d/(||d|| + eps)) and the base steps at w with g1.
    """
    g0 = grad(w)
    if vs["m"] is None:
        d = list(g0)
        vs["m"] = [g.clone() for g in g0]
    else:
        m = vs["m"]
        d = _add(g0, m, -h["sigma"])
        vs["m"] = [h["lmbda"] * mi + (1 - h["lmbda"]) * gi for mi, gi in zip(m, g0)]
    g1 = grad(_add(w, _ascent(d, h["rho"], eps)))
    return opt.step(w, g1)


def _four_passes(w, grad, h, eps, g0=None):
    """GAM's and C-Flat's four passes: g0 at w; g1 at w + ascent(g0, rho); h = g1 - g0;
    w2 = w + ascent(h, grad_norm_rho); g2 at w2; g3 at w2 + ascent(g2, rho).
    A g0 computed by the caller is the first pass."""
    if g0 is None:
        g0 = grad(w)
    g1 = grad(_add(w, _ascent(g0, h["rho"], eps)))
    hdir = _add(g1, g0, -1.0)
    w2 = _add(w, _ascent(hdir, h["grad_norm_rho"], eps))
    g2 = grad(w2)
    g3 = grad(_add(w2, _ascent(g2, h["rho"], eps)))
    return g0, g1, g2, g3


def _gam(w, t, grad, opt, vs, h, eps):
    """GAM (Zhang et al., CVPR 2023; official xxgege/GAM gam/gam.py). 4 passes (see _four_passes), then:
    pro_m = g0 + |beta2|*g2; d = beta1*g1 + beta3*g3; cos = <pro_m, d>/(||d||*||pro_m|| + eps);
    vertical = pro_m - cos*||pro_m||*d/(||d|| + eps); the base steps at w with d - grad_gamma*vertical.
    """
    g0, g1, g2, g3 = _four_passes(w, grad, h, eps)
    pro_m = _add(g0, g2, abs(h["grad_beta_2"]))
    d = _add(_scale(g1, h["grad_beta_1"]), g3, h["grad_beta_3"])
    nd, npm = _norm(d), _norm(pro_m)
    cos = _dot(pro_m, d) / (nd * npm + eps)
    vertical = [pm - cos * npm * di / (nd + eps) for pm, di in zip(pro_m, d)]
    return opt.step(w, _add(d, vertical, -h["grad_gamma"]))


def _cflat(w, t, grad, opt, vs, h, eps):
    """C-Flat (Bian et al., NeurIPS 2024). 4 passes (see _four_passes); the base steps at w with
    g1 + lamb*(g3 - g2).

    strategy="plus" (C-Flat++ as in THUDM/INFTY 0.1.2), with step_count = t + 1:
      E = A/(1 + exp(-k*(step_count - t0))) - ||g0||; then A <- A - cof*E.
      If E <= 0, the C-Flat step runs (4 passes). Otherwise the base steps with g0 (1 pass).
    """
    g0 = None
    if h["strategy"] == "plus":
        g0 = grad(w)
        e_val = vs["A"] / (1 + math.exp(-h["k"] * ((t + 1) - h["t0"]))) - float(_norm(g0))
        vs["A"] = vs["A"] - h["cof"] * e_val
        if e_val > 0:
            return opt.step(w, g0)
    _, g1, g2, g3 = _four_passes(w, grad, h, eps, g0)
    return opt.step(w, _add(g1, _add(g3, g2, -1.0), h["lamb"]))


def _rwp(w, t, grad, opt, vs, h, eps):
    """Random weight perturbation, m-RWP (Li et al.; official nblt/RWP train_rwp_parallel.py).

    g_clean = g0 and g_noisy = grad(w + n). For each tensor in order, n is drawn as
    randn(p.shape, generator=gen, dtype) from one generator seeded once with generator_seed before step 0.
    n is then scaled filter-wise. For a tensor with 2+ dims, row i (along dim 0) is multiplied by
    rho*||w[i]||. For a tensor with fewer dims, all of n is multiplied by rho*||w||.
    The base steps with alpha*g_noisy + (1-alpha)*g_clean.
    """
    g0 = grad(w)
    noise = []
    for p in w:
        n = torch.randn(p.shape, generator=vs["_gen"], dtype=p.dtype)
        if p.dim() >= 2:
            n = torch.stack([n[i] * (h["rho"] * p[i].norm()) for i in range(p.shape[0])])
        else:
            n = n * (h["rho"] * p.norm())
        noise.append(n)
    g_noisy = grad(_add(w, noise))
    return opt.step(w, _add(_scale(g_noisy, h["alpha"]), g0, 1 - h["alpha"]))


def _interval_sam(w, t, grad, opt, vs, h, eps):
    """SAM every `interval` steps from `start` on; late-phase SAM (Zhou et al., ICLR 2025) is interval=1.

    The step is SAM when t >= start and (t - start) % interval == 0. Otherwise the base steps with g0
    (1 pass). The same base optimizer, and its momentum, is used for both kinds of step.
    """
    if t >= h["start"] and (t - h["start"]) % h["interval"] == 0:
        return _sam(w, t, grad, opt, vs, h, eps)
    return opt.step(w, grad(w))


def _sam_on(w, t, grad, opt, vs, h, eps):
    """SAM-ON (Mueller et al., NeurIPS 2023). Only the tensors with norm_mask[i] True are perturbed:
    e_i = rho*g0_i/(||g0 restricted to the masked tensors|| + eps). Every tensor is updated with
    the gradient at w + e."""
    mask = h["norm_mask"]
    g0 = grad(w)
    n = _norm([g if m else torch.zeros_like(g) for g, m in zip(g0, mask)])  # masked tensors only
    e = [h["rho"] * g / (n + eps) if m else torch.zeros_like(g) for g, m in zip(g0, mask)]
    return opt.step(w, grad(_add(w, e)))


def _ssam_fisher(w, t, grad, opt, vs, h, eps):
    """SSAM-F (Mi et al., NeurIPS 2022): e = rho*mask*g0/(||g0|| + eps). The norm is over the whole g0,
    without the mask, as in the official code. The base steps at w with grad(w + e)."""
    g0 = grad(w)
    n = _norm(g0)
    e = [h["rho"] * m.to(g.dtype) * g / (n + eps) for g, m in zip(g0, h["masks"])]
    return opt.step(w, grad(_add(w, e)))


# name -> (rule, required hyper-parameters, optional hyper-parameters with defaults)
VARIANTS = {
    "sam": (_sam, {"rho"}, {}),
    "wsam": (_wsam, {"rho", "gamma", "decouple"}, {}),
    "looksam": (_looksam, {"rho", "k", "alpha", "layerwise"}, {}),
    "msam": (_msam, {"rho"}, {}),
    "friendly_sam": (_friendly_sam, {"rho", "sigma", "lmbda"}, {}),
    "gam": (
        _gam,
        {"rho", "grad_norm_rho", "grad_beta_1", "grad_beta_2", "grad_beta_3", "grad_gamma"},
        {},
    ),
    "cflat": (
        _cflat,
        {"rho", "lamb", "grad_norm_rho"},
        {"strategy": None, "A": None, "k": None, "t0": None, "cof": None},
    ),
    "rwp": (_rwp, {"rho", "alpha", "generator_seed"}, {}),
    "interval_sam": (_interval_sam, {"rho", "interval", "start"}, {}),
    "sam_on": (_sam_on, {"rho", "norm_mask"}, {}),
    "ssam_fisher": (_ssam_fisher, {"rho", "masks"}, {}),
}


def _initial_variant_state(variant: str, h: dict, params: list[Tensor], opt: _BaseOptimizer) -> dict:
    if variant == "looksam":
        return {"g_v": [torch.zeros_like(p) for p in params]}
    if variant == "msam":
        if opt.name == "sgd" and opt.h["momentum"] == 0:
            raise ValueError("msam needs a momentum: base 'sgd' with momentum != 0, or 'adamw'")
        return {"theta": [p.clone() for p in params], "c": 0.0}
    if variant == "friendly_sam":
        return {"m": None}
    if variant == "cflat":
        if h["strategy"] not in (None, "plus"):
            raise ValueError(f"unknown cflat strategy {h['strategy']!r}")
        if h["strategy"] == "plus":
            missing = [key for key in ("A", "k", "t0", "cof") if h[key] is None]
            if missing:
                raise ValueError(f"cflat strategy='plus' needs {missing}")
            return {"A": float(h["A"])}
        return {}
    if variant == "rwp":
        return {"_gen": torch.Generator().manual_seed(h["generator_seed"])}
    return {}


def run_reference(
    variant: str,
    params0: list[Tensor],
    loss_at: Callable[[list[Tensor], int], Tensor],
    steps: int,
    base: str,
    base_kwargs: dict,
    **hyper,
) -> dict:
    """Runs ``steps`` steps of ``variant`` (a key of VARIANTS) from ``params0``, as a single parameter group.

    ``loss_at(params, t)`` is the scalar loss at ``params`` on step t's batch. Every pass of step t uses the
    same t. ``base`` is "sgd" or "adamw", configured by ``base_kwargs``. ``hyper`` holds the variant's
    hyper-parameters and, optionally, ``perturb_eps`` (default 1e-12).

    Returns a dict:
      "params": the final weights (for msam, the stored perturbed weights);
      "base_state": per tensor, {"momentum_buffer"} (None when momentum is 0) or {"exp_avg", "exp_avg_sq", "step"};
      "variant_state": looksam {"g_v"}; msam {"theta", "c" (float)}; friendly_sam {"m"};
        cflat with strategy "plus" {"A" (float)}; the other variants {};
      "passes": the number of gradient evaluations in each step.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    rule, required, optional = VARIANTS[variant]
    hyper = dict(hyper)
    eps = hyper.pop("perturb_eps", 1e-12)
    missing = required - set(hyper)
    unknown = set(hyper) - required - set(optional)
    if missing or unknown:
        raise ValueError(f"{variant}: missing hyper-parameters {sorted(missing)}, unknown {sorted(unknown)}")
    h = {**optional, **hyper}

    w = [p.detach().clone() for p in params0]
    opt = _BaseOptimizer(base, base_kwargs, w)
    vs = _initial_variant_state(variant, h, w, opt)

    passes = []
    for t in range(steps):
        count = [0]

        def grad(point, t=t, count=count):
            count[0] += 1
            leaves = [p.detach().clone().requires_grad_(True) for p in point]
            loss = loss_at(leaves, t)
            gs = torch.autograd.grad(loss, leaves, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(leaves, gs)]

        w = rule(w, t, grad, opt, vs, h, eps)
        passes.append(count[0])

    return {
        "params": w,
        "base_state": opt.state,
        "variant_state": {k: v for k, v in vs.items() if not k.startswith("_")},
        "passes": passes,
    }


def fisher_mask(scores: list[Tensor], sparsity: float) -> list[Tensor]:
    """SSAM-F's mask (Mi et al., NeurIPS 2022). It keeps (True) the round((1 - sparsity)*N) elements with the
    largest score, over all N elements of all tensors.

    The oracle is one global sort of the concatenated, flattened scores. Ties are broken by a stable
    descending sort: among equal scores, the element that comes first (by tensor order, then row-major
    position) is kept. ``round`` is Python's round, which rounds halves to even.
    """
    flat = torch.cat([s.detach().reshape(-1) for s in scores])
    keep = round((1 - sparsity) * flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[order[:keep]] = True
    masks, start = [], 0
    for s in scores:
        masks.append(kept[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return masks
