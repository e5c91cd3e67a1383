"""Token forward for timm Vision Transformers at any input size (shared by teacher and student).

timm resamples position embeddings with antialiasing, which changes values when a grid shrinks
(PATH's 14 -> 8 columns). DPAL needs the plain 2-D bicubic resize (align_corners=False, no
antialias) from a fixed source grid to each view's grid: 16 x 8 for 256 x 128, 8 x 6 for the
128 x 96 crops, 16 x 16 for the 256 x 256 crowd image. This module owns that resize and a forward
that returns every token after the final norm (or after an earlier block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpal.errors import InputError

# B batch, C width, gh x gw source grid, H x W target grid, N = H * W patch tokens


@dataclass
class PosEmbed:
    """A ViT's position embedding split into its prefix slot(s) and its patch grid.

    Attributes:
        prefix: (1, num_prefix, C) added to the prefix tokens, or None when the model adds no
            position to them (timm `no_embed_class`).
        grid: (1, gh * gw, C) the patch-grid embedding at its native grid.
        grid_hw: (gh, gw).
    """

    prefix: Tensor | None
    grid: Tensor
    grid_hw: tuple[int, int]


def resize_pos_grid(grid: Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Tensor:
    """2-D bicubic resize of a flattened position grid, align_corners=False, no antialias.

    Args:
        grid: (1, gh * gw, C).
        src_hw: (gh, gw).
        dst_hw: (H, W).

    Returns:
        (1, H * W, C); the input itself when the grids are equal.
    """
    if tuple(src_hw) == tuple(dst_hw):
        return grid
    gh, gw = src_hw
    c = grid.shape[-1]
    x = grid.reshape(1, gh, gw, c).permute(0, 3, 1, 2)  # (1, C, gh, gw)
    x = F.interpolate(x.float(), size=tuple(dst_hw), mode="bicubic", align_corners=False, antialias=False)
    return x.to(grid.dtype).permute(0, 2, 3, 1).reshape(1, dst_hw[0] * dst_hw[1], c)


def pos_embed_of(model: nn.Module) -> PosEmbed:
    """Split a timm VisionTransformer's `pos_embed` into prefix and grid parts (views, no copies)."""
    pos = model.pos_embed
    gh, gw = model.patch_embed.grid_size
    n_grid = gh * gw
    if pos.shape[1] == n_grid:
        return PosEmbed(None, pos, (gh, gw))
    n_prefix = pos.shape[1] - n_grid
    return PosEmbed(pos[:, :n_prefix], pos[:, n_prefix:], (gh, gw))


def patch_size_of(model: nn.Module) -> tuple[int, int]:
    ps = model.patch_embed.patch_size
    return (ps, ps) if isinstance(ps, int) else tuple(ps)


def vit_tokens(
    model: nn.Module,
    x: Tensor,
    pos: PosEmbed | None = None,
    block_index: int | None = None,
    patch_mask: Tensor | None = None,
    mask_token: Tensor | None = None,
) -> Tensor:
    """All tokens of a timm VisionTransformer for an input of any size divisible by the patch.

    Args:
        model: a timm `VisionTransformer` (or subclass with the same attributes).
        x: (B, 3, H_px, W_px) normalised pixels.
        pos: position embedding source; defaults to the model's own (`pos_embed_of`), which keeps
            gradients flowing into a student's `pos_embed`.
        block_index: None for the output of the last block after the final norm (timm's
            `forward_features`); an integer i for the output of block i, normalised by a
            parameter-free LayerNorm (used when a teacher's last blocks were never trained).
        patch_mask: (B, H * W) bool, or None: the patch embeddings where it is True are replaced by
            `mask_token` (1, 1, C) before the position embedding is added (masked image modelling,
            as DINOv2 and Proteus do).
        mask_token: (1, 1, C), with `patch_mask`.

    Returns:
        (B, num_prefix + H * W, C): prefix tokens (CLS, registers) first, then patches row-major.
    """
    pos = pos if pos is not None else pos_embed_of(model)
    ph, pw = patch_size_of(model)
    if x.shape[-2] % ph or x.shape[-1] % pw:
        raise InputError(f"input {tuple(x.shape[-2:])} is not divisible by the patch size {(ph, pw)}")
    grid_hw = (x.shape[-2] // ph, x.shape[-1] // pw)
    pe = model.patch_embed
    pe.strict_img_size = False  # the grid is handled here, not by timm
    if getattr(pe, "dynamic_img_pad", False):
        raise ValueError("dynamic_img_pad ViTs are not supported")
    tokens = pe(x)  # (B, N, C) or (B, H, W, C)
    if tokens.ndim == 4:
        tokens = tokens.flatten(1, 2)
    if patch_mask is not None:
        tokens = torch.where(patch_mask.unsqueeze(-1), mask_token.to(tokens.dtype), tokens)
    tokens = tokens + resize_pos_grid(pos.grid, pos.grid_hw, grid_hw).to(tokens.dtype)
    prefix = []
    if getattr(model, "cls_token", None) is not None:
        prefix.append(model.cls_token.expand(x.shape[0], -1, -1))
    if getattr(model, "reg_token", None) is not None:
        prefix.append(model.reg_token.expand(x.shape[0], -1, -1))
    if prefix:
        pre = torch.cat(prefix, dim=1)
        if pos.prefix is not None:
            pre = pre + pos.prefix.to(pre.dtype)
        tokens = torch.cat([pre, tokens], dim=1)
    tokens = model.pos_drop(tokens)
    tokens = model.norm_pre(tokens)
    if block_index is None:
        tokens = model.blocks(tokens)
        return model.norm(tokens)
    if not -len(model.blocks) <= block_index < len(model.blocks):
        raise ValueError(f"block_index {block_index} out of range for {len(model.blocks)} blocks")
    for blk in model.blocks[: block_index % len(model.blocks) + 1]:
        tokens = blk(tokens)
    return F.layer_norm(tokens, tokens.shape[-1:], eps=1e-6)
