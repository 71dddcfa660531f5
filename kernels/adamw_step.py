"""``adamw_step_``: torch.optim.AdamW's update with the optional terms (RESTORE, AMP, FISHER_EMA,
CLIP, maximize, EWC) fused into one pass over a multi-tensor group. The step counts are counted
and turned into bias corrections by device ops (in fp64, as the C++ backend on the host), and a
step that ``found_inf`` skips counts nothing and writes back what it read: no host read."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._elementwise import chunk_of, descended, div_rn, load_tensor, restored_task_grad, store_tensor
from ._pointer_table import BLOCK, Contiguous, per_tensor, pointer_table
from ._step_terms import pick, split_by, step_inputs
from ._types import triton_dtype


@triton.jit
def _adamw_kernel(addresses, n_tensors, sizes, chunk_tensor, chunk_start, lams, step_sizes, bias2_sqrts,
                  inv_scale_ptr, found_inf_ptr, clip_ptr, combine_ptr, descent_ptr, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                  sign, beta, one_minus_beta, P_DTYPE: tl.constexpr, SAVE: tl.constexpr, FISHER: tl.constexpr,
                  EWC: tl.constexpr, AMSGRAD: tl.constexpr, AMP: tl.constexpr, SKIP: tl.constexpr,
                  CLIP: tl.constexpr, N_SOURCES: tl.constexpr, DESCENT: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    # Lists: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq, 5 save, 6 fisher,
    # 7 EWC precision, 8 EWC anchor, 9... COMBINE's sources (N_SOURCES = -1: no COMBINE).
    t, offsets, mask = chunk_of(chunk_tensor, chunk_start, sizes, BLOCK)
    p, g, f, f_new = restored_task_grad(addresses, n_tensors, t, offsets, mask, lams, inv_scale_ptr, clip_ptr, sign,
                                        beta, one_minus_beta, combine_ptr, P_DTYPE, SAVE, FISHER, EWC, AMP, CLIP, 0,
                                        1, 5, 6, 7, N_SOURCES, 9, BLOCK)  # fmt: skip
    m = load_tensor(addresses, 2, n_tensors, t, offsets, mask, P_DTYPE)
    v = load_tensor(addresses, 3, n_tensors, t, offsets, mask, P_DTYPE)
    p_new = p * decay
    # torch's lerp(m, g, 1 - beta1): the second form for a weight >= 0.5 (exactly g when beta1 = 0)
    diff = g - m
    small = (one_minus_beta1 < 0.5) & (one_minus_beta1 > -0.5)
    m_new = tl.where(small, m + one_minus_beta1 * diff, g - diff * (1.0 - one_minus_beta1))
    v_new = v * beta2 + one_minus_beta2 * g * g
    second = v_new
    if AMSGRAD:
        vmax = load_tensor(addresses, 4, n_tensors, t, offsets, mask, P_DTYPE)
        vmax_new = tl.maximum(vmax, v_new, propagate_nan=tl.PropagateNan.ALL)  # as torch.maximum
        second = vmax_new
    # sqrt and division rounded to nearest (Triton's defaults on NVIDIA GPUs are approximate and
    # flush denormals to zero: eps = 0 with tiny gradients would give inf), as torch and CUDA.
    denom = div_rn(tl.sqrt_rn(second), tl.load(bias2_sqrts + t)) + eps
    p_new = p_new - tl.load(step_sizes + t) * div_rn(m_new, denom)
    if DESCENT:  # after the update, in the same pass (WSAM's decoupled descent)
        p_new = descended(
            addresses, n_tensors, t, offsets, mask, p_new, descent_ptr, P_DTYPE, 1, N_SOURCES, 9
        )
    if SKIP:
        skip = tl.load(found_inf_ptr) != 0.0
        p_new = tl.where(skip, p, p_new)  # p: the restored weight
        m_new = tl.where(skip, m, m_new)
        v_new = tl.where(skip, v, v_new)
        f_new = tl.where(skip, f, f_new)
        if AMSGRAD:
            vmax_new = tl.where(skip, vmax, vmax_new)
    store_tensor(addresses, 0, n_tensors, t, offsets, mask, p_new, P_DTYPE)
    store_tensor(addresses, 2, n_tensors, t, offsets, mask, m_new, P_DTYPE)
    store_tensor(addresses, 3, n_tensors, t, offsets, mask, v_new, P_DTYPE)
    if AMSGRAD:
        store_tensor(addresses, 4, n_tensors, t, offsets, mask, vmax_new, P_DTYPE)
    if FISHER:
        store_tensor(addresses, 6, n_tensors, t, offsets, mask, f_new, tl.float32)


def adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, restore_from, combine_from,
                combine_coef, fisher, ewc_precision, ewc_anchor, ewc_lam, grad_scale, found_inf, clip_coef,
                fisher_beta, maximize, lr, beta1, beta2, eps, weight_decay) -> None:  # fmt: skip
    n = len(params)
    if n == 0:
        return
    device = params[0].device
    # Count the step on the steps' device; a skipped step (found_inf non-zero, or NaN) is not
    # counted: found_inf == 0, not 1 - found_inf (GradScaler hands over a sum of per-device flags).
    step_device = steps[0].device
    if found_inf is not None:
        torch._foreach_add_(steps, (found_inf.reshape(()).to(step_device) == 0).to(torch.float32))
    else:
        torch._foreach_add_(steps, 1.0)
    t = torch.stack([s.reshape(()) for s in steps]).to(device=device, dtype=torch.float64)
    step_sizes = (lr / (1.0 - torch.pow(beta1, t))).float()
    bias2_sqrts = torch.sqrt(1.0 - torch.pow(beta2, t)).float()
    views = Contiguous(params)
    params_c, grads_c = views(params, written=True), views(grads)
    m, v = views(exp_avgs, written=True), views(exp_avg_sqs, written=True)
    vmax = views(max_exp_avg_sqs, written=True) if max_exp_avg_sqs else None
    terms = step_inputs(views, n, device, restore_from, fisher, ewc_precision, ewc_anchor, grad_scale, found_inf,
                        clip_coef, combine_from, combine_coef, lr)  # fmt: skip
    none = [None] * n
    for is_covered, index in split_by(terms.covered).items():
        lists = [pick(params_c, index), pick(grads_c, index), pick(m, index), pick(v, index),
                 pick(vmax or none, index), pick(terms.saves, index), pick(terms.fishers, index),
                 pick(terms.precision, index), pick(terms.anchor, index),
                 *(pick(source, index) for source in terms.sources)]  # fmt: skip
        table = pointer_table(lists)
        if not table.num_chunks:
            continue
        picked = per_tensor(index, device, torch.int64)
        lams = per_tensor([ewc_lam[i] if is_covered else 0.0 for i in index], device)
        _adamw_kernel[(table.num_chunks,)](
            table.addresses, table.num_tensors, table.sizes, table.chunk_tensor, table.chunk_start, lams,
            step_sizes[picked], bias2_sqrts[picked], terms.inv_scale, terms.found_inf, terms.clip,
            terms.combine_coef, terms.descent_coef, float(1.0 - lr * weight_decay),
            float(1.0 - beta1), float(beta2), float(1.0 - beta2), float(eps), -1.0 if maximize else 1.0,
            float(fisher_beta), float(1.0 - fisher_beta), P_DTYPE=triton_dtype(params[0].dtype), SAVE=bool(restore_from),
            FISHER=bool(fisher), EWC=is_covered, AMSGRAD=vmax is not None, AMP=terms.amp, SKIP=terms.skip,
            CLIP=terms.clipped, N_SOURCES=len(terms.sources) if terms.combining else -1,
            DESCENT=terms.descending, BLOCK=BLOCK,
        )  # fmt: skip
    views.finish()
