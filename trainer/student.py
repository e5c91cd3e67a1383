"""The student backbone: the paper's ViT-Ti/16 layout (`dpal_vit_tiny`) and any timm ViT.

`dpal_vit_tiny` is a timm `VisionTransformer` (patch 16, width 192, depth 12, MLP ratio 4, qkv
bias, LayerNorm eps 1e-6, no drop path, 256 x 128 input) with 6 heads in blocks 0-10 and 12 in the
last block, so that its last attention matches PATH-B's 12 heads (docs/method.md, "Student"). Head count
changes no parameter shape, so its state dict has the same keys and shapes as timm's
`vit_tiny_patch16_224` at 256 x 128. It is registered with timm on import (as timm's own model
files do), so `timm.create_model("dpal_vit_tiny")` works anywhere `dpal.trainer.student` has been
imported. This module also owns the student token forward and the list of state-dict prefixes
that make up the backbone kept after pretraining, and `recompute_mlp_activations`, which trades
one GELU per block in the backward pass for a quarter of the student's activation memory.
"""

from __future__ import annotations

import math
import types
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp, to_2tuple
from timm.models import VisionTransformer, register_model
from torch import Tensor, nn

from dpal.common import IMAGENET_MEAN, IMAGENET_STD
from dpal.errors import InputError
from dpal.vit import vit_tokens

# B batch, H x W pixels, N = (H / 16) * (W / 16) patch tokens, d student width


DPAL_VIT_TINY = "dpal_vit_tiny"
DEFAULT_IMG_SIZE = (256, 128)
# First component of the state-dict keys of the backbone kept after pretraining (docs/method.md,
# "What is kept"). `norm_pre` only has parameters in pre-norm ViTs (CLIP-style); `reg_token` only in
# register ViTs.
BACKBONE_PREFIXES = ("patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre", "blocks", "norm")
# what `dpal.vit.vit_tokens` and the global (CLS) branch rely on
_REQUIRED_ATTRS = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "norm_pre", "pos_drop")
# How the views that train a student are resized: `views.apply_aug` resamples every crop with PIL's
# bilinear filter (tests/test_export.py checks timm's eval transform against it pixel for pixel).
TRAIN_INTERPOLATION = "bilinear"


def data_config(img_size: tuple[int, int]) -> dict[str, Any]:
    """The student's input as dpal trains it, in timm's `pretrained_cfg` fields.

    `timm.data.resolve_data_config({}, model=model)` reads these from `model.pretrained_cfg`: the
    native (3, H, W) input, ImageNet mean and std on RGB in [0, 1], bilinear resizing of the whole
    person crop to exactly H x W (crop_pct 1, crop_mode squash: the aspect ratio is not kept and no
    border is cut off, as `views.apply_aug` resizes each crop box).
    """
    h, w = to_2tuple(img_size)
    return {
        "input_size": (3, int(h), int(w)),
        "interpolation": TRAIN_INTERPOLATION,
        "mean": tuple(IMAGENET_MEAN),
        "std": tuple(IMAGENET_STD),
        "crop_pct": 1.0,
        "crop_mode": "squash",
    }


def dpal_vit_tiny(pretrained: bool = False, last_num_heads: int = 12, **kwargs: Any) -> VisionTransformer:
    """ViT-Ti/16 with 6 heads in all blocks but the last, which has `last_num_heads` (12).

    Args:
        pretrained: load the weights that `pretrained_cfg` points to: an exported model folder
            (`timm.create_model("local-dir:FOLDER", pretrained=True)`) or a hub repo; there are no
            published weights of this layout to load otherwise.
        last_num_heads: heads of the last block's attention.
        **kwargs: `VisionTransformer` arguments overriding the defaults (img_size, depth,
            num_classes, ...).

    Returns:
        The model, with all blocks but the last initialised by timm and the last block's new
        attention holding the weights timm initialised for it (or the loaded weights).
    """
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    source = kwargs.pop("pretrained_cfg", None) or {}
    # a hub or local-dir config (a PretrainedCfg or dict); a tag name (str) selects nothing here
    source = source.to_dict() if hasattr(source, "to_dict") else source if isinstance(source, dict) else {}
    if pretrained and not (source.get("file") or source.get("hf_hub_id")):
        raise ValueError(
            f"{DPAL_VIT_TINY} has no published weights; load an exported folder with "
            f'timm.create_model("local-dir:FOLDER", pretrained=True), or create it with pretrained=False'
        )
    for key in ("cache_dir", "pretrained_model_args"):
        kwargs.pop(key, None)
    args: dict[str, Any] = dict(
        img_size=DEFAULT_IMG_SIZE,
        patch_size=16,
        embed_dim=192,
        depth=12,
        num_heads=6,
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        num_classes=0,
    )
    args.update(kwargs)
    model = VisionTransformer(**args)  # LayerNorm eps defaults to 1e-6 in timm's ViT
    _last_block_heads(model, last_num_heads)
    # timm's create_model passes `pretrained_cfg_overlay` on (an export's recorded data config), and
    # a model folder's config.json as `pretrained_cfg` (its input as trained, where the weights are).
    model.pretrained_cfg = {
        "architecture": DPAL_VIT_TINY,
        **data_config(args["img_size"]),
        "num_classes": args["num_classes"],
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **{k: v for k, v in source.items() if v is not None},
        **overlay,
    }
    model.default_cfg = model.pretrained_cfg
    if pretrained:
        from timm.models import load_pretrained

        load_pretrained(model, model.pretrained_cfg, num_classes=args["num_classes"], strict=True)
    return model


def _last_block_heads(model: VisionTransformer, num_heads: int) -> None:
    """Give the last block's attention `num_heads` heads, keeping the weights it holds."""
    last = model.blocks[-1]
    old = last.attn
    qkv_w = old.qkv.weight
    new = Attention(
        qkv_w.shape[1],
        num_heads=num_heads,
        qkv_bias=old.qkv.bias is not None,
        attn_drop=old.attn_drop.p,
        proj_drop=old.proj_drop.p,
        device=qkv_w.device,
        dtype=qkv_w.dtype,
    )
    # Same parameter shapes: keep the initialisation timm gave the 6-head attention.
    new.load_state_dict(old.state_dict(), strict=True)
    last.attn = new


# Importing this module twice (or reloading it) must not re-register, which timm warns about.
if not timm.is_model(DPAL_VIT_TINY):
    register_model(dpal_vit_tiny)


STUDENT_INITS = ("dpal", "timm")


def dpal_init_(model: nn.Module) -> None:
    """Re-initialise a timm ViT student as the authors' pretraining code does (docs/method.md,
    "Student"): xavier-uniform for the patch convolution (as a (d, 3 p p) matrix) and every Linear
    weight (the fused qkv as one (3d, d) matrix), zero Linear biases, LayerNorm (1, 0), the CLS
    token from N(0, 0.02), the position embedding from U[0, 1) (`torch.rand`, never re-initialised
    there) and the patch convolution's bias at PyTorch's default, U(-1/sqrt(3 p p), 1/sqrt(3 p p)).
    Draws from the global RNG (seed it first)."""
    with torch.no_grad():
        proj = model.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        if proj.bias is not None:
            bound = 1 / math.sqrt(proj.weight[0].numel())
            nn.init.uniform_(proj.bias, -bound, bound)
        nn.init.normal_(model.cls_token, std=0.02)
        model.pos_embed.uniform_(0.0, 1.0)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def create_student(
    name: str, img_size: tuple[int, int] = DEFAULT_IMG_SIZE, init: str = "timm", **kw: Any
) -> nn.Module:
    """A randomly initialised, head-less student ViT.

    Args:
        name: `dpal_vit_tiny` or any timm Vision Transformer name (`vit_tiny_patch16_224`, ...).
        img_size: (H, W) the model's native input; its position grid is (H / 16, W / 16).
        init: `timm` keeps timm's initialisation; `dpal` applies the authors' code's (`dpal_init_`),
            what `dpal distill` starts from by default (`--student-init`).
        **kw: extra timm model arguments (depth, num_heads, ...); recorded on the model as
            `dpal_timm_kwargs` so that `dpal.trainer.export` can rebuild it.

    Returns:
        The model (pretrained=False, num_classes=0).

    Raises:
        ValueError: unknown model name, or a model without the ViT attributes DPAL needs.
    """
    if not timm.is_model(name):
        raise InputError(f"unknown timm model {name!r}; use {DPAL_VIT_TINY!r} or a timm ViT name")
    try:
        # The overlay replaces what timm's config says of the input (224 x 224, bicubic, mean 0.5 for
        # most ViTs) by what dpal trains on, so that timm.data.resolve_data_config tells the truth.
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            img_size=tuple(img_size),
            pretrained_cfg_overlay=data_config(img_size),
            **kw,
        )
    except TypeError as err:  # e.g. a CNN that takes no img_size
        raise InputError(f"{name!r} cannot be built as a DPAL student ViT: {err}") from err
    except (ValueError, RuntimeError, AssertionError, ZeroDivisionError) as err:  # e.g. depth -1
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise InputError(
            f"timm cannot build {name!r} with student_kwargs {kw} ({type(err).__name__}: {first}); "
            "fix or drop those keys"
        ) from None
    missing = [a for a in _REQUIRED_ATTRS if getattr(model, a, None) is None]
    if missing:
        raise InputError(
            f"{name!r} is not a timm VisionTransformer with a CLS token and a learned position embedding "
            f"(missing: {missing}); DPAL needs patch_embed, cls_token, pos_embed, blocks and norm"
        )
    if init not in STUDENT_INITS:
        raise InputError(f"student init {init!r}: choose one of {', '.join(STUDENT_INITS)}")
    if init == "dpal":
        dpal_init_(model)
    model.dpal_timm_kwargs = dict(kw)
    return model


def student_tokens(
    model: nn.Module, x: Tensor, patch_mask: Tensor | None = None, mask_token: Tensor | None = None
) -> Tensor:
    """All final normalised tokens of the student at any input size (position grid resized 2-D).

    Args:
        model: a student from `create_student`.
        x: (B, 3, H, W) normalised pixels, H and W divisible by 16.
        patch_mask: (B, N) bool, or None: patch embeddings replaced by `mask_token` (1, 1, d)
            before the position embedding (the proteus recipe's masked branch).
        mask_token: (1, 1, d), with `patch_mask`.

    Returns:
        (B, num_prefix_tokens + N, d): CLS first (then registers, if any), patches row-major.
        Gradients flow into every parameter, `pos_embed` included.
    """
    return vit_tokens(model, x, patch_mask=patch_mask, mask_token=mask_token)


# ---------------------------------------------------------------- activation memory


class _GeluLinear(torch.autograd.Function):
    """fc2(GELU(a)) that keeps only a for the backward pass and recomputes GELU(a) there.

    In a ViT block the MLP's hidden activations are the largest saved tensors: autograd keeps both
    a = fc1(x) (for GELU's backward) and GELU(a) (for fc2's weight gradient), 2 x 4d values per
    token. Recomputing GELU(a) drops one of them: about a quarter of the student's activation
    memory, for one element-wise GELU per block in the backward pass. Same values: the forward is
    the same two operations, and the backward applies the same formulas as autograd's.
    Under autocast, works in the autocast dtype as `F.linear` would.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        device = a.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else a.dtype
        with torch.autocast(device, enabled=False):
            a_c = a.to(dtype)
            out = F.linear(F.gelu(a_c), weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(a, weight)
        ctx.dtype = dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        a, weight = ctx.saved_tensors
        dtype = ctx.dtype
        with torch.autocast(a.device.type, enabled=False):
            a_c = a.to(dtype)
            g = grad.to(dtype).reshape(-1, grad.shape[-1])  # (tokens, out)
            h = F.gelu(a_c).reshape(-1, a.shape[-1])  # (tokens, hidden), recomputed
            grad_h = (g @ weight.to(dtype)).view(a.shape)
            grad_w = (g.t() @ h).to(weight.dtype)  # (out, hidden)
            grad_b = g.sum(dim=0).to(weight.dtype) if ctx.has_bias else None
            grad_a = torch.ops.aten.gelu_backward(grad_h, a_c).to(a.dtype)
        return grad_a, grad_w, grad_b


def _mlp_forward_recompute(self: Mlp, x: Tensor) -> Tensor:
    when = self.dpal_recompute
    if when or (when is None and x.device.type == "cuda"):
        return _GeluLinear.apply(self.fc1(x), self.fc2.weight, self.fc2.bias)
    return self.fc2(self.act(self.fc1(x)))


def recompute_mlp_activations(model: nn.Module, when: bool | None = True) -> int:
    """Make every plain timm MLP of `model` (fc1, exact GELU, fc2, no dropout or norm) recompute its
    GELU in the backward pass (`_GeluLinear`). Parameters and state-dict keys are unchanged.

    Args:
        model: the student.
        when: True always; None only for inputs on a CUDA device; False never.

    Returns:
        How many MLPs were changed (MLPs of another shape are left as they are).
    """
    changed = 0
    for m in model.modules():
        if (
            type(m) is Mlp
            and isinstance(m.act, nn.GELU)
            and m.act.approximate == "none"
            and isinstance(m.norm, nn.Identity)
            and m.drop1.p == 0
            and m.drop2.p == 0
            and isinstance(m.fc1, nn.Linear)
            and isinstance(m.fc2, nn.Linear)
        ):
            m.dpal_recompute = when
            m.forward = types.MethodType(_mlp_forward_recompute, m)
            changed += 1
    return changed
