"""Tests for dpal.trainer.student: the dpal_vit_tiny layout, create_student, student_tokens."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import timm
import torch

import dpal.trainer.student as student_mod
from dpal.errors import InputError
from dpal.trainer.student import BACKBONE_PREFIXES, create_student, student_tokens

# B batch, N patches, d width


def test_dpal_vit_tiny_layout() -> None:
    with torch.device("meta"):  # full size, no init cost
        m = create_student("dpal_vit_tiny")
        ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=(256, 128))
    assert [b.attn.num_heads for b in m.blocks] == [6] * 11 + [12]
    assert m.blocks[-1].attn.head_dim == 16 and m.blocks[0].attn.head_dim == 32
    assert m.embed_dim == 192 and len(m.blocks) == 12 and m.patch_embed.grid_size == (16, 8)
    assert m.num_classes == 0 and m.norm.eps == 1e-6 and m.blocks[0].norm1.eps == 1e-6
    assert {k: v.shape for k, v in m.state_dict().items()} == {
        k: v.shape for k, v in ref.state_dict().items()
    }
    # patch 3*16*16*192 + 192 = 147,648; cls 192; pos 129*192 = 24,768; norm 384;
    # per block: 2 LN 768 + qkv 111,168 + proj 37,056 + fc1 148,224 + fc2 147,648 = 444,864; x12
    assert sum(p.numel() for p in m.parameters()) == 147_648 + 192 + 24_768 + 384 + 12 * 444_864
    assert m.pretrained_cfg["input_size"] == (3, 256, 128)


def test_registration_is_idempotent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(student_mod)
    assert timm.is_model("dpal_vit_tiny")
    with pytest.raises(ValueError):
        timm.create_model("dpal_vit_tiny", pretrained=True)


def test_create_student_any_vit_and_refusals() -> None:
    m = create_student("vit_tiny_patch16_224", img_size=(64, 32), depth=2)
    assert len(m.blocks) == 2 and m.patch_embed.grid_size == (4, 2) and m.dpal_timm_kwargs == {"depth": 2}
    with pytest.raises(ValueError, match="unknown"):
        create_student("no_such_model")
    with pytest.raises(ValueError):
        create_student("resnet18")
    with pytest.raises(ValueError, match="cls_token"):
        create_student(
            "vit_tiny_patch16_224", img_size=(64, 32), depth=1, class_token=False, global_pool="avg"
        )


def test_student_tokens_shapes_and_pos_grad() -> None:
    torch.manual_seed(0)
    m = create_student("dpal_vit_tiny", depth=1).eval()
    x = torch.randn(2, 3, 256, 128)
    tokens = student_tokens(m, x)
    assert tokens.shape == (2, 1 + 128, 192)
    torch.testing.assert_close(tokens, m.forward_features(x))
    assert student_tokens(m, torch.randn(1, 3, 128, 96)).shape == (1, 1 + 48, 192)
    crowd = student_tokens(m, torch.randn(1, 3, 256, 256))
    assert crowd.shape == (1, 1 + 256, 192)
    # a random linear read-out: the sum of LayerNorm outputs alone would have ~zero gradient
    (
        crowd[:, 1:] * torch.randn(crowd[:, 1:].shape, generator=torch.Generator().manual_seed(1))
    ).sum().backward()
    grad = m.pos_embed.grad
    assert grad is not None and grad[0, 1:].abs().mean() > 1e-2


def test_backbone_prefixes() -> None:
    assert set(BACKBONE_PREFIXES) >= {"patch_embed", "cls_token", "pos_embed", "blocks", "norm", "reg_token"}
    m = create_student("dpal_vit_tiny", depth=1)
    assert {k.split(".")[0] for k in m.state_dict()} <= set(BACKBONE_PREFIXES)


def _saved_bytes(fn, model: torch.nn.Module) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages autograd saves for the backward pass while `fn` runs
    (the model's parameters, and views of them such as a transposed weight, excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("when", [True, None])
def test_recompute_mlp_activations_same_values_less_memory(when: bool | None) -> None:
    # Recomputing the MLP's GELU in the backward pass gives the same forward and the same
    # gradients bit for bit, and saves one (tokens, 4d) tensor per block: here 2 blocks x 2 images
    # x 9 tokens x 192 hidden x 4 bytes = 27,648 bytes less. `None` recomputes only on CUDA.
    from dpal.trainer.student import recompute_mlp_activations

    torch.manual_seed(0)
    base = create_student(
        "dpal_vit_tiny", img_size=(32, 64), depth=2, embed_dim=48, num_heads=3, last_num_heads=3
    )
    other = copy.deepcopy(base)
    assert recompute_mlp_activations(other, when) == 2
    x = torch.randn(2, 3, 32, 64)
    readout = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(1))
    saved = []
    for m in (base, other):
        nbytes, y = _saved_bytes(lambda m=m: student_tokens(m, x), m)
        (y * readout).sum().backward()
        saved.append(nbytes)
    assert torch.equal(student_tokens(base, x), student_tokens(other, x))
    for (name, p), q in zip(base.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    expected_saving = 2 * 2 * 9 * 192 * 4 if when else 0
    assert saved[0] - saved[1] == expected_saving
    assert sorted(base.state_dict()) == sorted(other.state_dict())


def test_dpal_init_is_the_authors_codes() -> None:
    """init="dpal": xavier-uniform patch convolution (as a (d, 3 p p) matrix) and Linear weights
    (qkv as one (3d, d) matrix), zero Linear biases, LayerNorm (1, 0), CLS from N(0, 0.02), position
    embedding from U[0, 1), the patch bias at PyTorch's default bound 1 / sqrt(3 p p); by value."""
    import math

    torch.manual_seed(0)
    m = create_student("dpal_vit_tiny", init="dpal")
    d = 192
    proj = m.patch_embed.proj
    bound = math.sqrt(6 / (d + 3 * 16 * 16))
    assert proj.weight.abs().max() <= bound and proj.weight.abs().max() > 0.99 * bound
    assert proj.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert proj.bias.abs().max() <= 1 / math.sqrt(3 * 16 * 16)
    assert m.cls_token.std().item() == pytest.approx(0.02, rel=0.15)
    pos = m.pos_embed
    assert pos.min() >= 0 and pos.max() < 1 and pos.mean().item() == pytest.approx(0.5, abs=0.01)
    for block in m.blocks:
        qkv, fc1 = block.attn.qkv, block.mlp.fc1
        assert qkv.weight.abs().max() <= math.sqrt(6 / (d + 3 * d)) and torch.equal(
            qkv.bias, torch.zeros(3 * d)
        )
        assert fc1.weight.abs().max() <= math.sqrt(6 / (d + 4 * d)) and torch.equal(
            fc1.bias, torch.zeros(4 * d)
        )
        assert torch.equal(block.norm1.weight, torch.ones(d)) and torch.equal(
            block.norm1.bias, torch.zeros(d)
        )
    # the default keeps timm's (its position embedding is a truncated normal of std 0.02)
    torch.manual_seed(0)
    timm_init = create_student("dpal_vit_tiny")
    assert timm_init.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    with pytest.raises(InputError, match="student init 'jax': choose one of dpal, timm"):
        create_student("dpal_vit_tiny", depth=1, init="jax")
