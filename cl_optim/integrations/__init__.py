"""cl_optim in the training loops and frameworks its users train with.

* :mod:`~cl_optim.integrations.loops` (re-exported here and as ``cl_optim.preserve_bn_stats`` /
  ``cl_optim.skip_grad_sync``): BatchNorm statistics and DDP gradient sync around SAM's passes.
* :mod:`~cl_optim.integrations.huggingface`: ``ContinualTrainer``, a ``transformers.Trainer``
  that makes SAM's two passes (with gradient accumulation) and keeps EWC in its checkpoints.
* :mod:`~cl_optim.integrations.lightning`: ``sam_step`` for Lightning's manual optimization,
  which counts the step so that ``global_step``, ``max_steps`` and checkpoints work.

The framework modules import their framework only when imported themselves.
"""

from .loops import preserve_bn_stats, skip_grad_sync

__all__ = ["preserve_bn_stats", "skip_grad_sync"]
