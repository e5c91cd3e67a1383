"""The Python API (api.py): `dpal.cache_teacher`, `dpal.distill`, `dpal.export`, `dpal.load_student`,
`dpal.eval_reid`, run for real on the tiny corpus and store of tests/stage2_util.py, and compared
with what the CLI makes from the same settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dpal_tests_stage2_util as u  # registered by conftest.py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import dpal
from dpal.api import make_config
from dpal.cli import app
from dpal.config import DistillConfig
from dpal.errors import ConfigError, InputError, UserError
from dpal.trainer.checkpoint import build_student_from_checkpoint

TRAIN = dict(
    student=u.STUDENT,
    student_kwargs=u.STUDENT_KWARGS,
    epochs=3,
    batch_size=4,
    num_workers=0,
    log_every=1,
    warmup_epochs=1.0,
    device="cpu",
    keep_last=10,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from u.one_torch_thread()


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("market")
    rng = np.random.default_rng(0)
    for folder, items in (
        ("query", [(1, 1, 10), (2, 1, 11)]),
        ("bounding_box_test", [(1, 2, 20), (2, 2, 21)]),
    ):
        (root / folder).mkdir()
        for pid, cam, frame in items:
            arr = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / folder / f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg")
    return root


@pytest.mark.subprocess
def test_import_dpal_imports_no_torch() -> None:
    code = (
        "import sys, dpal; f = dpal.distill; "
        "print(sorted(m for m in ('torch', 'torchvision', 'zarr', 'dask', 'timm') if m in sys.modules), "
        "f.__module__, sorted(set(dpal.__all__) - {'__version__'}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == "[] dpal.api ['cache_teacher', 'distill', 'eval_reid', 'export', 'load_student']\n"


@pytest.mark.subprocess
def test_the_api_runs_both_stages_as_the_cli_does(tmp_path: Path, same_store, market: Path) -> None:
    corpus = u.make_corpus(tmp_path / "corpus")
    store = dpal.cache_teacher(
        corpus,
        tmp_path / "store",
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
    assert (store.path, store.complete, store.images, store.cached, store.skipped) == (
        tmp_path / "store",
        True,
        10,
        10,
        0,
    )
    same_store(store.path, u.make_store(corpus, tmp_path / "reference"))  # the same config, bit for bit

    run = dpal.distill(store.path, tmp_path / "run", **TRAIN)
    assert (run.run_dir, run.step, run.epoch, run.stopped_by_signal) == (tmp_path / "run", 6, 3, False)
    assert run.last_checkpoint == tmp_path / "run" / "checkpoints" / "step-00000006.pt"
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert run.metrics == lines[-1] and run.metrics["step"] == 6 and run.val is None
    # the CLI over the same settings trains the same run, bit for bit
    cli = CliRunner().invoke(app, u.distill_args(store.path, tmp_path / "cli_run"))
    assert cli.exit_code == 0, cli.output
    u.assert_same_training_state(u.load_last(tmp_path / "cli_run"), u.load_last(run.run_dir))

    folder = dpal.export(run.run_dir, tmp_path / "model")
    assert (folder.path, folder.model_name, folder.step) == (tmp_path / "model", u.STUDENT, 6)
    trained, _ = build_student_from_checkpoint(run.run_dir)
    x = torch.randn(2, 3, *u.RECIPE.global_size)
    with torch.no_grad():
        want = trained.forward_features(x)
        for source in (folder.path, run.run_dir, run.last_checkpoint):
            model = dpal.load_student(source)
            assert not model.training and torch.equal(model.forward_features(x), want), source

    scores = dpal.eval_reid(folder.path, market)
    args = ["eval", "reid", "--model", str(folder.path), "--data", str(market), "--json"]
    printed = json.loads(CliRunner().invoke(app, args).stdout.splitlines()[-1])
    assert scores["model"] == printed["model"] == f"{u.STUDENT} (model)"
    assert 0 < scores["mAP"] <= 1 and printed["mAP"] == 100 * scores["mAP"]
    assert printed["rank1"] == 100 * scores["rank1"] and printed["unit"] == "percent"


def test_mistakes_raise_user_errors_and_never_exit(tmp_path: Path, market: Path) -> None:
    cases = [
        (lambda: dpal.distill(tmp_path / "store"), ConfigError, "--store and --out are required"),
        (
            lambda: dpal.distill(tmp_path / "s", tmp_path / "r", epochz=3),
            ConfigError,
            "unknown config key 'epochz'",
        ),
        (lambda: dpal.distill(tmp_path / "s", tmp_path / "r", epochs=0), ConfigError, "epochs, batch_size"),
        (
            lambda: dpal.distill(tmp_path / "s", tmp_path / "r", epochs="many"),
            ConfigError,
            "epochs must be an integer",
        ),
        (lambda: dpal.cache_teacher(tmp_path / "nope", tmp_path / "store"), InputError, "nope"),
        (lambda: dpal.cache_teacher(out=tmp_path / "store"), ConfigError, "--corpus is required"),
        (lambda: dpal.eval_reid("vit_tiny_patch16_224", tmp_path), InputError, "Market-1501 layout"),
        (lambda: dpal.eval_reid("vit_tiny_patch16_224", market), InputError, "--random-init"),
        (lambda: dpal.load_student(tmp_path), InputError, "holds no dpal checkpoint"),
        (lambda: dpal.export(tmp_path, tmp_path / "m"), InputError, "holds no dpal checkpoint"),
    ]
    for call, kind, needle in cases:
        with pytest.raises(kind) as info:
            call()
        assert isinstance(info.value, UserError) and needle in str(info.value), (needle, info.value)
    assert not (tmp_path / "store").exists() and not (tmp_path / "r").exists()


def test_config_file_and_object_under_keyword_arguments(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text("epochs: 7\nbatch_size: 8\nbetas: [0.8, 0.9]\n")
    cfg = make_config(DistillConfig, path, {"batch_size": 16, "store": "s"})
    assert (cfg.epochs, cfg.batch_size, cfg.betas, cfg.store, cfg.seed) == (7, 16, (0.8, 0.9), "s", 0)
    again = make_config(DistillConfig, cfg, {"seed": 3})
    assert again == DistillConfig(epochs=7, batch_size=16, betas=(0.8, 0.9), store="s", seed=3)
    with pytest.raises(ConfigError, match="config must be a YAML or TOML file or a DistillConfig"):
        make_config(DistillConfig, 3, {})
