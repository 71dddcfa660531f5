"""Multi-task gradient combination (and, to come, multi-task SAM): :func:`combine`, :class:`GradVac`."""

from .aggregators import METHODS, GradVac, coefficients, combine, gram, weighted_sum

__all__ = ["combine", "coefficients", "gram", "weighted_sum", "GradVac", "METHODS"]
