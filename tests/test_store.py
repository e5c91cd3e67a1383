"""Store: encode/decode per dtype, row shifting, layout arithmetic, and the reader's refusals (other
schema, incomplete store, missing shard data never read as zeros); verify and info."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from dpal.store import (
    FACTOR_SCHEMA,
    FEATURES,
    GLOBAL,
    LOCAL,
    PARAMS,
    RELATION,
    ROTATED_SCHEMA,
    SCHEMA_VERSION,
    VALID,
    Layout,
    StoreError,
    StoreReader,
    decode,
    encode,
    identity_diff,
    marker_path,
    read_attrs,
    shift_rows,
    store_info,
    verify_store,
)
from dpal.views import NUM_PARAMS

# N images, K views, P patches of v0, T tokens of Ic, D teacher width
N, K, P, T, D = 13, 2, 2, 7, 192


def _features(seed: int = 0, shape: tuple[int, ...] = (5, 3, 64)) -> np.ndarray:
    g = np.random.default_rng(seed)
    return (g.normal(0, 1, shape) * g.uniform(0.01, 100, shape[:-1])[..., None]).astype(np.float32)


def test_encode_decode_float32_exact_and_float16_is_the_cast() -> None:
    x = _features()
    stored, scale = encode(x, "float32")
    assert scale is None and stored.dtype == np.float32
    assert torch.equal(decode(stored, None, "float32"), torch.from_numpy(x))
    stored, scale = encode(x, "float16")
    assert stored.dtype == np.float16
    assert torch.equal(
        decode(stored, None, "float16"), torch.from_numpy(x.astype(np.float16).astype(np.float32))
    )


def test_encode_decode_bfloat16_bits() -> None:
    x = _features(1)
    stored, scale = encode(x, "bfloat16")
    assert scale is None and stored.dtype == np.uint16  # stored as raw bf16 bits
    expected = torch.from_numpy(x).to(torch.bfloat16)
    assert np.array_equal(stored, expected.view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(decode(stored, None, "bfloat16"), expected.float())


def test_encode_decode_int8_per_token_scale() -> None:
    x = _features(2)
    x[0, 0] = 0.0  # an all-zero token keeps a finite scale
    q, scale = encode(x, "int8")
    assert q.dtype == np.int8 and scale.shape == x.shape[:-1] and scale.dtype == np.float32
    amax = np.abs(x).max(axis=-1)
    assert np.array_equal(scale[amax > 0], (amax / 127.0).astype(np.float32)[amax > 0]) and scale[0, 0] == 1.0
    assert np.abs(q).max() == 127 and (np.abs(q).max(axis=-1)[amax > 0] == 127).all()
    y = decode(q, scale, "int8").numpy()
    # rounding error at most half a step per element (plus float32 noise of the product)
    assert (np.abs(y - x) <= scale[..., None] * (0.5 + 1e-4)).all()
    assert np.array_equal(y[0, 0], np.zeros(64, dtype=np.float32))
    with pytest.raises(ValueError, match="dtype .int4. is not one of float16, bfloat16, int8"):
        encode(x, "int4")


def test_shift_rows_keeps_softmax() -> None:
    logits = np.random.default_rng(3).normal(0, 5, (4, 7, 7)).astype(np.float32) + 40.0
    shifted = shift_rows(logits)
    assert (shifted.max(axis=-1) == 0).all() and (shifted <= 0).all()
    a = torch.softmax(torch.from_numpy(logits), dim=-1)
    b = torch.softmax(torch.from_numpy(shifted), dim=-1)
    assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert torch.equal(
        torch.from_numpy(shifted), torch.from_numpy(logits) - torch.from_numpy(logits).amax(-1, keepdim=True)
    )


def test_layout_arithmetic() -> None:
    lay = Layout(
        num_images=13,
        num_views=2,
        shard_size=3,
        embed_dim=4,
        num_patches=2,
        num_crowd_tokens=3,
        dtype="float16",
    )
    assert lay.num_shards == 5 and lay.shard_range(0) == (0, 3) and lay.shard_range(4) == (12, 13)
    assert lay.feature_shapes() == {GLOBAL: (13, 2, 4), LOCAL: (13, 2, 2, 4), RELATION: (13, 2, 3, 3)}
    assert NUM_PARAMS == 56
    # (D + P * D + T * T) items + 56 float64 params; int8 adds (1 + P + T) float32 scales
    assert lay.bytes_per_view() == (4 + 8 + 9) * 2 + 56 * 8 == 490
    assert Layout(13, 2, 3, 4, 2, 3, "int8").bytes_per_view() == 21 + 448 + 6 * 4
    assert Layout(13, 2, 3, 4, 2, 3, "float32").bytes_per_view() == 21 * 4 + 448


def test_reader_shapes_and_orthogonal_selection(ref_store: Path) -> None:
    reader = StoreReader(ref_store)
    assert reader.attrs["schema_version"] == SCHEMA_VERSION and reader.attrs["complete"] is True
    assert reader.array(GLOBAL).shape == (N, K, D) and reader.array(LOCAL).shape == (N, K, P, D)
    assert reader.array(RELATION).shape == (N, K, T, T) and reader.array(PARAMS).shape == (N, K, NUM_PARAMS)
    assert reader.meta(VALID).tolist() == [1] * N
    idx = np.array([12, 0, 5, 0, 7])  # unsorted, a duplicate, rows from four shards
    t = reader.read_targets(idx, 1)
    assert t.global_.shape == (5, D) and t.local.shape == (5, P, D) and t.relation.shape == (5, T, T)
    for j, i in enumerate(idx):
        one = reader.read_targets(np.array([i]), 1)
        assert torch.equal(t.global_[j], one.global_[0]) and torch.equal(t.relation[j], one.relation[0])
        assert torch.equal(t.global_[j], torch.from_numpy(reader.array(GLOBAL)[i, 1]))
        assert np.array_equal(t.params[j], reader.array(PARAMS)[i, 1])
    # relation targets are row-shifted: each row's max is exactly 0
    assert (t.relation.amax(-1) == 0).all()
    assert not torch.equal(t.global_[0], t.global_[1])


def test_missing_shard_file_raises_naming_the_shard(store_copy: Path) -> None:
    os.remove(store_copy / GLOBAL / "c" / "3" / "0" / "0")  # shard 3's global targets
    reader = StoreReader(store_copy)
    with pytest.raises(StoreError, match="000003"):
        reader.read_targets(np.array([9, 10]), 0)  # rows 9, 10 live in shard 3
    with pytest.raises(StoreError, match=r"shard\(s\) 000003 cannot be read"):
        reader.read_targets(np.array([0, 10]), 0)  # only the shard that lost data is named
    t = reader.read_targets(np.array([0, 4, 12]), 0)  # other shards still read
    assert t.global_.abs().sum() > 0
    os.remove(store_copy / VALID / "c" / "2")
    with pytest.raises(StoreError, match="valid"):
        StoreReader(store_copy).meta(VALID)


def test_reader_refuses_other_schema_and_incomplete_stores(store_copy: Path, tmp_path: Path) -> None:
    group = zarr.open_group(store_copy, mode="r+")
    group.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete .*rerunning the same `dpal cache-teacher`"):
        StoreReader(store_copy)
    assert StoreReader(store_copy, allow_incomplete=True).layout.num_shards == 5
    group.attrs["schema_version"] = ROTATED_SCHEMA + 1
    with pytest.raises(
        StoreError,
        match=f"schema {ROTATED_SCHEMA + 1}.*reads schema 1, {SCHEMA_VERSION}, {FACTOR_SCHEMA}, {ROTATED_SCHEMA}",
    ):
        read_attrs(store_copy)
    with pytest.raises(StoreError, match="not a dpal store"):
        read_attrs(tmp_path / "nothing")
    zarr.open_group(tmp_path / "other", mode="w")
    with pytest.raises(StoreError, match="not a dpal teacher store"):
        read_attrs(tmp_path / "other")


def test_image_bytes_are_the_corpus_files(ref_store: Path, corpus_files: dict[str, bytes]) -> None:
    reader = StoreReader(ref_store)
    keys = [str(k) for k in reader.meta("keys")]
    assert keys == sorted(corpus_files)
    for i, key in enumerate(keys):
        assert reader.image_bytes(i) == corpus_files[key]


def test_verify_names_missing_and_corrupted_shards(store_copy: Path) -> None:
    assert verify_store(store_copy) == {
        "ok": True,
        "metadata": [],
        "bad": {},
        "not_done": [],
        "num_shards": 5,
        "shards_checked": 5,
    }
    os.remove(store_copy / LOCAL / "c" / "1" / "0" / "0" / "0")
    target = store_copy / RELATION / "c" / "4" / "0" / "0" / "0"
    data = bytearray(target.read_bytes())
    data[len(data) // 3] ^= 0xFF
    target.write_bytes(bytes(data))
    marker_path(store_copy, 2).unlink()
    rep = verify_store(store_copy)
    assert not rep["ok"] and rep["not_done"] == ["000002"]
    assert rep["bad"] == {
        "000001": ["local/c/1/0/0/0 missing"],
        "000004": ["relation/c/4/0/0/0 checksum mismatch"],
    }


def test_info_counts(ref_store: Path) -> None:
    info = store_info(ref_store)
    assert info["num_images"] == N and info["num_cached_images"] == N and info["num_skipped_images"] == 0
    assert info["shards_done"] == info["num_shards"] == 5 and info["complete"] is True
    assert info["shapes"] == {GLOBAL: [N, K, D], LOCAL: [N, K, P, D], RELATION: [N, K, T, T]}
    assert info["bytes_per_view"] == (D + P * D + T * T) * 4 + NUM_PARAMS * 8
    assert info["teacher"]["name"] == "vit_tiny_patch16_224" and info["dtype"] == "float32"
    assert set(FEATURES) == set(info["shapes"])


def test_identity_diff_names_fields() -> None:
    old = {"seed": 0, "num_views": 2, "teacher": {"name": "a", "layer": None}, "dtype": "float16"}
    new = {"seed": 1, "num_views": 2, "teacher": {"name": "b", "layer": None}, "dtype": "float16"}
    assert identity_diff(old, new) == [
        "teacher.name: store has 'a', this run has 'b'",
        "seed: store has 0, this run has 1",
    ]
    assert identity_diff(old, dict(old)) == []
