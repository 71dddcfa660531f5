"""The per-element math of the fused ops for the Triton kernels, written once for all of them.

It is the math of ``csrc/include/cl_optim/elementwise.h`` (the C++/CUDA header) in Triton, in
the same order of operations, so that both compiled GPU backends give the oracle's numbers: fp32
registers whatever the parameter dtype; RESTORE -> AMP unscale -> FISHER_EMA -> CLIP -> maximize
-> EWC -> the base update. Terms that read memory are ``tl.constexpr`` flags; hyper-parameters
are runtime values (a learning-rate schedule never recompiles).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_tensor(addresses, list_index, n_tensors, tensor, offsets, mask, DTYPE: tl.constexpr):
    """Elements ``offsets`` of tensor ``tensor`` of list ``list_index``, as fp32."""
    base = tl.load(addresses + list_index * n_tensors + tensor).to(tl.pointer_type(DTYPE))
    return tl.load(base + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tensor(addresses, list_index, n_tensors, tensor, offsets, mask, value, DTYPE: tl.constexpr):
    """Write fp32 ``value`` into tensor ``tensor`` of list ``list_index`` (rounded to its dtype)."""
    base = tl.load(addresses + list_index * n_tensors + tensor).to(tl.pointer_type(DTYPE))
    tl.store(base + offsets, value.to(DTYPE), mask=mask)


@triton.jit
def task_grad(g, p, fisher, precision, anchor, lam, inv_scale, clip_coef, sign, beta, one_minus_beta,
              FISHER: tl.constexpr, EWC: tl.constexpr):  # fmt: skip
    """The gradient the base update sees, and the Fisher EMA of the task gradient (before the
    clip and the EWC pull): returns ``(g, fisher)``."""
    g = g * inv_scale
    if FISHER:
        fisher = fisher * beta + one_minus_beta * g * g
    g = g * clip_coef * sign
    if EWC:
        g = g + lam * precision * (p - anchor)
    return g, fisher


@triton.jit
def sam_weight_sq(p, g, fisher, eta, KIND: tl.constexpr):
    """T**2 of SAM (0), ASAM (1: (|p| + eta)**2), Fisher-SAM batch (2) and running (3) weights."""
    if KIND == 1:
        w = tl.abs(p) + eta
        return w * w
    elif KIND == 2:
        return 1.0 / (1.0 + eta * g * g)
    elif KIND == 3:
        return 1.0 / (1.0 + eta * fisher)
    else:
        return tl.full(g.shape, 1.0, tl.float32)


@triton.jit
def sam_norm_term(p, g, fisher, eta, KIND: tl.constexpr):
    """(T g)**2: SAM and ASAM square T*g, Fisher-SAM multiplies g**2 by T**2 (as the C++ header)."""
    if KIND == 1:
        tg = (tl.abs(p) + eta) * g
        return tg * tg
    elif KIND == 0:
        return g * g
    else:
        return g * g * sam_weight_sq(p, g, fisher, eta, KIND)


@triton.jit
def sam_perturbation(g, weight_sq, scale):
    """scale * T**2 * g; a non-finite result (scale 0 with an inf/nan gradient) moves nothing."""
    e = weight_sq * g * scale
    return tl.where((e == e) & (e - e == 0.0), e, 0.0)
