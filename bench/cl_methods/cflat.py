"""``cflat`` and ``cflat_ewc``: C-Flat (Bian et al. 2024), ``cl_optim.CFlat`` over the job's SGD with
momentum: the zeroth-order sharpness of SAM at ``--rho`` plus ``lamb = 0.2`` (the paper's value) times
the first-order flatness, the gradient at the worst point of the gradient norm's ascent (four
forward/backward passes per step: the loop's, and three calls of its closure). ``cflat_ewc`` adds separate-mode EWC (:mod:`.ewc`), the
combination the paper proposes C-Flat as a plug-in for."""

from __future__ import annotations

import cl_optim

from .base import Method
from .ewc import separate_ewc


class CFlat(Method):
    lamb = 0.2

    def make_optimizer(self, params, args, **kwargs):
        return cl_optim.CFlat(params, cl_optim.SGD, rho=args.rho, lamb=self.lamb, **kwargs)


class CFlatEWC(CFlat):
    def make_ewc(self, model, args):
        return separate_ewc(model, args)
