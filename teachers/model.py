"""`Teacher`: a frozen timm model plus the code that turns views into DPAL's targets.

A teacher sees only the global view v0 (256 x 128) and the crowd image Ic (256 x 256). From v0 it
gives the global target g (its CLS token, or the mean patch token) and the local target (its patch
tokens on the student's 16 x 16 patch grid); from Ic it gives the relation logits F F^T / sqrt(D)
over CLS + patch tokens (docs/method.md, "Teacher targets"). Every teacher takes
ImageNet-normalised pixels.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpal.errors import InputError
from dpal.teachers.presets import TeacherSpec
from dpal.vit import PosEmbed, patch_size_of, vit_tokens

# B batch, D teacher width, P = (Hg/16)(Wg/16) patch tokens of v0, T = 1 + (Hc/16)(Wc/16) crowd tokens

LN_EPS = 1e-6


def autocast_context(device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, plain float32 elsewhere. Callers also wrap in `torch.inference_mode()`."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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
                "set view sizes that are (--set views.global_size=...)"
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
