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
- :func:`hessian_spectrum`: the spectral density by stochastic Lanczos quadrature.
- :func:`sam_sharpness`: SAM's worst-case loss increase in a ``rho``-ball (and m-sharpness).
- :func:`stability_threshold`, :func:`preconditioned_sharpness`: the sharpness an optimizer keeps
  below at the edge of stability (2/lr for SGD), and Adam's preconditioned sharpness.
- :func:`interpolate`: loss and accuracy along the line between two solutions, and the barrier.
- :func:`loss_surface`: 1-D/2-D surfaces along filter-normalised or Hessian directions.
- :class:`SharpnessMonitor`: the sharpness against the threshold during training.
- :mod:`cl_optim.landscape.plots`: PNGs of all of them (matplotlib).
"""

from .eigen import hessian_eigenvalues
from .hvp import hvp
from .interpolate import barrier, interpolate
from .monitor import SharpnessMonitor
from .objective import flatten, unflatten
from .sharpness import is_adaptive, preconditioned_sharpness, sam_sharpness, stability_threshold
from .spectrum import hessian_spectrum
from .surface import loss_surface
from .trace import hessian_trace

__all__ = [
    "hvp",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_spectrum",
    "sam_sharpness",
    "stability_threshold",
    "preconditioned_sharpness",
    "is_adaptive",
    "interpolate",
    "barrier",
    "loss_surface",
    "SharpnessMonitor",
    "flatten",
    "unflatten",
]
