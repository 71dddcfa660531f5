"""Learned merge coefficients (AdaMerging, Yang et al. 2024; SAMerging, Dalili & Mahdavi 2025):
``theta(lambda) = theta0 + sum_k lambda_k tau_k`` with ``lambda`` trained, task- or layer-wise,
against the experts' own outputs, by ``cl_optim.SAM`` — with the second pass at the perturbed
coefficients (the SAMerging code caches the merged weights, so its second pass never sees the
perturbation and its "SAM" is the base optimizer at twice the cost)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..sam import SAM
from ._state import assemble, check_models, opmath


def learn_merge(
    model: nn.Module,
    base: Mapping[str, Tensor],
    experts: Sequence[Mapping[str, Tensor]],
    inputs: Sequence[Sequence[Tensor]],
    *,
    granularity: str = "layer",
    steps: int = 100,
    lr: float = 1e-3,
    rho: float = 0.07,
    adaptive: bool = False,
    init: float = 0.3,
    temperature: float = 2.0,
    base_optimizer: type = torch.optim.Adam,
    generator: Optional[torch.Generator] = None,
) -> tuple[dict, Tensor]:
    r"""Coefficients ``lambda`` (``(K,)`` task-wise or ``(K, L)`` layer-wise, one per expert and
    floating entry) minimising ``sum_t KL(softmax(e_t / T) || softmax(f_{theta(lambda)}(x_t) / T))``
    over unlabelled inputs ``x_t`` of each task ``t`` (``inputs[t]``, a list of batches), ``e_t``
    expert ``t``'s outputs on them (computed once). Each step draws one batch per task, runs
    ``SAM.step`` with a closure that rebuilds ``theta(lambda)`` from the current (perturbed)
    coefficients, and the base optimizer (Adam by default, as SAMerging) updates ``lambda``.
    ``rho=0`` is AdaMerging (the base optimizer alone). The model is evaluated in eval mode
    (BatchNorm statistics merged like the weights, never updated); the model itself is not changed.

    Returns the merged ``state_dict`` (floating entries in their dtypes, the others from
    ``base``) and the learned coefficients.

    Example:
        >>> import torch
        >>> from cl_optim.merge import learn_merge
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> net = torch.nn.Linear(4, 3)
        >>> base = {k: v.clone() for k, v in net.state_dict().items()}
        >>> experts = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
        >>> inputs = [[torch.randn(8, 4)], [torch.randn(8, 4)]]
        >>> merged, coefficients = learn_merge(net, base, experts, inputs, steps=5, granularity="task")
        >>> coefficients.shape
        torch.Size([2])
    """
    experts = list(experts)
    keys = check_models([base, *experts], ["base"] + [f"experts[{k}]" for k in range(len(experts))])
    if not experts:
        raise ValueError("learn_merge needs at least one expert")
    if set(model.state_dict()) != set(base):
        raise ValueError("base is not a state_dict of model (its keys differ)")
    if len(inputs) != len(experts) or any(len(batches) == 0 for batches in inputs):
        raise ValueError(f"inputs needs a non-empty list of batches for each of the {len(experts)} experts")
    if granularity not in ("task", "layer"):
        raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    if steps < 0 or not temperature > 0 or not rho >= 0:
        raise ValueError(
            f"steps must be >= 0, temperature > 0 and rho >= 0, got {steps}, {temperature}, {rho}"
        )
    device = base[keys[0]].device if keys else torch.device("cpu")
    # The arithmetic in opmath (fp32 for fp16/bf16 entries); each merged entry is handed to the
    # model in its own dtype (the cast is differentiable).
    theta0 = {key: base[key].detach().to(opmath(base[key].dtype)) for key in keys}
    tau = [{key: e[key].detach().to(theta0[key].dtype) - theta0[key] for key in keys} for e in experts]
    fixed = {key: v for key, v in base.items() if key not in theta0}  # integer buffers, from base
    shape = (len(experts),) if granularity == "task" else (len(experts), len(keys))
    coefficients = torch.full(shape, float(init), device=device, requires_grad=True)

    def merged(lam: Tensor) -> dict:
        out = dict(fixed)
        for j, key in enumerate(keys):
            value = theta0[key]
            for k in range(len(experts)):
                value = value + (lam[k] if lam.dim() == 1 else lam[k, j]) * tau[k][key]
            out[key] = value.to(base[key].dtype)
        return out

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # the experts' outputs, once
            targets = [
                [F.log_softmax(functional_call(model, _as_dict(experts[t], keys, fixed), (x,)) / temperature, -1)
                 for x in inputs[t]]
                for t in range(len(experts))
            ]  # fmt: skip
        # rho = 0: AdaMerging, the base optimizer alone (one pass a step, not SAM's two at zero radius)
        opt = SAM([coefficients], base_optimizer, rho=rho, adaptive=adaptive, lr=lr) if rho > 0 else None
        opt = opt if opt is not None else base_optimizer([coefficients], lr=lr)
        for _ in range(steps):
            picks = [
                int(torch.randint(len(inputs[t]), (1,), generator=generator)) if len(inputs[t]) > 1 else 0
                for t in range(len(experts))
            ]

            def closure(picks=picks):
                opt.zero_grad()
                params = merged(coefficients)  # rebuilt from the current, perturbed, coefficients
                loss = sum(
                    F.kl_div(F.log_softmax(functional_call(model, params, (inputs[t][i],)) / temperature, -1),
                             targets[t][i], log_target=True, reduction="batchmean")
                    for t, i in enumerate(picks)
                )  # fmt: skip
                loss.backward()
                return loss

            closure()
            if isinstance(opt, SAM):
                opt.step(closure)
            else:
                opt.step()
        with torch.no_grad():
            final = merged(coefficients.detach())
    finally:
        model.train(was_training)
    return assemble(base, {key: final[key] for key in keys}), coefficients.detach()


def _as_dict(state: Mapping[str, Tensor], keys: list[str], fixed: dict) -> dict:
    return {**fixed, **{key: state[key].detach() for key in keys}}
