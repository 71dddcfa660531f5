"""cl_optim.heads.ETFHead: the simplex geometry exactly, its extension, the frame closest to given
class means, the DR loss, and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch

from cl_optim.heads import ETFHead, dr_loss


def _assert_simplex(m: torch.Tensor):
    k = m.shape[1]
    gram = (m.T @ m).double()
    want = torch.full((k, k), -1.0 / (k - 1) if k > 1 else 0.0, dtype=torch.float64)
    want.fill_diagonal_(1.0)
    torch.testing.assert_close(gram, want, rtol=0, atol=1e-6)
    if k > 1:  # centred: the prototypes sum to zero
        torch.testing.assert_close(
            m.sum(1).double(), torch.zeros(m.shape[0], dtype=torch.float64), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("d,k", [(8, 2), (16, 5), (10, 10), (64, 3)])
def test_a_new_head_is_a_simplex_etf(d, k):
    head = ETFHead(d, k, generator=torch.Generator().manual_seed(d + k))
    assert head.prototypes.shape == (d, k) and head.classes == k and head.features == d
    _assert_simplex(head.prototypes)
    torch.testing.assert_close(head.basis.T @ head.basis, torch.eye(k), rtol=0, atol=1e-6)


def test_extension_keeps_a_simplex_and_moves_the_old_vertices_little():
    """2 -> 4 -> ... -> 10 classes (the digits' pairs): a simplex every time; the old prototypes move
    less as K grows (ProNC's measurement: cos >= 0.82 from 2 to 4, about 0.99 from 8 to 10)."""
    gen = torch.Generator().manual_seed(0)
    head = ETFHead(32, 2, generator=gen)
    cosines = []
    for _ in range(4):
        old = head.prototypes.clone()
        head.extend(2, generator=gen)
        _assert_simplex(head.prototypes)
        torch.testing.assert_close(head.basis.T @ head.basis, torch.eye(head.classes), rtol=0, atol=1e-6)
        cosines.append(float((old * head.prototypes[:, : old.shape[1]]).sum(0).min()))
    assert cosines[0] >= 0.8 and cosines[-1] >= 0.98 and cosines == sorted(cosines)
    # the analytic value: an old vertex of the K-frame against the 2-more frame
    k, k2 = 8, 10
    expected = (
        math.sqrt(k / (k - 1)) * math.sqrt(k2 / (k2 - 1)) * ((1 - 1 / k) * (1 - 1 / k2) + (k - 1) / (k * k2))
    )
    assert cosines[-1] == pytest.approx(expected, abs=1e-5)


def test_align_to_recovers_the_frame_of_etf_class_means():
    """Class means that are (a scaled, shifted) ETF give that ETF back, exactly up to rounding."""
    gen = torch.Generator().manual_seed(1)
    target = ETFHead(12, 4, generator=gen).prototypes
    means = 3.0 * target.T + torch.randn(1, 12, generator=gen)  # scaled and shifted: centring undoes it
    head = ETFHead(12, 4, generator=gen)
    head.align_to(means)
    _assert_simplex(head.prototypes)
    torch.testing.assert_close(head.prototypes, target, rtol=0, atol=1e-5)


def test_align_to_is_the_closest_frame_to_noisy_means():
    gen = torch.Generator().manual_seed(2)
    target = ETFHead(20, 5, generator=gen).prototypes
    means = target.T + 0.05 * torch.randn(5, 20, generator=gen)
    head = ETFHead(20, 5, generator=torch.Generator().manual_seed(9))
    before = float((head.prototypes * target).sum(0).min())
    head.align_to(means)
    _assert_simplex(head.prototypes)
    after = float((head.prototypes * target).sum(0).min())
    assert after > 0.97 > before  # noise of norm about 0.22 on unit prototypes


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="features >= classes"):
        ETFHead(3, 4)
    head = ETFHead(4, 3)
    with pytest.raises(ValueError, match="needs at least 5 feature dimensions"):
        head.extend(2)
    with pytest.raises(ValueError, match="class_means must be 3 x 4"):
        head.align_to(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="new_classes must be >= 1"):
        head.extend(0)


def test_logits_dr_loss_and_checkpoints():
    head = ETFHead(6, 3, generator=torch.Generator().manual_seed(3))
    m = head.prototypes
    features = 2.0 * m.T  # each sample exactly on its class's prototype, scaled
    targets = torch.arange(3)
    assert float(dr_loss(features, targets, m)) == pytest.approx(0.0, abs=1e-12)
    assert (head(features).argmax(1) == targets).all()
    # on the wrong prototype: <m_a, m_b> = -1/2, loss 1/2 (-1/2 - 1)^2 = 9/8
    assert float(dr_loss(m.T, torch.tensor([1, 2, 0]), m)) == pytest.approx(9 / 8, abs=1e-6)
    assert list(dict(head.named_parameters())) == []  # a buffer: no optimizer state
    head.extend(2, generator=torch.Generator().manual_seed(4))
    clone = ETFHead(6, 5)
    clone.load_state_dict(head.state_dict())
    assert torch.equal(clone.prototypes, head.prototypes) and clone.classes == 5
