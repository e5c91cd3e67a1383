"""Tests for dpal.trainer.export: exported students load as plain timm ViTs, bit for bit."""

from __future__ import annotations

import json
import logging
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config
from torch import nn

import dpal
from dpal.trainer.export import export_student, load_exported
from dpal.trainer.student import create_student, student_tokens
from dpal.views import NUM_AUG, apply_aug, to_normalized

# B batch


class _DDPLike(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def _packed_layout(path: Path) -> dict[str, tuple[int, ...]]:
    """Read the safetensors header itself and check that every tensor owns its own dense bytes.

    The file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
    shape and [begin, end) byte range, then the data. `load_file` always hands back fresh contiguous
    tensors, so only the header can show how the tensors were written: the ranges must tile the data
    section exactly (no overlap, so no tensor aliases another; no gap) and each range must hold
    numel * itemsize bytes (dense, nothing strided). Returns {name: shape}.
    """
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    header.pop("__metadata__", None)
    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8}
    spans = sorted((entry["data_offsets"], name) for name, entry in header.items())
    cursor = 0
    for (begin, end), name in spans:
        entry = header[name]
        numel = 1
        for n in entry["shape"]:
            numel *= n
        assert begin == cursor, f"{name} starts at {begin}, not at {cursor}: overlap or gap"
        assert end - begin == numel * itemsize[entry["dtype"]], f"{name} is not densely packed"
        cursor = end
    assert cursor == len(raw) - 8 - header_len
    return {name: tuple(entry["shape"]) for name, entry in header.items()}


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
        "pretrained_cfg": {
            "input_size": [3, 256, 128],
            "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "crop_pct": 1.0,
            "crop_mode": "squash",
        },
        "dpal_version": dpal.__version__,
    }
    state = load_file(str(path))
    assert not any(k.startswith("module.") for k in state)
    assert _packed_layout(path) == {k: tuple(v.shape) for k, v in model.state_dict().items()}

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


def test_export_packs_strided_views(tmp_path: Path) -> None:
    # Parameters that are views (a transposed weight, column slices of one wider buffer) are
    # non-contiguous in memory; safetensors refuses them, so the exporter must pack each one into
    # its own dense bytes, and the values must survive bit for bit.
    torch.manual_seed(0)
    model = create_student("vit_tiny_patch16_224", img_size=(32, 16), depth=1).eval()
    _perturb(model)
    qkv = model.blocks[0].attn.qkv
    wide = torch.randn(192, 2)  # two norms' weights as the columns of one (192, 2) buffer
    with torch.no_grad():
        wide[:, 0] = model.blocks[0].norm1.weight
        wide[:, 1] = model.blocks[0].norm2.weight
    model.blocks[0].attn.qkv.weight = nn.Parameter(qkv.weight.detach().t().contiguous().t())
    model.blocks[0].norm1.weight = nn.Parameter(wide[:, 0])
    model.blocks[0].norm2.weight = nn.Parameter(wide[:, 1])
    views = ["blocks.0.attn.qkv.weight", "blocks.0.norm1.weight", "blocks.0.norm2.weight"]
    assert not any(model.state_dict()[k].is_contiguous() for k in views)  # the case is real

    path = export_student(model, "vit_tiny_patch16_224", (32, 16), tmp_path / "student.safetensors")
    expected = model.state_dict()
    assert _packed_layout(path) == {k: tuple(v.shape) for k, v in expected.items()}
    state = load_file(str(path))
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    # (outputs are not compared: a matmul on a transposed weight may round differently)
    rebuilt = load_exported(path).state_dict()
    assert all(torch.equal(rebuilt[k], v) and rebuilt[k].is_contiguous() for k, v in expected.items())


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "student.json",
        "student.safetensors",
    ]  # no temporaries
    state = load_file(str(path))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["dpal_vit_tiny", "vit_tiny_patch16_224"])
def test_exported_data_config_is_the_training_preprocessing(tmp_path: Path, name: str) -> None:
    # A timm user rebuilds the model and asks timm how to feed it: the answer must be the input the
    # student was trained on (64 x 32 here, ImageNet mean/std, bilinear), not timm's ViT default
    # (224 x 224, mean 0.5, bicubic, crop 0.9), and timm's eval transform must then give, pixel for
    # pixel, what the training views give for the whole image (views.apply_aug with a full box).
    model = create_student(name, img_size=(64, 32), depth=1)
    path = export_student(model, name, (64, 32), tmp_path / "student.safetensors")
    expected = {
        "input_size": (3, 64, 32),
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }
    loaded = load_exported(path)
    assert resolve_data_config({}, model=loaded) == expected
    assert resolve_data_config({}, model=model) == expected  # the student in training says the same
    # the same through timm alone, from the JSON (dpal_vit_tiny needs dpal imported to be known)
    config = json.loads(path.with_suffix(".json").read_text())
    plain = timm.create_model(
        config["model_name"],
        pretrained=False,
        num_classes=0,
        img_size=config["img_size"],
        pretrained_cfg_overlay=config["pretrained_cfg"],
        **config["timm_kwargs"],
    )
    resolved = resolve_data_config({}, model=plain)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()} == expected

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(150, 70, 3), dtype=np.uint8))
    aug = np.zeros(NUM_AUG)
    aug[0:4] = (0, 0, image.height, image.width)  # the whole image; no flip, jitter, blur
    trained = to_normalized(apply_aug(image, aug, (64, 32)))
    timm_eval = create_transform(**resolve_data_config({}, model=loaded))(image)
    assert timm_eval.shape == trained.shape == (3, 64, 32)
    assert torch.equal(timm_eval, trained)


def test_export_of_tied_weights_writes_each_copy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Two entries on one storage make safetensors refuse the whole file; the export writes each as
    # its own bytes (the rebuilt timm model holds them apart anyway) and names the tie in one line.
    torch.manual_seed(0)
    model = create_student("vit_tiny_patch16_224", img_size=(32, 16), depth=2).eval()
    _perturb(model)
    model.blocks[1].norm1.weight = model.blocks[0].norm1.weight
    with caplog.at_level(logging.WARNING, logger="dpal.trainer.export"):
        path = export_student(model, "vit_tiny_patch16_224", (32, 16), tmp_path / "student.safetensors")
    assert [r.getMessage() for r in caplog.records] == [
        "tied weights are exported as separate copies: blocks.1.norm1.weight (shares memory with "
        "blocks.0.norm1.weight)"
    ]
    expected = model.state_dict()
    assert _packed_layout(path) == {k: tuple(v.shape) for k, v in expected.items()}
    loaded = load_exported(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.equal(student_tokens(loaded, x), student_tokens(model, x))


def test_safetensors_bytes_are_the_format_spelled_out() -> None:
    # one float32 tensor: 8-byte header length, the sorted JSON header padded with spaces to a
    # multiple of 8, then the values little-endian (safetensors' own writer orders the metadata
    # differently from one process to the next)
    import struct

    from safetensors.torch import load

    from dpal.trainer.export import safetensors_bytes

    got = safetensors_bytes({"w": torch.tensor([1.0, 2.0])}, {"model_name": "m", "format": "pt"})
    header = b'{"__metadata__":{"format":"pt","model_name":"m"},"w":{"data_offsets":[0,8],"dtype":"F32","shape":[2]}}'
    padded = header + b" " * (-len(header) % 8)
    assert len(padded) == 104
    assert got == struct.pack("<Q", 104) + padded + struct.pack("<2f", 1.0, 2.0)

    state = {
        "b": torch.randn(2, 3),
        "a": torch.randn(4).to(torch.bfloat16),
        "i": torch.arange(5),
        "h": torch.randn(3, dtype=torch.float16),
        "m": torch.tensor([True, False]),
        "e": torch.zeros(0, 4),
    }
    back = load(safetensors_bytes(state, {"format": "pt"}))
    assert sorted(back) == sorted(state)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k


# ---------------------------------------------------------------- the model folder


@pytest.mark.parametrize(
    "name,kwargs",
    [("dpal_vit_tiny", {"depth": 2}), ("vit_tiny_patch16_224", {"depth": 2, "drop_path_rate": 0.1})],
)
def test_a_model_folder_loads_in_timm_through_local_dir(tmp_path: Path, name: str, kwargs: dict) -> None:
    # timm alone (`local-dir:`, pretrained=True) rebuilds the model with the exported weights and the
    # input as trained; drop path (training only) is not a reconstruction argument
    torch.manual_seed(0)
    model = create_student(name, img_size=(64, 32), **kwargs).eval()
    _perturb(model)
    folder = export_student(model, name, (64, 32), tmp_path / "student")
    assert folder == tmp_path / "student"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert (config["architecture"], config["num_classes"], config["num_features"]) == (name, 0, 192)
    assert config["model_args"] == {"img_size": [64, 32], "num_classes": 0, "depth": 2}
    assert _packed_layout(folder / "model.safetensors") == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    resolved = resolve_data_config({}, model=loaded)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in resolved.items()} == {
        "input_size": (3, 64, 32),
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }
    state = model.state_dict()
    assert loaded.state_dict().keys() == state.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), model.forward_features(x))
        assert torch.equal(loaded(x), model(x)) and loaded(x).shape == (2, 192)
        assert torch.equal(student_tokens(load_exported(folder), x), student_tokens(model, x))
    assert loaded.blocks[-1].attn.num_heads == (12 if name == "dpal_vit_tiny" else 3)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "2508.07144" in card


def test_export_out_that_is_neither_a_folder_nor_safetensors_is_refused(tmp_path: Path) -> None:
    from dpal.errors import InputError

    model = create_student("vit_tiny_patch16_224", img_size=(32, 16), depth=1)
    (tmp_path / "a_file").write_text("x")
    for out in ("a.pt", "a.json", "a_file"):
        with pytest.raises(InputError, match="model folder .* or a FILE.safetensors"):
            export_student(model, "vit_tiny_patch16_224", (32, 16), tmp_path / out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
    with pytest.raises(InputError, match="not an exported model folder"):
        load_exported(tmp_path)
