"""bench/codec_losses.py: the loss shift of each target codec against float32 targets, on the tiny
store of the stage-two tests (stage2_util: random ViT-Ti teacher, D = 192, T = 7; a two-block
student with drop path, so that the same RNG per codec matters)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import dpal_tests_stage2_util as u  # registered by conftest.py
import pytest
import torch

from dpal.trainer.train import train

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "codec_losses.py"
SETS = [f"student={u.STUDENT}", "student_kwargs=" + json.dumps(u.STUDENT_KWARGS)]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dpal_bench_codec_losses", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("codec_losses")
    return u.make_store(u.make_corpus(root / "corpus"), root / "store", dtype="float32")


def test_shifts_are_relative_to_float32_per_batch(bench: ModuleType) -> None:
    ref = [
        {"global": 2.0, "local": 1.0, "relation": 4.0, "total": 7.0},
        {"global": 1.0, "local": 2.0, "relation": 2.0, "total": 5.0},
    ]
    other = [
        {"global": 2.02, "local": 1.0, "relation": 3.96, "total": 6.98},
        {"global": 1.0, "local": 2.1, "relation": 2.0, "total": 5.1},
    ]
    s = bench.shifts({"float32": ref, "x": other})
    assert s["reference"] == {"global": 1.5, "local": 1.5, "relation": 3.0, "total": 6.0}
    assert s["x"]["global"]["mean_abs"] == pytest.approx(0.005)  # (0.01 + 0) / 2
    assert s["x"]["global"]["max_abs"] == pytest.approx(0.01)
    assert s["x"]["local"]["max_abs"] == pytest.approx(0.05)
    assert s["x"]["relation"]["mean"] == pytest.approx(-0.005)  # signed: -0.01 and 0
    assert s["x"]["total"]["per_batch"] == pytest.approx([-0.02 / 7, 0.02])
    assert s["float32"]["total"]["max_abs"] == 0.0


def test_store_round_trip_is_what_the_store_serves(bench: ModuleType) -> None:
    x = torch.tensor([[1.0, -0.5, 1e-4, 3.0]])
    assert torch.equal(bench.store_round_trip(x, "float32"), x)
    assert torch.equal(bench.store_round_trip(x, "float16"), x.half().float())
    assert torch.equal(bench.store_round_trip(x, "bfloat16"), x.bfloat16().float())
    # int8: step 3 / 127 per token; 1e-4 rounds to 0
    step = torch.tensor(3.0 / 127)
    expected = torch.round(x / step) * step
    assert torch.allclose(bench.store_round_trip(x, "int8"), expected, rtol=0, atol=1e-7)


def test_only_the_targets_move_the_terms(bench: ModuleType, tiny_store: Path, tmp_path: Path) -> None:
    """float32 targets and the relation recomputed from Ic's tokens shift nothing; float16 shifts
    every term a little; a rank-1 factor of a 7-token relation moves the relation term alone; the
    same holds at a trained checkpoint."""
    res = bench.measure(str(tiny_store), 1, 4, SETS, None)
    s = res["shifts"]
    assert res["relation_recompute_max_abs_diff"] < 1e-5
    for term in bench.TERMS:
        assert s["float32"][term]["max_abs"] == 0.0
        assert s["online-teacher relation (float32)"][term]["max_abs"] < 1e-5
        assert 0.0 < s["float16"][term]["max_abs"] < 1e-3
    factor = s["factor r=1 (default)"]
    assert factor["global"]["max_abs"] == 0.0 and factor["local"]["max_abs"] == 0.0
    assert factor["relation"]["max_abs"] > 1e-3  # rank 1 of 7 tokens: not within 1%
    assert "factor r=2" in s
    run = tmp_path / "run"
    train(u.distill_config(tiny_store, run, epochs=1, max_steps=1), show_progress=False)
    ckpt = next((run / "checkpoints").glob("step-*.pt"))
    trained = bench.measure(str(tiny_store), 1, 4, [], ckpt)
    assert trained["terms"]["float32"] != res["terms"]["float32"]  # the checkpoint's weights were loaded
    assert trained["shifts"]["float32"]["total"]["max_abs"] == 0.0
