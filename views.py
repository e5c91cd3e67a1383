"""The view recipe: sample the parameters of DPAL's views, and replay parameters into pixels.

Both stages use this module. Stage one samples the parameters of the two views the teacher sees,
the global view v0 and the synthetic two-person crowd image Ic, from (seed, image key, view index),
replays them into pixels, runs the teacher and stores the parameters beside the targets. Stage two
replays the stored parameters and so sees bit-for-bit the same pixels. Every pixel operation is a
PIL operation on uint8 images (integer arithmetic, no thread-dependent reductions) followed by
element-wise float32 arithmetic, so replay is identical in any process on any machine that has the
same Pillow version. The local crops v1, v2 are only seen by the student: their parameters are drawn
fresh with `sample_local` from a generator the caller seeds; stage two applies them on the training
device (trainer.augment), `random_local` is the PIL reference.

A view's parameters are one float64 vector laid out as `PARAM_FIELDS` (integers are exact in
float64): the v0 augmentation, the augmentation of the v2 crop pasted into Ic (person A), the
background image (its store index) and its augmentation, and the two paste positions.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torch import Tensor

from dpal.common import IMAGENET_MEAN, IMAGENET_STD
from dpal.config import ViewRecipe

# One augmentation: a RandomResizedCrop box in source pixels, then flip, colour jitter (four factors
# applied in the order o0..o3 when `jitter` is 1), grayscale, gaussian blur (sigma 0 = none),
# solarize. Order of operations is that of the DPAL/DINO pipelines.
AUG_FIELDS = (
    "top", "left", "height", "width", "flip", "jitter", "brightness", "contrast", "saturation",
    "hue", "o0", "o1", "o2", "o3", "gray", "blur", "solarize",
)  # fmt: skip
NUM_AUG = len(AUG_FIELDS)
PARAM_FIELDS = (
    tuple(f"v0_{f}" for f in AUG_FIELDS)
    + tuple(f"a_{f}" for f in AUG_FIELDS)
    + ("bg_index",)
    + tuple(f"bg_{f}" for f in AUG_FIELDS)
    + ("a_row", "a_col", "b_row", "b_col")
)
NUM_PARAMS = len(PARAM_FIELDS)
_V0 = slice(0, NUM_AUG)
_A = slice(NUM_AUG, 2 * NUM_AUG)
_BG_INDEX = 2 * NUM_AUG
_BG = slice(2 * NUM_AUG + 1, 3 * NUM_AUG + 1)
_PASTE = slice(3 * NUM_AUG + 1, 3 * NUM_AUG + 5)


def view_rng(seed: int, key: str, view: int, stream: str = "view") -> np.random.Generator:
    """A generator that depends only on (seed, key, view, stream), never on process or order."""
    digest = hashlib.sha256(f"{stream}\x00{seed}\x00{view}\x00{key}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def _crop_box(rng: np.random.Generator, hw: tuple[int, int], scale, ratio) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box: (top, left, height, width) with area and aspect in range."""
    h_img, w_img = hw
    area = h_img * w_img
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= w_img and 0 < h <= h_img:
            top = int(rng.integers(0, h_img - h + 1))
            left = int(rng.integers(0, w_img - w + 1))
            return top, left, h, w
    # Fallback: the whole image clipped to the aspect range, centred.
    in_ratio = w_img / h_img
    if in_ratio < ratio[0]:
        w, h = w_img, int(round(w_img / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = h_img, int(round(h_img * ratio[1]))
    else:
        w, h = w_img, h_img
    return (h_img - h) // 2, (w_img - w) // 2, h, w


def sample_aug(
    rng: np.random.Generator,
    recipe: ViewRecipe,
    image_hw: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    blur_p: float,
    solarize_p: float = 0.0,
) -> np.ndarray:
    """Draw one augmentation's parameters, laid out as AUG_FIELDS. Draw order is fixed."""
    top, left, h, w = _crop_box(rng, image_hw, scale, ratio)
    flip = float(rng.random() < recipe.flip_p)
    jitter = float(rng.random() < recipe.jitter_p)
    b, c, s, hue = recipe.jitter
    factors = (
        rng.uniform(max(0.0, 1 - b), 1 + b),
        rng.uniform(max(0.0, 1 - c), 1 + c),
        rng.uniform(max(0.0, 1 - s), 1 + s),
        rng.uniform(-hue, hue),
    )
    order = rng.permutation(4)
    if not jitter:
        factors, order = (1.0, 1.0, 1.0, 0.0), np.arange(4)
    gray = float(rng.random() < recipe.gray_p)
    blur_draw = rng.random()
    sigma = rng.uniform(*recipe.blur_sigma)
    blur = sigma if blur_draw < blur_p else 0.0
    solarize = float(rng.random() < solarize_p)
    return np.array([top, left, h, w, flip, jitter, *factors, *order, gray, blur, solarize], dtype=np.float64)


def sample_view(
    recipe: ViewRecipe,
    seed: int,
    key: str,
    view: int,
    image_hw: tuple[int, int],
    backgrounds: list[tuple[int, tuple[int, int]]],
) -> np.ndarray:
    """Parameters of view `view` of image `key`: v0 and Ic (with its v2 crop), as PARAM_FIELDS.

    Args:
        recipe: the view recipe.
        seed: the run's seed.
        key: the image's stable key.
        view: view index in [0, K).
        image_hw: (H, W) of the decoded image.
        backgrounds: candidates for Ic's background, as (store index, (H, W)); stage one passes
            the other decodable images of the same store shard (the image itself if alone).
    """
    if not backgrounds:
        raise ValueError("sample_view needs at least one background candidate")
    rng = view_rng(seed, key, view)
    v0 = sample_aug(rng, recipe, image_hw, recipe.global_scale, recipe.person_ratio, recipe.global_blur_p)
    a = sample_aug(rng, recipe, image_hw, recipe.local_scale, recipe.person_ratio, recipe.local_blur_p)
    bg_index, bg_hw = backgrounds[int(rng.integers(0, len(backgrounds)))]
    bg = sample_aug(
        rng,
        recipe,
        bg_hw,
        recipe.crowd_scale,
        recipe.crowd_ratio,
        recipe.crowd_blur_p,
        recipe.crowd_solarize_p,
    )
    ch, cw = recipe.crowd_size
    lh, lw = recipe.local_size
    # docs/method.md: A at row [0, 127), col [0, 63); B at row [0, 127), col [end_col_A, 159) for 256/128x96.
    a_row = int(rng.integers(0, ch - lh - 1))
    a_col = int(rng.integers(0, cw - 2 * lw - 1))
    b_row = int(rng.integers(0, ch - lh - 1))
    b_col = int(rng.integers(a_col + lw, cw - lw - 1))
    return np.concatenate([v0, a, [bg_index], bg, [a_row, a_col, b_row, b_col]]).astype(np.float64)


def background_index(params: np.ndarray) -> int:
    """The store index of the image that Ic's background is cut from."""
    return int(params[_BG_INDEX])


def apply_aug(image: Image.Image, aug: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """Replay one augmentation (AUG_FIELDS) on an RGB image; returns an RGB image of `size` (H, W)."""
    top, left, h, w = (int(v) for v in aug[0:4])
    out = image.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if aug[4]:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if aug[5]:
        b, c, s, hue = (float(v) for v in aug[6:10])
        ops = (
            lambda im: TF.adjust_brightness(im, b),
            lambda im: TF.adjust_contrast(im, c),
            lambda im: TF.adjust_saturation(im, s),
            lambda im: TF.adjust_hue(im, hue),
        )
        for o in aug[10:14]:
            out = ops[int(o)](out)
    if aug[14]:
        out = out.convert("L").convert("RGB")
    if aug[15] > 0:
        out = out.filter(ImageFilter.GaussianBlur(radius=float(aug[15])))
    if aug[16]:
        out = ImageOps.solarize(out, threshold=128)
    return out


def to_unit(image: Image.Image) -> np.ndarray:
    """uint8 RGB image -> (3, H, W) float32 in [0, 1]."""
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)


def normalize(x: np.ndarray) -> Tensor:
    """(3, H, W) float32 in [0, 1] -> ImageNet-normalised tensor."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return torch.from_numpy(np.ascontiguousarray((x - mean) / std))


def _normalized_u8_table() -> np.ndarray:
    """(3, 256): `normalize(to_unit(image))` of every uint8 value in each channel, computed by those
    very functions, so that a lookup gives the same float32 bits (the arithmetic is element-wise)."""
    every_value = Image.fromarray(np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(1, 256, 3))
    return normalize(to_unit(every_value)).reshape(3, 256).numpy()


_NORMALIZED_U8 = _normalized_u8_table()


def to_normalized(image: Image.Image) -> Tensor:
    """uint8 RGB image -> ImageNet-normalised (3, H, W) float32; equals `normalize(to_unit(image))`
    bit for bit, by table lookup (about 3x faster)."""
    a = np.asarray(image)  # (H, W, 3) uint8
    out = np.empty((3, *a.shape[:2]), dtype=np.float32)
    for c in range(3):
        np.take(_NORMALIZED_U8[c], a[..., c], out=out[c])
    return torch.from_numpy(out)


def replay_v0(recipe: ViewRecipe, params: np.ndarray, image: Image.Image) -> Image.Image:
    """v0 alone (Hg, Wg) RGB, as `replay_pixels` makes it (for a run that reads no Ic)."""
    return apply_aug(image, params[_V0], recipe.global_size)


def replay_pixels(
    recipe: ViewRecipe, params: np.ndarray, image: Image.Image, background: Image.Image
) -> tuple[Image.Image, Image.Image, Image.Image, Image.Image]:
    """The PIL part of `replay`: the uint8 images that v0 and Ic are made of.

    Returns:
        v0 (Hg, Wg), person A (the v2 crop, Hl x Wl), person B (v0 resized nearest, Hl x Wl) and the
        augmented background of Ic (Hc, Wc), all RGB. `replay` blends them; stage two ships them as
        uint8 and blends on the training device (trainer.augment.compose_views, the same float32 bits).
    """
    lh, lw = recipe.local_size
    v0 = replay_v0(recipe, params, image)
    person_a = apply_aug(image, params[_A], recipe.local_size)  # the v2 crop
    person_b = v0.resize((lw, lh), Image.Resampling.NEAREST)
    crowd = apply_aug(background, params[_BG], recipe.crowd_size)
    return v0, person_a, person_b, crowd


def paste_positions(params: np.ndarray) -> tuple[int, int, int, int]:
    """(a_row, a_col, b_row, b_col): where persons A and B go in Ic (top-left corners)."""
    a_row, a_col, b_row, b_col = (int(v) for v in params[_PASTE])
    return a_row, a_col, b_row, b_col


def replay(
    recipe: ViewRecipe, params: np.ndarray, image: Image.Image, background: Image.Image
) -> tuple[Tensor, Tensor]:
    """Rebuild v0 and Ic from stored parameters.

    Args:
        recipe: the recipe the parameters were drawn with.
        params: (NUM_PARAMS,) float64, one view's PARAM_FIELDS.
        image: the decoded RGB image.
        background: the decoded RGB image at `background_index(params)`.

    Returns:
        v0 (3, Hg, Wg) and Ic (3, Hc, Wc), ImageNet-normalised float32.
    """
    lh, lw = recipe.local_size
    v0, person_a, person_b, background_aug = replay_pixels(recipe, params, image, background)
    crowd = to_unit(background_aug)  # (3, Hc, Wc)
    alpha = np.float32(recipe.person_alpha)
    a_row, a_col, b_row, b_col = paste_positions(params)
    for person, r, c in ((person_a, a_row, a_col), (person_b, b_row, b_col)):
        box = crowd[:, r : r + lh, c : c + lw]
        crowd[:, r : r + lh, c : c + lw] = alpha * to_unit(person) + (np.float32(1.0) - alpha) * box
    return to_normalized(v0), normalize(crowd)


def sample_local(recipe: ViewRecipe, rng: np.random.Generator, image_hw: tuple[int, int]) -> np.ndarray:
    """The parameters (AUG_FIELDS) of one fresh local crop (v1 or v2) of an image of `image_hw`."""
    return sample_aug(rng, recipe, image_hw, recipe.local_scale, recipe.person_ratio, recipe.local_blur_p)


def random_local(recipe: ViewRecipe, rng: np.random.Generator, image: Image.Image) -> Tensor:
    """A fresh local crop (v1 or v2) for the student, ImageNet-normalised (3, Hl, Wl), by PIL.

    Stage two draws the same parameters (`sample_local`) but applies them on the training device
    (trainer.augment.local_crops); this PIL version is the reference that one is compared with."""
    aug = sample_local(recipe, rng, (image.height, image.width))
    return to_normalized(apply_aug(image, aug, recipe.local_size))
