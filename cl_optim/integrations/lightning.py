"""SAM in Lightning's manual optimization, with the step counted.

Lightning counts an optimisation step (``trainer.global_step``, which ``max_steps``, schedulers'
``interval="step"`` and step-based checkpoints read) when the step goes through its optimizer
wrapper, ``self.optimizers().step(...)``. Calling ``first_step``/``second_step`` on the SAM object
directly leaves ``global_step`` at 0: ``max_steps`` never stops the run and no checkpoint is
written. :func:`sam_step` makes the two passes and completes the step through the wrapper, so
Lightning counts it; under ``precision="16-mixed"`` the wrapper's GradScaler unscales and skips as
for any optimizer.

Example (inside a ``LightningModule`` with ``self.automatic_optimization = False``)::

    def training_step(self, batch, batch_idx):
        x, y = batch
        return sam_step(self, lambda: F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return cl_optim.SAM(self.parameters(), cl_optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor

from ..sam import SAM
from .loops import preserve_bn_stats

__all__ = ["sam_step"]


def sam_step(
    module, compute_loss: Callable[[], Tensor], optimizer=None, *, keep_bn_stats: bool = True
) -> Tensor:
    """One SAM step in a ``LightningModule``'s manual ``training_step``; returns the first-pass loss.

    ``compute_loss()`` runs the forward on the current batch and returns the loss; it is called
    twice (at ``w`` and at ``w + e``). ``optimizer``: the Lightning optimizer wrapper of a
    ``cl_optim.SAM`` (default ``module.optimizers()``). ``keep_bn_stats``: the second forward does
    not update BatchNorm running statistics (:func:`cl_optim.preserve_bn_stats`).
    """
    optimizer = module.optimizers() if optimizer is None else optimizer
    sam = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(sam, SAM):
        raise TypeError(f"sam_step needs a cl_optim.SAM optimizer, got {type(sam).__name__}")
    loss = compute_loss()
    module.manual_backward(loss)
    scaler = getattr(getattr(module.trainer, "precision_plugin", None), "scaler", None)
    sam.first_step(zero_grad=True, grad_scaler=scaler)
    try:
        with preserve_bn_stats(module) if keep_bn_stats else contextlib.nullcontext():
            module.manual_backward(compute_loss())
    except BaseException:
        sam._abort()  # weights back, no update
        raise
    # Through Lightning's wrapper, so that the step is counted; the second-pass gradient is in
    # place, the closure has nothing left to do (mixed precision calls it before GradScaler.step).
    optimizer.step(closure=_no_more_passes)
    optimizer.zero_grad()
    return loss.detach()


def _no_more_passes() -> Optional[Tensor]:
    return torch.zeros(())
