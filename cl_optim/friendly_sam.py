r"""Friendly-SAM (Li et al., CVPR 2024): perturb along the gradient minus its running mean.

The full-batch part of the gradient barely changes from step to step and, in the authors'
analysis, harms SAM's generalisation; its estimate is an EMA ``m`` of past gradients. With ``g``
the gradient at ``w`` (the order of the official code, ``nblt/F-SAM``):

    first step:   m <- g,  d = g                   (plain SAM)
    later steps:  d = g - sigma * m,  then  m <- lmbda * m + (1 - lmbda) * g     (the raw g)
    e = rho * T**2 d / (||T d|| + eps),  the update uses the gradient at w + e.

pytorch_optimizer 3.9's FriendlySAM (fixed in 4.x) updates ``m`` with the corrected ``d`` (a different EMA:
``0.8 m + 0.1 g`` at ``lmbda = 0.9, sigma = 1``); the official code crashes on parameters
without a gradient, which are skipped here (their ``m`` is left as it is). Under AMP ``m`` is
of the unscaled gradient (give ``grad_scaler=`` to ``first_step``; ``step(closure)`` has no
scaler). ``m`` moves only with a finite first-pass gradient (an overflow, whose step is
skipped, must not poison it for every later step). ``m`` is persistent (``sam_state``, in
``state_dict``) and ``d`` is one buffer per parameter allocated once, which then holds the new
mean before it is selected where the gradient was finite: 40 bytes per fp32 parameter beyond
SAM's (DESIGN.md §11).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._sam_family import graded, known_on_host, refuse_dtensor, unscale_factor
from ._sam_passes import kept_buffers, param_buckets
from .multitask.aggregators import weighted_sum_unchecked as weighted_sum  # aligned by construction
from .sam import SAM

__all__ = ["FriendlySAM"]

MOMENTUM_KEY = "fsam_momentum"


class FriendlySAM(SAM):
    r"""Friendly-SAM around any ``torch.optim.Optimizer`` class; the ``SAM`` API.

    Args:
        sigma: weight of the running mean removed from the ascent direction (1 by default).
        lmbda: decay of that running mean (0.9 by default).
        everything else: as :class:`cl_optim.SAM` (``adaptive`` applies to ``d``).

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt = cl_optim.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> closure(); loss = opt.step(closure)  # doctest: +ELLIPSIS
        tensor(...)
    """

    _LOCAL_ACCUMULATION = False  # its state moves once per step

    def __init__(self, params, base_optimizer: type, rho: float = 0.05, sigma: float = 1.0, lmbda: float = 0.9,
                 adaptive=False, **kwargs):  # fmt: skip
        if not 0.0 <= sigma < math.inf:
            raise ValueError(f"Invalid sigma: {sigma} (must be finite and >= 0)")
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"Invalid lmbda: {lmbda} (must be in [0, 1])")
        super().__init__(params, base_optimizer, rho, adaptive, **kwargs)
        self.sigma, self.lmbda = float(sigma), float(lmbda)
        self._directions: dict = {}  # id(param) -> d, allocated once, never saved

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_directions"] = {}
        return state

    def _first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        if self._run["pending"] is not None or not self.is_sam_step:
            return super()._first_step(zero_grad, grad_scaler)  # which raises, naming the problem
        plan = self._ascent_plan()  # every check before anything changes, m included
        params = graded(self.param_groups)
        refuse_dtensor(params, "FriendlySAM")
        inv_scale = unscale_factor(grad_scaler)
        # m moves only with a finite first-pass gradient: an overflow (skipped) must not poison it.
        finite = ~self._nonfinite_gradient()
        directions, seen = self._friendly_directions(params, inv_scale, finite)
        if self.mask is not None:
            self._refresh_masks(plan)
        perturbed, ascent_finite = self._ascend(
            plan, self._saved, grad_scaler=grad_scaler, directions=directions
        )
        self._update_means(seen, inv_scale, finite)
        self._perturbed(perturbed, ~(finite & ascent_finite.to(finite.device)), grad_scaler, zero_grad)

    def _friendly_directions(self, params: list[Tensor], inv_scale, finite: Tensor) -> tuple[dict, list]:
        """``d = g - sigma S m`` (S the loss scale: ``m`` is of unscaled gradients) for the
        parameters that have a mean; the others (first step) start it at ``g / S`` (0 where the
        gradient is not finite) and ascend along ``g``. Returns the directions and the former."""
        directions, seen = {}, []
        for p in params:
            m = self.sam_state[p].get(MOMENTUM_KEY)
            if m is not None and m.shape == p.shape:
                seen.append(p)
                continue
            g = p.grad.detach()
            if inv_scale is not None:
                g = g * inv_scale.to(g.device, g.dtype)
            start = torch.zeros_like(p, memory_format=torch.contiguous_format)
            self.sam_state[p][MOMENTUM_KEY] = torch.where(finite.to(p.device), g, start, out=start)
            directions[id(p)] = p.grad
        for (device, dtype, _), bucket in param_buckets(seen).items():
            momenta = [self.sam_state[p][MOMENTUM_KEY] for p in bucket]
            out = kept_buffers(self._directions, bucket, device, dtype)
            scale = self._loss_scale(inv_scale, device)
            weighted_sum([[p.grad for p in bucket], momenta], torch.stack([torch.ones_like(scale), -self.sigma * scale]),
                         out=out, backend=self.backend)  # fmt: skip
            directions.update(zip((id(p) for p in bucket), out))
        return directions, seen

    def _update_means(self, seen: list[Tensor], inv_scale, finite: Tensor) -> None:
        """``m <- lmbda m + (1 - lmbda) g / S`` where the first-pass gradient is finite: in place
        when the flag is free to read (CPU); on an accelerator formed in the buffer of ``d``
        (spent by the ascent) and selected in place, without a synchronisation."""
        on_host = known_on_host(finite)
        if on_host is False:
            return
        for (device, dtype, _), bucket in param_buckets(seen).items():
            momenta = [self.sam_state[p][MOMENTUM_KEY] for p in bucket]
            out = momenta if on_host else kept_buffers(self._directions, bucket, device, dtype)
            inverse = (
                torch.ones((), dtype=torch.float64, device=device)
                if inv_scale is None
                else inv_scale.to(device)
            )
            weighted_sum([momenta, [p.grad for p in bucket]],
                         torch.stack([torch.full_like(inverse, self.lmbda), (1 - self.lmbda) * inverse]),
                         out=out, backend=self.backend)  # fmt: skip
            if not on_host:
                flag = finite.to(device)
                for m, new in zip(momenta, out):
                    torch.where(flag, new, m, out=m)

    @staticmethod
    def _loss_scale(inv_scale, device) -> Tensor:
        return (
            torch.ones((), dtype=torch.float64, device=device)
            if inv_scale is None
            else 1.0 / inv_scale.to(device)
        )
