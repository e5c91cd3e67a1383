"""Tests for dpal.trainer.export: exported students load as plain timm ViTs, bit for bit."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import dpal
from dpal.trainer.export import export_student, load_exported
from dpal.trainer.student import create_student, student_tokens

# B batch


class _DDPLike(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "name,kwargs", [("dpal_vit_tiny", {"depth": 2}), ("vit_tiny_patch16_224", {"depth": 2})]
)
def test_export_round_trip(tmp_path: Path, name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = create_student(name, img_size=(256, 128), **kwargs).eval()
    _perturb(model)
    path = export_student(_DDPLike(model), name, (256, 128), tmp_path / "out" / "student.safetensors")
    assert path == tmp_path / "out" / "student.safetensors"
    config = json.loads(path.with_suffix(".json").read_text())
    assert config == {
        "model_name": name,
        "img_size": [256, 128],
        "num_classes": 0,
        "timm_kwargs": kwargs,
        "dpal_version": dpal.__version__,
    }
    state = load_file(str(path))
    assert not any(k.startswith("module.") for k in state)
    assert all(t.is_contiguous() for t in state.values())

    plain = timm.create_model(name, pretrained=False, num_classes=0, img_size=(256, 128), **kwargs).eval()
    plain.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 256, 128)
    with torch.no_grad():
        assert torch.equal(plain.forward_features(x), model.forward_features(x))
        assert torch.equal(student_tokens(plain, x), student_tokens(model, x))
        loaded = load_exported(path)
        assert not loaded.training
        assert torch.equal(student_tokens(loaded, x), student_tokens(model, x))
    if name == "dpal_vit_tiny":
        assert loaded.blocks[-1].attn.num_heads == 12


def test_export_refuses_mismatched_config(tmp_path: Path) -> None:
    model = create_student("vit_tiny_patch16_224", img_size=(64, 32), depth=2)
    with pytest.raises(ValueError, match="does not match"):
        export_student(model, "vit_tiny_patch16_224", (64, 32), tmp_path / "a.safetensors", timm_kwargs={})
    with pytest.raises(ValueError, match="safetensors"):
        export_student(model, "vit_tiny_patch16_224", (64, 32), tmp_path / "a.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_exported_files_are_readable_like_any_new_file(tmp_path: Path, umask: int, mode: int) -> None:
    model = create_student("vit_tiny_patch16_224", img_size=(32, 16), depth=1)
    old = os.umask(umask)
    try:
        path = export_student(model, "vit_tiny_patch16_224", (32, 16), tmp_path / "student.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert stat.S_IMODE(path.with_suffix(".json").stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.json", "student.safetensors"]  # no temporaries
    state = load_file(str(path))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
