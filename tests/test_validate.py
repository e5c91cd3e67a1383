"""Held-out validation during stage two (trainer/validate.py, `--val-store`, `--val-every`,
`--eval-reid`) and `dpal plot` (trainer/plot.py).

The tiny store and run of tests/stage2_util.py (10 images, batch 4, 2 steps per epoch, 6 steps); the
validation store is stage one over 6 other noise images with the same teacher and views.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dpal_tests_stage2_util as u  # registered by conftest.py
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dpal.cli import app
from dpal.config import CacheConfig
from dpal.errors import InputError
from dpal.evaluate import evaluate_reid, resolve_model
from dpal.store import StoreReader
from dpal.trainer.data import BatchDataset, BatchRequest, valid_rows
from dpal.trainer.distiller import build_distiller
from dpal.trainer.plot import TRAIN_COLOUR, VAL_COLOUR
from dpal.trainer.train import Trainer, train
from dpal.trainer.validate import Validator
from dpal.views import ViewRecipe

CPU = torch.device("cpu")
VAL_IMAGES = 6  # batches of 4 and 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from u.one_torch_thread()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the training store, the validation store of held-out images)."""
    root = tmp_path_factory.mktemp("validate")
    train_store = u.make_store(u.make_corpus(root / "corpus"), root / "store")
    held_out = root / "held_out"
    held_out.mkdir()
    rng = np.random.default_rng(1)  # other images than make_corpus's
    for i in range(VAL_IMAGES):
        Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)).save(held_out / f"val{i}.jpg")
    return train_store, u.make_store(held_out, root / "val_store")


def _train_lines(run: Path) -> list[dict[str, Any]]:
    return [m for m in u.metrics(run) if "split" not in m]


def _val_lines(run: Path) -> list[dict[str, Any]]:
    return [m for m in u.metrics(run) if m.get("split") == "val"]


def test_val_terms_are_the_distillers_in_eval_mode_averaged_over_the_store(stores: tuple[Path, Path]) -> None:
    train_store, val_store = stores
    cfg = u.distill_config(train_store, train_store.parent / "unused", val_store=str(val_store))
    meta = StoreReader(train_store).store_meta
    trainer = Trainer(cfg, meta, meta.recipe, CPU)
    validator = Validator(cfg, meta, meta.recipe, CPU)
    rng_before = torch.get_rng_state()
    got = validator.run(trainer.model, epoch=0)
    assert torch.equal(torch.get_rng_state(), rng_before) and trainer.model.training  # left as it was

    # by hand: the store's rows in order, view 0, epoch 0's local crops; the same init in eval mode
    rows = valid_rows(StoreReader(val_store))
    assert rows.tolist() == list(range(VAL_IMAGES))
    ref = build_distiller(cfg, meta.recipe, meta.embed_dim, meta.token_grid.global_grid).eval()
    per_batch = []
    for chunk in (rows[:4], rows[4:]):
        sampler = SimpleNamespace(batch=lambda epoch, step, chunk=chunk: chunk)
        dataset = BatchDataset(val_store, sampler, meta.recipe, cfg.seed)
        batch = dataset.model_inputs(dataset.build(BatchRequest(0, 0, 0)), CPU)
        with torch.no_grad():
            per_batch.append(ref(batch, 0)[1])
    want = {k: (float(per_batch[0][k]) * 4 + float(per_batch[1][k]) * 2) / 6 for k in per_batch[0]}
    assert got == {**want, "images": 6}
    assert set(want) == {
        "global",
        "local",
        "relation",
        "route",
        "weight_l2",
        "total",
        "route_weight",
        "route_acc",
    }
    # eval mode matters: drop path (0.1) in train mode gives other values
    with torch.no_grad():
        assert float(ref.train()(batch, 0)[1]["total"]) != float(per_batch[1]["total"])

    # --val-images N: the first N images only (one batch here)
    first4 = Validator(
        u.distill_config(train_store, train_store.parent / "unused", val_store=str(val_store), val_images=4),
        meta,
        meta.recipe,
        CPU,
    ).run(trainer.model, epoch=0)
    assert first4 == {**{k: float(v) for k, v in per_batch[0].items()}, "images": 4}
    # batches of a training micro-batch: batch_size 4 / grad_accum 2 -> 2, 2, 2
    halves = u.distill_config(
        train_store, train_store.parent / "unused", val_store=str(val_store), grad_accum=2
    )
    assert [Validator(halves, meta, meta.recipe, CPU).sampler.batch(0, s).tolist() for s in range(3)] == [
        [0, 1],
        [2, 3],
        [4, 5],
    ]


def test_training_with_validation_is_bit_identical_and_logs_val_lines(
    tmp_path: Path, stores: tuple[Path, Path]
) -> None:
    train_store, val_store = stores
    plain = train(u.distill_config(train_store, tmp_path / "plain", checkpoint_every=2), show_progress=False)
    run = tmp_path / "val"
    validated = train(
        u.distill_config(train_store, run, checkpoint_every=2, val_store=str(val_store), val_every=4),
        show_progress=False,
    )
    assert plain.step == validated.step == 6
    for step in u.checkpoint_steps(run):
        a, b = (
            torch.load(r / "checkpoints" / f"step-{step:08d}.pt", map_location="cpu", weights_only=True)
            for r in (tmp_path / "plain", run)
        )
        u.assert_same_training_state(a, b)
    assert u.checkpoint_steps(run) == [2, 4, 6]
    assert _train_lines(run) == u.metrics(tmp_path / "plain")  # training lines unchanged
    val = _val_lines(run)
    assert [(m["step"], m["epoch"]) for m in val] == [(4, 1), (6, 2)]  # every 4 steps and at the end
    assert all(m["images"] == VAL_IMAGES and m.keys() == val[0].keys() for m in val)
    assert val[0].keys() - {"step", "epoch", "split", "images"} == _train_lines(run)[0].keys() - {
        "step",
        "epoch",
        "lr",
    }

    # the val line of step 6 is the validation of step 6's checkpoint
    last = u.load_last(run)
    meta = StoreReader(train_store).store_meta
    cfg = u.distill_config(train_store, run, val_store=str(val_store))
    trainer = Trainer(cfg, meta, meta.recipe, CPU)
    trainer.load_state_dict(last)
    assert {k: v for k, v in trainer_values(trainer, cfg).items()} == {
        k: v for k, v in val[1].items() if k not in ("step", "epoch", "split")
    }

    # dpal plot: one panel per term, both curves' colours drawn
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    image = Image.open(out).convert("RGB")
    assert image.size == (3 * 320, 20 + 3 * 200)  # 8 terms: 3 rows of 3 panels
    colours = {c for _, c in image.getcolors(maxcolors=1 << 20)}
    assert TRAIN_COLOUR in colours and VAL_COLOUR in colours
    # the first panel (global): a val dot at step 6, the right edge of its plot area
    panel = image.crop((0, 20, 320, 220))
    right_edge = [panel.getpixel((310, y)) for y in range(22, 182)]
    assert VAL_COLOUR in right_edge


def trainer_values(trainer: Trainer, cfg: Any) -> dict[str, float]:
    return Validator(cfg, trainer.meta, trainer.recipe, CPU).run(trainer.model, epoch=2)


def test_val_lines_after_a_resume_continue_without_duplicates(
    tmp_path: Path, stores: tuple[Path, Path]
) -> None:
    train_store, val_store = stores
    ref = tmp_path / "ref"
    train(u.distill_config(train_store, ref, val_store=str(val_store), val_every=2), show_progress=False)
    run = tmp_path / "run"
    # stopped at step 5 (a val line at 5, the end of that invocation), resumed from step 4's checkpoint
    train(
        u.distill_config(
            train_store, run, val_store=str(val_store), val_every=2, checkpoint_every=2, max_steps=5
        ),
        show_progress=False,
    )
    assert [m["step"] for m in _val_lines(run)] == [2, 4, 5]
    step4 = run / "checkpoints" / "step-00000004.pt"
    train(
        u.distill_config(train_store, run, val_store=str(val_store), val_every=2, resume=str(step4)),
        show_progress=False,
    )
    assert [m["step"] for m in _val_lines(run)] == [2, 4, 6]
    assert u.metrics(run) == u.metrics(ref)  # training and val lines, as the uninterrupted run's


@pytest.mark.subprocess
def test_a_val_store_of_another_token_grid_is_refused_in_one_line(
    tmp_path: Path, stores: tuple[Path, Path]
) -> None:
    from dpal.pipeline.engine import run_cache

    train_store, _ = stores
    other = ViewRecipe(global_size=(48, 32), local_size=(16, 16), crowd_size=(32, 48))
    run_cache(
        CacheConfig(
            corpus=str(u.make_corpus(tmp_path / "corpus", 2)),
            out=str(tmp_path / "other"),
            teacher=u.STUDENT,
            random_init=True,
            num_views=1,
            shard_size=2,
            batch_size=8,
            device="cpu",
            views=other,
        ),
        show_progress=False,
    )
    run = tmp_path / "run"
    result = CliRunner().invoke(app, u.distill_args(train_store, run, "--val-store", str(tmp_path / "other")))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: --val-store {tmp_path / 'other'} has the token grid (patch, v0 grid, Ic grid) (16, (3, 2), (2, 3)), "
        "the run's store (16, (2, 1), (2, 3)); cache the held-out images with the teacher and view recipe of the "
        "run's store"
    ]
    assert "Traceback" not in result.output
    assert not (run / "checkpoints").exists()  # refused before the first step
    with pytest.raises(InputError, match="view sizes|token grid"):
        Validator(
            u.distill_config(train_store, run, val_store=str(tmp_path / "other")),
            StoreReader(train_store).store_meta,
            u.RECIPE,
            CPU,
        )


def test_eval_reid_writes_map_and_rank1_of_the_students_cls(
    tmp_path: Path, stores: tuple[Path, Path]
) -> None:
    train_store, _ = stores
    market = tmp_path / "market"
    rng = np.random.default_rng(0)
    for folder, items in (
        ("query", [(1, 1, 10), (2, 1, 11)]),
        ("bounding_box_test", [(1, 2, 20), (2, 2, 21), (0, 2, 22), (2, 2, 23)]),
    ):
        (market / folder).mkdir(parents=True)
        for pid, cam, frame in items:
            arr = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
            Image.fromarray(arr).save(market / folder / f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg")
    run = tmp_path / "run"
    train(u.distill_config(train_store, run, eval_reid=str(market), val_every=3), show_progress=False)
    val = _val_lines(run)
    assert [(m["step"], sorted(m)) for m in val] == [
        (s, ["epoch", "reid_mAP", "reid_rank1", "split", "step"]) for s in (3, 6)
    ]
    # the last equals `dpal eval reid --feature cls` of the final checkpoint at v0's size
    want = evaluate_reid(resolve_model(str(run), tuple(u.RECIPE.global_size)), market, 4)
    assert (val[-1]["reid_mAP"], val[-1]["reid_rank1"]) == (want["mAP"], want["rank1"])
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0]).get("split") is None


@pytest.mark.parametrize(
    ("recipe", "terms"),
    [("proteus", {"token", "feature", "patch", "total"}), ("feature-kd", {"global", "local", "total"})],
)
def test_val_terms_of_the_baseline_recipes(stores: tuple[Path, Path], recipe: str, terms: set[str]) -> None:
    """proteus and feature-kd: the validation is the recipe's own forward in eval mode on the first batch."""
    train_store, val_store = stores
    cfg = u.distill_config(
        train_store, train_store.parent / "unused", recipe=recipe, val_store=str(val_store), val_images=4
    )
    meta = StoreReader(train_store).store_meta
    trainer = Trainer(cfg, meta, meta.recipe, CPU)
    got = Validator(cfg, meta, meta.recipe, CPU).run(trainer.model, epoch=1)
    rows = valid_rows(StoreReader(val_store))[:4]
    dataset = BatchDataset(val_store, SimpleNamespace(batch=lambda epoch, step: rows), meta.recipe, cfg.seed)
    batch = dataset.model_inputs(dataset.build(BatchRequest(0, 0, 0)), CPU)
    with torch.no_grad():
        want = trainer.model.eval()(batch, 1)[1]
    assert set(want) == terms
    assert got == {**{k: float(v) for k, v in want.items()}, "images": 4}


def test_plot_without_metrics_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'metrics.jsonl'} does not exist; give the run directory of `dpal distill` (its --out)"
    ]
