"""The model folder of a real run (`dpal export RUN --out FOLDER`) and its model card (trainer/card.py):
every figure the card states is read back and compared with the run's own records.

The tiny store and run of tests/stage2_util.py (10 images, batch 4, 6 steps), validated on a store of
6 held-out images and on a tiny ReID folder every 3 steps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import dpal_tests_stage2_util as u  # registered by conftest.py
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

import dpal
from dpal.cli import app
from dpal.trainer.card import CITATION, last_validation, non_defaults, source_commit
from dpal.trainer.checkpoint import build_student_from_checkpoint
from dpal.trainer.train import train


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from u.one_torch_thread()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(the run directory, its store, its ReID folder): a finished run with validation."""
    root = tmp_path_factory.mktemp("card")
    store = u.make_store(u.make_corpus(root / "corpus"), root / "store")
    held_out = root / "held_out"
    held_out.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)).save(held_out / f"val{i}.jpg")
    val_store = u.make_store(held_out, root / "val_store")
    market = root / "market"
    for folder, items in (
        ("query", [(1, 1, 10), (2, 1, 11)]),
        ("bounding_box_test", [(1, 2, 20), (2, 2, 21)]),
    ):
        (market / folder).mkdir(parents=True)
        for pid, cam, frame in items:
            arr = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(market / folder / f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg")
    cfg = u.distill_config(store, root / "run", val_store=str(val_store), eval_reid=str(market), val_every=3)
    train(cfg, show_progress=False)
    return root / "run", store, market


def _export(run_dir: Path, out: Path) -> str:
    result = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


@pytest.mark.subprocess
def test_the_card_states_the_runs_own_figures(run: tuple[Path, Path, Path], tmp_path: Path) -> None:
    run_dir, store, _ = run
    out = _export(run_dir, tmp_path / "model")
    assert out == (
        f"exported {u.STUDENT} at step 6 to {tmp_path / 'model'} (model.safetensors, config.json, README.md)\n"
    )
    card = (tmp_path / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\ntags: [")
    # teacher and its identity, the store
    assert f"- Teacher: `{u.STUDENT}` ({u.STUDENT}, width 192, layer final, global token" in card
    assert "weights random init, seed 0)" in card
    assert "- Store: 10 images (10 indexed, 0 skipped), K = 2 views, dtype float32, relation logits" in card
    assert f"- Corpus: `{store.parent / 'corpus'}`" in card
    # recipe, steps and images seen (6 steps x batch 4 x 1 rank), every non-default setting
    assert "- Recipe: `dpal`, projector `dpade`" in card
    assert "- Steps: 6 optimizer steps of 4 images x 1 rank(s): 24 images seen" in card
    settings = dict(re.findall(r"^- `(\w+)`: `(.*)`$", card, re.M))
    want = non_defaults(build_student_from_checkpoint(run_dir)[1]["config"])
    assert {k: json.loads(v) for k, v in settings.items()} == want
    assert want == {
        "student": u.STUDENT,
        "student_kwargs": u.STUDENT_KWARGS,
        "epochs": 3,
        "batch_size": 4,
        "warmup_epochs": 1.0,
        "num_workers": 0,
        "keep_last": 10,
        "log_every": 1,
        "device": "cpu",
        "val_every": 3,
    }
    # the final held-out losses and ReID scores are metrics.jsonl's last val line, to the digits shown
    val = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert val["split"] == "val" and val["step"] == 6 and val == last_validation(run_dir, 6)
    assert (
        f"At step 6 (the last validation at or before the exported step), on store `{store.parent / 'val_store'}` "
        f"and ReID folder `{store.parent / 'market'}`:" in card
    )
    for term in ("global", "local", "relation", "total"):
        assert f"{term} {val[term]:.4g}" in card
    assert f"mAP {100 * val['reid_mAP']:.1f}, rank1 {100 * val['reid_rank1']:.1f}" in card
    # versions, commit, citation, licences
    commit = source_commit()
    assert (
        f"Trained with dpal {dpal.__version__}; exported with dpal {dpal.__version__} at commit `{commit}`"
        in card
    )
    assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(-dirty)?", commit)
    assert CITATION in card and "eprint        = {2508.07144}" in CITATION
    assert "- Teacher weights (vit_tiny_patch16_224): none: a randomly initialised teacher" in card
    assert "- Training images: unknown: state it before publishing these weights" in card


@pytest.mark.subprocess
def test_the_folder_is_the_runs_student_for_timm_and_eval_reid(
    run: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    run_dir, _, market = run
    _export(run_dir, tmp_path / "model")
    student, _ = build_student_from_checkpoint(run_dir)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True).eval()
    x = torch.randn(2, 3, *u.RECIPE.global_size)
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(x), student.forward_features(x))

    def reid(model: Path) -> dict:
        args = ["eval", "reid", "--model", str(model), "--data", str(market), "--json"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (result.output, result.exception)
        return json.loads(result.stdout.splitlines()[-1])

    folder, run_scores = reid(tmp_path / "model"), reid(run_dir)
    assert folder["model"] == f"{u.STUDENT} (model)" and folder["image_size"] == list(u.RECIPE.global_size)
    assert {k: v for k, v in folder.items() if k != "model"} == {
        k: v for k, v in run_scores.items() if k != "model"
    }


@pytest.mark.subprocess
def test_a_run_without_validation_says_so_and_a_gone_store_is_not_guessed(
    run: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    run_dir, _, _ = run
    ckpt = sorted((run_dir / "checkpoints").glob("step-*.pt"))[-1]
    moved = tmp_path / "elsewhere.pt"  # a checkpoint outside its run directory: no metrics beside it
    moved.write_bytes(ckpt.read_bytes())
    data = torch.load(moved, weights_only=True)
    data["config"]["store"] = str(tmp_path / "gone.dpal")
    torch.save(data, moved)
    _export(moved, tmp_path / "model")
    card = (tmp_path / "model" / "README.md").read_text()
    assert "The run has no validation (no `--val-store`, no `--eval-reid`): no held-out figures." in card
    assert f"- Store `{tmp_path / 'gone.dpal'}` was not found at export time" in card
    assert "- Teacher weights (unknown): unknown" in card
