r"""A fixed simplex equiangular tight frame (ETF) of class prototypes that grows task by task.

Neural collapse (Papyan et al. 2020) ends training with the class means at the vertices of a
simplex ETF: ``K`` unit vectors with pairwise cosine ``-1/(K-1)``, the most separated ``K``
directions there are. Fixing the classifier to such a frame (Yang et al. 2022) and extending it as
classes arrive (ProNC, "progressive neural collapse", arXiv 2505.24254) gives a continual learner
prototypes that never drift. With ``U`` a ``d x K`` matrix of orthonormal columns (``d >= K``)::

    M = sqrt(K / (K - 1)) U (I_K - 1 1^T / K)        (unit columns, cosines -1/(K-1))

* the first frame is random (QR of a Gaussian) or the one closest to given class means
  (:meth:`ETFHead.align_to`, as ProNC's first task: ``U`` from the centred, normalised means
  through the pseudo-inverse of the centring, then the nearest orthonormal matrix by SVD);
* :meth:`ETFHead.extend` appends ``n`` random directions orthogonalised against ``U`` (Gram-Schmidt,
  twice, for orthogonality to rounding) and rebuilds ``M`` for the new ``K``: the old vertices move
  a little (the centring changes), less as ``K`` grows.

The frame is a buffer, not a parameter: no optimizer state, saved in ``state_dict``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ETFHead(nn.Module):
    """Logits ``features @ M`` for a simplex ETF ``M`` of ``classes`` prototypes in ``features``
    dimensions.

    Example:
        >>> import torch
        >>> from cl_optim.heads import ETFHead
        >>> head = ETFHead(8, 3, generator=torch.Generator().manual_seed(0))
        >>> m = head.prototypes
        >>> round(float(m[:, 0] @ m[:, 1]), 4)  # -1 / (K - 1)
        -0.5
        >>> head.extend(2)
        >>> head.classes, round(float(head.prototypes[:, 0] @ head.prototypes[:, 4]), 4)
        (5, -0.25)
    """

    def __init__(self, features: int, classes: int, *, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        if classes < 1 or features < classes:
            raise ValueError(f"an ETF of {classes} classes needs classes >= 1 and features >= classes, "
                             f"got features={features}")  # fmt: skip
        gaussian = torch.randn(features, classes, generator=generator, dtype=torch.float64)
        basis, _ = torch.linalg.qr(gaussian)
        self.register_buffer("basis", basis.to(dtype))
        self.register_buffer("prototypes", _frame(basis).to(dtype))

    @property
    def classes(self) -> int:
        return self.basis.shape[1]

    @property
    def features(self) -> int:
        return self.basis.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        return features @ self.prototypes.to(features.dtype)

    @torch.no_grad()
    def extend(self, new_classes: int, *, generator: Optional[torch.Generator] = None) -> None:
        """Add ``new_classes`` prototypes: random directions orthogonal to the current basis."""
        if new_classes < 1:
            raise ValueError(f"new_classes must be >= 1, got {new_classes}")
        k = self.classes + new_classes
        if k > self.features:
            raise ValueError(f"an ETF of {k} classes needs at least {k} feature dimensions, the head has "
                             f"{self.features}")  # fmt: skip
        basis = self.basis.double()
        fresh = torch.randn(self.features, new_classes, generator=generator, dtype=torch.float64).to(
            basis.device
        )
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to rounding
            fresh = fresh - basis @ (basis.T @ fresh)
        fresh, _ = torch.linalg.qr(fresh)  # orthonormal among themselves
        basis = torch.cat([basis, fresh], 1)
        self.basis = basis.to(self.basis.dtype)
        self.prototypes = _frame(basis).to(self.prototypes.dtype)

    @torch.no_grad()
    def align_to(self, class_means: Tensor) -> None:
        """Replace the frame by the ETF closest to ``class_means`` (``K x d``, one row per class, in
        class order): the means centred and normalised, ``U`` recovered through the pseudo-inverse
        of the centring, then the nearest matrix with orthonormal columns (polar factor, by SVD)."""
        k, d = class_means.shape
        if d != self.features or k != self.classes:
            raise ValueError(
                f"class_means must be {self.classes} x {self.features}, got {tuple(class_means.shape)}"
            )
        means = class_means.double()
        centred = means - means.mean(0, keepdim=True)
        centred = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
        target = centred.T  # d x K
        if k == 1:
            u = target
        else:
            centring = math.sqrt(k / (k - 1)) * (torch.eye(k, dtype=torch.float64) - 1.0 / k)
            u = target @ torch.linalg.pinv(centring.to(target.device))
        left, _, right = torch.linalg.svd(u, full_matrices=False)
        basis = left @ right
        self.basis = basis.to(self.basis.dtype)
        self.prototypes = _frame(basis).to(self.prototypes.dtype)


def _frame(basis: Tensor) -> Tensor:
    """``sqrt(K/(K-1)) U (I - 11^T/K)`` with unit columns (one class: the single direction)."""
    k = basis.shape[1]
    if k == 1:
        return basis / basis.norm()
    centring = torch.eye(k, dtype=basis.dtype, device=basis.device) - 1.0 / k
    frame = math.sqrt(k / (k - 1)) * basis @ centring
    return frame / frame.norm(dim=0, keepdim=True)


def dr_loss(features: Tensor, targets: Tensor, prototypes: Tensor) -> Tensor:
    """The dot-regression loss ``1/2 mean((<f / ||f||, m_y> - 1)^2)`` (ProNC's ``DR``; Yang et al.
    2022) of ``features`` (``B x d``) against their classes' prototypes (``d x K``)."""
    unit = F.normalize(features, dim=1)
    return 0.5 * ((unit * prototypes.T.to(unit.dtype)[targets]).sum(1) - 1).pow(2).mean()
