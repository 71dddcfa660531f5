"""The main job's methods, one file each, sharing the training loop of bench/continual.py through
:class:`base.Method`: what each builds (model, optimizer, EWC penalty) and what each batch trains
on. ``METHODS`` maps the job's method names, in the order it runs and reports them, to the classes."""

from .align import Align
from .base import Method, MultiHeadMLP
from .cflat import CFlat, CFlatEWC
from .combined import Combined
from .ewc import EWC, OnlineEWC
from .gsam import GSAM
from .large_lr import LargeLR
from .looksam import LookSAM
from .lwf import LwF
from .pnn import Progressive, ProgressiveMLP
from .pronc import ProNC
from .replay import Replay
from .sam import EWCSAM, SAM

METHODS: dict[str, type[Method]] = {
    "finetune": Method,
    "ewc": EWC,
    "online_ewc": OnlineEWC,
    "sam": SAM,
    "ewc_sam": EWCSAM,
    "gsam": GSAM,
    "looksam": LookSAM,
    "cflat": CFlat,
    "cflat_ewc": CFlatEWC,
    "large_lr": LargeLR,
    "replay": Replay,
    "lwf": LwF,
    "align": Align,
    "pnn": Progressive,
    "pronc": ProNC,
    "combined": Combined,
}
# The scenarios a method runs in, where not all (its class's ``scenarios``).
SCENARIOS = {name: cls.scenarios for name, cls in METHODS.items() if cls.scenarios is not None}

__all__ = [
    "METHODS",
    "SCENARIOS",
    "Align",
    "CFlat",
    "CFlatEWC",
    "Combined",
    "EWC",
    "EWCSAM",
    "GSAM",
    "LargeLR",
    "LookSAM",
    "LwF",
    "Method",
    "MultiHeadMLP",
    "OnlineEWC",
    "ProNC",
    "Progressive",
    "ProgressiveMLP",
    "Replay",
    "SAM",
]
