"""The main job's methods that change what is trained on (the optimizer-side ones — EWC, SAM and
its variants, large learning rates — are chosen in bench/continual.py): one file each, sharing the
training loop through :class:`base.Method`."""

from .align import Align
from .base import Method
from .lwf import LwF
from .pnn import Progressive, ProgressiveMLP
from .replay import Replay

METHODS = {"replay": Replay, "lwf": LwF, "align": Align, "pnn": Progressive}
# Scenarios a method runs in (all by default): PNN picks its column by the task, so it needs task
# identity at test time, which only the split scenario gives.
SCENARIOS = {"pnn": ("split",)}

__all__ = ["METHODS", "SCENARIOS", "Align", "LwF", "Method", "Progressive", "ProgressiveMLP", "Replay"]
