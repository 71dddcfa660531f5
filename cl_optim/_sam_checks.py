"""The checks of :class:`cl_optim.SAM`'s groups and gradients, each naming the problem before anything
moves."""

from __future__ import annotations

import math

from torch import Tensor

ADAPTIVE_MODES = (False, True, "official", "fisher", "fisher_ema")


def check_sam_group(group: dict) -> None:
    if not 0.0 <= group["rho"] < math.inf:
        raise ValueError(f"Invalid rho: {group['rho']} (must be finite and >= 0)")
    if group["adaptive"] not in ADAPTIVE_MODES:
        raise ValueError(
            f"Invalid adaptive: {group['adaptive']!r}; expected False, True, 'official', 'fisher' or 'fisher_ema'"
        )
    if group["eta"] is not None and not 0.0 <= group["eta"] < math.inf:
        raise ValueError(f"Invalid eta: {group['eta']} (must be >= 0)")


def check_perturb(group: dict) -> None:
    """A group's ``perturb``: a bool, or one bool per parameter (SAM-ON's selection)."""
    perturb = group.get("perturb", True)
    if isinstance(perturb, bool):
        return
    if (
        not isinstance(perturb, (list, tuple))
        or len(perturb) != len(group["params"])
        or not all(isinstance(flag, bool) for flag in perturb)
    ):
        raise ValueError(
            f"Invalid perturb: {perturb!r}; a bool or one bool per parameter of the group "
            f"({len(group['params'])})"
        )


def check_sam_params(params: list[Tensor]) -> None:
    """Raise, naming the problem, for a parameter whose gradient SAM refuses."""
    for p in params:
        grad = p.grad
        if grad.is_sparse or grad.shape != p.shape or grad.dtype != p.dtype:
            check_sam_param(p)  # raises, naming the problem


def check_sam_param(p: Tensor) -> None:
    if p.grad.is_sparse:
        raise RuntimeError(f"SAM does not support sparse gradients (parameter of shape {tuple(p.shape)})")
    if p.is_complex():
        raise RuntimeError(f"SAM supports real floating-point parameters only, got {p.dtype}")
    if p.grad.shape != p.shape or p.grad.dtype != p.dtype:
        raise RuntimeError(
            f"SAM: a gradient of shape {list(p.grad.shape)} ({p.grad.dtype}) for a parameter of shape "
            f"{list(p.shape)} ({p.dtype}): a layer changed after backward(), or a gradient was set by hand; "
            "nothing was changed"
        )
