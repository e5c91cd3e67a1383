"""Tests for dpal.trainer.losses: hand-computed values of every objective."""

from __future__ import annotations

import math

import pytest
import torch

from dpal.trainer.losses import (
    global_mse,
    local_masked_mse,
    relation_kl,
    route_weight,
    shape_mask,
    total_loss,
)

# B batch, P patches, D width, L tokens


def test_zero_when_student_equals_teacher() -> None:
    g = torch.Generator().manual_seed(0)
    t_global = torch.randn(2, 8, generator=g)
    t_patches = torch.randn(2, 6, 8, generator=g)
    y = torch.randn(2, 5, 8, generator=g)
    mask = torch.rand(2, 6, 1, generator=g)
    assert global_mse([t_global, t_global.clone(), t_global.unsqueeze(1)], t_global).item() == 0.0
    assert local_masked_mse(t_patches, t_patches, mask).item() == 0.0
    teacher_logits = y @ y.transpose(1, 2) / 8**0.5  # (B, L, L)
    assert relation_kl(y, teacher_logits).item() == pytest.approx(0.0, abs=1e-6)


def test_global_mse_by_hand() -> None:
    # teacher (1, 2); view a: ((1-0)^2 + (2-0)^2) / 2 = 2.5; view b: (0^2 + (2-4)^2) / 2 = 2.0
    # L_g = (2.5 + 2.0) / 2 = 2.25
    teacher = torch.tensor([[1.0, 2.0]])
    views = [torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 4.0]])]
    assert global_mse(views, teacher).item() == pytest.approx(2.25)
    with pytest.raises(ValueError):
        global_mse([], teacher)


def test_local_masked_mse_by_hand() -> None:
    # M * s = [[1, 1], [1, 1]] (second token halved), M * t = 0 -> mean of squares = 1.0
    s = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    t = torch.zeros(1, 2, 2)
    m = torch.tensor([[[1.0], [0.5]]])
    assert local_masked_mse(s, t, m).item() == pytest.approx(1.0)
    # with t = s except one channel off by 2 under weight 0.5: (0.5 * 2)^2 / 4 values = 0.25
    t2 = s.clone()
    t2[0, 1, 0] = 0.0
    assert local_masked_mse(s, t2, m).item() == pytest.approx(0.25)


# A 3 x 3 grid; the centre token (index 4) is far along the line, the border tokens near its start.
_T_LINE = torch.tensor([0.0, 1.0, 2.0, 3.0, 8.0, 3.0, 2.0, 1.0, 0.0])  # (P,)
_U = torch.tensor([0.6, 0.8])  # unit direction of the line
_C = torch.tensor([1.0, -2.0])  # offset, removed by centring


def _on_line(t: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return (_C + t[:, None] * direction).unsqueeze(0)  # (1, P, 2)


def test_shape_mask_points_on_a_line() -> None:
    # All points lie on one line, so the first PC is +-u and the projection is t - mean(t), up
    # to sign. Min-max over the batch: t / 8 for the sign that puts the border lower, else 1 - t / 8.
    expected = _T_LINE / 8.0
    for direction in (_U, -_U):
        m = shape_mask(_on_line(_T_LINE, direction), (3, 3), fix_sign=True)
        assert m.shape == (1, 9, 1)
        torch.testing.assert_close(m[0, :, 0], expected, atol=1e-5, rtol=0)
        raw = shape_mask(_on_line(_T_LINE, direction), (3, 3), fix_sign=False)[0, :, 0]
        # without the fix either sign may come back
        assert torch.allclose(raw, expected, atol=1e-5) or torch.allclose(raw, 1 - expected, atol=1e-5)


def test_shape_mask_flips_a_background_mask() -> None:
    # Border far along the line, centre at its start: with the fix the centre still scores 1.
    t = 8.0 - _T_LINE  # border mean 6.5 > centre 0
    m = shape_mask(_on_line(t, _U), (3, 3), fix_sign=True)[0, :, 0]
    torch.testing.assert_close(m, _T_LINE / 8.0, atol=1e-5, rtol=0)


def test_shape_mask_min_max_over_the_batch() -> None:
    # Second image at half the distance: the batch min is 0 and max 8, so it scores t / 16.
    x = torch.cat([_on_line(_T_LINE, _U), _on_line(_T_LINE / 2, _U)], dim=0)  # (2, 9, 2)
    m = shape_mask(x.requires_grad_(), (3, 3), fix_sign=True)
    assert not m.requires_grad
    torch.testing.assert_close(m[0, :, 0], _T_LINE / 8, atol=1e-5, rtol=0)
    torch.testing.assert_close(m[1, :, 0], _T_LINE / 16, atol=1e-5, rtol=0)


def test_shape_mask_constant_and_bad_grid() -> None:
    assert shape_mask(torch.ones(2, 4, 3), (2, 2), fix_sign=True).abs().sum().item() == 0.0
    with pytest.raises(ValueError):
        shape_mask(torch.ones(1, 9, 3), (2, 4), fix_sign=True)


def test_relation_kl_2x2_by_hand() -> None:
    # D = 4, Y = [[2, 0, 0, 0], [0, 0, 0, 0]]: Y Y^T / sqrt(4) = [[2, 0], [0, 0]].
    # A_s row 0 = softmax(2, 0) = (e^2, 1) / (1 + e^2) = (0.880797, 0.119203); row 1 = (0.5, 0.5).
    # teacher logits [[0, ln 3], [0, 0]]: A_t row 0 = (0.25, 0.75); row 1 = (0.5, 0.5).
    # KL row 0 = 0.25 ln(0.25 / 0.880797) + 0.75 ln(0.75 / 0.119203)
    #          = 0.25 ln 0.25 + 0.75 ln 0.75 - 0.25 * 2 + ln(1 + e^2)
    #          = -0.346574 - 0.215762 - 0.5 + 2.126928 = 1.064593;   KL row 1 = 0
    # L_r = mean over rows = 0.532296
    y = torch.tensor([[[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    t = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    assert relation_kl(y, t).item() == pytest.approx(0.532296, abs=1e-6)
    # rows shifted by a constant each (a cache may subtract each row's max): same softmax
    shifted = t + torch.tensor([[[5.0], [-2.0]]])
    assert relation_kl(y, shifted).item() == pytest.approx(0.532296, abs=1e-6)


def test_relation_kl_row_shift_invariant_random() -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 7, 16, generator=g)
    t = torch.randn(2, 7, 7, generator=g)
    base = relation_kl(y, t)
    assert base.item() > 0
    torch.testing.assert_close(relation_kl(y, t - t.amax(dim=-1, keepdim=True)), base)


def test_route_weight() -> None:
    # the paper's 200 epochs: 0.1 for epochs 0-19, then 0.01 (the default schedule length)
    assert [route_weight(e) for e in (0, 19, 20, 199)] == [0.1, 0.1, 0.01, 0.01]
    assert [route_weight(e, 200) for e in (0, 19, 20, 199)] == [0.1, 0.1, 0.01, 0.01]
    # the same tenth of shorter schedules: epochs 0-4 of 48 (4.8), 0-1 of 12 (1.2), 0-9 of 100
    assert [route_weight(e, 48) for e in (0, 4, 5, 47)] == [0.1, 0.1, 0.01, 0.01]
    assert [route_weight(e, 12) for e in (0, 1, 2, 11)] == [0.1, 0.1, 0.01, 0.01]
    assert [route_weight(e, 100) for e in (9, 10)] == [0.1, 0.01]


def test_total_loss_by_hand() -> None:
    # L_g + L_l + L_r = 1 + 2 + 3 = 6; mean route CE = (1+2+3+4+5)/5 = 3; mean L_W = 0.1
    # epoch 0: 6 + 0.1 * 3 + 0.1 = 6.4;  epoch 20: 6 + 0.01 * 3 + 0.1 = 6.13
    lg = torch.tensor(1.0, requires_grad=True)
    routes = [torch.tensor(float(v)) for v in (1, 2, 3, 4, 5)]
    l2s = [torch.tensor(0.1)] * 5
    total, terms = total_loss(lg, torch.tensor(2.0), torch.tensor(3.0), routes, l2s, epoch=0)
    assert total.item() == pytest.approx(6.4)
    assert terms == pytest.approx(
        {
            "global": 1.0,
            "local": 2.0,
            "relation": 3.0,
            "route": 3.0,
            "weight_l2": 0.1,
            "route_weight": 0.1,
            "total": 6.4,
        }
    )
    total.backward()
    assert lg.grad.item() == 1.0
    total20, terms20 = total_loss(
        torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), routes, l2s, epoch=20
    )
    assert total20.item() == pytest.approx(6.13)
    assert terms20["route_weight"] == 0.01


def test_mask_and_relation_logits_ignore_bf16_autocast() -> None:
    # `dpal distill` trains under bf16 autocast on GPUs; the shape mask (a constant of the targets)
    # and the relation affinities must still be float32 products. CPU autocast casts matmuls to
    # bf16 the same way, so this checks it here.
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(4, 12, 32, generator=g)
    y = torch.randn(2, 9, 32, generator=g)
    t_logits = torch.randn(2, 9, 9, generator=g) * 4
    ref_mask = shape_mask(patches, (4, 3), True)
    ref_kl = relation_kl(y, t_logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(shape_mask(patches, (4, 3), True), ref_mask)
        kl = relation_kl(y, t_logits)
    assert kl.dtype == torch.float32 and torch.equal(kl, ref_kl)
