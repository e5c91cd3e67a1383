"""Device-side batch work (trainer.augment): v0 and Ic equal views.replay bit for bit, stored targets
decode to store.decode's values, the batched local crops are deterministic and each of their
operations computes what it says, and a batch is the same whatever the number of DataLoader workers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dpal_tests_stage2_util as u  # registered by conftest.py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dpal.corpus import decode_image
from dpal.store import StoreReader
from dpal.trainer import augment
from dpal.trainer.data import BatchDataset, EpochSampler, collate_requests, valid_rows
from dpal.views import (
    AUG_FIELDS,
    NUM_AUG,
    ViewRecipe,
    normalize,
    paste_positions,
    random_local,
    replay,
    replay_pixels,
    sample_view,
    to_normalized,
    to_unit,
    view_rng,
)

REPO = Path(__file__).resolve().parent.parent
SAMPLE = sorted((REPO / "sample_data" / "corpus").rglob("*.jpg"))[:6]
FIELD = {name: i for i, name in enumerate(AUG_FIELDS)}
CPU = torch.device("cpu")


def _u8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image))[None]  # (1, H, W, 3)


def _identity_aug(top: int, left: int, h: int, w: int) -> np.ndarray:
    aug = np.zeros(NUM_AUG)
    aug[[FIELD["top"], FIELD["left"], FIELD["height"], FIELD["width"]]] = (top, left, h, w)
    aug[[FIELD["brightness"], FIELD["contrast"], FIELD["saturation"]]] = 1.0
    aug[[FIELD["o0"], FIELD["o1"], FIELD["o2"], FIELD["o3"]]] = (0, 1, 2, 3)
    return aug


def _images() -> list[Image.Image]:
    """Real photographs (sample_data/corpus), else seeded noise."""
    if SAMPLE:
        return [decode_image(p.read_bytes()) for p in SAMPLE]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (160, 80, 3), dtype=np.uint8)) for _ in range(6)]


# ---------------------------------------------------------------- exact v0 and Ic


@pytest.mark.parametrize(
    "recipe",
    [
        ViewRecipe(),
        ViewRecipe(global_size=(32, 16), local_size=(16, 16), crowd_size=(32, 48), person_alpha=0.55),
    ],
)
def test_compose_views_equals_replay_bit_for_bit(recipe: ViewRecipe) -> None:
    images = _images()
    hws = [(im.height, im.width) for im in images]
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("v0", "pa", "pb", "bg", "paste")}
    ref_v0, ref_ic = [], []
    for view in range(8):  # 8 views x 6 images: every jitter op, gray, blur and solarize occur
        for i, im in enumerate(images):
            p = sample_view(recipe, 3, f"img{i}", view, hws[i], list(enumerate(hws)))
            bg = images[int(p[2 * NUM_AUG])]
            v0, ic = replay(recipe, p, im, bg)
            ref_v0.append(v0)
            ref_ic.append(ic)
            for k, x in zip(("v0", "pa", "pb", "bg"), replay_pixels(recipe, p, im, bg), strict=True):
                parts[k].append(_u8(x))
            parts["paste"].append(torch.tensor([paste_positions(p)]))
    cat = {k: torch.cat(v) for k, v in parts.items()}
    v0, ic = augment.compose_views(
        cat["v0"], cat["bg"], cat["pa"], cat["pb"], cat["paste"], recipe.person_alpha
    )
    assert v0.dtype == ic.dtype == torch.float32
    assert torch.equal(v0, torch.stack(ref_v0))
    assert torch.equal(ic, torch.stack(ref_ic))


def test_compose_views_tables_every_person_background_pair() -> None:
    # persons A and B side by side cover a 256 x 512 background: pixel (p, g) of A's box pastes value
    # p over value g, so every pair of uint8 values occurs in every channel
    values = np.arange(256, dtype=np.uint8)
    person = torch.from_numpy(np.repeat(np.repeat(values[:, None, None], 256, 1), 3, 2))[None]  # row = p
    bg = torch.from_numpy(np.repeat(np.tile(values[None, :, None], (256, 2, 1)), 3, 2))[None]  # col = g
    alpha = 0.7
    _, ic = augment.compose_views(person, bg, person, person, torch.tensor([[0, 0, 0, 256]]), alpha)
    a = np.float32(alpha)
    crowd = a * to_unit(Image.fromarray(person[0].numpy())) + (np.float32(1) - a) * to_unit(
        Image.fromarray(bg[0, :, :256].numpy())
    )
    expected = normalize(crowd)
    assert torch.equal(ic[0, :, :, :256], expected) and torch.equal(ic[0, :, :, 256:], expected)
    # outside the boxes, and for v0, the value is to_normalized's
    empty = torch.zeros((1, 4, 4, 3), dtype=torch.uint8)
    v0, ic = augment.compose_views(bg, bg, empty, empty, torch.tensor([[0, 0, 0, 4]]), alpha)
    whole = to_normalized(Image.fromarray(bg[0].numpy()))
    assert torch.equal(v0[0], whole) and torch.equal(ic[0, :, 4:], whole[:, 4:])


# ---------------------------------------------------------------- local crops


def _pad(images: list[Image.Image]) -> torch.Tensor:
    from dpal.trainer.data import _pad_sources

    return _pad_sources([np.asarray(im) for im in images])["src_u8"]


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406]).view(-1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(-1, 3, 1, 1)
    return x * std + mean


def _local_params(recipe: ViewRecipe, images: list[Image.Image], seed: int = 0) -> torch.Tensor:
    from dpal.views import sample_local

    out = []
    for i, im in enumerate(images):
        rng = view_rng(seed, str(i), 0, stream="local")
        out.append([sample_local(recipe, rng, (im.height, im.width)) for _ in range(2)])
    a = torch.tensor(np.array(out))  # (B, 2, NUM_AUG)
    return torch.cat([a[:, 0], a[:, 1]])


def test_identity_parameters_give_the_plain_resized_crop() -> None:
    images = _images()[:3]
    src = _pad(images)
    # the whole image at its own size: exactly the normalised pixels
    im = images[0]
    whole = augment.local_crops(
        src[:1], torch.tensor(_identity_aug(0, 0, im.height, im.width))[None], (im.height, im.width)
    )
    assert torch.equal(whole[0], to_normalized(im))
    # a 2h x 2w box down to h x w: the mean of each 2 x 2 block (roi_align samples the four centres)
    box = torch.tensor(
        np.stack([_identity_aug(10, 6, 64, 32), _identity_aug(0, 0, 32, 48), _identity_aug(20, 10, 40, 40)])
    )
    for k, size in enumerate([(32, 16), (16, 24), (20, 20)]):
        out = augment.local_crops(src, box, size)[k]
        top, left, h, w = (int(v) for v in box[k, :4])
        unit = torch.from_numpy(to_unit(images[k]))[:, top : top + h, left : left + w]
        expected = F.avg_pool2d(unit[None], 2)[0]
        torch.testing.assert_close(_unnormalize(out[None])[0], expected, rtol=0, atol=2e-6)


def test_each_operation_computes_its_formula() -> None:
    # one 2 x 2 image per case; the crop is the whole image at its size, so the values pass unchanged
    px = torch.tensor([[[0.2, 0.4, 0.6], [1.0, 0.0, 0.0]], [[0.5, 0.5, 0.5], [0.9, 0.8, 0.1]]])  # (2, 2, 3)
    x = px.permute(2, 0, 1)[None]  # (1, 3, 2, 2)
    f = torch.tensor([1.5])
    torch.testing.assert_close(augment._brightness(x.clone(), f), (x * 1.5).clamp(0, 1))
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # (1, 2, 2)
    torch.testing.assert_close(augment._gray(x)[:, 0], luma)
    m = float(luma.mean())
    torch.testing.assert_close(
        augment._contrast(x.clone(), torch.tensor([0.5])), (0.5 * x + 0.5 * m).clamp(0, 1)
    )
    torch.testing.assert_close(
        augment._saturation(x.clone(), torch.tensor([0.0])), luma[:, None].expand(-1, 3, -1, -1)
    )
    # hue: red turned by a third is green, by a sixth yellow; grey has no hue and stays
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.2, 0.4, 0.6]]).T.reshape(1, 3, 1, 3)
    third = augment._hue(rgb, torch.tensor([1 / 3]))
    torch.testing.assert_close(
        third[0, :, 0, :2], torch.tensor([[0.0, 0.5], [1.0, 0.5], [0.0, 0.5]]), rtol=0, atol=1e-6
    )
    # (0.2, 0.4, 0.6) has hue 7/12; plus 1/2 turn is 1/12: (0.6, 0.4, 0.2)
    torch.testing.assert_close(
        augment._hue(rgb, torch.tensor([0.5]))[0, :, 0, 2], torch.tensor([0.6, 0.4, 0.2]), rtol=0, atol=1e-6
    )
    yellow = augment._hue(rgb, torch.tensor([-5 / 6]))  # any real number of turns
    torch.testing.assert_close(yellow[0, :, 0, 0], torch.tensor([1.0, 1.0, 0.0]), rtol=0, atol=1e-6)
    # blur: a constant image stays; an impulse spreads as the normalised gaussian of sigma
    assert torch.allclose(
        augment._blur(torch.full((1, 3, 9, 9), 0.3), torch.tensor([1.2])), torch.tensor(0.3)
    )
    imp = torch.zeros((1, 3, 21, 21))
    imp[..., 10, 10] = 1.0
    out = augment._blur(imp, torch.tensor([1.0]))
    g = torch.exp(-0.5 * torch.arange(-3.0, 4.0) ** 2)
    g = g / g.sum()
    torch.testing.assert_close(out[0, 0, 7:14, 7:14], g[:, None] * g[None, :], rtol=0, atol=1e-7)
    assert float(out.sum()) == pytest.approx(3.0, abs=1e-5)


def test_flip_gray_solarize_and_jitter_order_through_local_crops() -> None:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8))
    src = _pad([im])
    base = _identity_aug(0, 0, 8, 6)
    plain = _unnormalize(augment.local_crops(src, torch.tensor(base)[None], (8, 6)))[0]
    flip, gray, sol = base.copy(), base.copy(), base.copy()
    flip[FIELD["flip"]] = 1
    gray[FIELD["gray"]] = 1
    sol[FIELD["solarize"]] = 1
    out = _unnormalize(augment.local_crops(src, torch.tensor(np.stack([flip, gray, sol])), (8, 6)))
    torch.testing.assert_close(out[0], plain.flip(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        out[1], (0.299 * plain[0] + 0.587 * plain[1] + 0.114 * plain[2]).expand(3, -1, -1), rtol=0, atol=1e-6
    )
    torch.testing.assert_close(out[2], torch.where(plain >= 128 / 255, 1 - plain, plain), rtol=0, atol=1e-6)
    # brightness 1.5 then contrast 0.5, against the other order: each image keeps its own order
    jit = base.copy()
    jit[[FIELD["jitter"], FIELD["brightness"], FIELD["contrast"]]] = (1, 1.5, 0.5)
    other = jit.copy()
    other[[FIELD["o0"], FIELD["o1"]]] = (1, 0)
    out = _unnormalize(augment.local_crops(src, torch.tensor(np.stack([jit, other])), (8, 6)))
    x = plain[None]
    b_then_c = augment._contrast(augment._brightness(x.clone(), torch.tensor([1.5])), torch.tensor([0.5]))
    c_then_b = augment._brightness(augment._contrast(x.clone(), torch.tensor([0.5])), torch.tensor([1.5]))
    torch.testing.assert_close(out[0], b_then_c[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], c_then_b[0], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0], out[1])


LOCAL_SCRIPT = """
import torch
from dpal.trainer import augment
src, augs, size = torch.load({inputs!r}, weights_only=True)
torch.save(augment.local_crops(src, augs, tuple(size)), {path!r})
"""


@pytest.mark.subprocess
def test_local_crops_are_deterministic_in_another_process_and_near_pil(tmp_path: Path) -> None:
    recipe = ViewRecipe()
    images = _images()
    augs = _local_params(recipe, images)
    out = augment.local_crops(_pad(images), augs, recipe.local_size)
    assert out.shape == (2 * len(images), 3, *recipe.local_size)
    assert torch.equal(out, augment.local_crops(_pad(images), augs, recipe.local_size))
    path, inputs = tmp_path / "crops.pt", tmp_path / "inputs.pt"
    torch.save((_pad(images), augs, list(recipe.local_size)), inputs)
    subprocess.run(
        [sys.executable, "-c", LOCAL_SCRIPT.format(inputs=str(inputs), path=str(path))],
        check=True,
        env=u.env(),
        cwd=REPO,
    )
    assert torch.equal(torch.load(path, weights_only=True), out)
    # another seed draws other crops
    assert not torch.equal(
        out, augment.local_crops(_pad(images), _local_params(recipe, images, seed=1), recipe.local_size)
    )
    # near the PIL reference (views.random_local, same parameters): resampling, float between the ops
    # and the blur kernel differ; measured on six sample_data photographs: mean |diff| 0.017 normalised
    # (about one grey level in 255), 99th percentile 0.058, max 0.21
    ref = []
    for j in range(2):
        for i, im in enumerate(images):
            rng = view_rng(0, str(i), 0, stream="local")
            crops = [random_local(recipe, rng, im) for _ in range(2)]
            ref.append(crops[j])
    diff = (out - torch.stack(ref)).abs()
    assert float(diff.mean()) < 0.03, float(diff.mean())
    assert float(diff.flatten().quantile(0.99)) < 0.12


# ---------------------------------------------------------------- whole batches


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("augment")
    return u.make_store(u.make_corpus(root / "corpus"), root / "store", dtype="float16")


def _batches(
    store: Path, workers: int, finish_on_cpu: bool, read_targets: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Every batch of two epochs, through a DataLoader built as `train` builds it."""
    reader = StoreReader(store)
    recipe = reader.store_meta.recipe
    sampler = EpochSampler(valid_rows(reader), 4, 1, 0, seed=5)
    ds = BatchDataset(
        store,
        sampler,
        recipe,
        5,
        read_targets=read_targets,
        finish_on_cpu=finish_on_cpu,
        mask_fix_sign=True if read_targets else None,
    )
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        sampler=collate_requests(sampler, 0, 0, 2, None, 1),
        num_workers=workers,
        multiprocessing_context="forkserver" if workers > 0 else None,
        generator=torch.Generator().manual_seed(5),
    )
    return [ds.model_inputs(b, CPU) for b in loader]


@pytest.mark.subprocess
def test_batches_are_identical_whatever_the_worker_count(store: Path) -> None:
    keys = {"index", "v0", "v1", "v2", "ic", "g_t", "local_t", "rel_t", "mask"}

    def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
        assert len(a) == len(b) == 4
        for x, y in zip(a, b, strict=True):
            assert set(x) == set(y) == keys
            assert all(torch.equal(x[k], y[k]) for k in keys), [
                k for k in keys if not torch.equal(x[k], y[k])
            ]

    # a GPU run's path (uint8 from the workers, finished by the main process) with 0, 1 and 2 workers
    ref = _batches(store, 0, finish_on_cpu=False)
    same(ref, _batches(store, 1, finish_on_cpu=False))
    same(ref, _batches(store, 2, finish_on_cpu=False))
    # a CPU run's path (finished in the workers, one thread each): the same bits
    same(ref, _batches(store, 2, finish_on_cpu=True))
    same(ref, _batches(store, 0, finish_on_cpu=True))
    # the stored float16 targets arrive raw and decode to the reader's float32
    t = StoreReader(store).read_targets(ref[0]["index"].numpy(), 0)
    assert torch.equal(ref[0]["local_t"], t.local) and torch.equal(ref[0]["rel_t"], t.relation)
    online = _batches(store, 0, False, read_targets=False)
    assert all(
        torch.equal(a[k], o[k]) for a, o in zip(ref, online, strict=True) for k in ("v0", "v1", "v2", "ic")
    )


def test_a_worker_ships_only_the_region_the_crops_read() -> None:
    from dpal.trainer.data import _crop_to_boxes

    recipe = ViewRecipe()
    images = _images()
    augs = _local_params(recipe, images)  # (2B, NUM_AUG): v1 of every image, then v2
    b = len(images)
    whole = augment.local_crops(_pad(images), augs, recipe.local_size)
    shifted = augs.numpy().copy()
    regions = []
    for i, im in enumerate(images):
        pair = shifted[[i, b + i]]
        regions.append(_crop_to_boxes(np.asarray(im), pair))
        shifted[[i, b + i]] = pair
        assert regions[-1].shape[0] * regions[-1].shape[1] <= im.height * im.width
    src = torch.from_numpy(
        np.stack(
            [
                np.pad(
                    r,
                    (
                        (0, max(x.shape[0] for x in regions) - r.shape[0]),
                        (0, max(x.shape[1] for x in regions) - r.shape[1]),
                        (0, 0),
                    ),
                    mode="edge",
                )
                for r in regions
            ]
        )
    )
    cropped = augment.local_crops(src, torch.from_numpy(shifted), recipe.local_size)
    # the same samples of the same pixels; only float rounding of the shifted box coordinates differs
    torch.testing.assert_close(cropped, whole, rtol=0, atol=1e-4)
