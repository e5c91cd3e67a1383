"""Held-out validation during stage two (`--val-store`, `--val-every`, `--eval-reid`): every loss term
of the run's recipe on a store that stage one cached from held-out images, and optionally the ReID
probe of the student's CLS feature on a Market-style folder.

The validation set is fixed: the store's first `--val-images` cached rows (all by default), in store
order, cached view 0, the local crops v1 and v2 of epoch 0 (views.view_rng of (seed, image, 0)), so
every validation sees the same inputs. The model runs in eval mode (no drop path or dropout) under
`torch.no_grad`, then goes back to its mode. The global RNG states are saved before and restored
after, so that a run with validation trains bit for bit like one without. A validation reads its
batches in the main process (no DataLoader workers): it is small and runs once per interval.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpal.config import DistillConfig
from dpal.embed import Embedder, evaluate_reid
from dpal.errors import InputError
from dpal.reid import checked_market
from dpal.store import FEATURES, StoreMeta, StoreReader
from dpal.trainer.checkpoint import rng_state, set_rng_state
from dpal.trainer.data import BatchDataset, BatchRequest, valid_rows
from dpal.trainer.recipes import batch_needs, check_targets
from dpal.views import ViewRecipe
from dpal.vit import vit_tokens

logger = logging.getLogger(__name__)

REID_KEYS = ("mAP", "rank1")  # of reid.evaluate_ranking, written as reid_mAP and reid_rank1


class FixedOrder:
    """The sampler of a validation: rows in store order, `batch_size` at a time (the last batch may be
    smaller); `BatchDataset` asks it for `batch(epoch, step)` as it asks an `EpochSampler`."""

    def __init__(self, rows: np.ndarray, batch_size: int) -> None:
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size
        self.steps = -(-len(self.rows) // batch_size)

    def batch(self, epoch: int, step: int) -> np.ndarray:
        return self.rows[step * self.batch_size : (step + 1) * self.batch_size]


def check_val_store(val: StoreMeta, train: StoreMeta, where: str) -> None:
    """Refuse, in one line, a validation store whose targets cannot be compared with the run's: another
    teacher (weights or width), another token grid, or other view sizes. The targets' dtype (and how the
    relation target is stored) may differ: every target is decoded to float32 before the loss."""
    t, v = train.teacher, val.teacher
    fix = "cache the held-out images with the teacher and view recipe of the run's store"
    if v.embed_dim != t.embed_dim:
        raise InputError(
            f"{where} holds targets of teacher width {v.embed_dim}, the run's store {t.embed_dim}; {fix}"
        )
    if replace(v, checkpoint=None) != replace(t, checkpoint=None):  # the path may move; the sha256 may not
        raise InputError(
            f"{where} was cached by another teacher ({v.name}, sha256 {str(v.checkpoint_sha256)[:12]}) "
            f"than the run's store ({t.name}, sha256 {str(t.checkpoint_sha256)[:12]}); {fix}"
        )
    grids = [
        (g.patch_size, tuple(g.global_grid), tuple(g.crowd_grid)) for g in (val.token_grid, train.token_grid)
    ]
    if grids[0] != grids[1]:
        raise InputError(
            f"{where} has the token grid (patch, v0 grid, Ic grid) {grids[0]}, the run's store "
            f"{grids[1]}; {fix}"
        )
    sizes = ("global_size", "local_size", "crowd_size")
    vs, ts = ([tuple(getattr(m.recipe, s)) for s in sizes] for m in (val, train))
    if vs != ts:
        raise InputError(f"{where} has the view sizes v0, local, Ic {vs}, the run's store {ts}; {fix}")


class Validator:
    """One run's validation: the fixed batches of `--val-store` (if given) and the ReID folder (if given).

    Args:
        cfg: the run's config (val_store, val_images, eval_reid, seed, batch_size, recipe).
        train_meta: the run's store's metadata (the validation store must match it).
        recipe: the run's view recipe (its local size, which `--local-size` may override).
        device: where the model is.
    """

    def __init__(
        self, cfg: DistillConfig, train_meta: StoreMeta, recipe: ViewRecipe, device: torch.device
    ) -> None:
        self.cfg, self.device, self.recipe = cfg, torch.device(device), recipe
        self.dataset: BatchDataset | None = None
        self.num_images = 0
        if cfg.val_store:
            where = f"--val-store {cfg.val_store}"
            reader = StoreReader(cfg.val_store)  # refuses an incomplete store in one line
            meta = reader.store_meta
            check_val_store(meta, train_meta, where)
            check_targets(cfg, FEATURES, where)
            rows = valid_rows(reader)
            if len(rows) == 0:
                raise InputError(f"{where} has 0 cached images: nothing to validate on")
            if cfg.val_images is not None:
                rows = rows[: cfg.val_images]
            self.num_images = len(rows)
            self.sampler = FixedOrder(rows, cfg.batch_size // cfg.grad_accum)  # a training micro-batch
            # what the recipe reads of the val store's stored targets (the validation uses them even
            # when training computes its targets online)
            needs = batch_needs(replace(cfg, online_teacher=False))
            self.dataset = BatchDataset(cfg.val_store, self.sampler, recipe, cfg.seed, needs=needs)
        self.reid = Path(cfg.eval_reid) if cfg.eval_reid else None
        self.reid_split: Any = None
        if self.reid is not None:
            if not ((self.reid / "query").is_dir() and (self.reid / "bounding_box_test").is_dir()):
                raise InputError(
                    f"--eval-reid {self.reid} must hold query/ and bounding_box_test/ (Market-1501 layout)"
                )
            # read and decoded now, before the first step: names, images, a query with a true match
            self.reid_split, _ = checked_market(self.reid, cfg.strict, f"--eval-reid {self.reid}")

    def run(self, model: nn.Module, epoch: int, autocast: Any = None) -> dict[str, float]:
        """The validation values of `model` now: each loss term's mean over the validation images
        (batch means weighted by their images) and `images`; with --eval-reid, reid_mAP and
        reid_rank1 (fractions). `epoch`: passed to the model's forward, as the training step's (dpal's
        route weight, proteus's masked positions follow it)."""
        saved, was_training = rng_state(), model.training
        model.eval()
        try:
            values = self.losses(model, epoch, autocast) if self.dataset is not None else {}
            if self.reid is not None:
                values.update(self.reid_probe(model.student))
        finally:
            model.train(was_training)
            set_rng_state(saved)
        return values

    def losses(self, model: nn.Module, epoch: int, autocast: Any = None) -> dict[str, float]:
        """Each term's image-weighted mean over the fixed batches, summed in float64."""
        assert self.dataset is not None
        sums: dict[str, float] = {}
        n = 0
        with torch.no_grad(), autocast if autocast is not None else contextlib.nullcontext():
            for step in range(self.sampler.steps):
                loaded = self.dataset.build(BatchRequest(0, step, 0))
                batch = self.dataset.model_inputs(loaded, self.device)
                _, terms = model(batch, epoch)
                b = int(batch["v0"].shape[0])
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * b
                n += b
        return {**{k: s / n for k, s in sums.items()}, "images": n}

    def reid_probe(self, student: nn.Module) -> dict[str, float]:
        """mAP and rank-1 of the student's CLS token (`dpal eval reid --feature cls`'s), at v0's size."""

        def fn(x: torch.Tensor) -> torch.Tensor:
            return vit_tokens(student, x.to(self.device))[:, 0]  # (B, d)

        res = evaluate_reid(
            Embedder("student", fn, tuple(self.recipe.global_size), "student"),
            self.reid,
            self.cfg.batch_size // self.cfg.grad_accum,
            split=self.reid_split,
        )
        return {f"reid_{k}": float(res[k]) for k in REID_KEYS}
