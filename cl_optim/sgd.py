"""SGD with momentum: a drop-in for ``torch.optim.SGD`` with the fused-step terms of cl_optim."""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Union

import torch
from torch import Tensor

from ._backend import kernel_op
from ._checks import check_sgd_step_
from ._distributed import like_param, local_list
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

__all__ = ["SGD", "sgd_step_"]


class SGD(FusedOptimizer):
    r"""Stochastic gradient descent with momentum, the numbers of ``torch.optim.SGD``.

    Per element, with ``g`` the task gradient after the optional terms of ``cl_optim._terms``
    (AMP unscale, Fisher EMA, clipping, maximize, EWC)::

        g <- g + weight_decay * p
        b <- g                                 (first step)
        b <- momentum * b + (1 - dampening) * g
        g <- g + momentum * b   if nesterov else   b
        p <- p - lr * g

    The state is ``momentum_buffer`` (absent when ``momentum == 0``), as in torch, so state dicts
    move between the two both ways. fp16/bf16 parameters are updated in fp32 and rounded once.

    Args:
        params: parameters or parameter groups.
        lr, momentum, dampening, weight_decay, nesterov, maximize: as ``torch.optim.SGD``;
            ``lr`` may be a tensor.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpp"``, ``"foreach"`` or ``"forloop"``
            (see ``cl_optim.report()``).
        foreach, fused: torch's spellings of ``backend``, accepted for drop-in use.
        differentiable: accepted as ``False`` (torch's default); a step that autograd
            differentiates through is not supported.
        ewc: a ``cl_optim.EWC``; its gradient ``lam*A*(p - mu)`` is added inside the update.
        fisher_ema: ``beta``: a running fp32 Fisher ``F <- beta*F + (1-beta)*g**2`` of the task
            gradient (before the EWC term), in the state as ``fisher_ema``; see
            ``running_fisher()``.

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = cl_optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        params,
        lr: Union[float, Tensor] = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
        ewc=None,
        fisher_ema: Optional[float] = None,
    ):
        refuse_differentiable(differentiable, "SGD")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            differentiable=False,
        )
        self.check_hyperparameters(defaults)
        super().__init__(
            params,
            defaults,
            backend_from_torch_flags(backend, foreach, fused),
            ewc=ewc,
            fisher_ema=fisher_ema,
        )

    STATE_KEYS = ("momentum_buffer",)

    @staticmethod
    def check_hyperparameters(group: dict, on_device_too: bool = True) -> None:
        """torch.optim.SGD's checks, and finite values (also run on every group at each step)."""
        check_lr(group["lr"], on_device_too)
        momentum, dampening, weight_decay = group["momentum"], group["dampening"], group["weight_decay"]
        if not 0.0 <= momentum < math.inf:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not -math.inf < dampening < math.inf:
            raise ValueError(f"Invalid dampening value: {dampening}")
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _update_bucket(self, group, params, grads, terms, backend, sharded=False, trusted=False):
        momentum = group["momentum"]
        # The lists held in C++ between steps (_held.py) for a trusted plan.
        calls = held(params, "sgd_step_", backend) if trusted else None
        states, buffers, first = None, None, []
        if momentum != 0:
            # One lookup each (hashing a tensor is a Python call), or the held call's, while the
            # state holds the same per-parameter dicts.
            states = calls.states_of(self.state) if calls is not None else [self.state[p] for p in params]
            buffers = [s.get("momentum_buffer") for s in states]
            first = [i for i, buf in enumerate(buffers) if buf is None]
            if sharded:
                buffers = local_list(buffers)  # the step writes first-step buffers into this list
        lr = group["lr"]
        if (
            calls is not None
            and not first  # (a first step makes its buffers: the list call below)
            and calls.sgd_step(
                grads,
                buffers,
                kernel_terms(terms, len(params)),
                maximize=group["maximize"],
                lr=lr.item() if isinstance(lr, Tensor) else lr,
                momentum=momentum,
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
            )  # fmt: skip
        ):
            return
        sgd_step_(
            local_list(params) if sharded else params,
            grads,
            buffers,
            terms,
            lr=group["lr"],
            momentum=momentum,
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            backend=backend,
        )
        for i in first:  # the buffers the step made (none when it was skipped)
            if buffers[i] is not None:
                states[i]["momentum_buffer"] = like_param(buffers[i], params[i]) if sharded else buffers[i]


def sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: Optional[list[Optional[Tensor]]],
    terms: Optional[StepTerms] = None,
    *,
    lr,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    backend: str = "forloop",
) -> None:
    """The SGD step of one (device, dtype) bucket, in place.

    ``momentum_buffers[i] is None`` means "first step": the buffer is created from the gradient
    and written back into the list. ``None`` for the whole list means no momentum.
    """
    terms = terms if terms is not None else StepTerms()
    if backend in ("forloop", "foreach"):  # the compiled ops check their inputs themselves
        check_sgd_step_(params, grads, momentum_buffers, None, **terms.op_inputs())
    impl = {
        "forloop": _sgd_forloop,
        "foreach": _sgd_foreach,
        "cpp": partial(_sgd_kernel, "cpp"),
        "cuda": partial(_sgd_kernel, "cuda"),
        "triton": partial(_sgd_kernel, "triton"),
    }[backend]
    impl(params, grads, momentum_buffers, terms, lr, momentum, dampening, weight_decay, nesterov, maximize)


def _sgd_forloop(params, grads, buffers, terms, lr, momentum, dampening, weight_decay, nesterov, maximize):
    restore_forloop_(params, terms)
    if terms.skip_update():
        return
    for i, param in enumerate(params):
        p = param.to(opmath_dtype(param.dtype))
        g = task_grad_forloop(i, p, grads[i], terms, maximize)
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        if momentum != 0:
            if buffers[i] is None:
                buf = g.detach().clone()
            else:
                buf = buffers[i].to(p.dtype)
                buf.mul_(momentum).add_(g, alpha=1 - dampening)
            g = g.add(buf, alpha=momentum) if nesterov else buf
            buffers[i] = _written_back(buffers[i], buf, param.dtype)
        p.add_(g, alpha=-lr)
        if p is not param:
            param.copy_(p)
    descent_(params, grads, terms, lr, "forloop")


def _sgd_foreach(params, grads, buffers, terms, lr, momentum, dampening, weight_decay, nesterov, maximize):
    restore_foreach_(params, terms)
    if terms.skip_update() or not params:
        return
    dtype = opmath_dtype(params[0].dtype)
    p = [param.to(dtype) for param in params]
    g = task_grads_foreach(p, grads, terms, maximize)
    if weight_decay != 0:
        g = torch._foreach_add(g, p, alpha=weight_decay)
    if momentum != 0:
        fresh = [i for i, b in enumerate(buffers) if b is None]
        old = [i for i, b in enumerate(buffers) if b is not None]
        bufs: list = [None] * len(params)
        for i in fresh:
            bufs[i] = g[i].detach().clone()
        if old:
            stepped = [buffers[i].to(dtype) for i in old]
            torch._foreach_mul_(stepped, momentum)
            torch._foreach_add_(stepped, [g[i] for i in old], alpha=1 - dampening)
            for i, b in zip(old, stepped):
                bufs[i] = b
        g = torch._foreach_add(g, bufs, alpha=momentum) if nesterov else bufs
        for i in range(len(params)):
            buffers[i] = _written_back(buffers[i], bufs[i], params[i].dtype)
    torch._foreach_add_(p, g, alpha=-lr)
    if p[0] is not params[0]:
        torch._foreach_copy_(params, p)
    descent_(params, grads, terms, lr, "foreach")


def _sgd_kernel(
    backend, params, grads, buffers, terms, lr, momentum, dampening, weight_decay, nesterov, maximize
):
    """The compiled kernel (``torch.ops.cl_optim.sgd_step_``): one pass per element; it skips on
    ``found_inf`` itself."""
    if not params:
        return
    ready = []
    if momentum != 0:
        if dampening != 0 and any(buf is None for buf in buffers) and terms.skip_update():
            # A skipped first step leaves zero buffers (see the kernel), which the next step
            # continues exactly only without dampening; with it, decide on the host, once, while
            # some buffer does not exist yet.
            restore_foreach_(params, terms)
            return
        for i, buf in enumerate(buffers):
            ready.append(0 if buf is None else 1)
            if buf is None:  # the kernel writes the first-step buffer (= the gradient) itself
                buffers[i] = torch.empty_like(params[i], memory_format=torch.preserve_format)
    lr = lr.item() if isinstance(lr, Tensor) else lr
    kernel_op(backend, "sgd_step_", params[0])(
        params, grads, buffers if momentum != 0 else [], ready, **kernel_terms(terms, len(params)),
        maximize=maximize, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
        nesterov=nesterov,
    )  # fmt: skip


def _written_back(stored: Optional[Tensor], value: Tensor, dtype: torch.dtype) -> Tensor:
    """Store an opmath state tensor in the parameter dtype (in place when it already exists)."""
    if stored is None:
        return value if value.dtype == dtype else value.to(dtype)
    if stored is not value:
        stored.copy_(value)
    return stored
