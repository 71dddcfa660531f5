r"""The loss every landscape tool measures, and the guard that leaves the model as it was.

``L(theta) = sum_b n_b * loss_fn(model(inputs_b), targets_b) / sum_b n_b`` over the batches of
``data`` (``loss_fn`` a mean over its batch; cross-entropy by default), at the model's current
weights, in the mode the caller chose. Vectors in weight space are flat: one entry per element of
the parameters that require grad, in ``model.named_parameters()`` order (:func:`flatten`,
:func:`unflatten`).

:class:`Objective` is a context manager: it sets the mode (refusing a model in train mode with
BatchNorm unless ``mode`` says which to use, since train-mode BatchNorm would update its running
statistics and couple the samples of a batch), and on exit restores every module's mode, every
parameter and every buffer bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fisher.batch import Batch, logits

__all__ = ["Objective", "flatten", "unflatten"]


def flatten(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like) -> list:
    """Split a flat vector (or a block ``(k, n)``) into tensors shaped like ``like``."""
    out, at = [], 0
    for t in like:
        size = t.numel()
        piece = vector[..., at : at + size]
        out.append(piece.reshape(*vector.shape[:-1], *t.shape))
        at += size
    if at != vector.shape[-1]:
        raise ValueError(f"a vector of {vector.shape[-1]} entries for parameters of {at} elements")
    return out


class Objective:
    """The data loss of ``model`` and its derivatives, as flat vectors (see the module docstring).

    ``Objective.products`` counts every Hessian-vector product computed in the process (a block
    of k counts k), for reports of what a measurement cost.
    """

    products = 0

    def __init__(
        self,
        model: nn.Module,
        data: Iterable,
        loss_fn: Optional[Callable] = None,
        *,
        mode: Optional[str] = None,
        dtype: torch.dtype = torch.float32,
        derivatives: bool = True,
    ):
        if mode not in (None, "eval", "train"):
            raise ValueError(f"mode must be None, 'eval' or 'train', got {mode!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.model, self.loss_fn, self.mode, self.dtype = model, loss_fn or _cross_entropy, mode, dtype
        self.batches = [Batch.of(b) for b in data]
        if not self.batches:
            raise ValueError("data has no batches: the loss over it is undefined")
        self.total = sum(b.size for b in self.batches)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named and derivatives:
            raise ValueError("the model has no parameters that require grad: nothing to differentiate")
        self.params = [p for _, p in self.named]
        self.size = sum(p.numel() for p in self.params)
        first = next(model.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self._finite_checked = False  # the loss at the unperturbed weights, checked once
        self._reduction_checked = False
        self._batched_ok = True  # the batched double backward works for this model

    def __enter__(self) -> Objective:
        model = self.model
        if self.mode is None:
            # Train-mode BatchNorm changes its statistics and couples the samples; train-mode
            # dropout draws a new mask per forward, so the "Hessian" would change between two
            # products (Lanczos on a random operator). Either needs an explicit mode.
            for m in model.modules():
                stochastic = isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
                if m.training and (isinstance(m, nn.modules.batchnorm._BatchNorm) or stochastic):
                    why = ("its running statistics would change and the samples of a batch would be coupled"
                           if not stochastic else "a new dropout mask each forward makes every product random")  # fmt: skip
                    raise ValueError(
                        f"the model is in train mode with {type(m).__name__}: {why}; pass mode='eval' (the usual "
                        "choice) or mode='train'"
                    )
        self._modes = {m: m.training for m in model.modules()}
        self._saved = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
        self._rng = torch.get_rng_state()  # train-mode dropout would advance it
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        if self.mode == "eval":
            model.eval()
        elif self.mode == "train":
            model.train()
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for t, saved in zip(list(self.model.parameters()) + list(self.model.buffers()), self._saved):
                t.copy_(saved)
        for module, training in self._modes.items():
            module.train(training)
        torch.set_rng_state(self._rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)

    # ------------------------------------------------------------------------------ values

    def _batch_loss(self, batch: Batch, check_finite: bool = True) -> Tensor:
        output = logits(self.model(*batch.args, **batch.kwargs))
        loss = self.loss_fn(output, batch.targets)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor (the mean loss of its batch)")
        if check_finite and not bool(torch.isfinite(loss)):
            raise ValueError("the loss is not finite at these weights: no curvature can be measured")
        if not self._reduction_checked:
            self._reduction_checked = True
            _check_mean(self.loss_fn, output.detach(), batch.targets, float(loss.detach()))
        return loss

    def _checked_once(self) -> bool:
        """Derivatives at fixed weights: the loss's finiteness is checked on the first pass over
        the data only (a check per batch per product would sync the device every time)."""
        first = not self._finite_checked
        self._finite_checked = True
        return first

    def loss(self) -> float:
        with torch.no_grad():
            return sum(float(self._batch_loss(b)) * b.size for b in self.batches) / self.total

    def gradient(self) -> Tensor:
        total = torch.zeros(self.size, dtype=self.dtype, device=self.device)
        for batch in self.batches:
            with torch.enable_grad():
                grads = torch.autograd.grad(self._batch_loss(batch), self.params, allow_unused=True)
            total += flatten(_zeros_for_none(grads, self.params)).to(self.dtype) * (batch.size / self.total)
        return total

    def hvp(self, vectors: Tensor) -> Tensor:
        """``H v`` for a block of flat vectors ``(k, n)``, summed over the data (one double
        backward per batch for the whole block when torch can batch it, else one per vector)."""
        vectors = vectors.to(self.device)
        block = [v.to(p.dtype) for v, p in zip(unflatten(vectors, self.params), self.params)]
        out = torch.zeros(vectors.shape, dtype=self.dtype, device=self.device)
        check = self._checked_once()
        for batch in self.batches:
            with torch.enable_grad():
                loss = self._batch_loss(batch, check_finite=check)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                pairs = [
                    (g, v, p)
                    for g, v, p in zip(grads, block, self.params)
                    if g is not None and g.requires_grad
                ]
                if not pairs:
                    continue
                products = self._products(pairs, vectors.shape[0])
            out += flatten_block(products, self.params, pairs).to(self.dtype) * (batch.size / self.total)
        Objective.products += vectors.shape[0]
        return out

    def _products(self, pairs, k: int) -> list:
        gs, vs, ps = zip(*pairs)
        if k > 1:
            try:
                return list(
                    torch.autograd.grad(
                        gs, ps, vs, retain_graph=True, is_grads_batched=True, allow_unused=True
                    )
                )
            except RuntimeError:  # an op without a batching rule: one vector at a time
                pass
        rows = []
        for i in range(k):
            rows.append(torch.autograd.grad(gs, ps, [v[i] for v in vs], retain_graph=True, allow_unused=True))
        return [
            torch.stack([r[j] if r[j] is not None else torch.zeros_like(ps[j]) for r in rows])
            for j in range(len(ps))
        ]


def flatten_block(products, params, pairs) -> Tensor:
    """Per-parameter blocks ``(k, *shape)`` of the parameters in ``pairs`` to flat ``(k, n)``."""
    k = next((t.shape[0] for t in products if t is not None), 1)
    by_param = {id(p): t for (_, _, p), t in zip(pairs, products)}
    pieces = []
    for p in params:
        t = by_param.get(id(p))
        pieces.append(
            torch.zeros(k, p.numel(), dtype=p.dtype, device=p.device) if t is None else t.reshape(k, -1)
        )
    return torch.cat(pieces, dim=1)


def _zeros_for_none(grads, params) -> list:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _cross_entropy(output: Tensor, targets) -> Tensor:
    """Mean cross-entropy; logits ``(B, ..., C)`` with class targets ``(B, ...)`` (a token per
    position, as a Hugging Face sequence model's) are flattened first (``-100`` ignored). A causal
    language model's shift of the labels is the model's business: pass ``loss_fn`` for it."""
    if targets is None:
        raise ValueError("the default loss (cross-entropy) needs targets in the data; pass loss_fn")
    low = output.dtype in (torch.float16, torch.bfloat16)  # half logits: the loss in fp32
    output = output.float() if low else output
    if output.dim() > 2 and isinstance(targets, Tensor) and targets.shape == output.shape[:-1]:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(output, targets)


def _check_mean(loss_fn, output: Tensor, targets, value: float) -> None:
    """The data loss weights each batch by its size: ``loss_fn`` must be a mean over its batch.
    Checked once: the loss of the batch written twice must equal the loss of the batch."""
    if not isinstance(targets, Tensor) or not targets.dim() or output.shape[:1] != targets.shape[:1]:
        return  # nothing to double reliably
    with torch.no_grad():
        twice = float(loss_fn(torch.cat([output, output]), torch.cat([targets, targets])))
    if abs(twice - value) > 1e-4 * max(abs(value), 1e-12) and abs(twice - 2 * value) <= 1e-4 * max(
        abs(value), 1e-12
    ):
        raise ValueError(
            "loss_fn sums over its batch (the loss of the batch written twice doubles): the landscape tools "
            "weight each batch by its size and need its mean (reduction='mean')"
        )


def _where(generator: Optional[torch.Generator]):
    """Random numbers are drawn on the generator's device (a CUDA generator draws on CUDA)."""
    return generator.device if generator is not None else torch.device("cpu")


def rademacher(k: int, n: int, generator: Optional[torch.Generator], dtype, device) -> Tensor:
    signs = torch.randint(0, 2, (k, n), generator=generator, device=_where(generator), dtype=torch.int8)
    return (signs.to(dtype) * 2 - 1).to(device)


def gaussian(k: int, n: int, generator: Optional[torch.Generator], dtype, device) -> Tensor:
    return torch.randn((k, n), generator=generator, dtype=torch.float64, device=_where(generator)).to(
        dtype=dtype, device=device
    )


def standard_error(values: Tensor) -> float:
    return (
        float(values.std(unbiased=True)) / math.sqrt(values.numel()) if values.numel() > 1 else float("inf")
    )
