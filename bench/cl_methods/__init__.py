"""The main job's methods that change what is trained on (the optimizer-side ones — EWC, SAM and
its variants, large learning rates — are chosen in bench/continual.py): one file each, sharing the
training loop through :class:`base.Method`."""

from .align import Align
from .base import Method
from .lwf import LwF
from .replay import Replay

METHODS = {"replay": Replay, "lwf": LwF, "align": Align}

__all__ = ["METHODS", "Align", "LwF", "Method", "Replay"]
