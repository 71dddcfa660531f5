"""``gsam``: Surrogate-Gap Guided SAM (Zhuang et al. 2022), ``cl_optim.GSAM`` over the job's SGD with
momentum at ``--rho``: the SAM gradient minus ``alpha`` times the part of the first-pass gradient
orthogonal to it (``alpha = 0.4``, the paper's value for its ResNet runs), which lowers the
surrogate gap ``L(w + e) - L(w)`` without changing the descent on the perturbed loss."""

from __future__ import annotations

import cl_optim

from .base import Method


class GSAM(Method):
    alpha = 0.4

    def make_optimizer(self, params, args, **kwargs):
        return cl_optim.GSAM(params, cl_optim.SGD, rho=args.rho, alpha=self.alpha, **kwargs)
