"""Independent fp64 textbook implementations (NumPy) that the forloop oracle is checked against.

Written from the papers' update rules, not from cl_optim's code:
SGD with momentum (Sutskever et al. 2013, torch's dampening/nesterov convention), AdamW
(Loshchilov & Hutter 2019, Algorithm 2 with Kingma & Ba's bias correction), SAM (Foret et al.
2021, eq. 2) and ASAM (Kwon et al. 2021, eq. 8), plus the optional terms of DESIGN.md §3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Terms:
    """Per-step optional terms, as NumPy arrays / floats (None = off)."""

    grad_scale: Optional[float] = None
    found_inf: bool = False
    fisher_beta: Optional[float] = None
    clip_coef: Optional[float] = None
    ewc_lam: Optional[float] = None
    restore: bool = False


@dataclass
class TensorState:
    p: np.ndarray
    buf: Optional[np.ndarray] = None  # SGD momentum
    m: Optional[np.ndarray] = None  # Adam first moment
    v: Optional[np.ndarray] = None  # Adam second moment
    vmax: Optional[np.ndarray] = None
    t: int = 0
    fisher: Optional[np.ndarray] = None
    precision: Optional[np.ndarray] = None  # EWC A
    anchor: Optional[np.ndarray] = None  # EWC mu
    save: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)


def effective_grad(s: TensorState, g: np.ndarray, terms: Terms, maximize: bool) -> np.ndarray:
    """The gradient the base rule sees: unscale, Fisher EMA, clip, maximize, EWC."""
    g = g.astype(np.float64)
    if terms.grad_scale is not None:
        g = g / terms.grad_scale
    if terms.fisher_beta is not None:
        s.fisher = terms.fisher_beta * s.fisher + (1.0 - terms.fisher_beta) * g * g
    if terms.clip_coef is not None:
        g = terms.clip_coef * g
    if maximize:
        g = -g
    if terms.ewc_lam is not None:
        g = g + terms.ewc_lam * s.precision * (s.p - s.anchor)
    return g


def sgd_step(s, g, terms, *, lr, momentum, dampening, nesterov, weight_decay, maximize):
    if terms.restore:
        s.p = s.save.copy()
    if terms.found_inf:
        return
    d = effective_grad(s, g, terms, maximize)
    d = d + weight_decay * s.p
    if momentum != 0:
        s.buf = d.copy() if s.buf is None else momentum * s.buf + (1.0 - dampening) * d
        d = d + momentum * s.buf if nesterov else s.buf
    s.p = s.p - lr * d


def adamw_step(s, g, terms, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize):
    if terms.restore:
        s.p = s.save.copy()
    if terms.found_inf:
        return
    d = effective_grad(s, g, terms, maximize)
    if s.m is None:
        s.m, s.v = np.zeros_like(s.p), np.zeros_like(s.p)
        s.vmax = np.zeros_like(s.p)
    s.t += 1
    s.p = s.p * (1.0 - lr * weight_decay)
    s.m = beta1 * s.m + (1.0 - beta1) * d
    s.v = beta2 * s.v + (1.0 - beta2) * d * d
    m_hat = s.m / (1.0 - beta1**s.t)
    if amsgrad:
        s.vmax = np.maximum(s.vmax, s.v)
        v_used = s.vmax
    else:
        v_used = s.v
    v_hat = v_used / (1.0 - beta2**s.t)
    s.p = s.p - lr * m_hat / (np.sqrt(v_hat) + eps)


def sam_perturbation(ps, gs, rhos, modes, etas, eps=1e-12, fishers=None):
    """e_i = rho_i * T_i**2 * g_i / (||T g|| + eps), one norm over all tensors.

    ``modes[i]``: None (SAM, T = 1), "all" (ASAM on this tensor, T = |p| + eta) — the caller
    decides which tensors are normalised (davda54: all; official: tensors with 2+ dims) —,
    "fisher" (Fisher-SAM, T**2 = 1/(1 + eta*g**2)) or "fisher_ema" (T**2 = 1/(1 + eta*F) with
    ``fishers[i]``, the running Fisher before this step's update).
    """
    t_sq = []
    for i, (p, g, mode, eta) in enumerate(zip(ps, gs, modes, etas)):
        if mode is None:
            t_sq.append(np.ones_like(p))
        elif mode == "all":
            t_sq.append((np.abs(p) + eta) ** 2)
        elif mode == "fisher":
            t_sq.append(1.0 / (1.0 + eta * g * g))
        else:
            t_sq.append(1.0 / (1.0 + eta * fishers[i]))
    norm = np.sqrt(sum(float(np.sum(w * g * g)) for w, g in zip(t_sq, gs)))
    return [rho * w * g / (norm + eps) for w, g, rho in zip(t_sq, gs, rhos)]
