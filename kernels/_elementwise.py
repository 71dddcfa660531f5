"""The per-element math of the fused ops for the Triton kernels, written once for all of them.

It is the math of ``csrc/include/cl_optim/elementwise.h`` (the C++/CUDA header) in Triton, in
the same order of operations, so that both compiled GPU backends give the oracle's numbers: fp32
registers whatever the parameter dtype; COMBINE -> RESTORE -> AMP unscale -> FISHER_EMA -> CLIP -> maximize
-> EWC -> the base update. Terms that read memory are ``tl.constexpr`` flags; hyper-parameters
are runtime values (a learning-rate schedule never recompiles).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_of(chunk_tensor, chunk_start, sizes, BLOCK: tl.constexpr):
    """This program's chunk: ``(tensor, offsets, mask)``, offsets 64-bit."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_tensor + chunk)
    offsets = tl.load(chunk_start + chunk) + tl.arange(0, BLOCK)
    return tensor, offsets, offsets < tl.load(sizes + tensor)


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
def restored_task_grad(addresses, n_tensors, t, offsets, mask, lams, inv_scale_ptr, clip_ptr, sign, beta,
                       one_minus_beta, combine_ptr, P_DTYPE: tl.constexpr, SAVE: tl.constexpr, FISHER: tl.constexpr,
                       EWC: tl.constexpr, AMP: tl.constexpr, CLIP: tl.constexpr, P_LIST: tl.constexpr,
                       G_LIST: tl.constexpr, SAVE_LIST: tl.constexpr, FISHER_LIST: tl.constexpr,
                       EWC_LIST: tl.constexpr, N_SOURCES: tl.constexpr, SOURCE_LIST: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    """The first half of every fused step, shared by the SGD and AdamW kernels: RESTORE (the weight
    read from the save buffer), then the task gradient with its optional terms. The lists are
    given by index; the EWC anchor follows the precision, COMBINE's sources follow one another
    from ``SOURCE_LIST`` (``N_SOURCES`` of them; -1: no COMBINE). Returns ``(p, g, fisher, new
    fisher)``."""
    if SAVE:
        p = load_tensor(addresses, SAVE_LIST, n_tensors, t, offsets, mask, P_DTYPE)
    else:
        p = load_tensor(addresses, P_LIST, n_tensors, t, offsets, mask, P_DTYPE)
    g = load_tensor(addresses, G_LIST, n_tensors, t, offsets, mask, P_DTYPE)
    if N_SOURCES >= 0:
        # COMBINE: 0 + c_0 g + c_1 x_1 + ... in fp32, rounded to the gradient's dtype (as task_combine_
        # writes a combination into .grad).
        acc = 0.0 + tl.load(combine_ptr) * g
        for j in tl.static_range(N_SOURCES):
            x = load_tensor(addresses, SOURCE_LIST + j, n_tensors, t, offsets, mask, P_DTYPE)
            acc = acc + tl.load(combine_ptr + 1 + j) * x
        g = acc.to(P_DTYPE).to(tl.float32)
    f = tl.zeros((BLOCK,), dtype=tl.float32)
    a = tl.zeros((BLOCK,), dtype=tl.float32)
    mu = tl.zeros((BLOCK,), dtype=tl.float32)
    lam = 0.0
    if FISHER:
        f = load_tensor(addresses, FISHER_LIST, n_tensors, t, offsets, mask, tl.float32)
    if EWC:
        a = load_tensor(addresses, EWC_LIST, n_tensors, t, offsets, mask, tl.float32)
        mu = load_tensor(addresses, EWC_LIST + 1, n_tensors, t, offsets, mask, tl.float32)
        lam = tl.load(lams + t)
    scale = 1.0
    if AMP:
        scale = tl.load(inv_scale_ptr)
    clip = 1.0
    if CLIP:
        clip = tl.load(clip_ptr)
    g, f_new = task_grad(g, p, f, a, mu, lam, scale, clip, sign, beta, one_minus_beta, FISHER, EWC)
    return p, g, f, f_new


@triton.jit
def descended(addresses, n_tensors, t, offsets, mask, p_new, descent_ptr, P_DTYPE: tl.constexpr,
              G_LIST: tl.constexpr, N_SOURCES: tl.constexpr, SOURCE_LIST: tl.constexpr):  # fmt: skip
    """DESCENT (after the update): the weight as it will be stored, plus ``c_0 g + c_1 x_1 + ...``
    with the raw gradient and COMBINE's sources, in fp32, as ``task_combine_`` accumulates."""
    acc = p_new.to(P_DTYPE).to(tl.float32)
    acc = acc + tl.load(descent_ptr) * load_tensor(addresses, G_LIST, n_tensors, t, offsets, mask, P_DTYPE)
    for j in tl.static_range(N_SOURCES):
        x = load_tensor(addresses, SOURCE_LIST + j, n_tensors, t, offsets, mask, P_DTYPE)
        acc = acc + tl.load(descent_ptr + 1 + j) * x
    return acc


@triton.jit
def div_rn(x, y):
    """x / y rounded to nearest, as the C++/CUDA kernels and torch divide: Triton's fp32 ``/`` is
    an approximate division on NVIDIA GPUs (fp64 division is exact already)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@triton.jit
def sam_weight_sq(p, g, fisher, eta, KIND: tl.constexpr):
    """T**2 of SAM (0), ASAM (1: (|p| + eta)**2), Fisher-SAM batch (2) and running (3) weights."""
    if KIND == 1:
        w = tl.abs(p) + eta
        return w * w
    elif KIND == 2:
        denominator = 1.0 + eta * g * g
        return div_rn(tl.full(g.shape, 1.0, denominator.dtype), denominator)
    elif KIND == 3:
        denominator = 1.0 + eta * fisher
        return div_rn(tl.full(g.shape, 1.0, denominator.dtype), denominator)
    else:
        return tl.full(g.shape, 1.0, tl.float32)


@triton.jit
def sam_norm_term(p, g, fisher, eta, KIND: tl.constexpr):
    """(T g)**2 in fp64 (the square of a large finite gradient overflows fp32): SAM and ASAM
    square T*g, Fisher-SAM multiplies g**2 by T**2 (as the C++ header)."""
    g64 = g.to(tl.float64)
    if KIND == 1:
        tg = (tl.abs(p) + eta).to(tl.float64) * g64
        return tg * tg
    elif KIND == 0:
        return g64 * g64
    else:
        return g64 * g64 * sam_weight_sq(p.to(tl.float64), g64, fisher.to(tl.float64), eta, KIND)


@triton.jit
def sam_perturbation(g, weight_sq, scale):
    """scale * T**2 * g; a non-finite result (scale 0 with an inf/nan gradient) moves nothing."""
    e = weight_sq * g * scale
    return tl.where((e == e) & (e - e == 0.0), e, 0.0)
