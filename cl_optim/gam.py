r"""GAM: gradient norm aware minimisation (Zhang et al., CVPR 2023).

GAM bounds the first-order flatness (the largest gradient norm in the neighbourhood) besides the
loss. Of the four passes of :mod:`cl_optim._gradient_norm_sam` (``g0`` at ``w``, ``g1`` SAM's,
``g2`` after the ascent on ``||grad L||`` of radius ``grad_norm_rho``, ``g3`` SAM's from there), it
forms the official code's (``xxgege/GAM``) combination

    pro_m = g0 + |beta_2| g2,      d = beta_1 g1 + beta_3 g3
    cos   = <pro_m, d> / (||d|| ||pro_m|| + eps)
    grad  = d - gamma * (pro_m - cos ||pro_m|| d / (||d|| + eps))

from one 4 x 4 ``task_gram`` pass (fp64, no host read); the combination is read by the
restore+update pass (the COMBINE term of a fused cl_optim base, fp32/fp64 parameters), else one
``task_combine_`` into ``.grad``.
Defaults are the official CIFAR ones: ``rho`` (its ``grad_rho``) 0.02, ``grad_norm_rho`` 0.2,
``beta_0 = 0.5, beta_1 = 0.6`` hence ``beta_2 = 1 - beta_0 = 0.5, beta_3 = 1 - beta_1 = 0.4``,
``gamma`` 0.03. The official GAM fails unless its optional radius schedulers are given (the
radii are only set by them); INFTY 0.1.2's GAM ascends along ``h`` with radius 1 whatever its
``norm_rho`` (``grad_norm_rho=1.0`` here gives its numbers).

Bytes per fp32 parameter beyond the base update: keep g0, g1, g2 (24), the restore copy and
two more copies (24), three norms and three ascents (12 + 48), the Gram (16) and the three kept
gradients read by the update (12; 20 with the combination written into ``.grad``, and then a
check of it, 4): about 132,
against about 250 in the official per-tensor Python.
"""

from __future__ import annotations

import math

from ._gradient_norm_sam import GradientNormSAM
from .multitask.aggregators import gram_unchecked as gram  # aligned by construction

__all__ = ["GAM"]


class GAM(GradientNormSAM):
    r"""GAM around any ``torch.optim.Optimizer`` class.

    Args:
        rho: radius of the two SAM ascents (the official ``grad_rho``).
        grad_norm_rho: radius of the ascent on the gradient norm.
        grad_beta_1, grad_beta_2, grad_beta_3, grad_gamma: the combination's weights (above).
        everything else: as :class:`cl_optim.SAM`.

    ``loss.backward(); opt.step(closure)`` calls the closure three times. AMP: see
    :mod:`cl_optim._gradient_norm_sam`.

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt = cl_optim.GAM(model.parameters(), torch.optim.SGD, lr=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> closure(); loss = opt.step(closure)  # doctest: +ELLIPSIS
        tensor(...)
    """

    def __init__(self, params, base_optimizer: type, rho: float = 0.02, grad_norm_rho: float = 0.2, adaptive=False,
                 *, grad_beta_1: float = 0.6, grad_beta_2: float = 0.5, grad_beta_3: float = 0.4,
                 grad_gamma: float = 0.03, **kwargs):  # fmt: skip
        for name, value in (("grad_beta_1", grad_beta_1), ("grad_beta_2", grad_beta_2),
                            ("grad_beta_3", grad_beta_3), ("grad_gamma", grad_gamma)):  # fmt: skip
            if not math.isfinite(value):
                raise ValueError(f"Invalid {name}: {value} (must be finite)")
        super().__init__(params, base_optimizer, rho, grad_norm_rho, adaptive, **kwargs)
        self.grad_beta_1, self.grad_beta_2 = float(grad_beta_1), float(grad_beta_2)
        self.grad_beta_3, self.grad_gamma = float(grad_beta_3), float(grad_gamma)

    def _combine(self, params, g0, g1, g2) -> None:
        grads = [p.grad for p in params]
        tasks = [g0, g2, g1, grads]  # pro_m = a . tasks, d = c . tasks
        g = gram(tasks, backend=self.backend)
        a = self._constant((1.0, abs(self.grad_beta_2), 0.0, 0.0), g.device)
        c = self._constant((0.0, 0.0, self.grad_beta_1, self.grad_beta_3), g.device)
        pro_m_norm = (a @ g @ a).clamp_min(0).sqrt()
        d_norm = (c @ g @ c).clamp_min(0).sqrt()
        eps = self.perturb_eps
        cosine = (a @ g @ c) / (d_norm * pro_m_norm + eps)
        coefficients = c * (1 + self.grad_gamma * cosine * pro_m_norm / (d_norm + eps)) - self.grad_gamma * a
        # .grad first: read by the update where the base is fused (COMBINE), else written
        order = [3, 0, 1, 2]
        norms = g.diagonal().clamp_min(0).sqrt()
        self._combine_into_update(params, tasks[:3], coefficients[order], norms[:3], grad_norm=norms[3])
