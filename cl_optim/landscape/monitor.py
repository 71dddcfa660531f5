r"""Sharpness against the optimizer's stability threshold, during training.

Example:
    >>> import torch, cl_optim
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> data = [(torch.randn(32, 3), torch.randint(0, 2, (32,)))]
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
    >>> monitor = cl_optim.landscape.SharpnessMonitor(model, data, opt, every=5)
    >>> for step in range(10):
    ...     opt.zero_grad(); torch.nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()
    ...     opt.step(); _ = monitor.step()
    >>> [row["step"] for row in monitor.history]
    [1, 6]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable, Optional

from torch import nn

from .eigen import hessian_eigenvalues
from .objective import Objective
from .sharpness import is_adaptive, preconditioned_sharpness, stability_threshold

__all__ = ["SharpnessMonitor"]


class SharpnessMonitor:
    """Every ``every`` calls of :meth:`step`, the top Hessian eigenvalue of the loss over ``data``
    (warm-started from the last eigenvector; for Adam-type optimizers the preconditioned
    sharpness), next to :func:`stability_threshold` of ``optimizer``.

    ``history`` holds one dict per measurement: ``step``, ``sharpness``, ``threshold``, ``ratio``
    (sharpness / threshold: about 1 at the edge of stability), ``preconditioned`` and ``hvps``
    (Hessian-vector products spent).
    """

    def __init__(
        self,
        model: nn.Module,
        data: Iterable,
        optimizer,
        every: int = 10,
        *,
        loss_fn: Optional[Callable] = None,
        tol: float = 1e-3,
        max_iter: int = 40,
        mode: Optional[str] = None,
    ):
        if every < 1:
            raise ValueError("every must be >= 1")
        self.model, self.data, self.optimizer = model, list(data), optimizer
        self.every, self.loss_fn, self.tol, self.max_iter, self.mode = every, loss_fn, tol, max_iter, mode
        self.history: list = []
        self.calls = 0
        self._vector = None

    def step(self) -> Optional[dict]:
        """Call once per training step (after ``optimizer.step()``); measures on the first call
        and every ``every`` calls after it. Returns the new row, or None."""
        self.calls += 1
        if (self.calls - 1) % self.every:
            return None
        return self.measure()

    def measure(self) -> dict:
        before = Objective.products
        threshold = stability_threshold(self.optimizer)
        adaptive = is_adaptive(self.optimizer)
        if adaptive:
            sharpness = preconditioned_sharpness(
                self.model,
                self.data,
                self.optimizer,
                self.loss_fn,
                tol=self.tol,
                max_iter=self.max_iter,
                mode=self.mode,
            )
        else:
            size = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            if self._vector is not None and self._vector.shape[-1] != size:
                self._vector = None  # parameters were frozen or added since: start afresh
            values, vectors = hessian_eigenvalues(
                self.model, self.data, 1, self.loss_fn, tol=self.tol, max_iter=self.max_iter, init=self._vector,
                mode=self.mode,
            )  # fmt: skip
            sharpness, self._vector = float(values[0]), vectors
        row = {
            "step": self.calls,
            "sharpness": sharpness,
            "threshold": threshold,
            "ratio": sharpness / threshold,
            "preconditioned": adaptive,
            "hvps": Objective.products - before,
        }
        self.history.append(row)
        return row

    def plot(self, path) -> None:
        from .plots import plot_monitor

        plot_monitor(self.history, path)
