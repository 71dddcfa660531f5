"""The main job's methods that change what is trained on (the optimizer-side ones — EWC, SAM and
its variants, large learning rates — are chosen in bench/continual.py): one file each, sharing the
training loop through :class:`base.Method`."""

from .align import Align
from .base import Method
from .combined import Combined
from .lwf import LwF
from .pnn import Progressive, ProgressiveMLP
from .pronc import ProNC
from .replay import Replay

METHODS = {
    "replay": Replay,
    "lwf": LwF,
    "align": Align,
    "pnn": Progressive,
    "pronc": ProNC,
    "combined": Combined,
}
# Scenarios a method runs in (all by default): PNN picks its column by the task, so it needs task
# identity at test time, which only the split scenario gives; ProNC's growing frame of class
# prototypes is for new classes on one shared head.
SCENARIOS = {"pnn": ("split",), "combined": ("split",), "pronc": ("class_incremental",)}

__all__ = [
    "METHODS",
    "SCENARIOS",
    "Align",
    "LwF",
    "Method",
    "ProNC",
    "Progressive",
    "ProgressiveMLP",
    "Replay",
]
