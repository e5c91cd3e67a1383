"""dpal's Python API: the commands of the CLI as functions, over the same typed configs.

    import dpal

    store = dpal.cache_teacher("images/", "images.dpal", teacher="efficientnet-lite2", num_views=4)
    run = dpal.distill(store.path, "runs/ti", epochs=50, batch_size=64)
    folder = dpal.export(run.run_dir, "dpal-vit-ti")
    model = dpal.load_student(folder.path)
    scores = dpal.eval_reid(folder.path, "market1501/")

Keyword arguments are the config's keys (`CacheConfig`, `DistillConfig` in config.py; a section as a
mapping or its dataclass, `views={"global_size": (128, 64)}`), and `config=` takes a YAML or TOML
file, or a config object, under them: defaults < config < keyword arguments, as on the command line.
A mistake raises a `dpal.errors.UserError` kind (ConfigError, InputError, StoreError, ...) whose
message is the CLI's `error:` line; nothing here exits the process. Every heavy import (torch,
zarr, dask) happens inside the call, so `import dpal` stays light.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpal.config import CacheConfig, DistillConfig, build, load_file, to_dict, upgrade_keys
from dpal.errors import ConfigError, InputError

if TYPE_CHECKING:
    from torch import nn

    from dpal.pipeline.engine import RunSummary
    from dpal.trainer.export import ExportResult


def make_config(cls: type, config: str | Path | Any | None, settings: dict[str, Any]) -> Any:
    """`cls` from a config file or object (or none), then `settings` (keys of `cls`) over it."""
    if config is None:
        values: dict[str, Any] = {}
    elif isinstance(config, cls):
        values = to_dict(config)
    elif isinstance(config, (str, Path)):
        values = upgrade_keys(cls, load_file(config), f"config file {config}")
    else:
        raise ConfigError(
            f"config must be a YAML or TOML file or a {cls.__name__}, got {type(config).__name__}"
        )
    for key, value in upgrade_keys(
        cls, settings, "settings"
    ).items():  # a section given as a mapping updates the file's keys
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            value = {**values[key], **value}
        values[key] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return build(cls, values)


@dataclass(frozen=True)
class CacheResult:
    """What `cache_teacher` made: the store and its counts (`summary`: the CLI's summary line's)."""

    path: Path
    complete: bool
    images: int
    cached: int
    skipped: int
    summary: RunSummary


def cache_teacher(
    corpus: str | Path | None = None,
    out: str | Path | None = None,
    *,
    config: str | Path | CacheConfig | None = None,
    show_progress: bool = False,
    **settings: Any,
) -> CacheResult:
    """Stage one (`dpal cache-teacher`): run the teacher once over `corpus` and write the store `out`;
    a rerun resumes. `settings`: CacheConfig's keys (teacher, views, dtype, workers, shards, ...)."""
    given = {k: str(v) for k, v in (("corpus", corpus), ("out", out)) if v is not None}
    cfg = make_config(CacheConfig, config, {**given, **settings})
    if not cfg.corpus:
        raise ConfigError("--corpus is required (a folder of images, a .txt list, or .tar shards)")
    if not cfg.out:
        raise ConfigError("--out is required (the store to create or resume)")
    from dpal.pipeline.engine import run_cache

    summary = run_cache(cfg, show_progress=show_progress)
    return CacheResult(
        Path(cfg.out), summary.complete, summary.images, summary.cached, summary.skipped, summary
    )


@dataclass(frozen=True)
class DistillResult:
    """What `distill` did: where, to which step, its last checkpoint, and the last metrics lines
    (`metrics`: the last training line of metrics.jsonl, `val`: the last validation line, or None)."""

    run_dir: Path
    step: int
    epoch: int
    last_checkpoint: Path | None
    metrics: dict[str, Any] | None
    val: dict[str, Any] | None
    seconds: float
    stopped_by_signal: bool
    signal_name: str


def distill(
    store: str | Path | None = None,
    out: str | Path | None = None,
    *,
    config: str | Path | DistillConfig | None = None,
    show_progress: bool = False,
    **settings: Any,
) -> DistillResult:
    """Stage two (`dpal distill`): train the student on `store` into the run directory `out`; a rerun
    resumes bit for bit. `settings`: DistillConfig's keys (epochs, batch_size, recipe, val_store, ...)."""
    given = {k: str(v) for k, v in (("store", store), ("out", out)) if v is not None}
    cfg = make_config(DistillConfig, config, {**given, **settings})
    if not cfg.store or not cfg.out:
        raise ConfigError("--store and --out are required")
    from dpal.trainer.train import train

    result = train(cfg, show_progress=show_progress)
    train_line, val_line = _last_lines(Path(cfg.out) / "metrics.jsonl")
    return DistillResult(
        Path(cfg.out),
        result.step,
        result.epoch,
        result.last_checkpoint,
        train_line,
        val_line,
        result.seconds,
        result.stopped_by_signal,
        result.signal_name,
    )


def _last_lines(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The last training line and the last validation line of a metrics.jsonl (None where none)."""
    train_line = val_line = None
    if path.is_file():
        for ln in path.read_text().splitlines():
            try:
                line = json.loads(ln)
            except json.JSONDecodeError:
                continue
            if line.get("split") == "val":
                val_line = line
            else:
                train_line = line
    return train_line, val_line


def export(run: str | Path, out: str | Path) -> ExportResult:
    """`dpal export`: the student of run directory (or checkpoint) `run` as a model folder with its
    model card, or as one `.safetensors` file when `out` ends so."""
    from dpal.trainer.export import export_run

    return export_run(run, out)


def load_student(path: str | Path) -> nn.Module:
    """The student backbone, on CPU in eval mode, from an exported model folder or .safetensors file,
    a run directory (its newest checkpoint) or a checkpoint file; `timm.data.resolve_data_config({},
    model=model)` gives its input as trained."""
    path = Path(path)
    from dpal.trainer.export import is_model_folder, load_exported

    if is_model_folder(path) or (path.suffix in (".safetensors", ".json") and path.is_file()):
        return load_exported(path)
    from dpal.trainer.checkpoint import build_student_from_checkpoint

    return build_student_from_checkpoint(path)[0]


def eval_reid(
    model: str | Path,
    data: str | Path,
    *,
    image_size: tuple[int, int] | None = None,
    feature: str = "cls",
    batch_size: int = 64,
    random_init: bool = False,
    teacher_checkpoint: str | None = None,
    seed: int = 0,
    strict: bool = False,
) -> dict[str, Any]:
    """`dpal eval reid`: Market-1501 protocol on `data` for `model` (what `--model` accepts). Returns
    mAP, rank1, rank5, rank10 and the 90% bootstrap bounds (mAP_lo, ...) as fractions in [0, 1],
    the counts (images that do not decode are left out and counted in num_unreadable; `strict`:
    refused in one line), the image size, and `model`: the name the CLI prints."""
    if image_size is not None and len(image_size) != 2:
        raise ConfigError("--image-size takes two values: --image-size H --image-size W")
    data = Path(data)
    if not (data / "query").is_dir() or not (data / "bounding_box_test").is_dir():
        raise InputError(f"--data {data} must hold query/ and bounding_box_test/ (Market-1501 layout)")
    import torch

    from dpal.evaluate import evaluate_reid, resolve_model

    with torch.no_grad():
        size = tuple(image_size) if image_size else None
        emb = resolve_model(str(model), size, random_init, teacher_checkpoint, seed, feature)
        res = evaluate_reid(emb, data, batch_size, strict=strict)
    return {"model": emb.name, "feature": feature if emb.kind != "teacher" else "global", **res}
