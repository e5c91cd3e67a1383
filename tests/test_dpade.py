"""Tests for dpal.trainer.dpade: parameter count, shapes, router and regulariser, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpal.trainer.dpade import DPaDe

# B batch, L tokens, d student width, D teacher width, K patterns
D_S, D_T = 48, 32  # 48 / 16 = 3 and 48 / 12 = 4 per head


def _model(seed: int = 0, **kw) -> DPaDe:
    torch.manual_seed(seed)
    return DPaDe(D_S, D_T, **kw)


def test_parameter_count_paper_size() -> None:
    # d = 192, D = 768:
    #   4 MHA (token self-attn, router, query self-attn, query cross-attn), each
    #     in_proj 3*192*192 + 3*192 = 111,168 + out_proj 192*192 + 192 = 37,056 -> 148,224; x4 = 592,896
    #   4 LayerNorm(192) (post self-attn, router, pre cross-attn, pre expert fc): 4 * 384 = 1,536
    #   router token 192, Wg 3*192 = 576, pattern queries 3*192 = 576
    #   expert fc 192 -> 192*768 = 147,456: 192*147,456 + 147,456 = 28,459,008
    #   LayerNorm(147,456) 294,912; LayerNorm(768) 1,536
    #   total 29,351,232 (about 29.4M)
    with torch.device("meta"):
        m = DPaDe(192, 768)
    assert sum(p.numel() for p in m.parameters()) == 29_351_232


@pytest.mark.parametrize("pattern,length", [(0, 1), (1, 128), (2, 257)])
def test_shapes_and_router_loss(pattern: int, length: int) -> None:
    m = _model()
    x = torch.randn(2, length, D_S)
    out = m(x, pattern)
    assert out.y.shape == (2, length, D_T)
    assert out.route_logits.shape == (2, 3)
    for scalar in (out.route_loss, out.weight_l2, out.route_correct):
        assert scalar.shape == ()
    expected = F.cross_entropy(out.route_logits, torch.full((2,), pattern))
    torch.testing.assert_close(out.route_loss, expected)
    correct = (out.route_logits.argmax(-1) == pattern).float().mean()
    assert out.route_correct.item() == correct.item()
    # output LayerNorm (1, 0): every token has mean 0 and unit variance over D
    torch.testing.assert_close(out.y.mean(-1), torch.zeros(2, length), atol=1e-5, rtol=0)


def test_mixing_and_weight_l2_recomputed_from_hooks() -> None:
    # the textbook formulation, spelled out; the lean path is compared with it below
    m = _model(1, scale=0.5, lean=False)
    seen = {}
    m.attn_norm.register_forward_hook(lambda mod, inp, out: seen.__setitem__("x", out))
    m.expert_norm.register_forward_hook(lambda mod, inp, out: seen.__setitem__("e", out))
    out = m(torch.randn(3, 5, D_S), 1)
    s = out.route_logits.softmax(-1)  # (B, K)
    e = seen["e"].reshape(3, 3, D_S, D_T)  # (B, K, d, D)
    w = 0.5 * (s[:, 0, None, None] * e[:, 0] + s[:, 1, None, None] * e[:, 1] + s[:, 2, None, None] * e[:, 2])
    l2 = 0.025 * torch.stack([(w[i] ** 2).sum() for i in range(3)]).mean()
    torch.testing.assert_close(out.weight_l2, l2)
    y = F.layer_norm(F.gelu(seen["x"] @ w), (D_T,), eps=1e-6)
    torch.testing.assert_close(out.y, y)


@pytest.mark.parametrize("lean", [True, False])
def test_weight_l2_by_hand_with_constant_experts(lean: bool) -> None:
    # Zero expert fc weight and bias: GELU(0) = 0, LN over d*D of a constant -> its bias. With
    # that bias all ones every expert is the all-ones (d, D) matrix, and as s sums to 1,
    # W = ones / 256: ||W||_F^2 = d * D / 256^2 = 48 * 32 / 65,536 = 0.0234375,
    # L_W = 0.025 * 0.0234375 = 5.859375e-4.
    m = _model(lean=lean)
    with torch.no_grad():
        m.expert_fc.weight.zero_()
        m.expert_fc.bias.zero_()
        m.expert_norm.bias.fill_(1.0)
    out = m(torch.randn(2, 4, D_S), 2)
    assert out.weight_l2.item() == pytest.approx(5.859375e-4, rel=1e-6)


def test_init() -> None:
    m = _model()
    assert torch.equal(m.pattern_queries, torch.zeros(1, 3, D_S))
    bound_in = math.sqrt(6 / (D_S + 3 * D_S))  # xavier on the (3d, d) in_proj
    for mha in (m.attn, m.router_attn, m.query_attn, m.cross_attn):
        assert mha.in_proj_weight.abs().max() <= bound_in
        assert mha.in_proj_weight.abs().max() > 0.8 * bound_in
        assert torch.equal(mha.in_proj_bias, torch.zeros(3 * D_S))
        assert torch.equal(mha.out_proj.bias, torch.zeros(D_S))
    # the gate keeps nn.Linear's kaiming-uniform(a = sqrt 5): bound 1 / sqrt(d), as the public code
    # (xavier's would be sqrt(6 / (d + 3)), 0.175 at d = 192 against 0.072)
    bound_gate = 1 / math.sqrt(D_S)
    assert m.gate.weight.abs().max() <= bound_gate
    assert m.gate.weight.abs().max() > 0.8 * bound_gate
    assert m.gate.weight.std().item() == pytest.approx(bound_gate / math.sqrt(3), rel=0.3)
    assert m.expert_fc.weight.abs().max() <= math.sqrt(6 / (D_S + D_S * D_T))
    assert torch.equal(m.expert_fc.bias, torch.zeros(D_S * D_T))
    for ln in (m.attn_norm, m.router_norm, m.cross_norm, m.expert_in_norm, m.expert_norm, m.out_norm):
        assert torch.equal(ln.weight, torch.ones_like(ln.weight))
        assert torch.equal(ln.bias, torch.zeros_like(ln.bias))
    assert m.attn.num_heads == 16 and m.router_attn.num_heads == 12
    assert m.expert_norm.normalized_shape == (D_S * D_T,)


def test_gradients_reach_every_parameter_and_input() -> None:
    m = _model()
    x = torch.randn(2, 6, D_S, requires_grad=True)
    out = m(x, 0)
    readout = torch.randn(out.y.shape, generator=torch.Generator().manual_seed(2))
    ((out.y * readout).mean() + out.route_loss + out.weight_l2).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0
    assert m.gate.weight.grad.abs().sum() > 0 and m.expert_fc.weight.grad.abs().sum() > 0


def test_bad_arguments() -> None:
    m = _model()
    with pytest.raises(ValueError):
        m(torch.randn(1, 2, D_S), 3)
    with pytest.raises(ValueError):
        DPaDe(40, 8)  # 40 is not divisible by 16 heads


# ---------------------------------------------------------------- the lean expert path


def _perturbed(seed: int, dtype: torch.dtype = torch.float32) -> DPaDe:
    """A model with every parameter moved off its init (LayerNorm affines off (1, 0), nonzero
    biases and pattern queries), so that no term of the lean algebra vanishes."""
    m = _model(seed).to(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=dtype))
    return m


def _run(m: DPaDe, xs: list[torch.Tensor]) -> tuple[list, list[torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs of three branches, and the gradients of the inputs and every parameter of a loss
    touching each output (a random readout of y, the router CE, a large weight on L_W)."""
    xs = [x.clone().requires_grad_() for x in xs]
    outs = m.forward_many([(xs[0], 0), (xs[1], 1), (xs[2], 2)])
    g = torch.Generator().manual_seed(7)
    loss = sum(
        (o.y * torch.randn(o.y.shape, generator=g, dtype=o.y.dtype)).sum() + o.route_loss + 50 * o.weight_l2
        for o in outs
    )
    loss.backward()
    return outs, [x.grad for x in xs], {n: p.grad for n, p in m.named_parameters()}


def _inputs(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randn(6, 1, D_S, generator=g, dtype=dtype),
        torch.randn(2, 5, D_S, generator=g, dtype=dtype),
        torch.randn(3, 9, D_S, generator=g, dtype=dtype),
    ]


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the tensor's scale."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _compare(lean: DPaDe, ref: DPaDe, xs: list[torch.Tensor]) -> float:
    o_l, gx_l, gp_l = _run(lean, xs)
    o_r, gx_r, gp_r = _run(ref, xs)
    errs = []
    for a, b in zip(o_l, o_r, strict=True):
        errs += [_max_rel(a.y, b.y), _max_rel(a.weight_l2, b.weight_l2), _max_rel(a.route_loss, b.route_loss)]
        assert torch.equal(a.route_logits, b.route_logits)  # the router does not depend on the path
    errs += [_max_rel(a, b) for a, b in zip(gx_l, gx_r, strict=True)]
    assert gp_l.keys() == gp_r.keys()
    for name in gp_r:
        assert gp_l[name] is not None and gp_r[name] is not None, name
        errs.append(_max_rel(gp_l[name], gp_r[name]))
    return max(errs)


# one chunk; several chunks of 2, 2, 2 and 1 images (11 images of 3 branches: 6 + 2 + 3)
@pytest.mark.parametrize("chunk_images", [None, 3])
@pytest.mark.parametrize("recompute", [False, True])
def test_lean_equals_reference_float64_exactly(recompute: bool, chunk_images: int | None) -> None:
    # In float64 the rearranged algebra must agree with LayerNorm + einsum to rounding: values and
    # the gradient of every parameter and input.
    ref = _perturbed(0, torch.float64)
    ref.lean = False
    lean = _perturbed(0, torch.float64)
    lean.recompute = recompute
    if chunk_images is not None:
        lean.expert_chunk_bytes = chunk_images * 3 * D_S * D_T * 8
    assert _compare(lean, ref, _inputs(torch.float64)) < 1e-12


@pytest.mark.parametrize("recompute", [False, True])
def test_lean_equals_reference_float32_within_1e5(recompute: bool) -> None:
    ref = _perturbed(1)
    ref.lean = False
    lean = _perturbed(1)
    lean.recompute = recompute
    lean.expert_chunk_bytes = 2 * 3 * D_S * D_T * 4  # chunks of 2 images
    assert _compare(lean, ref, _inputs()) < 1e-5


def test_lean_under_bf16_autocast_stays_in_bf16_and_close() -> None:
    # Under autocast the mixed projection is built in bfloat16 (the compute dtype) with float32
    # statistics; it tracks the reference (which runs its LayerNorm in float32) to bf16 precision.
    ref = _perturbed(2)
    ref.lean = False
    lean = _perturbed(2)
    xs = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, sq = lean._mixed_lean(torch.randn(4, 3, D_S), torch.full((4, 3), 1 / 3))
        o_l = lean.forward_many([(xs[0], 0), (xs[1], 1), (xs[2], 2)])
        o_r = ref.forward_many([(xs[0], 0), (xs[1], 1), (xs[2], 2)])
    assert w.dtype == torch.bfloat16 and sq.dtype == torch.float32
    for a, b in zip(o_l, o_r, strict=True):
        assert _max_rel(a.y.float(), b.y.float()) < 3e-2
        assert _max_rel(a.weight_l2, b.weight_l2) < 2e-2
    sum(o.y.float().mean() + o.weight_l2 for o in o_l).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lean.parameters())


def test_chunks_are_near_equal() -> None:
    from dpal.trainer.dpade import _chunks

    assert _chunks(40, 37) == [(0, 20), (20, 40)]  # not 37 + 3
    assert _chunks(11, 3) == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert _chunks(5, 100) == [(0, 5)]
    assert _chunks(3, 0) == [(0, 1), (1, 2), (2, 3)]
