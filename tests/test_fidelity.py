"""Label-free fidelity measures of reid.py: linear CKA and kNN agreement, on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from dpal.reid import knn_agreement, linear_cka


def test_linear_cka_hand_computed() -> None:
    # x = (1, 2, 3), y = (1, 3, 2): centred (-1, 0, 1) and (-1, 1, 0); <x, y>^2 / (|x|^2 |y|^2) = 1 / 4
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [3.0], [2.0]])
    assert linear_cka(x, y) == pytest.approx(0.25, abs=1e-12)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_linear_cka_invariant_to_rotation_scale_and_shift() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, 3 * x @ q + 5) == pytest.approx(1.0, abs=1e-9)
    wide = torch.cat([x, torch.zeros(50, 4)], dim=1)  # another width, same structure
    assert linear_cka(x, wide) == pytest.approx(1.0, abs=1e-9)
    noise = torch.randn(50, 8, generator=g)
    assert linear_cka(x, noise) < 0.5
    with pytest.raises(ValueError, match="N >= 2"):
        linear_cka(x, x[:10])


def test_knn_agreement_hand_computed() -> None:
    # four points on the unit circle at angles 0, 0.1, 0.3, 0.7 (cosine neighbours are angular ones)
    angles = torch.tensor([0.0, 0.1, 0.3, 0.7])
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert knn_agreement(x, x, k=1) == 1.0
    # y swaps which of 1 and 3 is nearer to 0 (0 -> 3 first) but keeps the others' nearest
    angles_y = torch.tensor([0.0, 0.3, 0.1, 0.7])
    y = torch.stack([angles_y.cos(), angles_y.sin()], dim=1)
    # nearest in x: 0->1, 1->0, 2->1, 3->2; in y: 0->2, 1->2, 2->0, 3->1: no image keeps its nearest
    assert knn_agreement(x, y, k=1) == 0.0
    assert knn_agreement(x, y, k=3) == 1.0  # with 3 of 3 others, every set is the same
    assert math.isclose(knn_agreement(x, x[[0, 1, 2, 3]], k=2), 1.0)
