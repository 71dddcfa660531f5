"""What the SAM variants share beyond :class:`cl_optim.SAM`: kept copies of a pass's gradients,
the parameters a step combines, and the hand-over to a GradScaler of a step whose closure runs
several passes (GAM, C-Flat). Every combination goes through the fused multi-task ops
(:func:`cl_optim.multitask.aggregators.gram` and ``weighted_sum``: ``task_gram`` and
``task_combine_`` on every backend), so no variant reads a scalar back to the host.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._distributed import any_dtensor
from ._sam_passes import kept_buffers, param_buckets


def graded(param_groups: list[dict]) -> list[Tensor]:
    """The parameters with a dense gradient shaped as they are (the others are named by SAM's checks)."""
    return [
        p for group in param_groups for p in group["params"]
        if p.grad is not None and not p.grad.is_sparse and p.grad.shape == p.shape and p.grad.dtype == p.dtype
    ]  # fmt: skip


def keep_grads(store: dict, params: list[Tensor]) -> list[Tensor]:
    """Copy each parameter's ``.grad`` into its buffer of ``store`` (allocated once), one foreach
    copy per (device, dtype); returns the buffers aligned with ``params``."""
    kept = {}
    for (device, dtype, _), bucket in param_buckets(params).items():
        buffers = kept_buffers(store, bucket, device, dtype)
        torch._foreach_copy_(buffers, [p.grad for p in bucket])
        kept.update(zip((id(p) for p in bucket), buffers))
    return [kept[id(p)] for p in params]


def refuse_dtensor(params: list[Tensor], name: str) -> None:
    if any_dtensor(params):
        raise NotImplementedError(
            f"{name} does not take DTensor (FSDP2) parameters yet: its combination would be written "
            "into a redistributed copy of the gradient"
        )


def grads_of(params: list[Tensor], what: str) -> list[Tensor]:
    """The ``.grad`` of each parameter, which a later pass must have produced."""
    missing = [tuple(p.shape) for p in params if p.grad is None]
    if missing:
        raise RuntimeError(
            f"{what}: {len(missing)} parameter(s) with a first-pass gradient got none (shapes {missing[:3]}); "
            "every pass must reach the same parameters"
        )
    return [p.grad for p in params]


def known_on_host(flag: Tensor) -> Optional[bool]:
    """A device flag's value where reading it costs nothing (a CPU tensor), else None: the
    caller then selects on the device instead of branching (no synchronisation). Under
    ``torch.compile`` always None: a data-dependent branch would break the graph."""
    if flag.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    return bool(flag)


def norm_of(gram: Tensor, i: int) -> Tensor:
    """``||g_i||`` from a Gram matrix (fp64, clamped at 0 against rounding)."""
    return gram[i, i].clamp_min(0).sqrt()


class ScalerHandOver:
    """For a step whose closure runs several passes under AMP: do what ``GradScaler.step`` does
    before calling ``step()`` — check the final gradient for infs (recorded in the scaler, so that
    ``scaler.update()`` sees it) and hand the scale and the flag to the optimizer — then take the
    attributes away again."""

    def __init__(self, optimizer, grad_scaler) -> None:
        self.optimizer, self.grad_scaler = optimizer, grad_scaler

    def __enter__(self) -> None:
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return
        found = self.grad_scaler._check_inf_per_device(self.optimizer)
        scale = self.grad_scaler._get_scale_async()
        self.optimizer.grad_scale = scale
        self.optimizer.found_inf = sum(f.to(scale.device) for f in found.values()) if found else None

    def __exit__(self, *exc) -> None:
        for name in ("grad_scale", "found_inf"):
            if name in self.optimizer.__dict__:
                delattr(self.optimizer, name)


def unscale_factor(grad_scaler) -> Optional[Tensor]:
    """``1/S`` of an enabled GradScaler, on its device (None without one)."""
    if grad_scaler is None or not grad_scaler.is_enabled() or grad_scaler._scale is None:
        return None
    return grad_scaler._scale.double().reciprocal()
