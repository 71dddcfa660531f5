"""One batch as the model takes it, and the model's prediction tensor.

A batch is ``(inputs, targets)`` (``inputs`` a tensor, a tuple or list of tensors, or a dict of
keyword inputs) or a Hugging Face dict (targets under ``labels``). Tensors whose leading dimension
is the batch are per-sample; the others (position ids of shape ``(1, T)``, masks, flags) are
shared by every sample. Nested lists and tuples (what a ``DataLoader`` yields for
``((x1, x2), y)``) are walked, so that cutting a batch cuts each tensor, never the list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.utils._pytree import tree_flatten

__all__ = ["Batch", "logits"]


class Batch:
    """Positional and keyword inputs, targets and the number of samples of one batch."""

    def __init__(self, args: tuple, kwargs: dict, targets: Any):
        self.args, self.kwargs, self.targets = args, kwargs, targets
        leaves, _ = tree_flatten((targets, args, kwargs))
        leading = [t.shape[0] for t in leaves if isinstance(t, Tensor) and t.dim()]
        if not leading:
            raise ValueError("a batch needs at least one tensor with a batch dimension")
        # The sample count: the targets' length, else the longest leading dimension of the inputs
        # (a (1, T) position_ids next to (B, T) input_ids is shared, not a batch of one).
        if isinstance(targets, Tensor) and targets.dim():
            self.size = targets.shape[0]
        else:
            self.size = max(leading)

    @classmethod
    def of(cls, batch) -> Batch:
        if isinstance(batch, Tensor):
            return cls((batch,), {}, None)
        if isinstance(batch, Mapping):  # a Hugging Face batch: labels are the targets
            return cls((), {k: v for k, v in batch.items() if k != "labels"}, batch.get("labels"))
        if not isinstance(batch, (tuple, list)) or not batch:
            raise TypeError(
                f"a batch must be a tensor, a dict or an (inputs, targets) pair; got {type(batch).__name__}"
            )
        inputs, targets = batch[0], (batch[1] if len(batch) > 1 else None)
        if isinstance(inputs, Mapping):
            return cls((), dict(inputs), targets)
        return cls(tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,), {}, targets)

    def _map(self, fn) -> Batch:
        """A batch with ``fn`` applied to every per-sample tensor (leading dimension = the batch)."""
        size = self.size

        def cut(value):  # plain recursion: torch's pytree costs more than the model on small batches
            if isinstance(value, Tensor):
                return fn(value) if value.dim() and value.shape[0] == size else value
            if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
                return type(value)(cut(v) for v in value)
            if isinstance(value, dict):
                return {k: cut(v) for k, v in value.items()}
            return value

        return Batch(cut(self.args), cut(self.kwargs), cut(self.targets))

    def rows(self, start: int, stop: int) -> Batch:
        """Samples ``start..stop-1``, every per-sample tensor cut (shared ones kept whole)."""
        if start == 0 and stop >= self.size:
            return self
        part = self._map(lambda t: t[start:stop])
        part.size = min(stop, self.size) - start
        return part

    def take(self, n: int) -> Batch:
        """The first ``n`` samples."""
        return self.rows(0, n)


def logits(output) -> Tensor:
    """The prediction tensor of a model's output: itself, ``.logits`` (Hugging Face), or the first
    element of a tuple."""
    if isinstance(output, Tensor):
        return output
    value = getattr(output, "logits", None)
    if isinstance(value, Tensor):
        return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}; fisher.estimate needs a tensor or .logits")
