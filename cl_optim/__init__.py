"""cl_optim: drop-in torch.optim optimizers for continual learning.

``SGD`` and ``AdamW`` give the numbers of their torch.optim namesakes and take the fused-step
terms of continual learning; ``SAM`` wraps any torch.optim optimizer class;
its variants (GSAM, LookSAM, WSAM, MSAM, FriendlySAM, GAM, CFlat, RWP) share its API;
``MultiTaskSAM`` is its multi-task form (F-MTL). ``report()`` tells
which backends run on this machine. Nothing here touches CUDA, Triton or a compiler at import.
"""

from . import fisher, landscape, multitask
from ._backend import report
from ._optimizer import pad_state_
from .adamw import AdamW
from .cflat import CFlat
from .ewc import EWC
from .friendly_sam import FriendlySAM
from .gam import GAM
from .gsam import GSAM
from .integrations import preserve_bn_stats, skip_grad_sync
from .looksam import LookSAM
from .msam import MSAM
from .multitask_sam import MultiTaskSAM
from .rwp import RWP
from .sam import SAM
from .sgd import SGD
from .wsam import WSAM

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "AdamW",
    "SAM",
    "GSAM",
    "LookSAM",
    "WSAM",
    "MSAM",
    "FriendlySAM",
    "GAM",
    "CFlat",
    "RWP",
    "MultiTaskSAM",
    "EWC",
    "fisher",
    "landscape",
    "multitask",
    "report",
    "pad_state_",
    "preserve_bn_stats",
    "skip_grad_sync",
    "__version__",
]
