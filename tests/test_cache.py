"""Stage one end to end: stored targets are the teacher's outputs on the replayed views (exact for
float32, measured bounds for float16, bfloat16 and int8), replay is bit-identical in another
process, a SIGKILLed run resumes to the same arrays, dask workers give the same arrays as one
process, bad files are skipped with reasons, and a mismatched resume is refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds

from dpal.config import CacheConfig
from dpal.corpus import decode_image
from dpal.pipeline.cache import StrictModeError, batches_ahead, cache_shard, replay_threads_for
from dpal.pipeline.dryrun import dry_run
from dpal.pipeline.engine import run_cache
from dpal.pipeline.prepare import prepare_store
from dpal.store import (
    IMAGE_OFFSET,
    IMAGES_DIR,
    KEYS,
    PARAMS,
    VALID,
    StoreError,
    StoreReader,
    done_shards,
    marker_path,
    read_attrs,
    store_info,
)
from dpal.teachers import Teacher
from dpal.views import ViewRecipe, background_index, replay, sample_view

# B views in a batch, P patches of v0, T tokens of Ic, D teacher width
NUM_SHARDS = 5


def _replayed_views(
    reader: StoreReader, rows: list[int], view_of: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """v0 (B, 3, Hg, Wg) and Ic (B, 3, Hc, Wc) rebuilt from the store alone: params + image bytes."""
    recipe = reader.store_meta.recipe
    params = reader.array(PARAMS)
    v0s, ics = [], []
    for i, k in zip(rows, view_of, strict=True):
        p = params[i, k]
        v0, ic = replay(
            recipe,
            p,
            decode_image(reader.image_bytes(i)),
            decode_image(reader.image_bytes(background_index(p))),
        )
        v0s.append(v0)
        ics.append(ic)
    return torch.stack(v0s), torch.stack(ics)


def test_float32_targets_are_the_teacher_on_replayed_views(
    ref_store: Path, teacher: Teacher, recipe: ViewRecipe
) -> None:
    reader = StoreReader(ref_store)
    lay = reader.layout
    keys = [str(k) for k in reader.meta(KEYS)]
    for shard in range(lay.num_shards):
        start, stop = lay.shard_range(shard)
        # Same views in the same batch as stage one ((row, view) order, one batch per shard here):
        # CPU kernels are not batch-size invariant, a batch of one differs in the last bit.
        jobs = [(i, k) for i in range(start, stop) for k in range(lay.num_views)]
        v0, ic = _replayed_views(reader, [i for i, _ in jobs], [k for _, k in jobs])
        with torch.inference_mode():
            g, patches = teacher.encode_global(v0)  # (B, D), (B, P, D)
            rel = teacher.relation_logits(ic)  # (B, T, T)
        rel = rel - rel.amax(dim=-1, keepdim=True)
        for k in range(lay.num_views):
            t = reader.read_targets(np.arange(start, stop), k)
            sel = [j for j, (_, kk) in enumerate(jobs) if kk == k]
            assert torch.equal(t.global_, g[sel]) and torch.equal(t.local, patches[sel])
            assert torch.equal(t.relation, rel[sel])
            # the parameters are those sampled from (seed, key, view) with the shard's other images as backgrounds
            hw = {i: decode_image(reader.image_bytes(i)).size[::-1] for i in range(start, stop)}
            for row in range(start, stop):
                pool = [(i, hw[i]) for i in range(start, stop) if i != row] or [(row, hw[row])]
                assert np.array_equal(
                    t.params[row - start], sample_view(recipe, 0, keys[row], k, hw[row], pool)
                )
    assert lay.shard_range(NUM_SHARDS - 1) == (12, 13)  # the last shard's one image is its own background
    assert background_index(reader.array(PARAMS)[12, 0]) == 12


# Measured on this suite's store (max |stored - float32| / max |float32|, over every array and view):
#   float16  3.3e-4 (rounding bound 2^-11 = 4.9e-4)
#   bfloat16 2.7e-3 (rounding bound 2^-8 = 3.9e-3)
#   int8     3.94e-3 (bound 0.5 / 127 = 3.94e-3 of each token's max, reached); per-token cosine >= 0.99996
# Tolerances are the rounding bounds (slightly rounded up), which the measurements sit under.
TOLERANCE = {"float16": 5e-4, "bfloat16": 4e-3, "int8": 4e-3}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_low_precision_targets_within_measured_tolerance(
    tmp_path: Path, dtype: str, corpus_dir: Path, ref_store: Path, make_config: Callable[..., CacheConfig]
) -> None:
    out = tmp_path / dtype
    run_cache(make_config(corpus_dir, out, dtype=dtype), show_progress=False)
    ref, low = StoreReader(ref_store), StoreReader(out)
    assert np.array_equal(low.array(PARAMS)[:], ref.array(PARAMS)[:])  # the views do not depend on the dtype
    idx = np.arange(ref.layout.num_images)
    for k in range(ref.layout.num_views):
        a, b = ref.read_targets(idx, k), low.read_targets(idx, k)
        for x, y in ((a.global_, b.global_), (a.local, b.local), (a.relation, b.relation)):
            rel_err = ((y - x).abs().max() / x.abs().max()).item()
            assert 0 < rel_err <= TOLERANCE[dtype], (dtype, rel_err)
            if dtype == "float16":  # exactly the float16 cast of the float32 targets
                assert torch.equal(y, x.half().float())
            if dtype == "bfloat16":  # exactly torch's bfloat16 cast
                assert torch.equal(y, x.bfloat16().float())
            if dtype == "int8":
                cos = F.cosine_similarity(x.flatten(0, -2), y.flatten(0, -2), dim=-1)
                assert cos.min().item() >= 0.999
                # each token's largest element is stored exactly (to float32 rounding of q * scale)
                amax = x.abs().amax(-1)
                assert torch.allclose(y.abs().amax(-1), amax, rtol=1e-6, atol=0)


_CHILD_REPLAY = """
import sys, numpy as np, torch
from dpal.corpus import decode_image
from dpal.store import StoreReader
from dpal.views import ViewRecipe, background_index, replay
reader = StoreReader(sys.argv[1])
recipe = reader.store_meta.recipe
out = {}
for i in range(reader.layout.num_images):
    for k in range(reader.layout.num_views):
        p = reader.read_targets(np.array([i]), k).params[0]
        img = decode_image(reader.image_bytes(i))
        bg = decode_image(reader.image_bytes(background_index(p)))
        out[(i, k)] = replay(recipe, p, img, bg)
torch.save(out, sys.argv[2])
"""


@pytest.mark.subprocess
def test_replay_is_bit_identical_in_another_process(
    tmp_path: Path, ref_store: Path, child_env: dict[str, str]
) -> None:
    dump = tmp_path / "replay.pt"
    subprocess.run(
        [sys.executable, "-c", _CHILD_REPLAY, str(ref_store), str(dump)],
        check=True,
        timeout=120,
        env={**child_env, "OMP_NUM_THREADS": "2"},
    )  # replay is PIL and numpy: no thread dependence
    theirs = torch.load(dump, weights_only=True)
    reader = StoreReader(ref_store)
    recipe = reader.store_meta.recipe
    assert len(theirs) == 13 * 2
    for (i, k), (v0_child, ic_child) in theirs.items():
        p = reader.read_targets(np.array([i]), k).params[0]
        v0, ic = replay(
            recipe,
            p,
            decode_image(reader.image_bytes(i)),
            decode_image(reader.image_bytes(background_index(p))),
        )
        assert torch.equal(v0, v0_child) and torch.equal(ic, ic_child), (i, k)
        assert v0.shape == (3, 32, 16) and ic.shape == (3, 32, 48)


def _dpal() -> list[str]:
    exe = Path(sys.executable).parent / "dpal"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dpal.cli"]


@pytest.mark.subprocess
def test_sigkill_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path,
    big_corpus_dir: Path,
    make_config: Callable[..., CacheConfig],
    cli_args: Callable[..., list[str]],
    child_env: dict[str, str],
    same_store: Callable[[Path, Path], None],
) -> None:
    num_shards = 15  # 30 images, 2 per shard
    out = tmp_path / "killed"
    cmd = [*_dpal(), *cli_args(big_corpus_dir, out, "--shard-size", "2", "--shards", "0:", "--quiet")]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env, start_new_session=True
    )
    deadline = time.monotonic() + 180
    try:
        while not done_shards(out):
            assert proc.poll() is None, f"finished before the kill: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no shard marker within 180 s"
            time.sleep(0.002)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the CLI and anything it started
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    done = done_shards(out)
    assert 1 <= len(done) < num_shards and read_attrs(out)["complete"] is False

    summary = run_cache(make_config(big_corpus_dir, out, shard_size=2), show_progress=False)
    assert summary.shards_already_done == len(done) and summary.shards_run == num_shards - len(done)
    assert summary.complete and read_attrs(out)["complete"] is True
    uninterrupted = tmp_path / "uninterrupted"
    assert run_cache(make_config(big_corpus_dir, uninterrupted, shard_size=2), show_progress=False).complete
    same_store(out, uninterrupted)


@pytest.mark.subprocess
def test_dask_two_workers_equal_one_process(
    tmp_path: Path,
    corpus_dir: Path,
    ref_store: Path,
    make_config: Callable[..., CacheConfig],
    same_store: Callable[[Path, Path], None],
) -> None:
    out = tmp_path / "dask"
    # Same torch thread count as the reference process: on CPU, MKL splits small GEMMs (the last
    # shard's batch of 2 views is 6 token rows) differently for 1 and 2 threads, changing the last bit.
    assert torch.get_num_threads() == 1
    cfg = make_config(corpus_dir, out, shards=None, workers=2, threads_per_worker=1)
    summary = run_cache(cfg, show_progress=False)
    assert summary.shards_run == NUM_SHARDS and summary.cached == 13 and summary.complete
    same_store(out, ref_store)


def test_replay_threads_do_not_change_the_store(
    tmp_path: Path,
    corpus_dir: Path,
    ref_store: Path,
    make_config: Callable[..., CacheConfig],
    same_store: Callable[[Path, Path], None],
) -> None:
    # three threads replay the next batches while the teacher runs; batch_size 2 makes several batches
    ref = tmp_path / "ref"
    run_cache(make_config(corpus_dir, ref, batch_size=2), show_progress=False)
    out = tmp_path / "threads"
    summary = run_cache(make_config(corpus_dir, out, batch_size=2, replay_threads=3), show_progress=False)
    assert summary.complete and summary.cached == 13
    same_store(out, ref)


def test_ahead_keeps_order_and_batches() -> None:
    import random
    import time

    def slow_square(x: int) -> int:
        time.sleep(random.random() * 0.002)
        return x * x

    jobs = list(range(23))
    for threads in (1, 4):
        got = list(batches_ahead(jobs, 5, slow_square, threads))
        assert [b for b, _ in got] == [jobs[i : i + 5] for i in range(0, 23, 5)]
        assert [r for _, rs in got for r in rs] == [x * x for x in jobs]


def test_replay_threads_for() -> None:
    cfg = CacheConfig()
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert replay_threads_for(cfg, cpu, 8) == 1  # a CPU teacher keeps the cores busy
    assert replay_threads_for(cfg, gpu, 8) == 8 and replay_threads_for(cfg, gpu, 0) == 1
    assert replay_threads_for(CacheConfig(replay_threads=3), cpu, 8) == 3


def test_bad_files_are_skipped_with_reasons(
    tmp_path: Path,
    bad_corpus_dir: Path,
    bad_cases: dict[str, tuple[bytes, str]],
    make_config: Callable[..., CacheConfig],
) -> None:
    out = tmp_path / "bad"
    summary = run_cache(make_config(bad_corpus_dir, out), show_progress=False)
    expected_bad = {k: reason for k, (_, reason) in bad_cases.items() if reason != "rgb"}
    assert len(expected_bad) == 5 and summary.skipped == 5 and summary.cached == 6 and summary.complete
    info = store_info(out)
    assert info["num_skipped_images"] == 5 and info["num_cached_images"] == 6
    skipped = {s["key"]: s["reason"] for s in info["skipped"]}
    assert set(skipped) == set(expected_bad)
    for key, fragment in expected_bad.items():
        assert fragment in skipped[key], (key, skipped[key])

    reader = StoreReader(out)
    keys = [str(k) for k in reader.meta(KEYS)]
    valid = reader.meta(VALID)
    assert [k for k, v in zip(keys, valid, strict=True) if v] == sorted(
        [k for k, (_, r) in bad_cases.items() if r == "rgb"] + [k for k in keys if k.startswith("good_")]
    )
    idx = np.arange(len(keys))
    for k in range(2):
        t = reader.read_targets(idx, k)
        bad_rows = torch.from_numpy(valid == 0)
        assert (t.global_[bad_rows] == 0).all() and (t.relation[bad_rows] == 0).all()
        assert (t.global_[~bad_rows].abs().amax(-1) > 0).all()
        for i in np.flatnonzero(valid):
            assert valid[background_index(t.params[i])] == 1  # backgrounds are decodable images
    for i, key in enumerate(keys):
        if valid[i]:
            assert reader.image_bytes(i) == (bad_corpus_dir / key).read_bytes()
            assert decode_image(reader.image_bytes(i)).mode == "RGB"
        else:
            assert reader.meta(IMAGE_OFFSET)[i] == -1
            with pytest.raises(StoreError, match="no embedded image"):
                reader.image_bytes(i)


def test_strict_raises_on_the_first_bad_file(
    tmp_path: Path, bad_corpus_dir: Path, teacher: Teacher, make_config: Callable[..., CacheConfig]
) -> None:
    cfg = make_config(bad_corpus_dir, tmp_path / "strict", strict=True)
    prepare_store(cfg, teacher)
    with pytest.raises(StrictModeError, match=r"bad image 'bad_bomb.png' \(decompression bomb"):
        cache_shard(cfg.out, 0, teacher, cfg)
    assert not marker_path(cfg.out, 0).exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"seed": 1}, "seed: store has 0, this run has 1"),
        ({"num_views": 3}, "num_views: store has 2, this run has 3"),
        ({"dtype": "float16"}, "dtype: store has 'float32', this run has 'float16'"),
        (
            {"teacher": "deit_tiny_patch16_224"},
            "teacher.name: store has 'vit_tiny_patch16_224', this run has 'deit_tiny_patch16_224'",
        ),
        ({"random_init_seed": 1}, "teacher.random_init_seed: store has 0, this run has 1"),
        (
            {"views": ViewRecipe(global_size=(32, 16), local_size=(16, 16), crowd_size=(32, 48), flip_p=0.0)},
            "views.flip_p: store has 0.5, this run has 0.0",
        ),
        # these change stored values too: which images are skipped, and the teacher's last bits
        ({"max_pixels": 100}, "value_settings.max_pixels: store has 64000000, this run has 100"),
        ({"batch_size": 8}, "value_settings.batch_size: store has 32, this run has 8"),
        (
            {"shards": None, "threads_per_worker": 2},
            "value_settings.teacher_threads: store has 1, this run has 2",
        ),
    ],
)
def test_mismatched_resume_is_refused(
    store_copy: Path, corpus_dir: Path, make_config: Callable[..., CacheConfig], override: dict, needle: str
) -> None:
    before = sorted(p.name for p in store_copy.rglob("*"))
    with pytest.raises(StoreError, match="made with different settings") as e:
        run_cache(make_config(corpus_dir, store_copy, **override), show_progress=False)
    assert needle in str(e.value)
    assert sorted(p.name for p in store_copy.rglob("*")) == before


def test_changed_corpus_is_refused(
    tmp_path: Path,
    corpus_dir: Path,
    ref_store: Path,
    teacher: Teacher,
    make_config: Callable[..., CacheConfig],
) -> None:
    corpus = Path(shutil.copytree(corpus_dir, tmp_path / "corpus"))
    (corpus / "zz_new.jpg").write_bytes((corpus / "p00.jpg").read_bytes())
    store = Path(shutil.copytree(ref_store, tmp_path / "store"))
    with pytest.raises(StoreError) as e:
        prepare_store(make_config(corpus, store), teacher)
    assert "num_images: store has 13, this run has 14" in str(e.value) and "corpus_fingerprint" in str(
        e.value
    )


def test_out_paths(
    tmp_path: Path, corpus_dir: Path, teacher: Teacher, make_config: Callable[..., CacheConfig]
) -> None:
    empty = tmp_path / "made_by_user"
    empty.mkdir()
    lay = prepare_store(make_config(corpus_dir, empty), teacher)  # an empty folder becomes the store
    assert lay.num_shards == NUM_SHARDS and read_attrs(empty)["num_images"] == 13
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="exists and is not a dpal store"):
        prepare_store(make_config(corpus_dir, tmp_path / "file"), teacher)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("x")
    with pytest.raises(StoreError, match="exists and is not a dpal store"):
        prepare_store(make_config(corpus_dir, tmp_path / "full"), teacher)
    with pytest.raises(StoreError, match=r"--out .*file/store: cannot create"):
        prepare_store(make_config(corpus_dir, tmp_path / "file" / "store"), teacher)


def test_done_shard_is_not_recomputed(
    store_copy: Path, teacher: Teacher, corpus_dir: Path, make_config: Callable[..., CacheConfig]
) -> None:
    marker = marker_path(store_copy, 1)
    before = marker.read_bytes(), marker.stat().st_mtime_ns
    rep = cache_shard(store_copy, 1, teacher, make_config(corpus_dir, store_copy))
    assert rep.already_done and rep.num_cached == 0
    assert (marker.read_bytes(), marker.stat().st_mtime_ns) == before


def test_tar_corpus_and_embedded_webdataset_tars(
    tmp_path: Path, corpus_files: dict[str, bytes], make_config: Callable[..., CacheConfig]
) -> None:
    names = sorted(corpus_files)[:4]  # p00.jpg, p01.jpg, p02.png, p04.jpg
    with wds.TarWriter(str(tmp_path / "src.tar")) as sink:
        for n in names:
            sink.write({"__key__": Path(n).stem, Path(n).suffix[1:]: corpus_files[n]})
    out = tmp_path / "store"
    run_cache(make_config(tmp_path / "src.tar", out, num_views=1), show_progress=False)
    reader = StoreReader(out)
    assert [str(k) for k in reader.meta(KEYS)] == [Path(n).stem for n in names]
    for i, n in enumerate(names):
        assert reader.image_bytes(i) == corpus_files[n]
    # the store's image tars are WebDataset samples: __key__ = store index, the image under its
    # real extension (tar corpus keys carry none) and the corpus key
    with tarfile.open(out / IMAGES_DIR / "000000.tar") as tf:
        members = tf.getnames()
    assert members == [
        "000000000.jpg",
        "000000000.key.txt",
        "000000001.jpg",
        "000000001.key.txt",
        "000000002.png",
        "000000002.key.txt",
    ]
    samples = list(wds.WebDataset(str(out / IMAGES_DIR / "000000.tar"), shardshuffle=False))
    assert [s["key.txt"].decode() for s in samples] == ["p00", "p01", "p02"]
    assert samples[2]["png"] == corpus_files["p02.png"]

    # --no-embed-images: the same targets, and image bytes read back from the corpus tar by offset
    ref_out = tmp_path / "referenced"
    run_cache(
        make_config(tmp_path / "src.tar", ref_out, num_views=1, embed_images=False), show_progress=False
    )
    referenced = StoreReader(ref_out)
    assert not list((ref_out / IMAGES_DIR).iterdir())
    assert np.array_equal(referenced.array(PARAMS)[:], reader.array(PARAMS)[:])
    for i, n in enumerate(names):
        assert referenced.image_bytes(i) == corpus_files[n]
        assert torch.equal(
            referenced.read_targets(np.array([i]), 0).local, reader.read_targets(np.array([i]), 0).local
        )


def test_dry_run_sizes_the_store(
    corpus_dir: Path, corpus_files: dict[str, bytes], make_config: Callable[..., CacheConfig]
) -> None:
    rep = dry_run(make_config(corpus_dir, ""))
    bytes_per_view = (192 + 2 * 192 + 7 * 7) * 4 + 56 * 8  # float32 D + P * D + T * T, then 56 float64 params
    assert rep["num_images"] == 13 and rep["num_shards"] == NUM_SHARDS and rep["num_views"] == 2
    assert rep["bytes_per_view"] == bytes_per_view and rep["feature_bytes"] == bytes_per_view * 13 * 2
    assert abs(rep["image_bytes"] - sum(len(b) for b in corpus_files.values())) <= 1
    assert rep["store_bytes"] == rep["feature_bytes"] + rep["image_bytes"]
    assert rep["seconds_per_view"] > 0 and rep["teacher"]["embed_dim"] == 192


def test_corpus_problems_are_recorded_counted_and_strict(
    tmp_path: Path, corpus_files: dict[str, bytes], make_config: Callable[..., CacheConfig]
) -> None:
    """A FIFO and a non-UTF-8 file name (which aborted the whole run) are recorded in the store,
    counted in the summary, and stop a --strict run before any store is made."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    names = sorted(n for n in corpus_files if "/" not in n)[:4]
    for n in names:
        (corpus / n).write_bytes(corpus_files[n])
    os.mkfifo(corpus / "pipe.jpg")
    with open(os.path.join(os.fsencode(corpus), b"\xff\xfe.jpg"), "wb") as f:
        f.write(corpus_files[names[0]])
    out = tmp_path / "store"
    summary = run_cache(make_config(corpus, out), show_progress=False)
    assert (summary.cached, summary.skipped, summary.corpus_problems, summary.complete) == (4, 0, 2, True)
    assert "2 corpus entries unreadable and lost" in summary.line()
    assert read_attrs(out)["corpus_problems"] == [
        {"entry": f"{corpus}/pipe.jpg", "reason": "a FIFO (named pipe), not a regular file"},
        {
            "entry": f"{corpus}/\\xff\\xfe.jpg",
            "reason": "file name is not valid UTF-8 (store keys are UTF-8); rename it",
        },
    ]
    assert [str(k) for k in StoreReader(out).meta(KEYS)] == names
    with pytest.raises(StrictModeError, match=r"corpus entry .*pipe.jpg: a FIFO .*rerun without --strict"):
        run_cache(make_config(corpus, tmp_path / "strict", strict=True), show_progress=False)
    assert not (tmp_path / "strict").exists()


def test_value_settings_of_a_store_from_before_they_were_recorded() -> None:
    """A store written before `value_settings` existed is compared on what its config recorded."""
    from dpal.pipeline.prepare import _value_settings_diff

    now = {
        "value_settings": {
            "max_pixels": 100,
            "batch_size": 32,
            "teacher_device": "cpu",
            "teacher_precision": "float32",
        }
    }
    old = {"config": {"max_pixels": 64_000_000, "batch_size": 32, "device": "auto"}}
    assert _value_settings_diff(old, now) == [
        "value_settings.max_pixels: store has 64000000, this run has 100"
    ]
    assert _value_settings_diff({"config": {"max_pixels": 100, "batch_size": 32}}, now) == []
    cuda = {
        "value_settings": {
            **now["value_settings"],
            "teacher_device": "cuda",
            "teacher_precision": "bfloat16 autocast",
        }
    }
    assert _value_settings_diff(cuda, now) == [
        "value_settings.teacher_device: store has 'cuda', this run has 'cpu'",
        "value_settings.teacher_precision: store has 'bfloat16 autocast', this run has 'float32'",
    ]
