"""`dpal eval reid`: model resolution, the --random-init guard and the JSON it prints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dpal.cli import app
from dpal.trainer.export import export_student
from dpal.trainer.student import create_student


@pytest.fixture()
def market(tmp_path: Path) -> Path:
    """Two identities with distinct colours; queries in c1, gallery in c2, plus a distractor."""
    rng = np.random.default_rng(0)
    colours = {1: (200, 30, 30), 2: (30, 30, 200), 0: (30, 200, 30)}
    for folder, items in (
        ("query", [(1, 1, 10), (2, 1, 11)]),
        ("bounding_box_test", [(1, 2, 20), (2, 2, 21), (0, 2, 22), (1, 1, 10)]),
    ):
        (tmp_path / folder).mkdir()
        for pid, cam, frame in items:
            arr = np.clip(np.array(colours[pid]) + rng.integers(-20, 20, (64, 32, 3)), 0, 255).astype(
                np.uint8
            )
            Image.fromarray(arr).save(tmp_path / folder / f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg")
    return tmp_path


def _run(*args: str):
    return CliRunner().invoke(app, ["eval", "reid", *args])


def test_bare_model_name_needs_random_init(market: Path) -> None:
    result = _run("--model", "vit_tiny_patch16_224", "--data", str(market))
    assert result.exit_code == 2
    assert "--random-init" in result.stderr and "Traceback" not in result.output


def test_random_model_prints_market_metrics_as_json(market: Path) -> None:
    result = _run(
        "--model",
        "vit_tiny_patch16_224",
        "--random-init",
        "--data",
        str(market),
        "--image-size",
        "32",
        "--image-size",
        "16",
        "--feature",
        "mean",
        "--json",
    )
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout.strip().splitlines()[-1])
    assert res["num_query"] == 2 and res["num_gallery"] == 4 and res["feature"] == "mean"
    assert res["num_valid_queries"] == 2  # the same-camera copy of query 1 is excluded, c2 matches remain
    assert 0.0 < res["mAP"] <= 100.0 and res["rank10"] == 100.0  # 3 valid gallery images: all within rank 10
    assert res["unit"] == "percent"
    # 90% bootstrap intervals over the 2 queries, in percent too: mAP > 1 (each AP is at least 1/3),
    # and a rank-1 mean over 2 queries is 0, 50 or 100 whatever the resample
    assert res["mAP_lo"] <= res["mAP"] <= res["mAP_hi"] <= 100.0 and res["mAP"] > 1.0
    assert {res["rank1_lo"], res["rank1_hi"]} <= {0.0, 50.0, 100.0}
    assert res["rank1_lo"] <= res["rank1"] <= res["rank1_hi"]


def test_bad_feature_and_bad_folder_are_one_line_errors(market: Path, tmp_path: Path) -> None:
    result = _run(
        "--model", "vit_tiny_patch16_224", "--random-init", "--data", str(market), "--feature", "avg"
    )
    assert result.exit_code == 2 and "choose one of cls, mean" in result.stderr
    result = _run("--model", "vit_tiny_patch16_224", "--random-init", "--data", str(tmp_path / "nope"))
    assert result.exit_code == 2 and "Market-1501 layout" in result.stderr


def _tiny_student() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_student("vit_tiny_patch16_224", img_size=(32, 16), depth=1)


def test_an_exported_student_is_named_by_its_model_and_scored_in_percent_in_table_and_json(
    market: Path, tmp_path: Path
) -> None:
    path = export_student(_tiny_student(), "vit_tiny_patch16_224", (32, 16), tmp_path / "student.safetensors")
    res = json.loads(
        _run("--model", str(path), "--data", str(market), "--json").stdout.strip().splitlines()[-1]
    )
    assert res["model"] == "vit_tiny_patch16_224 (student.safetensors)" and res["unit"] == "percent"
    table = _run("--model", str(path), "--data", str(market)).stdout.splitlines()
    row = next(ln for ln in table if ln.startswith("vit_tiny_patch16_224 (student.safetensors)"))
    # the table's numbers are the JSON's, to its one decimal: one unit; mAP and R1 with [lo, hi]
    numbers = re.findall(r"\d+\.\d", row.removeprefix("vit_tiny_patch16_224 (student.safetensors)"))
    keys = ("mAP", "mAP_lo", "mAP_hi", "rank1", "rank1_lo", "rank1_hi", "rank5", "rank10")
    assert [float(v) for v in numbers] == [round(res[k], 1) for k in keys]
    assert "[" in row and "90% bootstrap interval" in table[-1]
    assert 1.0 < res["mAP"] <= 100.0 and "in percent" in table[-1]


def test_a_run_directory_is_named_by_its_student_and_step(market: Path, tmp_path: Path) -> None:
    from dpal.trainer.checkpoint import CHECKPOINT_VERSION

    student = _tiny_student()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(
        {
            "format_version": CHECKPOINT_VERSION,
            "step": 7,
            "model": student.state_dict(),
            "student_name": "vit_tiny_patch16_224",
            "img_size": [32, 16],
            "student_kwargs": {"depth": 1},
        },
        tmp_path / "run" / "checkpoints" / "step-00000007.pt",
    )
    res = json.loads(
        _run("--model", str(tmp_path / "run"), "--data", str(market), "--json").stdout.splitlines()[-1]
    )
    assert res["model"] == "vit_tiny_patch16_224 step 7 (run)"


def test_evaluate_reid_per_query_scores(market: Path) -> None:
    # Mean colour as the feature: after ImageNet normalisation red (200, 30, 30), blue (30, 30, 200)
    # and green (30, 200, 30) have negative cosine with each other, so each query ranks its own
    # person's c2 image first: AP 1 and a rank-1 hit for both, and every resample's mean is 1.
    from dpal.evaluate import Embedder, evaluate_reid

    emb = Embedder("colour", lambda x: x.mean(dim=(2, 3)), (32, 16), "random")
    res = evaluate_reid(emb, market, per_query=True)
    assert res["per_query_ap"].tolist() == [1.0, 1.0] and res["per_query_rank1"].tolist() == [1.0, 1.0]
    assert res["per_query_index"].tolist() == [0, 1]
    assert (res["mAP"], res["mAP_lo"], res["mAP_hi"]) == (1.0, 1.0, 1.0)
    assert (res["rank1"], res["rank1_lo"], res["rank1_hi"]) == (1.0, 1.0, 1.0)
    assert "per_query_ap" not in evaluate_reid(emb, market)
