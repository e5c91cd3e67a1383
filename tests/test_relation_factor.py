"""The relation target stored as a low-rank factor (issue 12, `--relation factor`, store schema 3):
stage one stores exactly the factor it computed, it rebuilds the logits store's relation, stage two
trains from it and resumes bit for bit, logits stores are unchanged, and damage is caught.

Sizes of tests/stage2_util.py: 10 images, shards of 4, K = 2 views, a random ViT-Ti teacher
(D = 192), v0 32 x 16 (P = 2) and Ic 32 x 48 (T = 1 + 2 x 3 = 7 crowd tokens).
"""

from __future__ import annotations

import json
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
from dpal.corpus import decode_image
from dpal.errors import InputError
from dpal.pipeline.cache import teacher_targets
from dpal.pipeline.engine import run_cache
from dpal.store import (
    RELATION,
    RELATION_DIAG,
    RELATION_FACTOR,
    StoreError,
    StoreMeta,
    StoreReader,
    read_marker,
    verify_store,
)
from dpal.store.relation import rebuild_logits, relation_factor, relation_logits, row_kl
from dpal.teachers import load_teacher
from dpal.trainer.data import BatchDataset, BatchRequest, EpochSampler, valid_rows
from dpal.trainer.train import train
from dpal.views import NUM_PARAMS, background_index, replay

RANK = 3  # below T = 7: a truncated factor
T = 7
U16 = 2.0**-11  # float16's unit roundoff


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    yield from u.one_torch_thread()


def cache_config(corpus: Path, out: Path, **overrides: Any) -> CacheConfig:
    """stage2_util.make_store's config (batch 8 = one shard's 4 images x 2 views per forward)."""
    kw: dict[str, Any] = dict(
        teacher=u.STUDENT,
        random_init=True,
        num_views=2,
        dtype="float32",
        shard_size=u.SHARD_SIZE,
        batch_size=8,
        shards="0:",
        device="cpu",
        views=u.RECIPE,
    )
    return CacheConfig(corpus=str(corpus), out=str(out), **(kw | overrides))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("relation_factor")


@pytest.fixture(scope="module")
def corpus(root: Path) -> Path:
    return u.make_corpus(root / "corpus")


@pytest.fixture(scope="module")
def factor_store(root: Path, corpus: Path) -> Path:
    out = root / "factor"
    run_cache(cache_config(corpus, out, relation="factor", relation_rank=RANK), show_progress=False)
    return out


@pytest.fixture(scope="module")
def logits_store(root: Path, corpus: Path) -> Path:
    out = root / "logits"
    run_cache(cache_config(corpus, out), show_progress=False)
    return out


def _shard0_views(reader: StoreReader) -> tuple[torch.Tensor, torch.Tensor]:
    """v0 and Ic of shard 0's 4 images x 2 views, replayed from the stored parameters in stage one's
    order (image, then view): the one teacher batch that stage one ran."""
    recipe = reader.store_meta.recipe
    images = {i: decode_image(reader.image_bytes(i)) for i in range(u.NUM_IMAGES)}
    v0s, ics = [], []
    for r in range(u.SHARD_SIZE):
        for k in range(2):
            p = reader.read_params(np.array([r]), k)[0]
            v0, ic = replay(recipe, p, images[r], images[background_index(p)])
            v0s.append(v0)
            ics.append(ic)
    return torch.stack(v0s), torch.stack(ics)


def test_stored_factor_is_exactly_what_stage_one_computed(factor_store: Path) -> None:
    reader = StoreReader(factor_store)
    meta = reader.store_meta
    assert (meta.schema_version, meta.relation_rank, reader.layout.relation_codec) == (3, RANK, "factor")
    v0, ic = _shard0_views(reader)
    teacher = load_teacher(meta.teacher_spec())
    g, loc, rel = teacher_targets(teacher, v0, ic, torch.device("cpu"), RANK)
    rows = np.arange(u.SHARD_SIZE)
    for k in range(2):
        t = reader.read_targets(rows, k, raw=True)
        assert t.relation.dtype == torch.float16 and t.relation.shape == (4, T, RANK)
        assert t.relation_diag.dtype == torch.float32 and t.relation_diag.shape == (4, T)
        assert torch.equal(t.relation, torch.from_numpy(rel[RELATION_FACTOR][k::2]))
        assert torch.equal(t.relation_diag, torch.from_numpy(rel[RELATION_DIAG][k::2]))
        assert torch.equal(t.global_, torch.from_numpy(g[k::2]))
        assert torch.equal(t.local, torch.from_numpy(loc[k::2]))
    # the marker records the mean of the 8 views' mean row KL, as measured while writing
    assert read_marker(factor_store, 0)["relation_kl"] == float(np.mean(rel["relation_kl"]))
    # the same computation by hand: the float16 factor of the teacher's tokens, and its row KL
    with torch.inference_mode():
        tokens = teacher.encode_crowd(ic)
    f = relation_factor(tokens, RANK)
    assert torch.equal(torch.from_numpy(rel[RELATION_FACTOR]), f.z.half())
    logits = relation_logits(tokens)
    kl = row_kl(logits, rebuild_logits(f.z.half().float(), f.diag, shift=False)).mean(-1)
    assert np.array_equal(rel["relation_kl"], kl.numpy())
    assert 0 < kl.max() < 0.05  # a rank-3 factor of 7 tokens loses something, not everything
    # the unrounded full-rank factor rebuilds the teacher's logits within float32 rounding
    full = relation_factor(tokens, T)
    torch.testing.assert_close(
        rebuild_logits(full.z, full.diag, shift=False),
        logits,
        rtol=1e-5,
        atol=1e-5 * float(logits.abs().max()),
    )


def test_full_rank_factor_store_rebuilds_the_logits_store(
    root: Path, corpus: Path, logits_store: Path
) -> None:
    out = root / "full"
    run_cache(cache_config(corpus, out, relation="factor", relation_rank=T), show_progress=False)
    full, ref = StoreReader(out), StoreReader(logits_store)
    rows = np.arange(u.NUM_IMAGES)
    for k in range(2):
        a, b = full.read_targets(rows, k), ref.read_targets(rows, k)
        assert torch.equal(a.global_, b.global_) and torch.equal(a.local, b.local)
        assert a.relation.dtype == torch.float32 and a.relation.shape == b.relation.shape == (10, T, T)
        # Z is float16: an element of Z Z^T moves by at most 2u |z_i| |z_j| = 2u sqrt(L_ii L_jj) (u
        # float16's roundoff), the row shift by as much again; the diagonal is exact float32
        d = full.read_targets(rows, k, raw=True).relation_diag.clamp_min(0)
        bound = 4 * U16 * (d[:, :, None] * d[:, None, :]).sqrt() * 1.01 + 1e-6
        err = (a.relation - b.relation).abs()
        assert (err <= bound).all(), float((err / bound).max())
        assert float(err.max()) > 0  # really rebuilt from float16, not copied
        assert row_kl(b.relation, a.relation).max() < 1e-5


def _train(store: Path, out: Path, **kw: Any) -> Any:
    return train(u.distill_config(store, out, checkpoint_every=1, **kw), show_progress=False)


def test_factor_store_trains_two_steps_and_resumes_bit_for_bit(root: Path, factor_store: Path) -> None:
    # what the loss sees: float32 row-shifted logits (B, T, T), rebuilt in model_inputs
    reader = StoreReader(factor_store)
    ds = BatchDataset(
        factor_store, EpochSampler(valid_rows(reader), 4, 1, 0, seed=0), reader.store_meta.recipe, seed=0
    )
    raw = ds[BatchRequest(0, 0, 0)]
    assert raw["rel_t"].dtype == torch.float16 and raw["rel_t_diag"].dtype == torch.float32
    batch = ds.model_inputs(raw, torch.device("cpu"))
    want = reader.read_targets(raw["index"].numpy(), 0).relation
    assert batch["rel_t"].dtype == torch.float32 and torch.equal(batch["rel_t"], want)
    assert (batch["rel_t"].amax(-1) == 0).all()  # row-shifted, as a logits store holds them

    ref, split = root / "train-ref", root / "train-split"
    _train(factor_store, ref, max_steps=2)
    _train(factor_store, split, max_steps=1)
    assert u.checkpoint_steps(split) == [1]
    _train(factor_store, split, max_steps=2, resume="auto")
    assert u.metrics(split) == u.metrics(ref) and len(u.metrics(ref)) == 2
    assert all(np.isfinite(m["relation"]) and m["relation"] > 0 for m in u.metrics(ref))
    u.assert_same_training_state(u.load_last(split), u.load_last(ref))


def test_logits_store_is_unchanged_and_still_trains(root: Path, logits_store: Path) -> None:
    attrs = json.loads((logits_store / "zarr.json").read_text())["attributes"]
    assert attrs["schema_version"] == 2 and "relation_codec" not in attrs
    arrays = {p.parent.name for p in logits_store.glob("*/zarr.json")}
    assert RELATION in arrays and not {RELATION_FACTOR, RELATION_DIAG} & arrays
    assert "relation_kl" not in read_marker(logits_store, 0)
    reader = StoreReader(logits_store)
    assert reader.layout.bytes_per_view() == (192 + 2 * 192 + T * T) * 4 + NUM_PARAMS * 8
    ds = BatchDataset(
        logits_store, EpochSampler(valid_rows(reader), 4, 1, 0, seed=0), reader.store_meta.recipe, seed=0
    )
    raw = ds[BatchRequest(0, 0, 0)]
    assert "rel_t_diag" not in raw and raw["rel_t"].shape == (4, T, T)
    assert torch.equal(ds.model_inputs(raw, torch.device("cpu"))["rel_t"], raw["rel_t"])
    _train(logits_store, root / "train-logits", max_steps=1)
    assert np.isfinite(u.metrics(root / "train-logits")[0]["relation"])


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_verify_and_reads_catch_a_flipped_byte_in_the_factor(root: Path, factor_store: Path) -> None:
    store = _copy(factor_store, root / "flipped")
    chunk = store / RELATION_FACTOR / "c" / "0" / "0" / "0" / "0"  # shard 0's Zarr shard file
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0x01
    chunk.write_bytes(bytes(data))
    rep = verify_store(store)
    assert not rep["ok"] and rep["bad"] == {"000000": [f"{RELATION_FACTOR}/c/0/0/0/0 checksum mismatch"]}
    with pytest.raises(StoreError, match="data of shard.s. 000000 cannot be read"):
        StoreReader(store).read_targets(np.array([0, 1]), 0)
    StoreReader(store).read_targets(np.array([4, 5]), 0)  # shard 1 is intact


def test_a_non_finite_factor_is_refused_in_one_line(root: Path, factor_store: Path) -> None:
    store = _copy(factor_store, root / "nan")
    z = zarr.open_array(store / RELATION_FACTOR, mode="r+", config={"write_empty_chunks": True})
    z[5, 1, 2, 0] = np.nan  # through Zarr: the chunk's own crc32c is rewritten, the marker's sha256 is not
    assert verify_store(store)["bad"] == {"000001": [f"{RELATION_FACTOR}/c/1/0/0/0 checksum mismatch"]}
    # the values' own checksum in the marker (issue 19) refuses the edit before the factor's check
    with pytest.raises(
        StoreError,
        match=r"the 'relation_factor' values of row 5 \(image 'img05.jpg', view 1, shard 000001\) do not match",
    ):
        StoreReader(store).read_targets(np.array([4, 5]), 1, raw=True)


def test_store_info_and_dry_run_show_the_codec(corpus: Path, factor_store: Path, logits_store: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["store", "info", str(factor_store)])
    assert res.exit_code == 0, res.output
    kl = float(np.mean([read_marker(factor_store, s)["relation_kl"] for s in range(3)]))
    # bytes per view: global 192 + local 2 x 192 float32, Z 7 x 3 float16, diagonal 7 float32, parameters
    per_view = (192 + 2 * 192) * 4 + T * RANK * 2 + T * 4 + NUM_PARAMS * 8
    assert per_view == 2822 and "dtype          float32, 2.8 KB per view\n" in res.output
    assert (
        f"relation       factor, rank {RANK} (float16 Z, float32 diagonal); mean row KL {kl:.3g}"
        in res.output
    )
    info = json.loads(runner.invoke(app, ["store", "info", "--json", str(factor_store)]).output)
    assert (info["bytes_per_view"], info["relation_codec"], info["relation_rank"]) == (
        per_view,
        "factor",
        RANK,
    )
    assert info["relation_kl_mean"] == pytest.approx(kl, rel=1e-12)
    res = runner.invoke(app, ["store", "info", str(logits_store)])
    assert "relation       logits T x T\n" in res.output
    args = [
        "cache-teacher",
        "--corpus",
        str(corpus),
        "--teacher",
        u.STUDENT,
        "--random-init",
        "--views",
        "2",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--set",
        "views.global_size=[32,16]",
        "--set",
        "views.local_size=[16,16]",
        "--set",
        "views.crowd_size=[32,48]",
        "--dry-run",
        "--relation",
        "factor",
        "--relation-rank",
        str(RANK),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert f"(float32, relation factor, rank {RANK} (float16 Z, float32 diagonal))" in res.output


def test_a_resume_with_another_relation_codec_is_refused(
    root: Path, corpus: Path, factor_store: Path, logits_store: Path
) -> None:
    store = _copy(logits_store, root / "resume-other")
    with pytest.raises(StoreError, match=r"relation_codec: store has None, this run has \{'codec': 'factor'"):
        run_cache(cache_config(corpus, store, relation="factor", relation_rank=RANK), show_progress=False)
    store = _copy(factor_store, root / "resume-rank")
    with pytest.raises(StoreError, match="relation_codec.rank: store has 3, this run has 2"):
        run_cache(cache_config(corpus, store, relation="factor", relation_rank=2), show_progress=False)
    same = run_cache(cache_config(corpus, store, relation="factor", relation_rank=RANK), show_progress=False)
    assert same.complete and same.shards_already_done == 3
    with pytest.raises(InputError, match="relation_rank 3 is set but the relation is stored as logits; add"):
        run_cache(cache_config(corpus, root / "rank-of-logits", relation_rank=RANK), show_progress=False)
    assert not (root / "rank-of-logits").exists()
    with pytest.raises(InputError, match="relation_rank 9 must be between 1 and T = 7"):
        run_cache(
            cache_config(corpus, root / "too-big", relation="factor", relation_rank=9), show_progress=False
        )


def test_schema_3_attributes_are_checked(factor_store: Path, logits_store: Path) -> None:
    attrs = json.loads((factor_store / "zarr.json").read_text())["attributes"]
    meta = StoreMeta.from_attrs(attrs, "S")
    assert meta.relation_rank == RANK and list(meta.to_attrs().items()) == [
        (k, v) for k, v in attrs.items() if k != "integrity"
    ]
    with pytest.raises(StoreError, match="S: store attribute relation_codec is missing"):
        StoreMeta.from_attrs({k: v for k, v in attrs.items() if k != "relation_codec"}, "S")
    with pytest.raises(StoreError, match="relation_codec.rank is 8, above T = 7"):
        StoreMeta.from_attrs(attrs | {"relation_codec": attrs["relation_codec"] | {"rank": 8}}, "S")
    old = json.loads((logits_store / "zarr.json").read_text())["attributes"]
    with pytest.raises(StoreError, match="relation_codec is set, but schema 2 stores hold logits"):
        StoreMeta.from_attrs(old | {"relation_codec": attrs["relation_codec"]}, "S")
    assert attrs["config"]["relation"] == "factor" and attrs["config"]["relation_rank"] == RANK
