r"""RWP: random weight perturbation (Li et al., "Revisiting Random Weight Perturbation", m-RWP).

Instead of SAM's adversarial ascent, the second gradient is taken at randomly perturbed weights,
and the two are mixed (the official code computes them on two ranks in parallel; here the
closure runs once more):

    n      ~ N(0, (rho * ||w_row||)^2) per output row (dim 0) of each tensor of 2+ dimensions,
             N(0, (rho * ||w||)^2) for a tensor of at most one dimension
    g_n    = gradient at w + n
    grad   = alpha * g_n + (1 - alpha) * g                        (g the gradient at w)

The noise is drawn per parameter, in parameter order, with ``torch.randn(shape,
generator=generator)`` (the global generator by default; give one on the parameters' device for
a reproducible run, and its state is saved in ``state_dict``; ``torch.compile`` traces
``first_step`` whole with the global generator, and breaks the graph at a given one). No global norm, so no reduction
orders the passes. The restore copy and ``g`` are one buffer each; with a fused cl_optim base the mix is
read by the restore+update pass (its COMBINE term, bounded by the norm of ``g`` taken with the
first pass's finiteness check), otherwise written into ``.grad`` by one fused ``task_combine_``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._sam_family import graded, keep_grads, refuse_dtensor
from ._sam_passes import kept_buffers, param_buckets
from .sam import SAM

__all__ = ["RWP"]


class RWP(SAM):
    r"""Random weight perturbation around any ``torch.optim.Optimizer`` class; the ``SAM`` API
    (``first_step`` adds the noise, ``second_step`` mixes, restores and updates).

    Args:
        rho: the noise's standard deviation relative to each row's norm (0.01 by default).
        alpha: weight of the noisy gradient (0.5).
        generator: a ``torch.Generator`` for the noise.
        everything else: as :class:`cl_optim.SAM` (no ``adaptive``).

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt = cl_optim.RWP(model.parameters(), torch.optim.SGD, rho=0.01, alpha=0.5, lr=0.1,
        ...                    generator=torch.Generator().manual_seed(0))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> closure(); loss = opt.step(closure)  # doctest: +ELLIPSIS
        tensor(...)
    """

    def __init__(self, params, base_optimizer: type, rho: float = 0.01, alpha: float = 0.5, *,
                 generator: Optional[torch.Generator] = None, **kwargs):  # fmt: skip
        if "adaptive" in kwargs:
            raise TypeError("RWP takes no adaptive=: its noise is scaled by each row's norm")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha} (must be in [0, 1])")
        if kwargs.get("mask") is not None:
            raise TypeError("RWP takes no mask=: SSAM-F's mask selects elements of an ascent, RWP has none")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator takes a torch.Generator, got {type(generator).__name__}")
        super().__init__(params, base_optimizer, rho, False, **kwargs)
        self.alpha, self.generator = float(alpha), generator
        self._clean_grads: dict = {}  # id(param) -> g, allocated once, never saved

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_clean_grads"] = {}
        return state

    def _first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        if self._run["pending"] is not None or not self.is_sam_step:
            return super()._first_step(zero_grad, grad_scaler)  # which raises, naming the problem
        plan = self._ascent_plan()  # SAM's checks (groups, gradients), the buckets it would move
        params = graded(self.param_groups)
        if self.fisher_ema is not None:  # the running Fisher takes g, as SAM's first pass does
            self._fisher_from_grads(self._ascent_plan(selected_only=False), grad_scaler)
        refuse_dtensor(params, "RWP")
        keep_grads(self._clean_grads, params)
        moved = {id(p) for _, _, _, bucket, _, _ in plan for p in bucket}
        perturbed = [p for p in params if id(p) in moved]
        for (device, dtype, _), bucket in param_buckets(perturbed).items():
            torch._foreach_copy_(kept_buffers(self._saved, bucket, device, dtype), bucket)
        rho_of = {id(p): group["rho"] for group in self.param_groups for p in group["params"]}
        for p in perturbed:  # in parameter order: the noise sequence is the generator's
            noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype, device=p.device)
            p.add_(noise.mul_(_row_norms(p).mul_(rho_of[id(p)])))
        self._run["first_pass"] = params
        # g enters the mix: skip on its inf/NaN; its norm bounds the mix (COMBINE)
        sq_norm = self._gradient_sq_norm()
        self._run["clean_norm"] = sq_norm.sqrt()
        self._perturbed(perturbed, ~torch.isfinite(sq_norm), grad_scaler, zero_grad)

    def _second_step(self, zero_grad: bool = False) -> None:
        params = self._second_pass_params()
        clean_norm = self._run.pop("clean_norm", None)
        if params:
            clean = [self._clean_grads[id(p)] for p in params]
            coefficients = self._constant((self.alpha, 1.0 - self.alpha), params[0].grad.device)
            # read by a fused base's update (COMBINE), the norm of g over every parameter bounding it
            self._combine_into_update(params, [clean], coefficients, clean_norm)
        super()._second_step(zero_grad)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.generator is not None:
            state["sam"]["rwp_generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        saved = state_dict.get("sam", {}).get("rwp_generator")
        if saved is not None and self.generator is not None:
            self.generator.set_state(saved)


def _row_norms(p: Tensor) -> Tensor:
    """``||w_row||`` per output row (shaped to broadcast), or the whole tensor's norm for 0-1 dims."""
    w = p.detach().to(torch.float32) if p.dtype in (torch.float16, torch.bfloat16) else p.detach()
    if p.dim() <= 1:
        return torch.linalg.vector_norm(w).to(p.dtype)
    return torch.linalg.vector_norm(w, dim=tuple(range(1, p.dim())), keepdim=True).to(p.dtype)
