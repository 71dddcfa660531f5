"""``sgd_step_``: torch.optim.SGD's update with the optional terms (RESTORE, AMP, FISHER_EMA, CLIP,
maximize, EWC) fused into one pass, over a multi-tensor group. The AMP skip is decided in the
kernel from ``found_inf`` on the device: a skipped step restores the weights and changes nothing
else (a buffer it was to start is left at zero, as in the C++ kernels)."""

from __future__ import annotations

import triton
import triton.language as tl

from ._elementwise import chunk_of, descended, load_tensor, restored_task_grad, store_tensor
from ._pointer_table import BLOCK, Contiguous, per_tensor, pointer_table
from ._step_terms import pick, split_by, step_inputs
from ._types import triton_dtype


@triton.jit
def _sgd_kernel(addresses, n_tensors, sizes, chunk_tensor, chunk_start, lams, inv_scale_ptr, found_inf_ptr,
                clip_ptr, combine_ptr, descent_ptr, lr, momentum, one_minus_dampening, weight_decay, sign, beta, one_minus_beta,
                P_DTYPE: tl.constexpr, SAVE: tl.constexpr, FISHER: tl.constexpr, EWC: tl.constexpr,
                MOMENTUM: tl.constexpr, READY: tl.constexpr, NESTEROV: tl.constexpr, AMP: tl.constexpr,
                SKIP: tl.constexpr, CLIP: tl.constexpr, N_SOURCES: tl.constexpr, DESCENT: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    # Lists: 0 param, 1 grad, 2 momentum buffer, 3 save, 4 fisher, 5 EWC precision, 6 EWC anchor,
    # 7... COMBINE's sources (N_SOURCES = -1: no COMBINE).
    t, offsets, mask = chunk_of(chunk_tensor, chunk_start, sizes, BLOCK)
    p, g, f, f_new = restored_task_grad(addresses, n_tensors, t, offsets, mask, lams, inv_scale_ptr, clip_ptr, sign,
                                        beta, one_minus_beta, combine_ptr, P_DTYPE, SAVE, FISHER, EWC, AMP, CLIP, 0,
                                        1, 3, 4, 5, N_SOURCES, 7, BLOCK)  # fmt: skip
    g = tl.where(weight_decay != 0.0, g + weight_decay * p, g)  # 0 * inf must not reach g
    b = g
    if MOMENTUM:
        if READY:
            b = (
                load_tensor(addresses, 2, n_tensors, t, offsets, mask, P_DTYPE) * momentum
                + one_minus_dampening * g
            )
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    p_new = p - lr * g
    if DESCENT:  # after the update, in the same pass (WSAM's decoupled descent)
        p_new = descended(
            addresses, n_tensors, t, offsets, mask, p_new, descent_ptr, P_DTYPE, 1, N_SOURCES, 7
        )
    if SKIP:
        skip = tl.load(found_inf_ptr) != 0.0
        p_new = tl.where(skip, p, p_new)  # p: the restored weight
        f_new = tl.where(skip, f, f_new)
        if MOMENTUM:
            if READY:
                b = tl.where(skip, load_tensor(addresses, 2, n_tensors, t, offsets, mask, P_DTYPE), b)
            else:
                b = tl.where(skip, 0.0, b)
    store_tensor(addresses, 0, n_tensors, t, offsets, mask, p_new, P_DTYPE)
    if MOMENTUM:
        store_tensor(addresses, 2, n_tensors, t, offsets, mask, b, P_DTYPE)
    if FISHER:
        store_tensor(addresses, 4, n_tensors, t, offsets, mask, f_new, tl.float32)


def sgd_step_(params, grads, momentum_buffers, buffer_ready, restore_from, combine_from, combine_coef, fisher,
              ewc_precision, ewc_anchor, ewc_lam, grad_scale, found_inf, clip_coef, fisher_beta, maximize, lr,
              momentum, dampening, weight_decay, nesterov) -> None:  # fmt: skip
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    views = Contiguous(params)
    params_c, grads_c = views(params, written=True), views(grads)
    buffers = views(momentum_buffers, written=True) if momentum_buffers else None
    terms = step_inputs(views, n, device, restore_from, fisher, ewc_precision, ewc_anchor, grad_scale, found_inf,
                        clip_coef, combine_from, combine_coef, lr)  # fmt: skip
    ready = [bool(buffers) and buffer_ready[i] != 0 for i in range(n)]
    for (is_covered, is_ready), index in split_by(list(zip(terms.covered, ready))).items():
        lists = [pick(params_c, index), pick(grads_c, index), pick(buffers, index) or [None] * len(index),
                 pick(terms.saves, index), pick(terms.fishers, index), pick(terms.precision, index),
                 pick(terms.anchor, index), *(pick(source, index) for source in terms.sources)]  # fmt: skip
        table = pointer_table(lists)
        if not table.num_chunks:
            continue
        lams = per_tensor([ewc_lam[i] if is_covered else 0.0 for i in index], device)
        _sgd_kernel[(table.num_chunks,)](
            table.addresses, table.num_tensors, table.sizes, table.chunk_tensor, table.chunk_start, lams,
            terms.inv_scale, terms.found_inf, terms.clip, terms.combine_coef, terms.descent_coef, float(lr), float(momentum), float(1.0 - dampening),
            float(weight_decay), -1.0 if maximize else 1.0, float(fisher_beta), float(1.0 - fisher_beta),
            P_DTYPE=triton_dtype(params[0].dtype), SAVE=bool(restore_from), FISHER=bool(fisher),
            EWC=is_covered, MOMENTUM=buffers is not None, READY=is_ready, NESTEROV=bool(nesterov),
            AMP=terms.amp, SKIP=terms.skip, CLIP=terms.clipped,
            N_SOURCES=len(terms.sources) if terms.combining else -1,
            DESCENT=terms.descending, BLOCK=BLOCK,
        )  # fmt: skip
    views.finish()
