"""Gradient accumulation with a perturbation per micro-batch (``second_step(accumulate=True)``, the
m-sharpness of the SAM paper): a running sum per parameter, added to the last micro-batch's
gradient before the one update."""

from __future__ import annotations

import torch

from ._sam_passes import kept_buffers, param_buckets


class SAMAccumulation:
    """The accumulation's methods of :class:`cl_optim.SAM` (a mixin: the state is SAM's). They use
    SAM's ``_run``, ``_micro_sums``, ``_nonfinite_gradient``, ``_restore`` and ``zero_grad``."""

    # Whether second_step(accumulate=True) applies: variants whose state moves once per step
    # (LookSAM's g_v, F-SAM's mean, WSAM's decoupled descent) set False.
    _LOCAL_ACCUMULATION = True

    def _refuse_mid_accumulation(self, what: str) -> None:
        if self._run.get("micro_summed"):
            raise RuntimeError(
                f"{what} between micro-batches of second_step(accumulate=True): the summed gradient "
                "is not part of a copy or a checkpoint; finish the step first"
            )

    def _accumulate_micro_batch(self) -> None:
        """``sum <- sum + .grad`` (a micro-batch's perturbed gradient), restore, clear ``.grad``."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        flags = [self._run["pass1_nonfinite"], self._nonfinite_gradient()]  # GradScaler sees only the last
        if self._run.get("micro_skip") is not None:
            flags.append(self._run["micro_skip"])
        home = flags[1].device
        self._run["micro_skip"] = torch.stack([f.to(home) for f in flags]).any()
        summed = self._run.setdefault("micro_summed", set())
        for (device, dtype, _), bucket in param_buckets(params).items():
            sums = kept_buffers(self._micro_sums, bucket, device, dtype)
            fresh = [i for i, p in enumerate(bucket) if id(p) not in summed]
            seen = [i for i, p in enumerate(bucket) if id(p) in summed]
            if fresh:
                torch._foreach_copy_([sums[i] for i in fresh], [bucket[i].grad for i in fresh])
            if seen:
                torch._foreach_add_([sums[i] for i in seen], [bucket[i].grad for i in seen])
            summed.update(id(p) for p in bucket)
        self._restore()
        self._run["pending"] = None
        self.zero_grad()

    def _add_accumulated(self) -> None:
        """The last micro-batch: ``.grad <- .grad + sum`` of the earlier ones, and their skip flag."""
        summed = self._run.pop("micro_summed", None)
        micro_skip = self._run.pop("micro_skip", None)
        if not summed:
            return
        params = [p for group in self.param_groups for p in group["params"] if id(p) in summed]
        for p in params:
            if p.grad is None:  # reached by earlier micro-batches only
                p.grad = torch.zeros_like(p)
        for (device, dtype, _), bucket in param_buckets(params).items():
            torch._foreach_add_(
                [p.grad for p in bucket], kept_buffers(self._micro_sums, bucket, device, dtype)
            )
        skip = self._run["pass1_nonfinite"]
        self._run["pass1_nonfinite"] = micro_skip if skip is None else skip | micro_skip.to(skip.device)
