"""`dpal eval reid`: model resolution, the --random-init guard and the JSON it prints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dpal.cli import app


@pytest.fixture()
def market(tmp_path: Path) -> Path:
    """Two identities with distinct colours; queries in c1, gallery in c2, plus a distractor."""
    rng = np.random.default_rng(0)
    colours = {1: (200, 30, 30), 2: (30, 30, 200), 0: (30, 200, 30)}
    for folder, items in (("query", [(1, 1, 10), (2, 1, 11)]),
                          ("bounding_box_test", [(1, 2, 20), (2, 2, 21), (0, 2, 22), (1, 1, 10)])):
        (tmp_path / folder).mkdir()
        for pid, cam, frame in items:
            arr = np.clip(np.array(colours[pid]) + rng.integers(-20, 20, (64, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / folder / f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg")
    return tmp_path


def _run(*args: str):
    return CliRunner().invoke(app, ["eval", "reid", *args])


def test_bare_model_name_needs_random_init(market: Path) -> None:
    result = _run("--model", "vit_tiny_patch16_224", "--data", str(market))
    assert result.exit_code == 2
    assert "--random-init" in result.stderr and "Traceback" not in result.output


def test_random_model_prints_market_metrics_as_json(market: Path) -> None:
    result = _run("--model", "vit_tiny_patch16_224", "--random-init", "--data", str(market),
                  "--image-size", "32", "--image-size", "16", "--feature", "mean", "--json")
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout.strip().splitlines()[-1])
    assert res["num_query"] == 2 and res["num_gallery"] == 4 and res["feature"] == "mean"
    assert res["num_valid_queries"] == 2  # the same-camera copy of query 1 is excluded, c2 matches remain
    assert 0.0 < res["mAP"] <= 1.0 and res["rank10"] == 1.0  # 3 valid gallery images: all within rank 10


def test_bad_feature_and_bad_folder_are_one_line_errors(market: Path, tmp_path: Path) -> None:
    result = _run("--model", "vit_tiny_patch16_224", "--random-init", "--data", str(market), "--feature", "avg")
    assert result.exit_code == 2 and "choose one of cls, mean" in result.stderr
    result = _run("--model", "vit_tiny_patch16_224", "--random-init", "--data", str(tmp_path / "nope"))
    assert result.exit_code == 2 and "Market-1501 layout" in result.stderr
