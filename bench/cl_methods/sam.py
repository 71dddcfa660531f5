"""``sam`` and ``ewc_sam``: Sharpness-Aware Minimization (Foret et al. 2021) over the job's SGD with
momentum, at radius ``--rho``: each step ascends to ``w + rho g/||g||``, takes the gradient there
(the loop's closure: a second forward and backward on the same batch) and updates the weights at
``w`` with it. ``ewc_sam`` adds separate-mode EWC (:mod:`.ewc`) to the update: a flat region of the
new task near the old tasks' anchors."""

from __future__ import annotations

import cl_optim

from .base import Method
from .ewc import separate_ewc


class SAM(Method):
    def make_optimizer(self, params, args, **kwargs):
        return cl_optim.SAM(params, cl_optim.SGD, rho=args.rho, **kwargs)


class EWCSAM(SAM):
    def make_ewc(self, model, args):
        return separate_ewc(model, args)
