"""Checkpoints and copies of :class:`cl_optim.SAM`: the state dict (the base optimizer's, and SAM's
counters and per-parameter tensors), loading one (SAM's or a plain base optimizer's), copies and
pickles, and state carried over to a grown parameter."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

from torch import Tensor

from ._optimizer import FISHER_KEY, FusedOptimizer, keep_fp32_state, pad_state_
from ._plan import BucketPlans
from ._sam_settings import check_perturb, check_sam_group
from .sam_select import MASK_KEY

# Group keys of SAM and its variants that a plain base optimizer's state dict lacks.
GROUP_KEYS = ("rho", "adaptive", "eta", "perturb", "grad_norm_rho", "rho_max", "lr_max")


class SAMCheckpoints:
    """The checkpoint and copy methods of :class:`cl_optim.SAM` (a mixin: the state is SAM's). They
    use SAM's ``_run``, ``sam_state``, ``base_optimizer``, ``_check_fisher_source`` and
    ``_refuse_mid_accumulation``; ``super()`` is ``torch.optim.Optimizer``."""

    def __getstate__(self) -> dict:
        """A copy or pickle keeps the base optimizer, the options and the counters (torch's
        Optimizer keeps only defaults, state and groups); the restore buffers are transient."""
        if self._run["pending"] is not None:
            raise RuntimeError(
                "cannot copy or pickle SAM between first_step() and second_step(): the weights are perturbed"
            )
        self._refuse_mid_accumulation("copy or pickle")
        state = dict(self.__dict__)
        for hooks in [key for key in state if key.startswith("_optimizer_") and key.endswith("_hooks")]:
            del state[hooks]  # as torch.optim.Optimizer: hooks are not part of a copy
        state["_saved"] = {}
        state["_micro_sums"] = {}
        state["_norm_module"] = None  # a weak reference: the copy selects new groups by name
        state["_constants"] = {}
        state["_plans"] = BucketPlans()
        state["_run"] = {**self._run, "grad_scaler": None, "ascent_norms": [], "ascent_saves": None}
        return state

    def state_dict(self) -> dict:
        """The base optimizer's state (momentum, Adam moments, ...) and SAM's own counters.

        The restore buffers are transient and never saved; asking between ``first_step`` and
        ``second_step`` (perturbed weights) is an error.
        """
        if self._run["pending"] is not None:
            raise RuntimeError(
                "state_dict() between first_step() and second_step(): the weights are perturbed"
            )
        self._refuse_mid_accumulation("state_dict()")
        state = super().state_dict()
        state["sam"] = {"steps": self.steps}
        if self.mask is not None:
            state["sam"]["masks_from_step"] = self._masks_from_step
        params = [p for group in self.param_groups for p in group["params"]]
        per_param = {i: dict(self.sam_state[p]) for i, p in enumerate(params) if self.sam_state.get(p)}
        if per_param:
            state["sam"]["param_state"] = per_param
        return state

    def pad_state_(self, param: Tensor, new_param: Optional[Tensor] = None) -> None:
        """Carry a grown parameter's state over (``cl_optim.pad_state_``); not while perturbed."""
        if self._run["pending"] is not None:
            raise RuntimeError("pad_state_() between first_step() and second_step()")
        pad_state_(self, param, new_param)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a SAM state dict, or a plain one of the base optimizer class."""
        if self._run["pending"] is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step()")
        state_dict = dict(state_dict)
        sam_state = state_dict.pop("sam", {})
        # A plain base optimizer's state dict has none of SAM's group keys: keep the current ones.
        kept = [{k: v for k, v in group.items() if k in GROUP_KEYS} for group in self.param_groups]
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        keep_fp32_state(self, state_dict)
        for group, own in zip(self.param_groups, kept):
            for key, value in own.items():
                group.setdefault(key, value)
            for key in ("rho", "adaptive", "eta"):
                group.setdefault(key, self.defaults[key])
            check_sam_group(group)
            check_perturb(group)
            self._check_fisher_source(group)
        self._run["steps"].fill_(int(sam_state.get("steps", 0)))
        self._masks_from_step = sam_state.get("masks_from_step")
        # SAM's per-parameter tensors as saved (no cast to the parameter dtype: 1-bit masks, fp32
        # Fisher), on each parameter's device; a running Fisher a torch.optim base kept in its own
        # state (checkpoints before the store existed) moves to the store.
        params = [p for group in self.param_groups for p in group["params"]]
        self.sam_state = defaultdict(dict)
        for index, entries in sam_state.get("param_state", {}).items():
            p = params[int(index)]
            for key, value in entries.items():
                if value.shape != p.shape and key != MASK_KEY:
                    raise ValueError(f"sam param_state[{index}][{key!r}] of shape {tuple(value.shape)} "
                                     f"for a parameter of shape {tuple(p.shape)}; nothing usable was loaded")  # fmt: skip
                self.sam_state[p][key] = value.to(p.device).clone()
        if not isinstance(self.base_optimizer, FusedOptimizer):
            for p in params:
                if FISHER_KEY in self.state.get(p, {}):
                    self.sam_state[p][FISHER_KEY] = self.state[p].pop(FISHER_KEY)
