"""Issue 19: never train on NaN, never lose a run to a side input.

Every setting is checked before anything is written (no --out left behind); a loss or gradient norm
that is not finite stops the run before the optimizer step and before any checkpoint, in one line
(or is skipped, --skip-nonfinite); side inputs (--eval-reid, --val-store) are read at the start;
damaged metrics.jsonl lines never block a resume; pickles that would run code are refused in
dpal's own words. The tiny run of tests/stage2_util.py (10 images, batch 4, 6 steps) is the
reference; stores are real Zarr stores written by stage one, edited through zarr where a test
needs a value changed with every checksum still valid.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import dpal_tests_stage2_util as u  # registered by conftest.py
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from dpal.cli import app
from dpal.errors import InputError
from dpal.trainer.train import Trainer


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    yield from u.one_torch_thread()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def corpus(root: Path) -> Path:
    return u.make_corpus(root / "corpus")


@pytest.fixture(scope="module")
def store16(root: Path, corpus: Path) -> Path:
    return u.make_store(corpus, root / "store16", dtype="float16")


def _cli(*args: Any) -> Any:
    """`dpal ARGS` in this process; the CLI's logging setup is undone afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _one_error_line(result: Any) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback, nothing after it)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    return errors[0]


# ---------------------------------------------------------------- item 3: settings checked at the start

NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        (["--base-lr", "nan"], "error: base_lr must be a finite number > 0, got nan"),
        (["--base-lr", "-1"], "error: base_lr must be a finite number > 0, got -1.0"),
        (["--base-lr", "0"], "error: base_lr must be a finite number > 0, got 0.0"),
        (["--min-lr", "-1e-6"], "error: min_lr must be a finite number >= 0, got -1e-06"),
        (["--warmup-epochs", "-1"], "error: warmup_epochs must be a finite number >= 0, got -1.0"),
        (["--set", "weight_decay=.nan"], "error: weight_decay must be a finite number >= 0, got nan"),
        (["--skip-nonfinite", "-1"], "error: skip_nonfinite must be an integer >= 0, got -1"),
        (
            ["--betas", "[1.5, 0.9]"],
            "error: betas must be two numbers in [0, 1) (AdamW's beta1 and beta2), got [1.5, 0.9]",
        ),
        (
            ["--betas", "1.5", "--betas", "0.9"],
            "error: betas must be two numbers in [0, 1) (AdamW's beta1 and beta2), got [1.5, 0.9]",
        ),
        (
            ["--betas", "0.9"],
            "error: betas must be a list of 2 values: one YAML list such as [0.9, 0.95], or on the "
            "command line the option once per value; got 0.9",
        ),
        (["--epochs", "0"], "error: epochs, batch_size and grad_accum must be >= 1"),
        (
            ["--set", "student_kwargs={depth: -1}"],
            "error: timm cannot build 'vit_tiny_patch16_224' with student_kwargs {'depth': -1} "
            "(RuntimeError: number of steps must be non-negative); fix or drop those keys",
        ),
        pytest.param(
            ["--device", "cuda"],
            "error: --device cuda: torch sees no CUDA device here (no GPU, no driver, or "
            "CUDA_VISIBLE_DEVICES hides it); use --device cpu, or auto to take a GPU where there is one",
            marks=pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU"),
        ),
        (["--resume", "no-such.pt"], "error: --resume no-such.pt: no such checkpoint"),
    ],
)
def test_a_bad_setting_is_one_line_and_leaves_no_out_behind(
    store16: Path, tmp_path: Path, extra: list[str], line: str
) -> None:
    out = tmp_path / "run"
    assert _one_error_line(_cli(*u.distill_args(store16, out), *extra)) == line
    assert not out.exists()  # not even the lock file of a run that never started


def test_betas_repeated_on_the_command_line_are_the_list(store16: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _cli(*u.distill_args(store16, out), "--betas", "0.8", "--betas", "0.9", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["betas"] == [0.8, 0.9]


def test_a_config_directory_is_named_as_one(store16: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = _one_error_line(_cli(*u.distill_args(store16, out), "--config", tmp_path))
    assert line == f"error: config file {tmp_path} is a directory; give a YAML or TOML file"


def test_a_store_with_no_cached_image_says_so(root: Path, tmp_path: Path) -> None:
    bad = root / "bad_corpus"
    bad.mkdir(exist_ok=True)
    for i in range(3):
        (bad / f"bad{i}.jpg").write_bytes(b"this is a text file, not a JPEG\n")
    store = u.make_store(bad, root / "store_empty")
    out = tmp_path / "run"
    line = _one_error_line(_cli(*u.distill_args(store, out)))
    assert line == (
        f"error: store {store} has 0 cached images of its 3 (every one skipped, or in shards not "
        f"finished): nothing to train on; `dpal store info {store}` lists the skipped images and why"
    )
    assert not out.exists()


# ---------------------------------------------------------------- item 1: the non-finite guard

# base_lr 1e12 (peak 7.8e9 at step 1 of the 2-step warmup): step 1 is finite, its AdamW update makes
# the forward of step 2 overflow float32, so every term and the gradient of step 2 are NaN
DIVERGING = ["--base-lr", "1e12", "--set", "checkpoint_every=1"]
STEP_2 = "img03.jpg, img09.jpg, img00.jpg, img08.jpg (store rows 3, 9, 0, 8)"  # the sampler's batches
STEP_4 = "img00.jpg, img08.jpg, img09.jpg, img03.jpg (store rows 0, 8, 9, 3)"
NAN_LINE = (
    "error: step {step}: not finite: global nan, local nan, relation nan, route nan, weight_l2 nan, total "
    "nan, gradient norm nan, images {keys}; stopped before the optimizer step, the last checkpoint, {out}/checkpoints/step-{last:08d}.pt, "
    "is kept. Find the cause (`dpal store verify --deep {store}` checks the stored targets; a learning "
    "rate too high diverges), or rerun with --skip-nonfinite N to skip up to N such steps"
)


def test_a_nan_step_stops_before_the_optimizer_and_keeps_the_last_good_checkpoint(
    store16: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = [*u.distill_args(store16, out), *DIVERGING, "--set", "keep_last=1"]
    line = _one_error_line(_cli(*args))
    assert line == NAN_LINE.format(step=2, keys=STEP_2, out=out, last=1, store=store16)
    assert u.checkpoint_steps(out) == [1]  # keep_last 1: no NaN checkpoint pruned step 1's
    ckpt = u.load_last(out)
    assert all(torch.isfinite(t).all() for t in u.tensors(ckpt["model"]).values())
    assert [m["step"] for m in u.metrics(out)] == [1]  # no line of the bad step
    # the rerun resumes from the kept checkpoint and stops at the same step, with the same line
    line = _one_error_line(_cli(*args))
    assert line == NAN_LINE.format(step=2, keys=STEP_2, out=out, last=1, store=store16)


def test_skip_nonfinite_skips_n_steps_records_them_and_stops_at_the_next(
    store16: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = [*u.distill_args(store16, out), *DIVERGING, "--skip-nonfinite", "2"]
    line = _one_error_line(_cli(*args))
    assert (
        line == NAN_LINE.format(step=4, keys=STEP_4, out=out, last=3, store=store16) + " (2 skipped so far)"
    )
    lines = u.metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3]
    what = "global nan, local nan, relation nan, route nan, weight_l2 nan, total nan, gradient norm nan"
    assert lines[1:] == [
        {"step": s, "epoch": e, "lr": lr, "skipped_nonfinite": what}
        for s, e, lr in ((2, 0, 1e12 * 4 / 256), (3, 1, 1e12 * 4 / 256))
    ]
    # a skipped step changes no weight: checkpoints 2 and 3 hold step 1's student, optimizer and all
    steps = {s: torch.load(out / "checkpoints" / f"step-{s:08d}.pt", weights_only=True) for s in (1, 2, 3)}
    for s in (2, 3):
        a, b = u.tensors(steps[1]["model"]), u.tensors(steps[s]["model"])
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert steps[s]["nonfinite_steps"] == [2, 3][: s - 1]
    # the count survives a resume: the rerun starts at step 3 and stops at step 4 again
    assert _one_error_line(_cli(*args)).endswith(" (2 skipped so far)")


# ---------------------------------------------------------------- item 5: damaged metrics.jsonl lines

DAMAGED_LINES = b'null\n[1, 2]\n{"loss": 1.0}\n\xff\xfe not UTF-8\n{"step": true}\n'
DAMAGED_WARNING = "5 line(s) are not metric lines (not a JSON object with an integer step: damaged or edited)"


@pytest.fixture(scope="module")
def reference(root: Path, store16: Path) -> Path:
    """The uninterrupted 6-step run through the CLI."""
    out = root / "reference"
    assert _cli(*u.distill_args(store16, out)).exit_code == 0
    return out


def test_damaged_metric_lines_do_not_block_a_resume(store16: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _cli(*u.distill_args(store16, out), "--max-steps", "3").exit_code == 0
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(DAMAGED_LINES)
    result = _cli(*u.distill_args(store16, out))
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stderr.count(DAMAGED_WARNING) == 1
    assert u.metrics(out) == u.metrics(reference)  # the damaged lines trimmed like lines past step 3


def test_plot_leaves_damaged_lines_out_with_one_warning(reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    good = (reference / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(DAMAGED_LINES + good)
    result = _cli("plot", run)
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == f"wrote {run / 'curves.png'}\n"
    assert result.stderr.count(DAMAGED_WARNING) == 1
    from dpal.trainer.plot import read_curves

    (run / "metrics.jsonl").write_bytes(good)
    clean = read_curves(run)
    (run / "metrics.jsonl").write_bytes(DAMAGED_LINES + good)
    assert read_curves(run) == clean
    assert [s for s, _ in clean[0]["total"]] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- item 6: pickles that would run code


class _RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint holds (its class is not needed to load)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _market(root: Path) -> Path:
    """A Market-1501-style folder of real JPEGs: 2 identities, queries in c1, gallery in c2."""
    rng = np.random.default_rng(0)
    for folder, items in (
        ("query", [(1, 1, 10), (2, 1, 11)]),
        ("bounding_box_test", [(1, 2, 20), (2, 2, 21)]),
    ):
        (root / folder).mkdir(parents=True)
        for pid, cam, frame in items:
            arr = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / folder / f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg")
    return root


@pytest.fixture()
def code_pickles(tmp_path: Path) -> dict[str, Path]:
    """A torch.save'd zip and raw pickles (protocols 2 and 4) that would run `touch PWNED` on load."""
    bomb = _RunsCode(tmp_path / "PWNED")
    files = {"zip": tmp_path / "zip.pt", "raw2": tmp_path / "raw2.pt", "raw4": tmp_path / "raw4.pt"}
    torch.save({"format_version": 1, "model": bomb}, files["zip"])
    files["raw2"].write_bytes(pickle.dumps({"model": bomb}, protocol=2))
    files["raw4"].write_bytes(pickle.dumps({"model": bomb}, protocol=4))
    return files


def _refused(path: Path) -> str:
    return (
        f"error: refused: {path} needs code execution to load (its pickle calls posix.system, as a "
        "__reduce__ or an object other than tensors does); dpal never loads such files"
    )


@pytest.mark.parametrize("kind", ["zip", "raw2", "raw4"])
def test_a_pickle_that_runs_code_is_refused_in_dpals_words_everywhere(
    store16: Path, corpus: Path, code_pickles: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    evil = code_pickles[kind]
    market = _market(tmp_path / "market")
    commands = {
        "--resume": [*u.distill_args(store16, tmp_path / "run"), "--resume", evil],
        "export": ["export", evil, "--out", tmp_path / "x.safetensors"],
        "eval reid --model": ["eval", "reid", "--model", evil, "--data", market],
        "eval reid --teacher-checkpoint": [
            "eval",
            "reid",
            "--model",
            "vit_tiny_patch16_224",
            "--teacher-checkpoint",
            evil,
            "--data",
            market,
        ],  # fmt: skip
        "--teacher-checkpoint": [
            "cache-teacher",
            "--corpus",
            corpus,
            "--out",
            tmp_path / "store",
            "--teacher",
            "vit_tiny_patch16_224",
            "--teacher-checkpoint",
            evil,
            "--device",
            "cpu",
        ],  # fmt: skip
    }
    for what, args in commands.items():
        result = _cli(*args)
        line = _one_error_line(result)
        assert line == _refused(evil), (what, line)
        assert "weights_only" not in result.output, what  # never torch's advice to load it anyway
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- item 4: side inputs read at the start


def _bad_images(market: Path) -> list[str]:
    """An empty, a cut and a text .jpg among a Market folder's gallery (names in Market form)."""
    gallery = market / "bounding_box_test"
    good = (gallery / "0001_c2s1_000020_00.jpg").read_bytes()
    (gallery / "0001_c2s1_000030_00.jpg").write_bytes(b"")
    (gallery / "0002_c2s1_000031_00.jpg").write_bytes(good[: len(good) // 2])
    (gallery / "0002_c2s1_000032_00.jpg").write_bytes(b"<html>404 Not Found</html>\n")
    return ["0001_c2s1_000030_00.jpg", "0002_c2s1_000031_00.jpg", "0002_c2s1_000032_00.jpg"]


def test_eval_reid_leaves_images_that_do_not_decode_out_and_counts_them(tmp_path: Path) -> None:
    market = _market(tmp_path / "market")
    args = ["eval", "reid", "--model", "vit_tiny_patch16_224", "--random-init", "--data", market]
    clean = _cli(*args, "--json")
    assert clean.exit_code == 0, clean.output
    names = _bad_images(market)
    result = _cli(*args, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    warning = (
        f"--data: 3 of 7 images do not decode and are left out (bounding_box_test/{names[0]}: empty file; "
        f"bounding_box_test/{names[1]}: truncated or corrupt: image file is truncated"
    )
    assert result.stderr.count(warning) == 1, result.stderr
    got, want = json.loads(result.stdout), json.loads(clean.stdout)
    assert (got["num_unreadable"], got["num_query"], got["num_gallery"]) == (3, 2, 2)
    assert got["mAP"] == want["mAP"] and got["rank1"] == want["rank1"]  # scored on the same images
    line = _one_error_line(_cli(*args, "--strict"))
    assert line == (
        f"error: --data: {market / 'bounding_box_test' / names[0]}: empty file; rerun without --strict to "
        "leave such images out"
    )


def test_distill_checks_the_reid_folder_before_the_first_step(store16: Path, tmp_path: Path) -> None:
    market = _market(tmp_path / "market")
    names = _bad_images(market)
    out = tmp_path / "run"
    args = [*u.distill_args(store16, out), "--eval-reid", market, "--val-every", "2"]
    line = _one_error_line(_cli(*args, "--strict"))
    assert line == (
        f"error: --eval-reid {market}: {market / 'bounding_box_test' / names[0]}: empty file; rerun without "
        "--strict to leave such images out"
    )
    assert not out.exists()
    result = _cli(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    warning = f"--eval-reid {market}: 3 of 7 images do not decode and are left out"
    assert warning in result.stderr.split("starting fresh at step 0")[0]  # said before training
    val = [m for m in u.metrics(out) if m.get("split") == "val"]
    assert [m["step"] for m in val] == [2, 4, 6] and all(0 <= m["reid_mAP"] <= 1 for m in val)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            "no match",  # every gallery image of a person from the query's own camera
            "error: --eval-reid {market}: no query of its 2 readable query images has a true match in the "
            "gallery (an image of the same person id from another camera); mAP and rank-1 are undefined there",
        ),
        (
            "bad name",
            "error: {market}/query/frame.jpg: 'frame.jpg' is not a Market-1501 file name: expected "
            "PPPP_cCsS_FFFFFF_BB.jpg (4-digit pid, or -1 for junk), e.g. 0002_c1s1_000451_03.jpg",
        ),
    ],
)
def test_a_reid_folder_that_cannot_be_scored_is_refused_before_training(
    store16: Path, tmp_path: Path, damage: str, message: str
) -> None:
    market = _market(tmp_path / "market")
    if damage == "no match":
        for p in (market / "bounding_box_test").iterdir():
            p.rename(p.with_name(p.name.replace("_c2s1", "_c1s1")))
    else:
        (market / "query" / "0001_c1s1_000010_00.jpg").rename(market / "query" / "frame.jpg")
    out = tmp_path / "run"
    line = _one_error_line(_cli(*u.distill_args(store16, out), "--eval-reid", market))
    assert line == message.format(market=market)
    assert not out.exists()  # refused before the first step (it was at the first validation, after it)


def test_a_val_store_with_no_cached_image_is_refused_before_training(
    root: Path, store16: Path, tmp_path: Path
) -> None:
    bad = root / "bad_corpus_val"
    bad.mkdir(exist_ok=True)
    for i in range(2):
        (bad / f"bad{i}.jpg").write_bytes(b"")
    val = u.make_store(bad, root / "val_empty", dtype="float16")
    out = tmp_path / "run"
    line = _one_error_line(_cli(*u.distill_args(store16, out), "--val-store", val))
    assert line == f"error: --val-store {val} has 0 cached images: nothing to validate on"
    assert not out.exists()


def test_a_reid_image_gone_mid_run_stops_after_a_checkpoint(store16: Path, tmp_path: Path) -> None:
    market = _market(tmp_path / "market")
    out = tmp_path / "run"
    cfg = u.distill_config(store16, out, eval_reid=str(market), val_every=4, checkpoint_every=500)
    gone = market / "query" / "0001_c1s1_000010_00.jpg"
    with ExitStack() as stack, pytest.raises(InputError) as err:
        trainer = Trainer.from_config(cfg, stack, show_progress=False)
        gone.unlink()  # the folder changes after the start check, before the first validation
        trainer.train()
    assert str(err.value) == f"{gone} cannot be read (missing); it changed since it was checked"
    assert u.checkpoint_steps(out) == [4]  # the 4 steps trained are kept


# ---------------------------------------------------------------- item 2: values checked where they are read


def _store(root: Path, corpus: Path, name: str, dtype: str, relation: str = "logits") -> Path:
    """A real stage-one store of the tiny corpus (stage2_util's settings), copied fresh per test."""
    from dpal.config import CacheConfig
    from dpal.pipeline.engine import run_cache

    ref = root / f"ref_{name}"
    if not ref.exists():
        cfg = CacheConfig(
            corpus=str(corpus), out=str(ref), teacher=u.STUDENT, random_init=True, num_views=2, dtype=dtype,
            relation=relation, shard_size=u.SHARD_SIZE, batch_size=8, device="cpu", views=u.RECIPE,
        )  # fmt: skip
        run_cache(cfg, show_progress=False)
    out = root / f"{name}_{len(list(root.glob(name + '_*')))}"
    shutil.copytree(ref, out)
    return out


# (store dtype, relation codec, array, edit through zarr of row 1 view 0, what the reader says)
EDITS = [
    ("float16", "logits", "global", lambda x: x * np.nan, "do not match the checksum its marker recorded"),
    ("float16", "logits", "global", lambda x: -x, "do not match the checksum its marker recorded"),
    ("int8-rotated", "logits", "local", lambda x: -x, "do not match the checksum its marker recorded"),
    (
        "float16",
        "factor",
        "relation_factor",
        lambda x: x * 3,
        "do not match the checksum its marker recorded",
    ),
]


@pytest.mark.parametrize(
    ("dtype", "relation", "name", "edit", "what"), EDITS, ids=["nan", "neg", "rot", "x3"]
)
@pytest.mark.subprocess
def test_values_edited_through_zarr_are_refused_where_read_and_by_verify_deep(
    root: Path, corpus: Path, dtype: str, relation: str, name: str, edit: Any, what: str
) -> None:
    import zarr

    from dpal.store import StoreError, StoreReader, verify_store

    store = _store(root, corpus, f"{dtype}_{relation}", dtype, relation)
    arr = zarr.open_array(store / name, mode="r+")
    arr[1, 0] = edit(arr[1, 0])  # through zarr: every chunk checksum stays valid
    with pytest.raises(StoreError) as err:
        StoreReader(store).read_targets(np.array([0, 1, 2]), view=0)
    assert str(err.value) == (
        f"{store}: the {name!r} values of row 1 (image 'img01.jpg', view 0, shard 000000) {what} (damaged, "
        f"or edited through zarr after stage one); `dpal store verify --deep` lists every such row; delete "
        f"{store}/shards/000000.json and rerun the same `dpal cache-teacher` command to rewrite shard(s) 000000"
    )
    StoreReader(store).read_targets(np.array([0, 2, 5]), view=0)  # other rows, and row 1's other view,
    StoreReader(store).read_targets(np.array([1]), view=1)  # read as before
    deep = verify_store(store, deep=True)["bad"]
    assert deep == {"000000": [f"{name}/c/0/0/0{'/0' * (arr.ndim - 3)} checksum mismatch",
                               f"{name!r} row 1 view 0 differs from its recorded checksum"]
                    + ([f"{name!r} row 1 view 0 is not finite"] if "nan" in str(edit(np.ones(1))) else [])}  # fmt: skip


@pytest.mark.subprocess
def test_distill_stops_on_a_nan_written_through_zarr_before_the_step(
    root: Path, corpus: Path, tmp_path: Path
) -> None:
    import zarr

    store = _store(root, corpus, "float16_logits", "float16")
    arr = zarr.open_array(store / "global", mode="r+")
    arr[3, 0, 5] = np.nan  # img03, in step 2's batch (epoch 0 reads view 0)
    out = tmp_path / "run"
    line = _one_error_line(_cli(*u.distill_args(store, out)))
    assert line.startswith(
        f"error: {store}: the 'global' values of row 3 (image 'img03.jpg', view 0, shard 000000) do not "
        "match the checksum its marker recorded"
    )
    assert [m["step"] for m in u.metrics(out)] == [1]  # step 2, which would read it, never ran


@pytest.mark.subprocess
def test_a_store_without_value_checksums_still_reads_and_nan_is_refused(root: Path, corpus: Path) -> None:
    import zarr

    from dpal.store import StoreError, StoreReader, verify_store

    store = _store(root, corpus, "float16_logits", "float16")
    for marker in (store / "shards").glob("*.json"):  # a store written before markers recorded them
        m = json.loads(marker.read_text())
        del m["value_crc32c"]
        marker.write_text(json.dumps(m))
    reader = StoreReader(store)
    before = reader.read_targets(np.array([0, 1]), view=0)
    arr = zarr.open_array(store / "relation", mode="r+")
    arr[1, 0, 2, 3] = np.inf  # stage one wrote an infinity (a float16 overflow) into row 1
    with pytest.raises(StoreError, match=r"the 'relation' values of row 1 \(image 'img01.jpg', view 0, shard "
                       r"000000\) are not finite \(NaN or inf\)"):  # fmt: skip
        StoreReader(store).read_targets(np.array([0, 1]), view=0)
    assert torch.equal(StoreReader(store).read_targets(np.array([0]), view=0).global_, before.global_[:1])
    rep = verify_store(store, deep=True)
    assert rep["unrecorded"] == ["000000", "000001", "000002"]
    assert rep["bad"] == {
        "000000": ["relation/c/0/0/0/0 checksum mismatch", "'relation' row 1 view 0 is not finite"]
    }
