"""The per-group settings of :class:`cl_optim.SAM`: the ``adaptive`` conventions and their offsets
``eta``, the checks of a group's values (each naming the problem before anything moves), and the
weight kind each convention gives a tensor."""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from .sam_ops import ASAM, FISHER_BATCH, FISHER_RUNNING, PLAIN

ADAPTIVE_MODES = (False, True, "official", "fisher", "fisher_ema")
# The offset ``eta`` of each ``adaptive`` convention where a group leaves it None.
DEFAULT_ETA = {False: 0.0, True: 0.0, "official": 0.01, "fisher": 1.0, "fisher_ema": 1.0}


def check_sam_group(group: dict) -> None:
    """Raise, naming the value, for a group's ``rho``, ``adaptive`` or ``eta`` out of range."""
    if not 0.0 <= group["rho"] < math.inf:
        raise ValueError(f"Invalid rho: {group['rho']} (must be finite and >= 0)")
    if group["adaptive"] not in ADAPTIVE_MODES:
        raise ValueError(
            f"Invalid adaptive: {group['adaptive']!r}; expected False, True, 'official', 'fisher' or 'fisher_ema'"
        )
    if group["eta"] is not None and not 0.0 <= group["eta"] < math.inf:
        raise ValueError(f"Invalid eta: {group['eta']} (must be >= 0)")


def check_perturb(group: dict) -> None:
    """A group's ``perturb``: a bool, or one bool per parameter (SAM-ON's selection)."""
    perturb = group.get("perturb", True)
    if isinstance(perturb, bool):
        return
    if (
        not isinstance(perturb, (list, tuple))
        or len(perturb) != len(group["params"])
        or not all(isinstance(flag, bool) for flag in perturb)
    ):
        raise ValueError(
            f"Invalid perturb: {perturb!r}; a bool or one bool per parameter of the group "
            f"({len(group['params'])})"
        )


def sam_weights(group: dict, params: list[Tensor]) -> tuple[Optional[list[int]], float]:
    """The weight kind of each tensor (PLAIN, ASAM, FISHER_*) and ``eta``; ``(None, 0)`` for SAM."""
    mode = group["adaptive"]
    if mode is False:
        return None, 0.0
    eta = float(DEFAULT_ETA[mode] if group["eta"] is None else group["eta"])
    if mode == "fisher":
        return [FISHER_BATCH] * len(params), eta
    if mode == "fisher_ema":
        return [FISHER_RUNNING] * len(params), eta
    return [PLAIN if (mode == "official" and p.dim() <= 1) else ASAM for p in params], eta
