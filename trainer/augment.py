"""Stage two's device-side batch work: a loader batch (uint8 pixels, view parameters, stored targets)
-> the model's float32 inputs, batched, on the training device.

A DataLoader worker (trainer.data.BatchDataset) ships what only the CPU can make cheaply: the PIL
replay of v0 and of Ic's parts as uint8 (views.replay_pixels, the pixels the teacher saw), the
local crops' parameters with their decoded source images, and the targets in the store's dtype.
This module does the rest where the step runs:

- `compose_views`: v0 and Ic as ImageNet-normalised float32, bit for bit `views.replay`'s. Every
  float operation of replay is element-wise on uint8 inputs, so each output value is a function of
  one uint8 value (v0, Ic outside the pasted boxes) or of one (person, background) pair (inside).
  Those functions are tabulated once by numpy with replay's own expressions (256 and 256 x 256
  values per channel) and looked up here. A lookup has no arithmetic, so the bits cannot depend on
  the device, its kernels (CUDA divides by a scalar as a multiply by its reciprocal) or on fused
  multiply-adds.
- `local_crops`: v1 and v2 from per-image parameters drawn in the worker exactly as before
  (views.sample_local), applied as a batch in float32 (see the function for where it deviates from
  the PIL reference, views.random_local).
- the targets: the store's codecs decode them (`dpal.store.codecs`: float16 / bfloat16 / int8 (+
  scale) -> float32, `store.decode`'s values; int8-rotated tokens rotated back with the store's R,
  one batched matmul on the device; a factor store's relation (Z, diagonal) becomes the row-shifted
  logits).

Shapes: B images, (Hg, Wg) v0, (Hl, Wl) local crops and persons, (Hc, Wc) Ic, (Hs, Ws) the batch's
largest source image.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align

from dpal.common import IMAGENET_MEAN, IMAGENET_STD
from dpal.store import GLOBAL, LOCAL, RELATION, Layout
from dpal.views import ViewRecipe, normalize, to_unit

# ITU-R 601-2 luma, PIL's convert("L") and torchvision's rgb_to_grayscale
_LUMA = (0.299, 0.587, 0.114)
_NO_PERSON = 256  # person code of an Ic pixel outside both pasted boxes


# ---------------------------------------------------------------- exact v0 and Ic


def _value_image(rows: np.ndarray, cols: np.ndarray) -> tuple[Image.Image, Image.Image]:
    """Two RGB images of shape (len(rows), len(cols)) whose pixels are rows[i] and cols[j]."""
    r = np.broadcast_to(rows[:, None, None], (len(rows), len(cols), 3)).astype(np.uint8)
    c = np.broadcast_to(cols[None, :, None], (len(rows), len(cols), 3)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(r)), Image.fromarray(np.ascontiguousarray(c))


@lru_cache(maxsize=4)
def _tables(alpha: float) -> np.ndarray:
    """(3, 257, 256) float32: [c, p, g] is the normalised Ic value of channel c where person value p
    is pasted over background value g, computed by `views.replay`'s expressions; row p = 256 is the
    background alone (`to_normalized`'s value of g, which is also v0's table)."""
    values = np.arange(256, dtype=np.uint8)
    person, background = _value_image(values, values)  # pixel (p, g) holds p and g
    a = np.float32(alpha)
    blended = a * to_unit(person) + (np.float32(1.0) - a) * to_unit(background)  # (3, 256, 256)
    out = np.empty((3, 257, 256), dtype=np.float32)
    out[:, :256] = normalize(blended).numpy()
    out[:, 256] = normalize(to_unit(background))[:, 0].numpy()
    return out


_DEVICE_TABLES: dict[tuple[float, str], Tensor] = {}


def _table(alpha: float, device: torch.device) -> Tensor:
    """`_tables(alpha)` flattened, on `device` (kept: 790 KB)."""
    key = (float(alpha), str(device))
    if key not in _DEVICE_TABLES:
        _DEVICE_TABLES[key] = torch.from_numpy(_tables(float(alpha)).reshape(-1)).to(device)
    return _DEVICE_TABLES[key]


def _channels_first(x: Tensor) -> Tensor:
    """(B, H, W, 3) -> contiguous (B, 3, H, W): element-wise ops then run over long rows (a last
    dimension of 3 makes every CPU kernel loop three elements at a time, 30-100x slower)."""
    return x.permute(0, 3, 1, 2).contiguous()


def _take(table: Tensor, code: Tensor) -> Tensor:
    """table[code] for an int32 code tensor of any shape (index_select: 4x faster than take on CPU)."""
    return table.index_select(0, code.reshape(-1)).view(code.shape)


def _box_positions(shape: tuple[int, ...], rows: Tensor, cols: Tensor, box: tuple[int, int]) -> Tensor:
    """Flat positions (B, 3, Hl, Wl) in a contiguous (B, 3, Hc, Wc) tensor of the box of size `box`
    whose top-left corner is at (rows, cols) (B,) in each image."""
    b, c, hc, wc = shape
    hl, wl = box
    dev = rows.device
    plane = (
        torch.arange(b, device=dev).view(b, 1, 1, 1) * c + torch.arange(c, device=dev).view(1, c, 1, 1)
    ) * (hc * wc)
    r = rows.view(b, 1, 1, 1) + torch.arange(hl, device=dev).view(1, 1, hl, 1)
    col = cols.view(b, 1, 1, 1) + torch.arange(wl, device=dev).view(1, 1, 1, wl)
    return plane + r * wc + col


def _channel_codes(device: torch.device) -> Tensor:
    """(1, 3, 1, 1) int32: channel c's offset c * 257 * 256 in the flat table. The code of
    table[c, p, g] is (c * 257 + p) * 256 + g, int32 (index_select's fast path on CPU); p = 256 is
    "no person"."""
    return torch.arange(3, device=device, dtype=torch.int32).view(1, 3, 1, 1) * (257 * 256)


def compose_v0(v0: Tensor, alpha: float) -> Tensor:
    """v0 alone (B, Hg, Wg, 3) uint8 -> (B, 3, Hg, Wg) float32, `compose_views`' v0 bit for bit."""
    alone = _channel_codes(v0.device) + _NO_PERSON * 256
    return _take(_table(alpha, v0.device), _channels_first(v0).int() + alone)


def compose_views(
    v0: Tensor, background: Tensor, person_a: Tensor, person_b: Tensor, paste: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """v0 and Ic as `views.replay` makes them, bit for bit, from their uint8 parts.

    Args:
        v0: (B, Hg, Wg, 3) uint8.
        background: (B, Hc, Wc, 3) uint8, Ic's augmented background.
        person_a, person_b: (B, Hl, Wl, 3) uint8.
        paste: (B, 4) integer (a_row, a_col, b_row, b_col), `views.paste_positions`.
        alpha: the recipe's person_alpha.

    Returns:
        v0 (B, 3, Hg, Wg) and Ic (B, 3, Hc, Wc), ImageNet-normalised float32.
    """
    table = _table(alpha, v0.device)
    channel = _channel_codes(v0.device)
    alone = channel + _NO_PERSON * 256
    v0_out = _take(table, _channels_first(v0).int() + alone)
    bg = _channels_first(background).int()
    ic = _take(table, bg + alone)
    paste = paste.long()
    hl, wl = person_a.shape[1:3]
    # A and B never overlap (B starts right of A's box), so the order of the two pastes is free
    for person, rows, cols in ((person_a, paste[:, 0], paste[:, 1]), (person_b, paste[:, 2], paste[:, 3])):
        pos = _box_positions(tuple(bg.shape), rows, cols, (hl, wl)).view(-1)
        code = _channels_first(person).int() * 256
        code += bg.view(-1).index_select(0, pos).view(code.shape)
        code += channel
        ic.view(-1).index_copy_(0, pos, _take(table, code).view(-1))
    return v0_out, ic


# ---------------------------------------------------------------- local crops


def _gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def _per_image(f: Tensor) -> Tensor:
    return f.view(-1, 1, 1, 1)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * _per_image(f)).clamp_(0.0, 1.0)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)  # (N, 1, 1, 1)
    return (_per_image(f) * x + (1.0 - _per_image(f)) * mean).clamp_(0.0, 1.0)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    return (_per_image(f) * x + (1.0 - _per_image(f)) * _gray(x)).clamp_(0.0, 1.0)


def _hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of (N, 3, H, W) in [0, 1] by `shift` (N,) turns, through HSV (value and
    saturation kept; HSV -> RGB in its closed form: c = v - v s clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6 h) mod 6, n = 5, 3, 1 for r, g, b)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = torch.maximum(torch.maximum(r, g), b)  # (N, 1, H, W)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    d = torch.where(delta > 0, delta, 1.0)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, h, 0.0) / 6.0 + shift.view(-1, 1, 1, 1)  # turns, any real
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + 6.0 * h) % 6.0  # (N, 3, H, W)
    # v s = delta: the chroma
    return maxc - delta * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


_JITTER = (_brightness, _contrast, _saturation, _hue)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def _blur(x: Tensor, sigma: Tensor, radius: int | None = None) -> Tensor:
    """Gaussian blur of (N, 3, H, W) with per-image `sigma` (N,) pixels: a separable, depthwise
    convolution, kernel radius ceil(3 * max sigma) (pass it when sigma is on a GPU: no sync),
    edges replicated (PIL extends edge pixels)."""
    n, c, h, w = x.shape
    if radius is None:
        radius = max(1, math.ceil(3.0 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N * 3, 2r + 1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def local_crops(source: Tensor, augs: Tensor, size: tuple[int, int]) -> Tensor:
    """Local crops from per-image parameters, batched: what `views.random_local` does with PIL.

    Args:
        source: (B, Hs, Ws, 3) uint8 decoded images, each at the top left and padded to the batch's
            largest by repeating its last row and column (bilinear sampling at the right and
            bottom edges then sees the edge pixel, as PIL's clamped filter does).
        augs: (N, NUM_AUG) float64 on the CPU, `views.sample_local` parameters; crop n is cut from
            image n % B (so N = 2B gives v1 of every image, then v2).
        size: (Hl, Wl).

    Returns:
        (N, 3, Hl, Wl) ImageNet-normalised float32 on source's device.

    Deviations from the PIL reference (values differ by a few grey levels; tests bound them): the
    crop is resampled by `roi_align` (aligned, ceil(box / size) bilinear samples per output pixel
    and axis, averaged) instead of PIL's triangle filter; values stay float in [0, 1] between the
    operations instead of being rounded to uint8 after each; contrast blends with the float mean of
    the luma instead of PIL's integer mean; the blur is a true gaussian truncated at 3 sigma instead
    of PIL's three box passes. The parameters, the order of the jitter operations per image and
    which operations apply are those of the PIL version.
    """
    device = source.device
    b = source.shape[0]
    n = augs.shape[0]
    augs = augs.detach().to("cpu", torch.float64)
    x = _channels_first(source).float().div_(255.0)  # (B, 3, Hs, Ws)
    top, left, h, w = augs[:, 0], augs[:, 1], augs[:, 2], augs[:, 3]
    boxes = torch.stack([torch.arange(n, dtype=torch.float64) % b, left, top, left + w, top + h], 1)
    out = roi_align(
        x,
        boxes.to(device, torch.float32),
        output_size=size,
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )  # (N, 3, Hl, Wl)

    def apply(mask: Tensor, op, *factors: Tensor) -> None:
        """out[mask] = op(out[mask], *factors[mask]); masks live on the CPU (no device sync)."""
        sel = torch.nonzero(mask).flatten()
        if len(sel):
            dev_sel = sel.to(device)
            out[dev_sel] = op(out[dev_sel], *(f[sel].to(device, torch.float32) for f in factors))

    apply(augs[:, 4] > 0, lambda t: t.flip(-1))
    jittered = augs[:, 5] > 0
    order = augs[:, 10:14].long()
    for j in range(4):  # the j-th jitter operation of each image, in its own order
        for o, op in enumerate(_JITTER):
            apply(jittered & (order[:, j] == o) & (augs[:, 6 + o] != _IDENTITY[o]), op, augs[:, 6 + o])
    apply(augs[:, 14] > 0, lambda t: _gray(t).expand(-1, 3, -1, -1).clone())
    blur = augs[:, 15] > 0
    if blur.any():
        radius = max(1, math.ceil(3.0 * float(augs[blur, 15].max())))
        apply(blur, lambda t, sigma: _blur(t, sigma, radius), augs[:, 15])
    apply(augs[:, 16] > 0, lambda t: torch.where(t >= 128 / 255, 1.0 - t, t))
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (out - mean) / std


# ---------------------------------------------------------------- the whole batch


def model_inputs(
    batch: dict[str, Tensor],
    recipe: ViewRecipe,
    device: torch.device,
    layout: Layout | None = None,
    rotation: Tensor | None = None,
) -> dict[str, Tensor]:
    """A `BatchDataset` batch -> the model's inputs on `device`: index, v0, v1, v2, ic (float32,
    normalised; v1, v2 and ic when the batch has their parts, BatchDataset's `needs`), and the
    targets it has, g_t, local_t, rel_t (float32, decoded by the codecs of the store's `layout`),
    and mask. `rotation`: a rotated codec's R (D, D) on `device` (`BatchDataset.rotation_on`),
    which g_t and local_t are rotated back by."""
    on = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "local_aug"}
    out = {"index": on["index"]}
    if "bg_u8" in on:
        out["v0"], out["ic"] = compose_views(
            on["v0_u8"], on["bg_u8"], on["pa_u8"], on["pb_u8"], on["paste"], recipe.person_alpha
        )
    else:
        out["v0"] = compose_v0(on["v0_u8"], recipe.person_alpha)
    if "local_aug" in batch:
        b = out["v0"].shape[0]
        augs = batch["local_aug"]  # (B, 2, NUM_AUG), stays on the CPU: it only steers the batched ops
        local = local_crops(on["src_u8"], torch.cat([augs[:, 0], augs[:, 1]]), recipe.local_size)
        out.update(v1=local[:b], v2=local[b:])
    for name, feature in (("g_t", GLOBAL), ("local_t", LOCAL)):
        if name in on:
            out[name] = layout.codec(feature).decode(on[name], on.get(name + "_scale"), rotation)
    if "rel_t" in on:  # the logits (never rotated), or a factor store's Z and diagonal: one matmul
        out["rel_t"] = layout.relation.decode(
            layout.codec(RELATION), on["rel_t"], on.get("rel_t_scale"), on.get("rel_t_diag")
        )
    if "mask" in on:
        out["mask"] = on["mask"]
    return out
