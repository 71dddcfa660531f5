"""``looksam``: LookSAM (Liu et al. 2022), ``cl_optim.LookSAM`` over the job's SGD with momentum at
``--rho``: a full SAM step every ``k = 5`` iterations (the paper's value), in between the gradient
plus ``alpha * ||g|| / ||g_v|| * g_v``, ``g_v`` the part of the last SAM gradient orthogonal to the
plain one, with no second pass.

``alpha = 0.2``, not the paper's 0.7 (tuned for ViTs at batch 4096): at the job's batch of 32 the
reused direction is mostly noise, and scaled up to ``0.7 ||g||`` it ends task 2v3 of a quick split
run at 0.57 accuracy (0.98 with 0.2)."""

from __future__ import annotations

import cl_optim

from .base import Method


class LookSAM(Method):
    k, alpha = 5, 0.2

    def make_optimizer(self, params, args, **kwargs):
        return cl_optim.LookSAM(params, cl_optim.SGD, rho=args.rho, k=self.k, alpha=self.alpha, **kwargs)
