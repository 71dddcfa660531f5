"""``transformers.Trainer`` with cl_optim: SAM's two passes, gradient accumulation, EWC in checkpoints.

A plain ``Trainer`` cannot drive SAM: it calls ``optimizer.step()`` once per optimisation step
(through accelerate's wrapper, which hides ``first_step``), and with gradient accumulation the
second pass must run over the same micro-batches as the first. ``ContinualTrainer`` (or the
mixin, for a Trainer subclass of your own) does, for each optimisation step of ``k`` micro-batches:

1. the first pass of each micro-batch as the Trainer makes it (forward, loss scaled for
   accumulation, backward), kept local to the rank (no gradient all-reduce under DDP);
2. at the last micro-batch, ``first_step`` (perturb along the accumulated gradient, which under
   fp16 is the scaled one: SAM's direction does not depend on the scale), then the second pass
   over the same ``k`` micro-batches (only the last one all-reduces);
3. the Trainer's own clipping and ``optimizer.step()`` (through GradScaler under fp16), which
   completes the pending SAM step (``second_step``: restore, update).

Any other cl_optim optimizer (``SGD``, ``AdamW``, with ``ewc=``) runs as the Trainer runs any
optimizer. The ``EWC`` of the optimizer (or ``ewc=``) is saved in each checkpoint
(``cl_optim_ewc.pt``) and loaded when training resumes from one, so a resumed run keeps the
importance of earlier tasks.

Example:
    >>> from cl_optim.integrations.huggingface import ContinualTrainer  # doctest: +SKIP
    >>> ewc = cl_optim.EWC(model, lam=100.0)  # doctest: +SKIP
    >>> opt = cl_optim.SAM(model.parameters(), cl_optim.AdamW, rho=0.05, lr=5e-5, ewc=ewc)  # doctest: +SKIP
    >>> trainer = ContinualTrainer(model=model, args=args, train_dataset=task, optimizers=(opt, None))  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> ewc.consolidate(cl_optim.fisher.estimate(model, loader))  # at the task boundary  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import transformers

from ..ewc import EWC
from ..sam import SAM

__all__ = ["ContinualTrainerMixin", "ContinualTrainer", "EWC_CHECKPOINT"]

EWC_CHECKPOINT = "cl_optim_ewc.pt"


def _unwrap(optimizer):
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (which keeps it as ``.optimizer``)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class ContinualTrainerMixin:
    """Put before ``transformers.Trainer`` (or a subclass of it) in the bases; see the module."""

    def __init__(self, *args, ewc: Optional[EWC] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._cl_ewc = ewc
        self._sam_micro_batches: list = []

    # --------------------------------------------------------------------------------- state

    @property
    def cl_optimizer(self):
        """The cl_optim optimizer inside the Trainer's (accelerate's) wrapper, or None before it exists."""
        return _unwrap(getattr(self, "optimizer", None))

    @property
    def ewc(self) -> Optional[EWC]:
        if self._cl_ewc is not None:
            return self._cl_ewc
        return getattr(self.cl_optimizer, "ewc", None)

    # ------------------------------------------------------------------------------- the step

    def training_step(self, model, inputs, num_items_in_batch=None):
        sam = self.cl_optimizer
        if not isinstance(sam, SAM):
            return super().training_step(model, inputs, num_items_in_batch)
        # Pass 1: as the Trainer makes it, but never all-reduced (m-sharpness per rank, and one
        # all-reduce saved per step).
        with self._no_sync(model):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._sam_micro_batches.append((inputs, num_items_in_batch))
        if self.accelerator.sync_gradients:  # the last micro-batch of this optimisation step
            scaler = getattr(self.accelerator, "scaler", None)
            sam.first_step(zero_grad=True, grad_scaler=scaler)
            batches, self._sam_micro_batches = self._sam_micro_batches, []
            try:
                for i, (micro_inputs, micro_items) in enumerate(batches):
                    sync = contextlib.nullcontext() if i == len(batches) - 1 else self._no_sync(model)
                    with sync:
                        super().training_step(model, micro_inputs, micro_items)
            except BaseException:
                sam._abort()  # weights back, no update
                raise
        return loss

    def _no_sync(self, model):
        if self.accelerator.num_processes > 1:
            return self.accelerator.no_sync(model)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------- checkpoints

    def _save_checkpoint(self, model, trial, *args, **kwargs):  # transformers 4.46 passes metrics=
        super()._save_checkpoint(model, trial, *args, **kwargs)
        ewc = self.ewc
        if ewc is None or not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        torch.save(ewc.state_dict(), os.path.join(folder, EWC_CHECKPOINT))

    def _load_optimizer_and_scheduler(self, checkpoint, *args, **kwargs):
        super()._load_optimizer_and_scheduler(checkpoint, *args, **kwargs)
        ewc = self.ewc
        if checkpoint is None or ewc is None:
            return
        path = os.path.join(checkpoint, EWC_CHECKPOINT)
        if os.path.isfile(path):
            ewc.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))


class ContinualTrainer(ContinualTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` with SAM's two passes and EWC in checkpoints (module docstring)."""
