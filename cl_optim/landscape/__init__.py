"""Measuring flatness: curvature of the data loss around the weights.

All tools take ``data`` as :func:`cl_optim.fisher.estimate` does (batches of ``(inputs,
targets)``, tuples, lists or dicts of inputs, Hugging Face dicts) and measure the sample-weighted
mean of ``loss_fn`` (cross-entropy by default) over it, at the current weights, in the model's
mode (``mode="eval"``/``"train"`` to choose; a model in train mode with BatchNorm is refused
unless told). They restore every module's mode, every parameter and every buffer bit for bit,
and accumulate in fp32 (``dtype=torch.float64`` for more).

- :func:`hvp`: Hessian-vector products, one vector or a block.
- :func:`hessian_eigenvalues`: the extreme eigenvalues (``which="LA"`` the largest, right on
  indefinite Hessians), by Lanczos with full reorthogonalisation, warm-startable.
- :func:`hessian_trace`: Hutchinson or Hutch++, with a standard error.
"""

from .eigen import hessian_eigenvalues
from .hvp import hvp
from .objective import flatten, unflatten
from .trace import hessian_trace

__all__ = ["hvp", "hessian_eigenvalues", "hessian_trace", "flatten", "unflatten"]
