"""The token codec `int8-rotated` (issue 12, store schema 4): v0's global and local targets are
stored as per-token int8 of x @ R, R one random orthogonal D x D matrix written once into the store;
stage two decodes (q * scale) @ R^T on the device. R is the same for every store of a seed, every
writer uses the stored R, the round trip is exact, the error is measured while writing, a store
trains and resumes bit for bit, damage to R is caught, and old int8 stores read as before.

Sizes of tests/stage2_util.py: 10 images, shards of 4, K = 2 views, a random ViT-Ti teacher
(D = 192), v0 32 x 16 (P = 2) and Ic 32 x 48 (T = 7 crowd tokens).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import dpal_tests_stage2_util as u  # registered by conftest.py
import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from dpal.cli import app
from dpal.config import CacheConfig
from dpal.pipeline.cache import teacher_spec
from dpal.pipeline.engine import run_cache
from dpal.pipeline.prepare import prepare_store
from dpal.store import (
    GLOBAL,
    INTEGRITY,
    LOCAL,
    RELATION,
    SCALE_SUFFIX,
    TOKEN_ROTATION,
    StoreError,
    StoreMeta,
    StoreReader,
    decode,
    encode,
    index_crc32c,
    read_marker,
    token_rotation,
    verify_store,
)
from dpal.teachers import load_teacher
from dpal.trainer.data import BatchDataset, BatchRequest, EpochSampler, valid_rows
from dpal.trainer.train import train
from dpal.views import NUM_PARAMS

D, T, RANK = 192, 7, 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    yield from u.one_torch_thread()


def cache_config(corpus: Path, out: Path, **overrides: Any) -> CacheConfig:
    """stage2_util.make_store's config (batch 8 = one shard's 4 images x 2 views per forward)."""
    kw: dict[str, Any] = dict(
        teacher=u.STUDENT,
        random_init=True,
        num_views=2,
        dtype="int8-rotated",
        shard_size=u.SHARD_SIZE,
        batch_size=8,
        shards="0:",
        device="cpu",
        views=u.RECIPE,
    )
    return CacheConfig(corpus=str(corpus), out=str(out), **(kw | overrides))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token_rotation")


@pytest.fixture(scope="module")
def corpus(root: Path) -> Path:
    return u.make_corpus(root / "corpus")


def _store(root: Path, corpus: Path, name: str, **kw: Any) -> Path:
    run_cache(cache_config(corpus, root / name, **kw), show_progress=False)
    return root / name


@pytest.fixture(scope="module")
def rotated(root: Path, corpus: Path) -> Path:
    return _store(root, corpus, "rotated")


@pytest.fixture(scope="module")
def rotated_factor(root: Path, corpus: Path) -> Path:
    return _store(root, corpus, "rotated-factor", relation="factor", relation_rank=RANK)


@pytest.fixture(scope="module")
def float32(root: Path, corpus: Path) -> Path:
    return _store(root, corpus, "float32", dtype="float32")


@pytest.fixture(scope="module")
def int8(root: Path, corpus: Path) -> Path:
    return _store(root, corpus, "int8", dtype="int8")


def _stored_rotation(store: Path) -> np.ndarray:
    return zarr.open_array(store / TOKEN_ROTATION, mode="r")[:]


def test_rotation_is_orthogonal_unique_and_the_same_for_a_seed(
    root: Path, corpus: Path, rotated: Path
) -> None:
    r = _stored_rotation(rotated)
    assert r.dtype == np.float32 and r.shape == (D, D)
    assert np.abs(r.astype(np.float64).T @ r - np.eye(D)).max() < 2e-6
    # R is Q of the QR of the seed's Gaussian matrix G with a positive triangular diagonal:
    # R^T G is upper triangular with a positive diagonal (up to float32 rounding of R)
    g = np.random.default_rng([0x524F54, 0]).standard_normal((D, D))
    tri = r.astype(np.float64).T @ g
    assert np.abs(np.tril(tri, -1)).max() < 1e-4 * np.abs(tri).max()
    assert (np.diagonal(tri) > 0).all()
    # a second store of the same seed holds the same bytes; another seed, another R
    other = _store(root, corpus, "rotated-again")
    assert np.array_equal(_stored_rotation(other), r) and np.array_equal(token_rotation(D, 0), r)
    assert not np.allclose(token_rotation(D, 1), r, atol=0.1)


def test_hand_computed_round_trip() -> None:
    # R = H / 2 with H the 4 x 4 Hadamard matrix (orthogonal): x @ R = [5, -1, -2, 0]
    h = np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=np.float32)
    r = h / 2
    q, s = encode(np.array([[1.0, 2.0, 3.0, 4.0]]), "int8-rotated", r)
    assert q.tolist() == [[127, -25, -51, 0]] and s.tolist() == [np.float32(5 / 127)]
    y = np.array([127, -25, -51, 0]) * 5 / 127  # [5, -0.98425, -2.00787, 0]
    want = y @ r.T.astype(np.float64)  # (5 - 0.98425 - 2.00787) / 2 = 1.00394, ...
    torch.testing.assert_close(
        decode(q, s, "int8-rotated", r).double(), torch.from_numpy(want[None]), rtol=1e-6, atol=0
    )
    assert np.allclose(want, [1.003937, 1.988189, 3.011811, 3.996063], atol=1e-6)
    with pytest.raises(ValueError, match="needs the store's rotation R"):
        encode(np.ones((1, 4)), "int8-rotated")


def test_stored_tokens_decode_exactly_and_within_1_percent(rotated: Path, float32: Path, int8: Path) -> None:
    reader, ref = StoreReader(rotated), StoreReader(float32)
    assert reader.store_meta.schema_version == 4 and reader.layout.feature_dtype(RELATION) == "int8"
    r = _stored_rotation(rotated)
    rows = np.arange(u.NUM_IMAGES)
    errors = []
    for k in range(2):
        raw, dec, want = (
            reader.read_targets(rows, k, raw=True),
            reader.read_targets(rows, k),
            ref.read_targets(rows, k),
        )
        for name, q, s, x, y in (
            (GLOBAL, raw.global_, raw.scales[0], dec.global_, want.global_),
            (LOCAL, raw.local, raw.scales[1], dec.local, want.local),
        ):
            assert q.dtype == torch.int8 and s.dtype == torch.float32
            # what is stored decodes to (q * s) @ R^T, by hand in float64
            by_hand = (q.double() * s.double()[..., None]) @ torch.from_numpy(r).double().T
            torch.testing.assert_close(x.double(), by_hand, rtol=0, atol=2e-6 * float(by_hand.abs().max()))
            # and the stored q is int8 of the float32 store's tokens times R, one step per token
            rotated_t = y @ torch.from_numpy(r)
            step = rotated_t.abs().amax(-1) / 127
            assert torch.allclose(step, s, rtol=1e-5)
            assert (q.float() - rotated_t / s[..., None]).abs().max() <= 0.5 + 1e-3
            rel = (x - y).norm(dim=-1) / y.norm(dim=-1)
            errors.append((name, rel))
        # the relation logits are today's plain int8 (no rotation: they are T x T)
        assert raw.relation.dtype == torch.int8 and raw.scales[2].shape == (10, T)
        torch.testing.assert_close(dec.relation, raw.relation.float() * raw.scales[2][..., None])
    local = torch.cat([e for n, e in errors if n == LOCAL])
    assert 0.001 < float(local.mean()) < 0.01 and float(local.max()) < 0.02
    # the markers record each shard's mean error as measured while writing (views of cached rows)
    for s, (a, b) in enumerate(((0, 4), (4, 8), (8, 10))):
        m = read_marker(rotated, s)["token_error"]
        mine = torch.cat([e[a:b].reshape(-1) for n, e in errors if n == LOCAL])
        assert m[LOCAL] == pytest.approx(float(mine.mean()), rel=1e-3)
    # plain int8 markers record it too; its error here is of the same order (random teacher)
    assert 0.001 < read_marker(int8, 0)["token_error"][LOCAL] < 0.02


def test_writers_use_the_stored_rotation(root: Path, corpus: Path, float32: Path) -> None:
    cfg = cache_config(corpus, root / "swapped")
    prepare_store(cfg, load_teacher(teacher_spec(cfg)))  # the store exists, no shard written yet
    store = root / "swapped"
    swapped = _stored_rotation(store)[:, ::-1].copy()  # still orthogonal, but not the seed's R
    zarr.open_array(store / TOKEN_ROTATION, mode="r+")[:] = swapped
    attrs = json.loads((store / "zarr.json").read_text())
    attrs["attributes"][INTEGRITY]["index_crc32c"][TOKEN_ROTATION] = index_crc32c(swapped)
    (store / "zarr.json").write_text(json.dumps(attrs))
    run_cache(cfg, show_progress=False)
    x = StoreReader(store).read_targets(np.arange(10), 1).local
    y = StoreReader(float32).read_targets(np.arange(10), 1).local
    # a writer that made its own R (the seed's) would be off by about sqrt(2): two unrelated rotations
    assert float(((x - y).norm(dim=-1) / y.norm(dim=-1)).max()) < 0.02


def _train(store: Path, out: Path, **kw: Any) -> Any:
    return train(u.distill_config(store, out, checkpoint_every=1, **kw), show_progress=False)


def test_a_rotated_store_trains_and_resumes_bit_for_bit(root: Path, rotated_factor: Path) -> None:
    reader = StoreReader(rotated_factor)
    assert (reader.store_meta.schema_version, reader.layout.relation_codec) == (4, "factor")
    ds = BatchDataset(
        rotated_factor, EpochSampler(valid_rows(reader), 4, 1, 0, seed=0), reader.store_meta.recipe, seed=0
    )
    raw = ds[BatchRequest(0, 0, 0)]
    assert raw["local_t"].dtype == torch.int8 and "local_t_scale" in raw and "rel_t_diag" in raw
    batch = ds.model_inputs(raw, torch.device("cpu"))
    want = reader.read_targets(raw["index"].numpy(), 0)
    torch.testing.assert_close(batch["local_t"], want.local, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batch["g_t"], want.global_, rtol=1e-6, atol=1e-6)
    assert torch.equal(batch["rel_t"], want.relation)
    ref, split = root / "train-ref", root / "train-split"
    _train(rotated_factor, ref, max_steps=2)
    _train(rotated_factor, split, max_steps=1)
    _train(rotated_factor, split, max_steps=2, resume="auto")
    assert u.metrics(split) == u.metrics(ref) and len(u.metrics(ref)) == 2
    assert all(np.isfinite(m["local"]) and m["local"] > 0 for m in u.metrics(ref))
    u.assert_same_training_state(u.load_last(split), u.load_last(ref))


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def test_a_flipped_byte_in_the_rotation_is_caught(root: Path, rotated: Path) -> None:
    store = _copy(rotated, root / "flipped")
    chunk = store / TOKEN_ROTATION / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))
    rep = verify_store(store)
    assert not rep["ok"] and rep["metadata"] == ["index array 'token_rotation' does not match its checksum"]
    with pytest.raises(
        StoreError, match=r"the token rotation \(token_rotation\) cannot be read \(ValueError"
    ):
        StoreReader(store)


def test_a_nan_in_the_rotation_is_caught(root: Path, rotated: Path) -> None:
    store = _copy(rotated, root / "nan")
    r = _stored_rotation(store)
    r[3, 5] = np.nan
    zarr.open_array(store / TOKEN_ROTATION, mode="r+")[:] = (
        r  # the chunk's crc32c is rewritten, not integrity's
    )
    assert verify_store(store)["metadata"] == ["index array 'token_rotation' does not match its checksum"]
    with pytest.raises(StoreError, match="does not match the checksum recorded when the store was created"):
        StoreReader(store)
    # recorded with the NaN (a writer that computed a bad R): still refused, in one line
    attrs = json.loads((store / "zarr.json").read_text())
    attrs["attributes"][INTEGRITY]["index_crc32c"][TOKEN_ROTATION] = index_crc32c(r)
    (store / "zarr.json").write_text(json.dumps(attrs))
    with pytest.raises(
        StoreError, match=r"token_rotation\) is corrupt: it holds NaN or infinite values"
    ) as e:
        StoreReader(store)
    assert "\n" not in str(e.value)


def test_an_old_int8_store_reads_as_before(int8: Path) -> None:
    attrs = json.loads((int8 / "zarr.json").read_text())["attributes"]
    assert attrs["schema_version"] == 2 and "token_codec" not in attrs
    assert not (int8 / TOKEN_ROTATION).exists()
    reader = StoreReader(int8)
    assert reader.rotation is None
    raw, dec = reader.read_targets(np.arange(4), 0, raw=True), reader.read_targets(np.arange(4), 0)
    assert torch.equal(dec.local, raw.local.float() * raw.scales[1][..., None])
    q = zarr.open_array(int8 / LOCAL, mode="r")[:4, 0]
    s = zarr.open_array(int8 / (LOCAL + SCALE_SUFFIX), mode="r")[:4, 0]
    assert torch.equal(dec.local, torch.from_numpy(q.astype(np.float32) * s[..., None]))
    assert verify_store(int8)["ok"]


def test_schema_4_attributes_are_checked(rotated: Path, int8: Path) -> None:
    attrs = json.loads((rotated / "zarr.json").read_text())["attributes"]
    assert (
        attrs["token_codec"]["codec"] == "int8-rotated" and attrs["token_codec"]["rotation"] == TOKEN_ROTATION
    )
    assert list(StoreMeta.from_attrs(attrs, "S").to_attrs().items()) == [
        (k, v) for k, v in attrs.items() if k != INTEGRITY
    ]
    with pytest.raises(StoreError, match="S: store attribute token_codec is missing"):
        StoreMeta.from_attrs({k: v for k, v in attrs.items() if k != "token_codec"}, "S")
    with pytest.raises(
        StoreError, match="store attribute dtype is int8-rotated, but schema 2 stores are not"
    ):
        StoreMeta.from_attrs(attrs | {"schema_version": 2}, "S")
    old = json.loads((int8 / "zarr.json").read_text())["attributes"]
    with pytest.raises(
        StoreError, match="store attribute dtype is int8, but schema 4 stores are int8-rotated"
    ):
        StoreMeta.from_attrs(old | {"schema_version": 4}, "S")


def test_store_info_and_dry_run_show_the_codec(corpus: Path, rotated_factor: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["store", "info", str(rotated_factor)])
    assert res.exit_code == 0, res.output
    # global 192 + 4, local 2 x (192 + 4) int8 + scales, Z 7 x 3 float16, diagonal 7 float32, parameters
    per_view = 3 * (D + 4) + T * RANK * 2 + T * 4 + NUM_PARAMS * 8
    assert per_view == 1106 and "dtype          int8-rotated, 1.1 KB per view\n" in res.output
    info = json.loads(runner.invoke(app, ["store", "info", "--json", str(rotated_factor)]).output)
    assert info["bytes_per_view"] == per_view and info["rotation_bytes"] == D * D * 4
    err = float(np.mean([read_marker(rotated_factor, s)["token_error"][LOCAL] for s in range(3)]))
    assert info["token_error"][LOCAL]["mean"] == pytest.approx(err, rel=1e-12)
    assert "decoded (q * s) @ R^T; mean relative error global " in res.output
    assert f"local {err:.3%} (worst shard " in res.output
    args = ["cache-teacher", "--corpus", str(corpus), "--teacher", u.STUDENT, "--random-init", "--views", "2"]
    args += ["--dtype", "int8-rotated", "--device", "cpu", "--dry-run"]
    args += ["--set", "views.global_size=[32,16]", "--set", "views.local_size=[16,16]"]
    args += ["--set", "views.crowd_size=[32,48]"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "(int8-rotated, relation logits T x T); plus R 147.5 KB once per store" in res.output


def test_the_shape_mask_is_the_same_in_the_rotated_basis() -> None:
    # the loader computes the mask from int8-rotated tokens left in R's basis: the centred projection
    # on the top principal axis does not change under a rotation (up to float rounding)
    from dpal.trainer.losses import shape_mask

    g = torch.Generator().manual_seed(3)
    b, (h, w), d = 4, (4, 3), 24
    person = torch.zeros(h, w)
    person[1:3, 1] = 1.0  # an inner "person" whose tokens differ from the border's
    tokens = torch.randn(b, h * w, d, generator=g) * 0.3 + person.flatten()[None, :, None] * torch.randn(
        d, generator=g
    )
    rotation = torch.from_numpy(token_rotation(d, 0))
    plain = shape_mask(tokens, (h, w), fix_sign=True)
    rotated = shape_mask(tokens @ rotation, (h, w), fix_sign=True)
    assert plain.shape == (b, h * w, 1) and float(plain.max()) == 1.0
    torch.testing.assert_close(rotated, plain, atol=1e-5, rtol=0)
    assert float(plain.reshape(b, h, w)[:, 1:3, 1].mean() - plain.reshape(b, h, w)[:, 0, :].mean()) > 0.3
