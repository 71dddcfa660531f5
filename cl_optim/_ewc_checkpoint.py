"""Checkpoints and copies of :class:`cl_optim.EWC`: its state dict (mode, lambdas, task count,
history, and each parameter's fp32 precision and anchor), loading one with every entry checked
before anything is assigned, and copies and pickles (the caches keyed by object identity rebuilt)."""

from __future__ import annotations

import torch
from torch import Tensor


class EWCCheckpoints:
    """The checkpoint and copy methods of :class:`cl_optim.EWC` (a mixin: the state is EWC's)."""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_uncovered"] = {}  # a cache of weak references: rebuilt on use
        state["_terms_cache"] = None  # the step lists of the original's parameters
        del state["_by_param"]  # keyed by id(): rebuilt for the copied parameters
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_terms_cache", None)  # (a pickle from before the cache)
        self._by_param = {id(entry.param): entry for entry in self._entries.values()}

    def state_dict(self) -> dict:
        """Everything needed to resume: mode, lambdas, task count, history, and fp32 (A, mu)."""
        return {
            "mode": self.mode,
            "lam": self.lam,
            "gamma": self.gamma,
            "tasks": self.tasks,
            "history": list(self.history),
            "entries": {
                name: {
                    "lam": e.lam,
                    "precision": e.precision,
                    "anchor": e.anchor,
                    "constant": e.constant,
                }
                for name, e in self._entries.items()
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a state dict; (A, mu) stay fp32 whatever the model dtype. Shapes must match."""
        if state["mode"] != self.mode:
            raise ValueError(f"state dict is for mode {state['mode']!r}, this EWC is {self.mode!r}")
        unknown = set(state["entries"]) - set(self._entries)
        if unknown:
            raise KeyError(f"state dict has parameters this EWC does not cover: {sorted(unknown)}")
        # Everything read and checked before anything is assigned: a malformed state dict raises
        # and leaves this EWC as it was.
        lam, gamma = float(state["lam"]), float(state["gamma"])
        tasks, history = int(state["tasks"]), list(state["history"])
        scalars = {}
        for name, saved in state["entries"].items():
            entry = self._entries[name]
            scalars[name] = float(saved["lam"]), float(saved["constant"])
            if saved["precision"] is None:
                continue
            for key in ("precision", "anchor"):
                value = saved[key]
                if not isinstance(value, Tensor) or not value.is_floating_point():
                    raise TypeError(
                        f"EWC: saved {name!r} has a {key} of type {type(value).__name__}"
                        + (f" ({value.dtype})" if isinstance(value, Tensor) else "")
                        + ", not a floating-point tensor; nothing was loaded"
                    )
                if value.shape != entry.param.shape:
                    raise RuntimeError(
                        f"EWC: saved {name!r} has a {key} of shape {tuple(value.shape)}, the parameter "
                        f"{tuple(entry.param.shape)}; load into the old shape, then pad_ (nothing was loaded)"
                    )
        self.lam, self.gamma, self.tasks, self.history = lam, gamma, tasks, history
        # Converted one buffer at a time: the memory of the old state plus one buffer, not twice the
        # state; only a failure of the copy itself (out of memory) can stop it part-way.
        for name, saved in state["entries"].items():
            entry = self._entries[name]
            entry.lam, entry.constant = scalars[name]
            if saved["precision"] is None:
                entry.precision = entry.anchor = None
                continue
            for key in ("precision", "anchor"):
                setattr(entry, key, saved[key].to(device=entry.param.device, dtype=torch.float32, copy=True))
