"""Store integrity: stage two never reads damaged or edited data. Real stores written by stage one
(conftest's `ref_store`), real bytes changed on disk: a flipped byte in `valid`, swapped
`image_offset` rows, a flipped byte inside an embedded JPEG, an edited zarr.json; each is refused
with one line that names the file or shard and says what to run."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

from dpal.store import (
    IMAGE_OFFSET,
    IMAGES_DIR,
    PARAMS,
    VALID,
    StoreError,
    StoreReader,
    crc32c_of,
    marker_path,
    read_marker,
    shard_name,
)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_markers_record_the_crc32c_of_rows_and_images(
    ref_store: Path, corpus_files: dict[str, bytes]
) -> None:
    reader = StoreReader(ref_store)
    keys = [str(k) for k in reader.meta("keys")]
    for s in range(reader.layout.num_shards):
        m = read_marker(ref_store, s)
        a, b = reader.layout.shard_range(s)
        assert m["crc32c"] == {
            name: crc32c_of(zarr.open_array(ref_store / name, mode="r")[a:b])
            for name in (PARAMS, VALID, IMAGE_OFFSET, "image_size")
        }
        assert m["image_crc32c"] == [google_crc32c.value(corpus_files[k]) for k in keys[a:b]]


def test_flipped_byte_in_valid_stops_naming_the_shard(store_copy: Path) -> None:
    chunk = store_copy / VALID / "c" / "2"  # rows 6..8
    clean = chunk.read_bytes()
    caught = 0
    for offset in range(len(clean)):  # every byte of the (zstd-framed) chunk file
        chunk.write_bytes(clean)
        _flip(chunk, offset)
        with pytest.raises(StoreError) as e:
            StoreReader(store_copy).valid_rows()
        msg = _one_line(e)
        assert "shard(s) 000002" in msg and "shards/000002.json" in msg and "dpal cache-teacher" in msg, msg
        caught += 1
    assert caught == len(clean)
    chunk.write_bytes(clean)
    assert StoreReader(store_copy).valid_rows().tolist() == list(range(13))


def test_swapped_image_offset_rows_stop_naming_the_shard(store_copy: Path) -> None:
    arr = zarr.open_array(store_copy / IMAGE_OFFSET, mode="r+")
    rows = arr[3:5]
    arr[3:5] = rows[::-1]  # a valid chunk (Zarr rewrites it), but other rows' images
    reader = StoreReader(store_copy)
    assert reader.valid_rows().size == 13  # other arrays still read
    with pytest.raises(StoreError) as e:
        reader.image_bytes(0)  # the offsets are checked whole, when first read: any row stops
    msg = _one_line(e)
    assert "'image_offset' rows of shard 000001" in msg and f"{marker_path(store_copy, 1).as_posix()}" in msg


def test_flipped_byte_inside_an_embedded_jpeg_stops_naming_the_shard(
    store_copy: Path, corpus_files: dict[str, bytes]
) -> None:
    reader = StoreReader(store_copy)
    keys = [str(k) for k in reader.meta("keys")]
    row = next(i for i in range(3, 6) if keys[i].endswith(".jpg"))  # a JPEG of shard 1
    assert reader.image_bytes(row) == corpus_files[keys[row]]
    tar = store_copy / IMAGES_DIR / "000001.tar"
    with tarfile.open(tar) as tf:
        member = tf.getmember(f"{row:09d}.jpg")
    _flip(tar, member.offset_data + member.size // 2)  # inside the entropy-coded data: still decodes
    reader = StoreReader(store_copy)
    assert all(reader.image_bytes(i) == corpus_files[keys[i]] for i in range(3, 6) if i != row)  # the others
    with pytest.raises(StoreError) as e:
        reader.image_bytes(row)
    msg = _one_line(e)
    assert (
        msg.startswith(f"{tar}: the image of row {row} (shard 000001) does not match")
        and "000001.json" in msg
    )


def test_changed_corpus_image_of_a_referencing_store_is_refused(
    tmp_path: Path, corpus_dir: Path, make_config
) -> None:
    import shutil

    from dpal.pipeline.engine import run_cache

    corpus = Path(shutil.copytree(corpus_dir, tmp_path / "corpus"))
    out = tmp_path / "store"
    run_cache(make_config(corpus, out, embed_images=False, num_views=1), show_progress=False)
    assert StoreReader(out).image_bytes(0) == (corpus / "p00.jpg").read_bytes()
    _flip(corpus / "p00.jpg", 300)  # same size, same key: the corpus fingerprint cannot see it
    with pytest.raises(StoreError) as e:
        StoreReader(out).image_bytes(0)
    assert "p00.jpg: the image of row 0 (shard 000000) does not match" in _one_line(e)


def test_rewritten_params_rows_stop_naming_the_shard(store_copy: Path) -> None:
    arr = zarr.open_array(store_copy / PARAMS, mode="r+")
    p = arr[9:12]
    arr[9:12] = p[[1, 0, 2]]  # rows 9 and 10 swapped: a valid zstd chunk with its own checksum
    reader = StoreReader(store_copy)
    assert reader.read_targets(np.array([0, 12]), 0).params.shape == (2, 56)
    with pytest.raises(StoreError) as e:
        reader.read_targets(np.array([0, 10]), 1)
    assert "'params' rows of shard 000003" in _one_line(e)
    with pytest.raises(StoreError, match="shard 000003"):
        reader.read_params(np.array([11]), 0)


def test_damaged_marker_without_checksums_is_refused(store_copy: Path) -> None:
    m = read_marker(store_copy, 2)
    del m["crc32c"]
    marker_path(store_copy, 2).write_text(json.dumps(m))
    with pytest.raises(StoreError) as e:
        StoreReader(store_copy).valid_rows()
    assert f"marker of shard {shard_name(2)} has no checksums" in _one_line(e)


def test_schema_1_store_still_reads_unchecked(store_copy: Path, ref_store: Path) -> None:
    # a schema-1 store: the group says 1 and the markers carry no crc32c
    group = zarr.open_group(store_copy, mode="r+")
    group.attrs["schema_version"] = 1
    del group.attrs["integrity"]
    for s in range(5):
        m = read_marker(store_copy, s)
        del m["crc32c"], m["image_crc32c"]
        marker_path(store_copy, s).write_text(json.dumps(m))
    old, ref = StoreReader(store_copy), StoreReader(ref_store)
    assert old.valid_rows().tolist() == list(range(13))
    assert all(old.image_bytes(i) == ref.image_bytes(i) for i in range(13))
    idx = np.array([12, 0, 4])
    assert np.array_equal(old.read_targets(idx, 1).params, ref.read_targets(idx, 1).params)


def test_distill_stops_on_a_flipped_jpeg_byte_with_one_line(tmp_path: Path) -> None:
    import sys

    from typer.testing import CliRunner

    from dpal.cli import app
    from dpal.corpus import decode_image

    u = sys.modules["dpal_tests_stage2_util"]
    store = u.make_store(u.make_corpus(tmp_path / "corpus"), tmp_path / "store")
    tar = store / IMAGES_DIR / "000001.tar"  # rows 4..7
    with tarfile.open(tar) as tf:
        member = tf.getmember("000000005.jpg")
    _flip(tar, member.offset_data + member.size // 2)
    with open(tar, "rb") as f:  # the damaged JPEG still decodes: only the checksum can tell
        f.seek(member.offset_data)
        assert decode_image(f.read(member.size)).size == (32, 48)
    result = CliRunner().invoke(app, u.distill_args(store, tmp_path / "run"))
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "row 5 (shard 000001)" in errors[0] and "000001.json" in errors[0], (
        result.stderr
    )


# ---------------------------------------------------------------- the store's own metadata (item 4)


def _edit_json(path: Path, old: str, new: str) -> None:
    """Replace the first `old` in a JSON file, as an editor would (the group's own attributes come
    before the saved config)."""
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_edited_dtype_attribute_is_refused_on_open_and_by_verify(store_copy: Path) -> None:
    from dpal.store import verify_store

    # the case: the group's dtype edited by hand (float32 -> bfloat16 reinterprets every target)
    _edit_json(store_copy / "zarr.json", '"dtype": "float32"', '"dtype": "bfloat16"')
    with pytest.raises(StoreError) as e:
        StoreReader(store_copy)
    msg = _one_line(e)
    assert msg.startswith(f"{store_copy}: zarr.json: the store's attributes changed") and "--out NEW" in msg
    rep = verify_store(store_copy)
    assert not rep["ok"] and rep["metadata"] == [
        "zarr.json: the store's attributes changed since it was created"
    ]
    assert rep["bad"] == {} and rep["not_done"] == []


def test_distill_refuses_an_edited_dtype_attribute_with_one_line(tmp_path: Path) -> None:
    import sys

    from typer.testing import CliRunner

    from dpal.cli import app

    u = sys.modules["dpal_tests_stage2_util"]
    store = u.make_store(u.make_corpus(tmp_path / "corpus"), tmp_path / "store", dtype="float16")
    _edit_json(store / "zarr.json", '"dtype": "float16"', '"dtype": "bfloat16"')  # the edit
    result = CliRunner().invoke(app, u.distill_args(store, tmp_path / "run"))
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{store}: zarr.json: the store's attributes changed" in errors[0], (
        result.stderr
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step trained


def test_edited_array_zarr_json_is_refused(store_copy: Path) -> None:
    from dpal.store import verify_store

    # float32 bits read as int32: same size, so Zarr alone reads it without complaint
    _edit_json(store_copy / "global" / "zarr.json", '"data_type": "float32"', '"data_type": "int32"')
    assert zarr.open_array(store_copy / "global", mode="r")[0, 0].dtype == np.int32
    with pytest.raises(StoreError) as e:
        StoreReader(store_copy)
    assert "global/zarr.json changed since the store was created" in _one_line(e)
    assert verify_store(store_copy)["metadata"] == ["global/zarr.json changed since the store was created"]


def test_edited_index_array_is_refused(store_copy: Path) -> None:
    from dpal.store import verify_store

    keys = zarr.open_array(store_copy / "keys", mode="r+")
    first = keys[0:2]
    keys[0:2] = first[::-1]
    reader = StoreReader(store_copy)  # opens: the index is checked when read
    with pytest.raises(StoreError) as e:
        reader.meta("keys")
    assert "the 'keys' array does not match the checksum recorded when the store was created" in _one_line(e)
    assert verify_store(store_copy)["metadata"] == ["index array 'keys' does not match its checksum"]


def test_cli_verify_names_edited_metadata(store_copy: Path) -> None:
    from typer.testing import CliRunner

    from dpal.cli import app

    _edit_json(store_copy / "zarr.json", '"num_views": 2', '"num_views": 1')
    result = CliRunner().invoke(app, ["store", "verify", str(store_copy)])
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "BAD store metadata: zarr.json: the store's attributes changed since it was created",
        "the store's own metadata cannot be rewritten shard by shard: restore the store from a copy, or rebuild it "
        "with `dpal cache-teacher --out NEW`",
    ]


# ---------------------------------------------------------------- corrupt markers and zarr.json (item 12)


def _cli_error(*args: str) -> str:
    from typer.testing import CliRunner

    from dpal.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("damage", ["truncated", "other shard", "not an object"])
def test_corrupt_marker_names_the_file_and_the_shard(store_copy: Path, damage: str) -> None:
    from dpal.store import verify_store

    f = marker_path(store_copy, 3)
    text = f.read_text()
    f.write_text(
        {
            "truncated": text[: len(text) // 2],
            "other shard": text.replace('"shard": 3', '"shard": 2'),
            "not an object": "[1, 2]",
        }[damage]
    )
    line = _cli_error("store", "info", str(store_copy))
    assert (
        line.startswith(f"error: {f}: the marker of shard 000003 ")
        and "rerun the same `dpal cache-teacher`" in line
    )
    with pytest.raises(StoreError, match="marker of shard 000003"):
        StoreReader(store_copy).valid_rows()
    rep = verify_store(store_copy)
    assert rep["bad"] == {"000003": ["shards/000003.json is damaged"]} and not rep["ok"]


def test_corrupt_group_zarr_json_names_the_file(store_copy: Path) -> None:
    f = store_copy / "zarr.json"
    f.write_bytes(f.read_bytes()[:100])
    line = _cli_error("store", "info", str(store_copy))
    assert line.startswith(f"error: {f}: the store's attributes cannot be read (JSONDecodeError: ")
    assert "restore the store from a copy, or rebuild it" in line


def test_corrupt_array_zarr_json_names_the_file(store_copy: Path) -> None:
    # in a schema-1 store (no recorded checksums) the damage shows when the array is opened
    group = zarr.open_group(store_copy, mode="r+")
    group.attrs["schema_version"] = 1
    del group.attrs["integrity"]
    f = store_copy / "local" / "zarr.json"
    f.write_text(f.read_text()[:50])
    reader = StoreReader(store_copy)
    with pytest.raises(StoreError) as e:
        reader.read_targets(np.array([0]), 0)
    assert _one_line(e).startswith(f"{f}: array 'local' cannot be opened (JSONDecodeError: ")


# ---------------------------------------------------------------- temporary files of killed writers (item 14)

_KILLED_WRITERS = """
import os, signal, sys, tempfile
from pathlib import Path
import numpy as np
from dpal import store as st

root = Path(sys.argv[1])


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def killed(write):  # a forked writer killed at its rename, as by a SIGKILL at the worst moment
    pid = os.fork()
    if pid == 0:
        os.replace = die
        Path.replace = die
        write()
        os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


killed(lambda: (tempfile.mkdtemp(dir=root.parent, prefix=st._init_prefix(root)), die()))
killed(lambda: st.atomic_write_bytes(root / "images" / "000002.tar", b"x" * 1000))
killed(lambda: st.atomic_write_bytes(st.marker_path(root, 2), b"{}"))
killed(lambda: st._open_rw(root, "valid").__setitem__(slice(6, 9), np.ones(3, dtype=np.uint8)))
killed(lambda: st._open_rw(root, "global").__setitem__(slice(6, 9), np.ones((3, 2, 192), dtype=np.float32)))
"""


def _temporaries(store: Path) -> list[str]:
    found = [p for p in store.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    found += list(store.parent.glob(f".{store.name}.init-*"))
    return sorted(p.relative_to(store.parent).as_posix() for p in found)


@pytest.mark.subprocess
def test_temporaries_of_killed_writers_are_removed_on_resume(
    store_copy: Path, ref_store: Path, corpus_dir: Path, make_config, child_env: dict[str, str], same_store
) -> None:
    import subprocess
    import sys

    from dpal.pipeline.engine import run_cache
    from dpal.store import remove_shard_temporaries

    marker_path(store_copy, 2).unlink()  # shard 2's writer was killed: no marker
    subprocess.run(
        [sys.executable, "-c", _KILLED_WRITERS, str(store_copy)], check=True, timeout=120, env=child_env
    )
    left = _temporaries(store_copy)
    assert [p.split("/")[0] for p in left if "init-" in p] and len(left) == 5, left
    assert {p.rsplit(".", 1)[-1] for p in left if "init-" not in p} == {"tmp", "partial"}
    assert remove_shard_temporaries(store_copy, 1) == []  # another shard's writer leaves them alone

    summary = run_cache(make_config(corpus_dir, store_copy), show_progress=False)
    assert summary.shards_run == 1 and summary.complete
    assert _temporaries(store_copy) == []
    same_store(store_copy, ref_store)


# ---------------------------------------------------------------- messages that named too much (item 15)


def test_params_read_error_names_the_one_damaged_shard(store_copy: Path) -> None:
    f = store_copy / PARAMS / "c" / "2" / "0" / "0"  # shard 2's zstd chunk, with its content checksum
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError) as e:
        StoreReader(store_copy).read_params(np.array([0, 7, 12]), 0)  # rows of shards 0, 2 and 4
    msg = _one_line(e)
    assert "view parameters of shard(s) 000002 cannot be read" in msg and "shards/000002.json" in msg
    assert "000000" not in msg and "000004" not in msg


def test_store_verify_is_suggested_only_when_it_finds_something(store_copy: Path) -> None:
    from dpal.store import verify_store

    reader = StoreReader(store_copy)
    with pytest.raises(StoreError) as e:
        reader.read_targets(np.array([3, 13]), 0)  # 13 images: row 13 is not in this store
    msg = _one_line(e)
    assert "row(s) 13 are outside this store's 13 images (rows 0 to 12)" in msg and "store verify" not in msg
    assert verify_store(store_copy)["ok"]
    with pytest.raises(StoreError, match="row"):
        reader.image_bytes(-1)

    (store_copy / "relation" / "c" / "1" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreError) as e:
        StoreReader(store_copy).read_targets(np.array([0, 4]), 0)
    msg = _one_line(e)
    assert "`dpal store verify` finds 000001: relation/c/1/0/0/0 missing" in msg and "000000" not in msg
    assert verify_store(store_copy)["bad"] == {"000001": ["relation/c/1/0/0/0 missing"]}


def test_summary_lists_skipped_images_with_reasons(
    tmp_path: Path, bad_corpus_dir: Path, bad_cases: dict[str, tuple[bytes, str]], make_config
) -> None:
    from dpal.pipeline.engine import run_cache

    summary = run_cache(make_config(bad_corpus_dir, tmp_path / "store"), show_progress=False)
    lines = summary.line().splitlines()
    bad = sorted(k for k, (_, reason) in bad_cases.items() if reason != "rgb")
    assert len(lines) == 6 and lines[-1].startswith("cached 6 images in 4 shards")
    assert [ln.split(":", 1)[0] for ln in lines[:5]] == [f"skipped {k}" for k in bad]
    for ln, key in zip(lines[:5], bad, strict=True):
        assert bad_cases[key][1] in ln.split(": ", 1)[1], ln
    assert [s["key"] for s in summary.skipped_images] == bad
    assert summary.line(max_listed=2).splitlines()[2] == "... and 3 more (`dpal store info --json` lists all)"


def test_shard_finished_by_another_run_is_not_counted_as_run(
    tmp_path: Path, corpus_dir: Path, teacher, make_config
) -> None:
    from dpal.pipeline.cache import cache_shard
    from dpal.pipeline.engine import summarize
    from dpal.pipeline.prepare import prepare_store

    cfg = make_config(corpus_dir, tmp_path / "store")
    layout = prepare_store(cfg, teacher)
    pending = list(range(layout.num_shards))  # this run's plan, made before the other run wrote shard 1
    cache_shard(cfg.out, 1, teacher, cfg)  # the other run sharing the store
    reports = [cache_shard(cfg.out, s, teacher, cfg) for s in pending]
    assert [r.already_done for r in reports] == [False, True, False, False, False]
    summary = summarize(Path(cfg.out), layout, len(pending), reports, 1.0, True)
    assert (summary.shards_run, summary.shards_already_done, summary.images, summary.cached) == (4, 1, 10, 10)
    assert summary.shards_done == 5
    assert summary.line() == (
        "cached 10 images in 4 shards (10.0 img/s, 1.0 s); skipped 0 bad images; "
        "1 shards were already done; store complete"
    )


def test_resume_names_a_corrupt_marker(store_copy: Path, corpus_dir: Path, make_config) -> None:
    from dpal.pipeline.engine import run_cache

    f = marker_path(store_copy, 4)
    f.write_text(f.read_text()[:-40])
    with pytest.raises(StoreError) as e:
        run_cache(make_config(corpus_dir, store_copy), show_progress=False)
    assert _one_line(e).startswith(f"{f}: the marker of shard 000004 is not valid JSON")
    f.unlink()  # as the message says: delete it and rerun
    summary = run_cache(make_config(corpus_dir, store_copy), show_progress=False)
    assert (summary.shards_run, summary.shards_already_done, summary.complete) == (1, 4, True)
    assert StoreReader(store_copy).valid_rows().tolist() == list(range(13))
