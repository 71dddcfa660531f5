"""AdamW: a drop-in for ``torch.optim.AdamW`` with the fused-step terms of cl_optim."""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Union

import torch
from torch import Tensor

from ._backend import kernel_op
from ._checks import check_adamw_step_
from ._distributed import local_list
from ._held import held
from ._optimizer import FusedOptimizer, backend_from_torch_flags, check_lr, refuse_differentiable
from ._terms import (
    StepTerms,
    descent_,
    kernel_terms,
    opmath_dtype,
    restore_foreach_,
    restore_forloop_,
    task_grad_forloop,
    task_grads_foreach,
)

__all__ = ["AdamW", "adamw_step_"]


class AdamW(FusedOptimizer):
    r"""Adam with decoupled weight decay (Loshchilov & Hutter), the numbers of ``torch.optim.AdamW``.

    Per element, at step ``t``, with ``g`` the task gradient after the optional terms of
    ``cl_optim._terms`` (AMP unscale, Fisher EMA, clipping, maximize, EWC)::

        p <- p * (1 - lr * weight_decay)
        m <- m + (1 - beta1) * (g - m)
        v <- beta2 * v + (1 - beta2) * g**2
        vmax <- max(vmax, v)                          (amsgrad; v below means vmax)
        p <- p - lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

    The state is ``step`` (a CPU fp32 scalar, as in torch), ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq``, in the parameter dtype; fp16/bf16 parameters are updated in fp32
    and rounded once. A step skipped by AMP leaves every state entry unchanged.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW``; ``lr`` may be a
            tensor.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpp"``, ``"foreach"`` or ``"forloop"``
            (see ``cl_optim.report()``).
        foreach, fused: torch's spellings of ``backend``, accepted for drop-in use.
        capturable, differentiable: accepted as ``False`` (torch's defaults).
        ewc: a ``cl_optim.EWC``; its gradient ``lam*A*(p - mu)`` is added inside the update.
        fisher_ema: ``beta``: a running fp32 Fisher ``F <- beta*F + (1-beta)*g**2`` of the task
            gradient (before the EWC term), in the state as ``fisher_ema``; see
            ``running_fisher()``.

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = cl_optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params,
        lr: Union[float, Tensor] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        ewc=None,
        fisher_ema: Optional[float] = None,
    ):
        refuse_differentiable(differentiable, "AdamW")
        if capturable:
            raise ValueError(
                "cl_optim.AdamW does not take capturable=True yet: its CUDA and Triton steps keep the step "
                "count on the device and read nothing on the host, but capture in a CUDA graph has not been "
                "tested; use torch.optim.AdamW(capturable=True) for graph capture"
            )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            capturable=False,
            differentiable=False,
        )
        self.check_hyperparameters({**defaults, "foreach": foreach})
        super().__init__(
            params,
            defaults,
            backend_from_torch_flags(backend, foreach, fused),
            ewc=ewc,
            fisher_ema=fisher_ema,
        )

    STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # Checkpoints of old torch versions keep `step` as a Python number: a tensor, as torch
        # itself converts it (torch.optim.Adam.__setstate__).
        for param_state in self.state.values():
            step = param_state.get("step")
            if step is not None and not isinstance(step, Tensor):
                param_state["step"] = torch.tensor(float(step), dtype=torch.float32)

    @staticmethod
    def check_hyperparameters(group: dict, on_device_too: bool = True) -> None:
        """torch.optim.AdamW's checks, and finite values (also run on every group at each step)."""
        check_lr(group["lr"], on_device_too)
        eps, betas, weight_decay = group["eps"], group["betas"], group["weight_decay"]
        if not 0.0 <= eps < math.inf:
            raise ValueError(f"Invalid epsilon value: {eps}")
        tensors = [isinstance(b, Tensor) for b in betas]
        if any(tensors):
            if not all(tensors):
                raise ValueError("betas must be either both floats or both Tensors")
            if group.get("foreach"):  # torch's own refusal, in torch's words
                raise ValueError(
                    "betas[0] as a Tensor is not supported for capturable=False and foreach=True"
                )
            raise ValueError(
                "cl_optim.AdamW takes betas as Python floats (tensor betas, for torch's capturable "
                "CUDA-graph steps, are not supported)"
            )
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

    def _update_bucket(self, group, params, grads, terms, backend, sharded=False, trusted=False):
        amsgrad = group["amsgrad"]
        # The lists held in C++ between steps (_held.py) for a trusted plan.
        calls = held(params, "adamw_step_", backend) if trusted else None
        # One lookup each (hashing a tensor is a Python call), or the held call's, while the state
        # holds the same per-parameter dicts.
        states = calls.states_of(self.state) if calls is not None else [self.state[p] for p in params]
        keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        # Trusted, the op checks the state (shapes, the step counts' device) and a refusal comes back
        # untrusted; a missing entry (a parameter's first step) takes the loop below.
        try:
            lists = [[s[key] for s in states] for key in keys] if trusted else None
        except KeyError:
            lists = None
        if lists is None:
            # The CUDA and Triton kernels count steps on the device (no host sync under AMP), as
            # torch's fused AdamW; the other backends on the host, as torch's default.
            step_device = params[0].device if backend in ("cuda", "triton") else torch.device("cpu")
            fresh = [(p, state) for p, state in zip(params, states) if "step" not in state]
            # Every new buffer made before any state is assigned: an allocation that fails leaves no
            # parameter with part of its state (the next step would raise KeyError on it). A
            # parameter's two moments together, as torch allocates them: allocating each moment's
            # list apart measured 0.90-1.12x across runs (bench/bench_layout.py's placement: where
            # the allocator puts them depends on what the process freed before), not kept.
            made = [
                (torch.zeros_like(p, memory_format=torch.preserve_format),
                 torch.zeros_like(p, memory_format=torch.preserve_format))
                for p, _ in fresh
            ]  # fmt: skip
            for (_, state), (exp_avg, exp_avg_sq) in zip(fresh, made):
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device)
                state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
            for p, state in zip(params, states):
                if state["step"].device != step_device:  # e.g. a state dict saved by the other kind
                    state["step"] = state["step"].to(step_device)
                if amsgrad and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            lists = [[s[key] for s in states] for key in keys]
        steps, exp_avgs, exp_avg_sqs, *max_exp_avg_sqs = lists
        beta1, beta2 = group["betas"]
        if calls is not None and calls.adamw_step(
            grads, steps, exp_avgs, exp_avg_sqs, max_exp_avg_sqs[0] if amsgrad else None,
            kernel_terms(terms, len(params)), maximize=group["maximize"], lr=_to_float(_as_scalar(group["lr"])),
            beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
        ):  # fmt: skip
            return
        shards = local_list if sharded else (lambda tensors: tensors)
        adamw_step_(
            shards(params),
            grads,
            shards(exp_avgs),
            shards(exp_avg_sqs),
            shards(max_exp_avg_sqs[0]) if amsgrad else None,
            steps,
            terms,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            backend=backend,
        )


def adamw_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: Optional[list[Tensor]],
    steps: list[Tensor],
    terms: Optional[StepTerms] = None,
    *,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
    backend: str = "forloop",
) -> None:
    """The AdamW step of one (device, dtype) bucket, in place. ``max_exp_avg_sqs`` given = amsgrad."""
    terms = terms if terms is not None else StepTerms()
    if backend in ("forloop", "foreach"):  # the compiled ops check their inputs themselves
        check_adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, **terms.op_inputs())
    impl = {
        "forloop": _adamw_forloop,
        "foreach": _adamw_foreach,
        "cpp": partial(_adamw_kernel, "cpp"),
        "cuda": partial(_adamw_kernel, "cuda"),
        "triton": partial(_adamw_kernel, "triton"),
    }[backend]
    impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, terms, lr, beta1, beta2, eps,
         weight_decay, maximize)  # fmt: skip


def _as_scalar(lr):
    # A 1-element tensor lr is used as torch does (0-dim arithmetic), a CPU read when it is an alpha.
    return lr.squeeze() if isinstance(lr, Tensor) else lr


def _adamw_forloop(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, terms, lr, beta1, beta2,
                   eps, weight_decay, maximize):  # fmt: skip
    restore_forloop_(params, terms)
    if terms.skip_update():
        return
    lr = _as_scalar(lr)
    for i, param in enumerate(params):
        dtype = opmath_dtype(param.dtype)
        p = param.to(dtype)
        g = task_grad_forloop(i, p, grads[i], terms, maximize)
        exp_avg, exp_avg_sq = exp_avgs[i].to(dtype), exp_avg_sqs[i].to(dtype)
        steps[i] += 1
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = steps[i].item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if max_exp_avg_sqs is not None:
            max_sq = max_exp_avg_sqs[i].to(dtype)
            torch.maximum(max_sq, exp_avg_sq, out=max_sq)
            denom = (max_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            _copy_back(max_exp_avg_sqs[i], max_sq)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(exp_avg, denom, value=-step_size)
        _copy_back(exp_avgs[i], exp_avg)
        _copy_back(exp_avg_sqs[i], exp_avg_sq)
        _copy_back(param, p)
    descent_(params, grads, terms, lr, "forloop")


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, terms, lr, beta1, beta2,
                   eps, weight_decay, maximize):  # fmt: skip
    restore_foreach_(params, terms)
    if terms.skip_update() or not params:
        return
    lr = _as_scalar(lr)
    dtype = opmath_dtype(params[0].dtype)
    low_precision = dtype != params[0].dtype
    up = (lambda ts: [t.to(dtype) for t in ts]) if low_precision else (lambda ts: ts)
    p, exp_avg, exp_avg_sq = up(params), up(exp_avgs), up(exp_avg_sqs)
    g = task_grads_foreach(p, grads, terms, maximize)
    torch._foreach_add_(steps, 1)
    if weight_decay != 0:
        torch._foreach_mul_(p, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avg, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, g, g, value=1 - beta2)
    if max_exp_avg_sqs is not None:
        max_sq = up(max_exp_avg_sqs)
        torch._foreach_maximum_(max_sq, exp_avg_sq)
        denom = torch._foreach_sqrt(max_sq)
    else:
        denom = torch._foreach_sqrt(exp_avg_sq)
    if torch.compiler.is_compiling():
        # The bias corrections as tensor ops (as torch's capturable Adam): reading the step counts
        # on the host would break the graph.
        # On the parameters' device: the step counts stay on the CPU, a tensor lr may not.
        t = torch.stack([s.reshape(()) for s in steps]).to(device=denom[0].device, dtype=torch.float64)
        lr = lr.to(denom[0].device) if isinstance(lr, Tensor) else lr
        step_sizes = (-lr / (1 - torch.pow(beta1, t))).to(denom[0].dtype)
        bias_correction2_sqrts = torch.sqrt(1 - torch.pow(beta2, t)).to(denom[0].dtype)
        torch._foreach_div_(denom, list(bias_correction2_sqrts.unbind()))
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, list(step_sizes.unbind()))
        torch._foreach_addcdiv_(p, exp_avg, denom)
    else:
        step_values = torch.stack(steps).tolist() if steps else []  # one host read, not one per tensor
        step_sizes = [-_to_float(lr / (1 - beta1**t)) for t in step_values]
        bias_correction2_sqrts = [(1 - beta2**t) ** 0.5 for t in step_values]
        torch._foreach_div_(denom, bias_correction2_sqrts)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(p, exp_avg, denom, step_sizes)
    if low_precision:
        written = [exp_avgs, exp_avg_sqs, params] + ([max_exp_avg_sqs] if max_exp_avg_sqs is not None else [])
        values = [exp_avg, exp_avg_sq, p] + ([max_sq] if max_exp_avg_sqs is not None else [])
        for dst, src in zip(written, values):
            torch._foreach_copy_(dst, src)
    descent_(params, grads, terms, lr, "foreach")


def _adamw_kernel(backend, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, terms, lr, beta1, beta2, eps,
                  weight_decay, maximize):  # fmt: skip
    """The compiled kernel (``torch.ops.cl_optim.adamw_step_``): one pass per element; it counts
    the step and skips on ``found_inf`` itself, so nothing here reads a tensor on the host."""
    if not params:
        return
    kernel_op(backend, "adamw_step_", params[0])(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if max_exp_avg_sqs is not None else [], steps,
        **kernel_terms(terms, len(params)), maximize=maximize, lr=_to_float(_as_scalar(lr)), beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay,
    )  # fmt: skip


def _to_float(x) -> float:
    return x.item() if isinstance(x, Tensor) else x


def _copy_back(stored: Tensor, value: Tensor) -> None:
    if stored is not value:
        stored.copy_(value)
