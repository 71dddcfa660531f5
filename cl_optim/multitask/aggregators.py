r"""Combine task gradients in coefficient space: one Gram pass, a T x T problem, one weighted sum.

Every method here returns ``g = sum_t a_t g_t`` for coefficients ``a`` that depend on the task
gradients only through their Gram matrix ``G_ij = <g_i, g_j>`` (norms are its diagonal). So the
T gradient buffers are read once to build ``G`` (fp64 products and sums, in a fixed order:
deterministic; the fused ``task_gram`` op of :mod:`cl_optim.multitask.fused`), the small problem is solved on the device without
reading ``.item()`` (no host synchronisation: branches are ``torch.where``; CAGrad and MGDA beyond
two tasks are iterative and read the T x T matrix once, to solve it on the host — on a GPU, one
synchronisation per call), and one pass writes the weighted sum (``task_combine_``). No flattened ``T x |W|`` copy is made.

=========  ==========================================================================
``sum``    ``a_t = 1``
``mean``   ``a_t = 1/T``
``pcgrad`` Yu et al. 2020: each ``g_i`` is projected off every ``g_j`` it conflicts with
           (``<g_i', g_j> < 0``: ``g_i' -= <g_i', g_j>/||g_j||^2 g_j``), the ``j`` in a random
           order per ``i`` (``generator``; ``shuffle=False``: 0..T-1), with the original ``g_j``;
           the result is ``sum_i g_i'``.
``cagrad`` Liu et al. 2021, the official objective: ``w`` minimises
           ``w^T G b + c ||g_0|| sqrt(w^T G w)`` on the simplex (``b = 1/T``,
           ``||g_0||^2 = mean(G)``); ``g = g_0 + c ||g_0|| / ||g_w|| g_w``, divided by ``1 + c^2``.
``mgda``   the min-norm point of the convex hull, ``sum_t alpha_t g_t`` (closed form for 2 tasks;
           projected gradient on the simplex for more).
``imtl``   IMTL-G (Liu et al. 2021), closed form with task 0 as reference:
           ``alpha_{2..T} = g_1 U^T (D U^T)^{-1}`` with ``D_j = g_1 - g_j``, ``U_j = u_1 - u_j``,
           ``u = g/||g||``; ``alpha_1 = 1 - sum alpha_{2..T}``.
``gradvac`` Wang et al. 2021, with its EMA cosine targets: use :class:`GradVac` (an object keeps
           the state between steps); ``combine(..., "gradvac")`` starts from zero targets.
``agem``   Chaudhry et al. 2019: two entries, the task gradient and the memory gradient; the first
           is projected off the second only when they conflict.
=========  ==========================================================================

Example:
    >>> import torch
    >>> from cl_optim import multitask
    >>> a = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
    >>> b = [torch.tensor([-1.0, 1.0]), torch.tensor([0.0])]
    >>> multitask.combine([a, b], "agem")  # the memory gradient b conflicts: project a off it
    [tensor([0.5000, 0.5000]), tensor([1.])]
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._backend import resolve
from .._optimizer import bucket_indices
from .fused import task_combine_, task_gram

__all__ = ["combine", "coefficients", "gram", "weighted_sum", "GradVac", "METHODS"]

METHODS = ("sum", "mean", "pcgrad", "cagrad", "mgda", "imtl", "gradvac", "agem")
_EPS = 1e-12


def _check(task_grads) -> tuple[int, list]:
    if not isinstance(task_grads, (list, tuple)) or not task_grads:
        raise ValueError("task_grads must be a non-empty list over tasks of lists of tensors")
    first = task_grads[0]
    if not isinstance(first, (list, tuple)) or not first:
        raise ValueError("each task's gradient must be a non-empty list of tensors, one per parameter")
    for t, grads in enumerate(task_grads):
        if not isinstance(grads, (list, tuple)) or len(grads) != len(first):
            raise ValueError(
                f"task {t} has {len(grads) if isinstance(grads, (list, tuple)) else '?'} gradient tensors, "
                f"task 0 has {len(first)}: they must align with the same parameters"
            )
        for k, (g, ref) in enumerate(zip(grads, first)):
            if (
                not isinstance(g, Tensor)
                or g.shape != ref.shape
                or g.dtype != ref.dtype
                or g.device != ref.device
            ):
                raise ValueError(
                    f"task {t}, tensor {k}: {tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__} "
                    f"does not match task 0's {tuple(ref.shape)} {ref.dtype} on {ref.device}"
                )
    return len(task_grads), list(first)


def gram(task_grads, *, backend: str = "auto") -> Tensor:
    """``G_ij = <g_i, g_j>`` over every parameter, fp64, on the first gradient's device.

    One :func:`~cl_optim.multitask.fused.task_gram` call per (device, dtype) bucket (products and
    sums in fp64, in a fixed order: deterministic), the bucket sums added in bucket order.
    """
    _check(task_grads)
    return gram_unchecked(task_grads, backend=backend)


def gram_unchecked(task_grads, *, backend: str = "auto") -> Tensor:
    """:func:`gram` for callers whose lists are aligned by construction (the SAM variants: buffers
    shaped as their parameters): no per-tensor check in Python (the op checks its inputs)."""
    first = task_grads[0]
    home = first[0].device
    total = None
    for (device, dtype, _), index in bucket_indices(first).items():
        part = task_gram(
            [[grads[k] for k in index] for grads in task_grads], backend=resolve(backend, device, dtype)
        ).to(home)
        total = part if total is None else total + part
    return total


def weighted_sum(task_grads, coefficients: Tensor, *, out: Optional[list] = None, accumulate: bool = False,
                 backend: str = "auto") -> list:  # fmt: skip
    """``sum_t a_t g_t`` per parameter in the gradients' dtype, one fused pass per bucket (the
    coefficients stay on the device). ``out``: write there (``accumulate``: add to it)."""
    _check(task_grads)
    return weighted_sum_unchecked(task_grads, coefficients, out=out, accumulate=accumulate, backend=backend)


def weighted_sum_unchecked(task_grads, coefficients: Tensor, *, out: Optional[list] = None,
                           accumulate: bool = False, backend: str = "auto") -> list:  # fmt: skip
    """:func:`weighted_sum` without the per-tensor check in Python (see :func:`gram_unchecked`)."""
    first = task_grads[0]
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True adds to `out`: give it")
        out = [torch.empty_like(g) for g in first]
    elif len(out) != len(first):
        raise ValueError(f"out has {len(out)} tensors for {len(first)} gradients")
    for (device, dtype, _), index in bucket_indices(first).items():
        task_combine_(
            [out[k] for k in index],
            [[grads[k] for k in index] for grads in task_grads],
            coefficients.to(device),
            accumulate=accumulate,
            backend=resolve(backend, device, dtype),
        )
    return out


def coefficients(g: Tensor, method: str, **options) -> Tensor:
    """The coefficients ``a`` of ``sum_t a_t g_t`` that ``method`` picks from the Gram matrix ``g``
    (T x T), computed on its device without a host read, except for CAGrad (any number of tasks)
    and MGDA with more than two: those are iterative and solved on the host after one read.
    ``gradvac`` keeps state: use :meth:`GradVac.coefficients`.
    """
    if method not in METHODS or method == "gradvac":
        raise ValueError(
            f"unknown method {method!r}; expected one of {tuple(m for m in METHODS if m != 'gradvac')}"
        )
    t = g.shape[0]
    allowed = {"pcgrad": {"generator", "shuffle"}, "cagrad": {"c", "iterations"}, "mgda": {"iterations"}}
    unknown = set(options) - allowed.get(method, set())
    if unknown:
        raise ValueError(f"method {method!r} takes no option(s) {sorted(unknown)}")
    if method == "sum":
        return torch.ones(t, dtype=g.dtype, device=g.device)
    if method == "mean":
        return torch.full((t,), 1.0 / t, dtype=g.dtype, device=g.device)
    if method == "pcgrad":
        return _pcgrad(g, options.get("generator"), options.get("shuffle", True))
    if method == "cagrad":
        return _cagrad(g, float(options.get("c", 0.4)), int(options.get("iterations", 500)))
    if method == "mgda":
        return _min_norm(g, int(options.get("iterations", 500)))
    if method == "imtl":
        return _imtl(g)
    if t != 2:  # agem
        raise ValueError(f"agem takes two entries (the task gradient and the memory gradient), got {t}")
    dot = g[0, 1]
    return torch.stack([torch.ones_like(dot), torch.where(dot < 0, -dot / g[1, 1].clamp_min(_EPS), 0.0)])


def combine(task_grads, method: str = "sum", *, backend: str = "auto", **options) -> list:
    """The combined gradient ``sum_t a_t g_t`` (see the module docstring for each method).

    Args:
        task_grads: a list over tasks of lists of tensors aligned with the parameters.
        method: one of :data:`METHODS`.
        backend: of the Gram and combine passes (``"auto"``: the fastest on each device and dtype).
        options: ``generator`` and ``shuffle`` (pcgrad), ``c`` (cagrad, 0.4), ``iterations``
            (cagrad and mgda with more than 2 tasks, 500), ``beta`` (gradvac, 0.01).

    Returns:
        A list of tensors shaped and typed as the first task's.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    _check(task_grads)
    if method == "gradvac":
        return GradVac(beta=options.pop("beta", 0.01), **options)(task_grads, backend=backend)
    if method in ("sum", "mean"):  # their coefficients do not read the Gram matrix: no pass for it
        t = len(task_grads)
        unread = torch.zeros((t, t), dtype=torch.float64, device=task_grads[0][0].device)
        return weighted_sum(task_grads, coefficients(unread, method, **options), backend=backend)
    return weighted_sum(
        task_grads, coefficients(gram(task_grads, backend=backend), method, **options), backend=backend
    )


# ----------------------------------------------------------------------------------- the T x T problems


def _pcgrad(g: Tensor, generator: Optional[torch.Generator], shuffle: bool) -> Tensor:
    t = g.shape[0]
    coefficients = torch.eye(t, dtype=g.dtype, device=g.device)  # row i: g_i' in the basis g_1..g_T
    for i in range(t):
        order = torch.randperm(t, generator=generator).tolist() if shuffle else list(range(t))
        for j in order:
            if j == i:
                continue
            dot = coefficients[i] @ g[:, j]  # <g_i', g_j>
            step = torch.where(dot < 0, dot / g[j, j].clamp_min(_EPS), 0.0)
            coefficients[i, j] -= step
    return coefficients.sum(0)


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection on the probability simplex (Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1
    index = np.arange(1, v.shape[0] + 1)
    rho = np.nonzero(u - cumulative / index > 0)[0][-1]  # the last index where it holds
    return np.maximum(v - cumulative[rho] / (rho + 1), 0)


def _projected_gradient(gradient, start: np.ndarray, step: float, iterations: int) -> np.ndarray:
    """Projected gradient on the simplex until the iterate stops moving (or ``iterations``)."""
    w = start
    for _ in range(iterations):
        moved = _project_simplex(w - step * gradient(w))
        if np.max(np.abs(moved - w)) <= 1e-15:
            return moved
        w = moved
    return w


def _host(g: Tensor) -> np.ndarray:
    """The T x T matrix on the host in fp64: the iterative solvers (MGDA beyond two tasks, CAGrad)
    take one host read, as the official CAGrad code does; tens of tiny device ops per iteration
    would cost more than the read (500 iterations: ~40 ms of launches on CPU, more on a GPU)."""
    return g.detach().to("cpu", torch.float64).numpy()


def _min_norm(g: Tensor, iterations: int) -> Tensor:
    """``argmin_{alpha in simplex} alpha^T G alpha``: closed form for 2 tasks (on the device, no
    host read), else projected gradient with step ``1 / (2 lambda_max(G))`` on the host."""
    t = g.shape[0]
    if t == 1:
        return torch.ones(1, dtype=g.dtype, device=g.device)
    if t == 2:
        # alpha g_1 + (1 - alpha) g_2 is shortest at alpha = <g_2 - g_1, g_2> / ||g_1 - g_2||^2, in [0, 1].
        denominator = (g[0, 0] - 2 * g[0, 1] + g[1, 1]).clamp_min(_EPS)
        alpha = ((g[1, 1] - g[0, 1]) / denominator).clamp(0.0, 1.0)
        return torch.stack([alpha, 1 - alpha])
    a = _host(g)
    if not np.isfinite(a).all():  # a non-finite gradient: a non-finite result, as the other rules give
        return torch.full((t,), float("nan"), dtype=g.dtype, device=g.device)
    step = 1.0 / (2 * max(np.linalg.eigvalsh(a)[-1], _EPS))
    alpha = _projected_gradient(lambda x: 2 * (a @ x), np.full(t, 1.0 / t), step, iterations)
    return torch.from_numpy(alpha).to(device=g.device, dtype=g.dtype)


def _cagrad(g: Tensor, c: float, iterations: int) -> Tensor:
    t = g.shape[0]
    a = _host(g)
    if not np.isfinite(a).all():
        return torch.full((t,), float("nan"), dtype=g.dtype, device=g.device)
    g0_norm = np.sqrt(a.mean() + 1e-8)
    scale = c * g0_norm + 1e-8  # the official "c" of the objective
    b = np.full(t, 1.0 / t)

    def objective_gradient(w):
        return a @ b + scale * (a @ w) / np.sqrt(w @ a @ w + 1e-8)

    step = 1.0 / (max(np.linalg.eigvalsh(a)[-1], _EPS) * (1 + scale / g0_norm))
    w = _projected_gradient(objective_gradient, b.copy(), step, iterations)  # convex on the simplex
    lam = scale / np.sqrt(w @ a @ w + 1e-8)
    return torch.from_numpy((b + lam * w) / (1 + c**2)).to(device=g.device, dtype=g.dtype)


def _imtl(g: Tensor) -> Tensor:
    t = g.shape[0]
    if t == 1:
        return torch.ones(1, dtype=g.dtype, device=g.device)
    norms = g.diagonal().clamp_min(_EPS).sqrt()
    # <g_a, u_b> = G_ab / |g_b|
    gu = g / norms.unsqueeze(0)
    rest = torch.arange(1, t, device=g.device)
    # D_j = g_1 - g_j, U_k = u_1 - u_k (j, k = 2..T): (D U^T)_jk = <g_1 - g_j, u_1 - u_k>
    du = (gu[0, 0] - gu[0, rest]).unsqueeze(0) - (gu[rest, 0].unsqueeze(1) - gu[rest][:, rest])
    gu_row = gu[0, 0] - gu[0, rest]  # g_1 U^T
    alpha_rest = torch.linalg.solve(du.t(), gu_row)  # alpha (D U^T) = g_1 U^T, alpha a row vector
    return torch.cat([(1 - alpha_rest.sum()).unsqueeze(0), alpha_rest])


class GradVac:
    r"""Gradient Vaccine (Wang et al. 2021): raise each pair's cosine towards an EMA target.

    For each task ``i`` and each other task ``j`` (random order from ``generator``, or 0..T-1 with
    ``shuffle=False``), with ``phi = cos(g_i', g_j)`` and target ``phi_hat_ij``: if
    ``phi < phi_hat``, ``g_i' += |g_i'| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) /
    (|g_j| sqrt(1 - phi_hat^2)) g_j``; then ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi``.
    The result is ``sum_i g_i'``; the targets persist in the object between calls (``state``).
    """

    def __init__(self, beta: float = 0.01, generator: Optional[torch.Generator] = None, shuffle: bool = True):
        if not 0 < beta <= 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        self.beta, self.generator, self.shuffle = beta, generator, shuffle
        self.state: Optional[Tensor] = None  # phi_hat, T x T

    def __call__(self, task_grads, *, backend: str = "auto") -> list:
        _check(task_grads)
        return weighted_sum(task_grads, self.coefficients(gram(task_grads, backend=backend)), backend=backend)

    def coefficients(self, g: Tensor) -> Tensor:
        """The coefficients for the Gram matrix ``g`` (T x T); updates the EMA targets."""
        t = g.shape[0]
        if self.state is None or self.state.shape != (t, t):
            self.state = torch.zeros((t, t), dtype=g.dtype, device=g.device)
        coefficients = torch.eye(t, dtype=g.dtype, device=g.device)
        for i in range(t):
            order = torch.randperm(t, generator=self.generator).tolist() if self.shuffle else list(range(t))
            for j in order:
                if j == i:
                    continue
                c = coefficients[i]
                norm_i = (c @ g @ c).clamp_min(0).sqrt()
                norm_j = g[j, j].clamp_min(_EPS).sqrt()
                phi = (c @ g[:, j]) / (norm_i * norm_j).clamp_min(_EPS)
                target = self.state[i, j]
                gain = norm_i * (
                    target * (1 - phi**2).clamp_min(0).sqrt() - phi * (1 - target**2).clamp_min(0).sqrt()
                )
                gain = gain / (norm_j * (1 - target**2).clamp_min(_EPS).sqrt())
                coefficients[i, j] += torch.where(phi < target, gain, 0.0)
                self.state[i, j] = (1 - self.beta) * target + self.beta * phi
        return coefficients.sum(0)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "state": None if self.state is None else self.state.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]
        self.state = None if state["state"] is None else state["state"].clone()
