"""Views: deterministic sampling from (seed, key, view), docs/method.md's paste ranges, crop boxes inside
the image, exact replay, and Ic built as alpha * person + (1 - alpha) * background."""

from __future__ import annotations

import subprocess
import sys

import dpal_tests_stage2_util as u  # registered by conftest.py
import numpy as np
import pytest
import torch
from PIL import Image

from dpal.views import (
    AUG_FIELDS,
    NUM_AUG,
    NUM_PARAMS,
    PARAM_FIELDS,
    ViewRecipe,
    apply_aug,
    background_index,
    normalize,
    random_local,
    replay,
    sample_aug,
    sample_view,
    to_normalized,
    to_unit,
    view_rng,
)

# Hg x Wg global view, Hc x Wc crowd image, Hl x Wl local crop / pasted person
FIELD = {name: i for i, name in enumerate(PARAM_FIELDS)}


def _image(seed: int, h: int, w: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _aug(name: str, params: np.ndarray) -> np.ndarray:
    start = FIELD[f"{name}_top"]
    return params[start : start + NUM_AUG]


def test_param_layout() -> None:
    assert NUM_AUG == len(AUG_FIELDS) == 17
    assert NUM_PARAMS == len(PARAM_FIELDS) == 3 * 17 + 5
    assert PARAM_FIELDS[-4:] == ("a_row", "a_col", "b_row", "b_col")
    assert len(set(PARAM_FIELDS)) == NUM_PARAMS


def test_sample_view_is_deterministic_and_depends_on_seed_key_view(recipe: ViewRecipe) -> None:
    bgs = [(0, (60, 30)), (1, (70, 40)), (2, (50, 25))]
    p = sample_view(recipe, 0, "a.jpg", 0, (60, 30), bgs)
    assert p.shape == (NUM_PARAMS,) and p.dtype == np.float64
    assert np.array_equal(p, sample_view(recipe, 0, "a.jpg", 0, (60, 30), bgs))
    others = [
        sample_view(recipe, 0, "a.jpg", 1, (60, 30), bgs),
        sample_view(recipe, 1, "a.jpg", 0, (60, 30), bgs),
        sample_view(recipe, 0, "b.jpg", 0, (60, 30), bgs),
    ]
    for q in others:
        # the continuous draws (jitter factors, blur sigma) differ whenever the generator differs
        assert not np.array_equal(p, q)
        assert p[FIELD["v0_brightness"]] != q[FIELD["v0_brightness"]]
    # K views of one image: all distinct
    views = np.stack([sample_view(recipe, 0, "a.jpg", k, (60, 30), bgs) for k in range(8)])
    assert len({v.tobytes() for v in views}) == 8
    # (that the stream never depends on process state is test_views_replay_alike_in_a_fresh_process)
    assert view_rng(0, "a.jpg", 0).random() != view_rng(0, "a.jpg", 0, stream="local").random()


def test_paste_positions_follow_method_md_at_paper_sizes() -> None:
    paper = ViewRecipe()  # v0 256 x 128, locals 128 x 96, Ic 256 x 256
    assert (paper.global_size, paper.local_size, paper.crowd_size) == ((256, 128), (128, 96), (256, 256))
    ps = np.stack(
        [
            sample_view(paper, 0, f"img{i}", k, (300, 150), [(0, (300, 300))])
            for i in range(1000)
            for k in range(2)
        ]
    )
    a_row, a_col, b_row, b_col = (ps[:, FIELD[f]].astype(int) for f in ("a_row", "a_col", "b_row", "b_col"))
    # docs/method.md: A row in [0, 127), col in [0, 63); B row in [0, 127), col in [end_col_A, 159)
    assert a_row.min() == 0 and a_row.max() == 126
    assert a_col.min() == 0 and a_col.max() == 62
    assert b_row.min() == 0 and b_row.max() == 126
    assert (b_col >= a_col + 96).all() and b_col.max() == 158
    assert (b_col == a_col + 96).any()  # the lower bound is reached, so it is end_col_A exactly
    # both boxes lie inside Ic and never overlap horizontally
    assert (a_col + 96 <= b_col).all() and (b_col + 96 <= 256).all() and (a_row + 128 <= 256).all()


@pytest.mark.parametrize("image_hw", [(60, 30), (300, 120), (20, 200), (200, 12), (16, 16)])
def test_crop_boxes_lie_inside_the_image(recipe: ViewRecipe, image_hw: tuple[int, int]) -> None:
    bg_hw = (90, 70)
    for i in range(200):
        p = sample_view(recipe, 3, f"k{i}", i % 4, image_hw, [(5, bg_hw)])
        assert background_index(p) == 5
        for name, (h_img, w_img) in (("v0", image_hw), ("a", image_hw), ("bg", bg_hw)):
            top, left, h, w = _aug(name, p)[:4]
            assert 0 <= top and 0 <= left and h >= 1 and w >= 1, (name, top, left, h, w)
            assert top + h <= h_img and left + w <= w_img, (name, image_hw, top, left, h, w)
        if image_hw == (300, 120):  # room for the aspect range: v0's w/h is in person_ratio (0.4, 0.6)
            _, _, h, w = _aug("v0", p)[:4]
            assert 0.4 - 1 / h - 0.01 <= w / h <= 0.6 + 1 / h + 0.01


def test_augmentation_draws_are_in_range(recipe: ViewRecipe) -> None:
    ps = np.stack([sample_view(recipe, 0, f"k{i}", 0, (64, 32), [(0, (64, 64))]) for i in range(400)])
    v0_blur = ps[:, FIELD["v0_blur"]]
    assert (v0_blur >= 0.1).all() and (v0_blur <= 2.0).all()  # global blur p = 1.0
    order = ps[:, FIELD["v0_o0"] : FIELD["v0_o3"] + 1]
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    jit = ps[:, FIELD["v0_jitter"]] == 1
    assert 0.7 < jit.mean() < 0.9  # p 0.8
    assert (ps[jit, FIELD["v0_brightness"]] >= 0.6).all() and (ps[jit, FIELD["v0_brightness"]] <= 1.4).all()
    assert (np.abs(ps[jit, FIELD["v0_hue"]]) <= 0.1).all()
    assert (ps[~jit, FIELD["v0_brightness"]] == 1.0).all() and (ps[~jit, FIELD["v0_hue"]] == 0.0).all()
    assert (ps[:, FIELD["v0_solarize"]] == 0).all() and 0.1 < ps[:, FIELD["bg_solarize"]].mean() < 0.3


def test_apply_aug_identity_and_flip() -> None:
    img = _image(0, 20, 12)
    ident = np.array([0, 0, 20, 12, 0, 0, 1, 1, 1, 0, 0, 1, 2, 3, 0, 0, 0], dtype=np.float64)
    assert np.array_equal(np.asarray(apply_aug(img, ident, (20, 12))), np.asarray(img))
    flip = ident.copy()
    flip[4] = 1
    assert np.array_equal(np.asarray(apply_aug(img, flip, (20, 12))), np.asarray(img)[:, ::-1])
    gray = ident.copy()
    gray[14] = 1
    g = np.asarray(apply_aug(img, gray, (20, 12)))
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    sol = ident.copy()
    sol[16] = 1
    s = np.asarray(apply_aug(img, sol, (20, 12))).astype(int)
    a = np.asarray(img).astype(int)
    assert np.array_equal(s, np.where(a >= 128, 255 - a, a))


def test_replay_is_deterministic_and_builds_ic_by_alpha_blend(recipe: ViewRecipe) -> None:
    img, bg = _image(1, 70, 35), _image(2, 60, 60)
    p = sample_view(recipe, 0, "x", 0, (70, 35), [(9, (60, 60))])
    v0, ic = replay(recipe, p, img, bg)
    assert v0.shape == (3, 32, 16) and ic.shape == (3, 32, 48) and v0.dtype == ic.dtype == torch.float32
    v0b, icb = replay(recipe, p, img.copy(), bg.copy())
    assert torch.equal(v0, v0b) and torch.equal(ic, icb)

    # Ic by hand: background crop, then A (the v2 crop) and B (v0 resized, nearest) blended at 0.7
    lh, lw = recipe.local_size
    back = to_unit(apply_aug(bg, _aug("bg", p), recipe.crowd_size))
    v0_img = apply_aug(img, _aug("v0", p), recipe.global_size)
    person_a = to_unit(apply_aug(img, _aug("a", p), recipe.local_size))
    person_b = to_unit(v0_img.resize((lw, lh), Image.Resampling.NEAREST))
    a_row, a_col, b_row, b_col = (int(p[FIELD[f]]) for f in ("a_row", "a_col", "b_row", "b_col"))
    expected = back.copy()
    alpha = np.float32(0.7)
    for person, r, c in ((person_a, a_row, a_col), (person_b, b_row, b_col)):
        expected[:, r : r + lh, c : c + lw] = (
            alpha * person + (np.float32(1) - alpha) * back[:, r : r + lh, c : c + lw]
        )
    assert torch.equal(ic, normalize(expected))
    assert torch.equal(v0, normalize(to_unit(v0_img)))
    # outside both boxes, Ic is the background alone
    mask = np.ones(recipe.crowd_size, dtype=bool)
    mask[a_row : a_row + lh, a_col : a_col + lw] = False
    mask[b_row : b_row + lh, b_col : b_col + lw] = False
    assert mask.sum() > 0 and torch.equal(
        ic[:, torch.from_numpy(mask)], normalize(back)[:, torch.from_numpy(mask)]
    )


# Draws and replays views of three seeded images and prints one SHA-256 per image over the stream's
# first draw, the view parameters, v0's pixels and Ic's pixels. Run by this process and by a fresh
# interpreter with another hash seed, it must print the same lines everywhere.
VIEW_DIGESTS = """
import hashlib
import numpy as np
from PIL import Image
from dpal.views import ViewRecipe, replay, sample_view, view_rng

recipe = {recipe!r}
for i in range(3):
    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 256, (70 + i, 35, 3), dtype=np.uint8))
    bg = Image.fromarray(rng.integers(0, 256, (60, 60 + i, 3), dtype=np.uint8))
    key = f"photos/{{i}}.jpg"
    p = sample_view(recipe, 7, key, i, img.size[::-1], [(9, bg.size[::-1])])
    v0, ic = replay(recipe, p, img, bg)
    h = hashlib.sha256(view_rng(7, key, i).random(4).tobytes())
    for part in (p.tobytes(), v0.numpy().tobytes(), ic.numpy().tobytes()):
        h.update(part)
    print(h.hexdigest())
"""


@pytest.mark.subprocess
def test_views_replay_alike_in_a_fresh_process(recipe: ViewRecipe) -> None:
    # Another interpreter (other PYTHONHASHSEED, nothing imported or drawn before) must draw the same
    # view parameters and replay the same pixels, byte for byte: stage one replays in its worker
    # processes and stage two in its loader workers what the cache was computed on.
    script = VIEW_DIGESTS.format(recipe=recipe)
    namespace: dict[str, object] = {}
    printed: list[str] = []
    namespace["print"] = printed.append
    exec(compile(script, "<view digests>", "exec"), namespace)
    assert len(printed) == 3 and len(set(printed)) == 3
    # this process hashes str with a random seed (unless PYTHONHASHSEED is set); the child with seed 1
    child = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**u.env(), "PYTHONHASHSEED": "1"},
        cwd=u.REPO_ROOT,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == printed


def test_normalize_uses_imagenet_stats() -> None:
    x = np.full((3, 2, 2), 0.5, dtype=np.float32)
    y = normalize(x)
    expected = (0.5 - np.array([0.485, 0.456, 0.406], dtype=np.float32)) / np.array(
        [0.229, 0.224, 0.225], dtype=np.float32
    )
    assert torch.equal(y[:, 0, 0], torch.from_numpy(expected.astype(np.float32)))
    assert y.shape == (3, 2, 2) and y.dtype == torch.float32


def test_random_local_is_seeded(recipe: ViewRecipe) -> None:
    img = _image(4, 64, 32)
    a = random_local(recipe, np.random.default_rng(5), img)
    b = random_local(recipe, np.random.default_rng(5), img)
    c = random_local(recipe, np.random.default_rng(6), img)
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    # the same pixels as the reference path, to_unit then normalize
    rng = np.random.default_rng(5)
    aug = sample_aug(rng, recipe, (64, 32), recipe.local_scale, recipe.person_ratio, recipe.local_blur_p)
    assert torch.equal(a, normalize(to_unit(apply_aug(img, aug, recipe.local_size))))


def test_to_normalized_is_normalize_of_to_unit_bit_for_bit() -> None:
    # every uint8 value in every channel, each channel in a different order, plus a random image
    v = np.arange(256, dtype=np.uint8)
    ramp = np.stack([v, v[::-1], np.roll(v, 77)], axis=-1).reshape(16, 16, 3)
    for arr in (ramp, np.asarray(_image(7, 33, 17))):
        img = Image.fromarray(arr)
        out = to_normalized(img)
        assert out.shape == (3, *arr.shape[:2]) and out.dtype == torch.float32 and out.is_contiguous()
        assert torch.equal(out, normalize(to_unit(img)))


def test_recipe_validation_and_round_trip(recipe: ViewRecipe) -> None:
    assert ViewRecipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="crowd_size"):
        ViewRecipe(crowd_size=(256, 192))  # 192 < 2 * 96 + 2: two persons do not fit side by side
    with pytest.raises(ValueError, match="global_size"):
        ViewRecipe(global_size=(0, 128))
    with pytest.raises(ValueError, match="flip_p"):
        ViewRecipe(flip_p=1.5)
    with pytest.raises(ValueError, match="unknown view keys"):
        ViewRecipe.from_dict({"global_sise": [1, 2]})
