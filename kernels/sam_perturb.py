"""``sam_perturb_``: save <- p; [F <- beta F + (1-beta)(g/scale)**2 where ``finite``];
p <- p + s * T**2 * g with s read from the device and T**2 from the Fisher before its update;
an element whose perturbation is not finite stays put. One launch per weight kind present."""

from __future__ import annotations

import triton
import triton.language as tl

from ._elementwise import chunk_of, load_tensor, sam_perturbation, sam_weight_sq, store_tensor
from ._pointer_table import BLOCK, Contiguous, pointer_table
from ._step_terms import device_scalar, inv_scale, pick, split_by
from ._types import triton_dtype


@triton.jit
def _sam_perturb_kernel(addresses, n_tensors, sizes, chunk_tensor, chunk_start, scale_ptr, inv_scale_ptr,
                        finite_ptr, eta, beta, one_minus_beta, P_DTYPE: tl.constexpr, KIND: tl.constexpr,
                        FISHER: tl.constexpr, AMP: tl.constexpr, FINITE: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    # Lists: 0 param, 1 grad, 2 save, 3 fisher (fp32).
    t, offsets, mask = chunk_of(chunk_tensor, chunk_start, sizes, BLOCK)
    p = load_tensor(addresses, 0, n_tensors, t, offsets, mask, P_DTYPE)
    g = load_tensor(addresses, 1, n_tensors, t, offsets, mask, P_DTYPE)
    f = tl.zeros((BLOCK,), dtype=tl.float32)
    if FISHER:
        f = load_tensor(addresses, 3, n_tensors, t, offsets, mask, tl.float32)
    weight_sq = sam_weight_sq(p, g, f, eta, KIND)
    store_tensor(addresses, 2, n_tensors, t, offsets, mask, p, P_DTYPE)
    if FISHER:
        unscaled = g
        if AMP:
            unscaled = g * tl.load(inv_scale_ptr)
        f_new = f * beta + one_minus_beta * unscaled * unscaled
        if FINITE:
            f_new = tl.where(tl.load(finite_ptr) != 0, f_new, f)
        store_tensor(addresses, 3, n_tensors, t, offsets, mask, f_new, tl.float32)
    e = sam_perturbation(g, weight_sq, tl.load(scale_ptr))
    store_tensor(addresses, 0, n_tensors, t, offsets, mask, p + e, P_DTYPE)


def sam_perturb_(params, grads, saves, scale, weighted, eta, fisher, fisher_beta, grad_scale, finite) -> None:
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    kinds = [int(k) for k in weighted] if weighted else [0] * n
    views = Contiguous(params)
    p, g, s = views(params, written=True), views(grads), views(saves, written=True)
    f = views(fisher, written=True) if fisher else [None] * n
    scale_t, _ = device_scalar(scale, device)
    inv, amp = inv_scale(grad_scale, device)
    finite_t, has_finite = device_scalar(finite, device)
    for kind, index in split_by(kinds).items():
        table = pointer_table([pick(p, index), pick(g, index), pick(s, index), pick(f, index)])
        if not table.num_chunks:
            continue
        _sam_perturb_kernel[(table.num_chunks,)](
            table.addresses, table.num_tensors, table.sizes, table.chunk_tensor, table.chunk_start, scale_t, inv,
            finite_t, float(eta), float(fisher_beta), float(1.0 - fisher_beta), P_DTYPE=triton_dtype(params[0].dtype),
            KIND=kind, FISHER=bool(fisher), AMP=amp, FINITE=has_finite, BLOCK=BLOCK,
        )  # fmt: skip
    views.finish()
