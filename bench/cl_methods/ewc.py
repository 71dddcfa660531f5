"""``ewc`` and ``online_ewc``: Elastic Weight Consolidation (Kirkpatrick et al. 2017), SGD with
momentum on the task's cross-entropy plus ``lam/2 * sum_i F_i (theta_i - theta*_i)^2``, applied by
cl_optim's fused step (``SGD(..., ewc=...)``): the penalty's gradient is added in the update, never
through autograd. After each task the loop estimates the exact Fisher of its loss
(``cl_optim.fisher.estimate(..., estimator="exact")`` on ``--fisher-samples`` samples) and
consolidates it.

* ``ewc``: separate mode, one anchor and precision per task (the sum of the tasks' penalties);
* ``online_ewc``: Schwarz et al. 2018 (Progress & Compress), one anchor at the last solution and
  the precision ``gamma * F_old + F_new`` (``--gamma``).
"""

from __future__ import annotations

import cl_optim

from .base import Method


def separate_ewc(model, args) -> cl_optim.EWC:
    """EWC with one anchor per task at ``--lam``: the penalty of ``ewc``, ``ewc_sam``, ``cflat_ewc``."""
    return cl_optim.EWC(model, lam=args.lam, mode="separate")


class EWC(Method):
    def make_ewc(self, model, args):
        return separate_ewc(model, args)


class OnlineEWC(Method):
    def make_ewc(self, model, args):
        return cl_optim.EWC(model, lam=args.lam, mode="online", gamma=args.gamma)
