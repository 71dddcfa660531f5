r"""Momentum-SAM (Becker et al., arXiv 2401.12033): the perturbation from the momentum, no second pass.

MSAM takes the base optimizer's momentum ``v`` (SGD's ``momentum_buffer``, Adam's ``exp_avg``)
as the ascent direction instead of a fresh gradient, so one forward/backward per step suffices.
Between steps the parameters are kept at the perturbed point ``p = theta - c v``,
``c = rho / (||v|| + 1e-12)`` (one norm over every parameter; ``rho`` per group), and the
gradient the user computes there drives the step (the official code, ``MarlonBecker/MSAM``):

    theta  = p + c_old v_old            (move back)
    theta', v' = base update of theta with that gradient
    p      = theta' - c_new v',   c_new = rho / (||v'|| + 1e-12)

The first step has no momentum yet, so ``p = theta``. Evaluate and save the model at ``theta``:
``move_back()`` before, ``move_forward()`` after (``state_dict`` records where the weights
are, so a checkpoint taken either way resumes exactly). No buffer beyond the base optimizer's; the
two moves are one fused ``task_combine_`` pass each, the norm one ``task_gram`` pass.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._sam_family import norm_of, refuse_dtensor
from .multitask.aggregators import gram_unchecked as gram  # aligned by construction
from .multitask.aggregators import weighted_sum_unchecked as weighted_sum
from .sam import SAM

__all__ = ["MSAM"]

_DIRECTION_KEYS = ("momentum_buffer", "exp_avg")


class MSAM(SAM):
    r"""Momentum-SAM around a ``torch.optim.Optimizer`` class that keeps a momentum (SGD with
    ``momentum > 0``, Adam, AdamW and their cl_optim counterparts).

    Args:
        rho: radius along the momentum (the official configurations use 0.3 to 3).
        everything else: as :class:`cl_optim.SAM` (no ``adaptive``: the direction is the momentum).

    ``step(closure=None)`` makes one update with the gradient already computed at the current
    (perturbed) weights; a closure is never called (it may be given, as to any optimizer).
    There is no ``first_step``/``second_step``, and the options of an ascent (``interval``,
    ``start_step``, ``only_norm_layers``, ``mask``, a group's ``perturb``) are refused; a group
    with ``rho=0`` is left alone. The move back uses the factors of the move forward, so changing
    ``rho`` between steps never moves ``theta``.

    Example:
        >>> import torch, cl_optim
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt = cl_optim.MSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
        >>> for _ in range(3):
        ...     opt.zero_grad(); torch.nn.functional.mse_loss(model(x), y).backward(); opt.step()
        >>> opt.move_back()   # evaluate / save at theta
        >>> opt.move_forward()
    """

    def __init__(self, params, base_optimizer: type, rho: float = 0.3, **kwargs):
        if "adaptive" in kwargs:
            raise TypeError("MSAM takes no adaptive=: its direction is the base optimizer's momentum")
        for name in ("interval", "start_step", "only_norm_layers", "mask"):
            if kwargs.get(name) not in (None, False, 1 if name == "interval" else 0):
                raise TypeError(
                    f"MSAM takes no {name}=: it moves every parameter along the momentum every step"
                )
        super().__init__(params, base_optimizer, rho, False, **kwargs)
        for index, group in enumerate(self.param_groups):
            if group.get("perturb", True) is not True:
                raise ValueError(
                    f"param_groups[{index}]: MSAM takes no perturb= (use rho=0 for a group it leaves alone)"
                )
            if "momentum" in group and not group["momentum"]:
                raise ValueError(
                    f"param_groups[{index}]: MSAM perturbs along the momentum, and momentum=0 keeps none; "
                    "set momentum > 0"
                )
        # The factors rho_group * c of the last move (device scalars; None before the first step)
        # and whether the weights are at the perturbed point.
        self._msam: dict = {"factors": None, "at_ascent": False}

    # ----------------------------------------------------------------------------------- steps

    def first_step(self, zero_grad: bool = False, grad_scaler=None) -> None:
        raise RuntimeError("MSAM has no second pass: call step() after backward()")

    def second_step(self, zero_grad: bool = False) -> None:
        raise RuntimeError("MSAM has no second pass: call step() after backward()")

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        """Move back to ``theta``, make the base update with the gradient there now, move to
        ``theta' - c v'``. Skipped steps (AMP, non-finite) leave ``v`` and the weights' place."""
        self._move(+1)  # theta = p + c_old v_old
        self._base_step()
        directions = self._directions()
        if not directions:
            raise RuntimeError(
                "MSAM found no momentum after the base update: use a base optimizer that keeps one "
                f"(state keys {_DIRECTION_KEYS}), e.g. SGD with momentum > 0 or AdamW"
            )
        refuse_dtensor([p for p, _ in directions], "MSAM")
        g = gram([[v for _, v in directions]], backend=self.backend)
        inverse_norm = 1.0 / (norm_of(g, 0) + 1e-12)
        # rho_group * c, fixed now: a later change of rho must not move theta (the move back takes
        # exactly the factor of the move forward).
        self._msam["factors"] = [group["rho"] * inverse_norm for group in self.param_groups]
        self._move(-1)  # p = theta' - c_new v'
        return None

    def move_back(self) -> None:
        """Put the weights at ``theta`` (evaluation, checkpoints); a no-op where they are already."""
        with torch.no_grad():
            self._move(+1)

    def move_forward(self) -> None:
        """Put the weights back at the perturbed point ``theta - c v`` for the next step."""
        with torch.no_grad():
            if not self._msam["at_ascent"] and self._msam["factors"] is not None:
                self._shift(-1)
                self._msam["at_ascent"] = True

    @property
    def at_ascent(self) -> bool:
        """Whether the weights are at the perturbed point (after a step) rather than at ``theta``."""
        return self._msam["at_ascent"]

    def _move(self, sign: int) -> None:
        if sign > 0:
            if self._msam["at_ascent"]:
                self._shift(+1)
            self._msam["at_ascent"] = False
        elif self._msam["factors"] is not None:
            self._shift(-1)
            self._msam["at_ascent"] = True

    def _shift(self, sign: int) -> None:
        """``p <- p + sign * factor_group * v`` for every parameter with a momentum, with the
        factors ``rho_group * c`` of the last step."""
        for group, factor in zip(self.param_groups, self._msam["factors"]):  # groups added since: never moved
            pairs = [
                (p, self.state[p][k]) for p in group["params"] for k in _DIRECTION_KEYS if k in self.state[p]
            ]
            if pairs:
                weighted_sum([[v for _, v in pairs]], (sign * factor).reshape(1), out=[p for p, _ in pairs],
                             accumulate=True, backend=self.backend)  # fmt: skip

    def _directions(self) -> list[tuple[Tensor, Tensor]]:
        return [
            (p, self.state[p][k]) for group in self.param_groups for p in group["params"]
            for k in _DIRECTION_KEYS if k in self.state[p]
        ]  # fmt: skip

    # ------------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """The base optimizer's state, the step count, the factors ``rho_group * c`` of the last
        move and where the weights are."""
        state = super().state_dict()
        factors = self._msam["factors"]
        state["sam"]["msam"] = {
            "factors": None if factors is None else [f.detach().cpu().clone() for f in factors],
            "at_ascent": self._msam["at_ascent"],
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        saved = dict(state_dict.get("sam", {})).get("msam", {})
        super().load_state_dict(state_dict)
        factors = saved.get("factors")
        if factors is not None:
            device = next((v.device for _, v in self._directions()), torch.device("cpu"))
            factors = [f.to(device=device, dtype=torch.float64) for f in factors]
        self._msam = {"factors": factors, "at_ascent": bool(saved.get("at_ascent", False))}
