r"""C-Flat: flatter minima for continual learning (Bian et al., NeurIPS 2024), and C-Flat++.

C-Flat adds to SAM's zeroth-order sharpness the first-order one (GAM's gradient-norm ascent) as
a plug-in for class-incremental methods (about +1 point on average over seven of them). Of the
four passes of :mod:`cl_optim._gradient_norm_sam` (``g0`` at ``w``, ``g1`` SAM's, ``g2`` after
the ascent on ``||grad L||``, ``g3`` SAM's from there) it updates with

    grad = g1 + lamb * (g3 - g2)

(read by a fused cl_optim base's restore+update pass as its COMBINE term, bounded by the
ascents' norms; written into ``.grad`` by one fused ``task_combine_`` otherwise). ``grad_norm_rho`` is the radius of the
gradient-norm ascent (GAM's name); it defaults to ``rho`` (the paper's single radius, ``w + rho
h/||h||``); INFTY 0.1.2 ascends there with radius 1 whatever its settings, so
``grad_norm_rho=1.0`` gives its numbers.

C-Flat++ (``strategy="plus"``, INFTY's form) runs the four passes only when
``E = A / (1 + exp(-k (t - t0))) - ||g0||`` is at most 0 (``t`` the 1-based step), after
``A <- A - cof * E``; otherwise the base optimizer steps with ``g0`` and the closure is not
called. The gate is decided in ``first_step`` (so ``first_step(grad_scaler=...)`` under AMP
decides on the unscaled norm, and a gated ``step(closure)`` then makes the base update); it reads
``||g0||`` on the host once per step (the documented exception to "no host read"); a non-finite
norm shuts it and leaves ``A`` as it was (the base step then skips); ``A`` is saved in
``state_dict``.

Buffers: the restore copy, ``g1``, ``g2`` and ``g0`` (which, dead after ``h``, holds the third
ascent's scratch copy): 4 against 5 in the official code. Bytes per fp32 parameter beyond the
base update: about 116 (three copies in, three norms, three ascents, ``h``, the two kept
gradients read by the update and the norm of ``g3``; 124 with the combination written).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._gradient_norm_sam import GradientNormSAM
from ._sam_family import graded, unscale_factor
from .sam_ops import grad_sq_norm

__all__ = ["CFlat"]


class CFlat(GradientNormSAM):
    r"""C-Flat around any ``torch.optim.Optimizer`` class.

    Args:
        rho: radius of the two SAM ascents (0.2 by default, the paper's).
        lamb: weight of the first-order flatness term (0.2).
        grad_norm_rho: radius of the gradient-norm ascent (default: ``rho``).
        strategy: ``"basic"`` (every step) or ``"plus"`` (C-Flat++, with ``A``, ``k``, ``t0``, ``cof``).
        everything else: as :class:`cl_optim.SAM`.

    ``loss.backward(); opt.step(closure)`` calls the closure three times (none on a step C-Flat++
    skips). AMP: see :mod:`cl_optim._gradient_norm_sam`.

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt = cl_optim.CFlat(model.parameters(), torch.optim.SGD, rho=0.2, lamb=0.2, lr=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> closure(); loss = opt.step(closure)  # doctest: +ELLIPSIS
        tensor(...)
    """

    _KEEPS_G0 = False

    def __init__(self, params, base_optimizer: type, rho: float = 0.2, lamb: float = 0.2, adaptive=False, *,
                 grad_norm_rho: Optional[float] = None, strategy: str = "basic", A: float = 5.0, k: float = 0.01,
                 t0: float = 80, cof: float = 1.0, **kwargs):  # fmt: skip
        if not math.isfinite(lamb):
            raise ValueError(f"Invalid lamb: {lamb} (must be finite)")
        if strategy not in ("basic", "plus"):
            raise ValueError(f'Invalid strategy: {strategy!r}; expected "basic" or "plus" (C-Flat++)')
        for name, value in (("A", A), ("k", k), ("t0", t0), ("cof", cof)):
            if not math.isfinite(value):
                raise ValueError(f"Invalid {name}: {value} (must be finite)")
        super().__init__(params, base_optimizer, rho, rho if grad_norm_rho is None else grad_norm_rho, adaptive,
                         **kwargs)  # fmt: skip
        self.lamb, self.strategy = float(lamb), strategy
        self.trigger = {"A": float(A), "k": float(k), "t0": float(t0), "cof": float(cof)}

    def _gate(self, grad_scaler) -> bool:
        """C-Flat++'s gate on the (unscaled) gradient norm, one host read, counting from step 1;
        a non-finite norm shuts it and leaves ``A`` as it was (the base step then skips)."""
        if self.strategy != "plus":
            return True
        params = graded(self.param_groups)
        if not params:
            return True  # SAM's checks then name the missing gradient
        sq_norm = sum(float(grad_sq_norm([p.grad for p in params if p.device == d], backend="foreach"))
                      for d in {p.device for p in params})  # fmt: skip
        inv_scale = unscale_factor(grad_scaler)
        norm = math.sqrt(sq_norm) * (1.0 if inv_scale is None else float(inv_scale))
        if not math.isfinite(norm):
            return False
        t = self.steps + 1
        trigger = self.trigger
        energy = trigger["A"] / (1 + math.exp(-trigger["k"] * (t - trigger["t0"]))) - norm
        trigger["A"] -= trigger["cof"] * energy
        return energy <= 0

    def _combine(self, params, g0, g1, g2) -> None:
        """``lamb g3 + g1 - lamb g2``: read by a fused base's update (COMBINE) where the three
        ascents' norms bound the sources (``||g1|| <= ||g0|| + ||h||``, ``||g2||``), else written."""
        device = params[0].grad.device
        coefficients = self._constant((self.lamb, 1.0, -self.lamb), device)  # .grad (g3), g1, g2
        norms = [self._ascent_norm(i) for i in range(3)]  # ||g0||, ||h||, ||g2||
        source_norms = None
        if all(norm is not None for norm in norms):
            source_norms = torch.stack([norms[0] + norms[1], norms[2]])
        self._combine_into_update(params, [g1, g2], coefficients, source_norms)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.strategy == "plus":
            state["sam"]["cflat_A"] = self.trigger["A"]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("sam", {}).get("cflat_A")
        if saved is not None and not math.isfinite(float(saved)):
            raise ValueError(f"cflat_A = {saved} in the state dict: C-Flat++'s gate needs a finite A")
        super().load_state_dict(state_dict)
        if saved is not None:
            self.trigger["A"] = float(saved)
