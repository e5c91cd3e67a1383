"""Typed, frozen run configuration for both stages: load YAML/TOML, apply overrides, validate, save.

Precedence: dataclass defaults < `--config FILE` < command-line flags < `--set key=value`.
Nested sections use dotted keys (`--set recipe.global_size=[128,64]`, `--set slurm.partition=gpu`).
Unknown keys are errors that list the known ones; a bad value names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpal.views import ViewRecipe

DTYPES = ("float16", "bfloat16", "int8", "float32")


@dataclass(frozen=True)
class SlurmConfig:
    """Stage-one workers on SLURM through dask-jobqueue (one worker per GPU)."""

    partition: str | None = None
    """SLURM partition (queue)."""
    account: str | None = None
    """SLURM account to charge."""
    jobs: int = 1
    """Number of SLURM jobs, each running one dask worker with one GPU."""
    gpus_per_job: int = 1
    """GPUs requested per job (one worker uses one)."""
    cores: int = 8
    """CPU cores per job (decoding and views)."""
    memory: str = "32GB"
    """Memory per job."""
    walltime: str = "04:00:00"
    """Walltime per job; shards left over are picked up by a rerun."""
    job_extra: tuple[str, ...] = ()
    """Extra #SBATCH directives, e.g. ["--constraint=a100"]."""

    def __post_init__(self) -> None:
        if self.jobs < 1 or self.gpus_per_job < 0 or self.cores < 1:
            raise ValueError("slurm.jobs and slurm.cores must be >= 1 and slurm.gpus_per_job >= 0")


@dataclass(frozen=True)
class CacheConfig:
    """`dpal cache-teacher`: run the teacher once over a corpus and write the store."""

    corpus: str = ""
    """Folder of images, .txt list of image paths, or WebDataset .tar shards (glob, {a..b}, URL)."""
    out: str = ""
    """Store path (created; rerunning the same command resumes it)."""
    teacher: str = "efficientnet-lite2"
    """Teacher preset (path-b, efficientnet-lite2) or any timm model name."""
    teacher_checkpoint: str | None = None
    """Teacher weights file (required for path-b and plain timm names)."""
    teacher_arch: str | None = None
    """Override the timm architecture of a preset (e.g. a smaller ViT in PATH layout)."""
    teacher_layer: int | None = None
    """None: final normalised tokens; i: output of ViT block i (see docs/store.md)."""
    teacher_global_token: str = "auto"
    """auto: the teacher's CLS token where it has one, else the mean patch token; mean: always the mean."""
    random_init: bool = False
    """Allow a teacher without weights, randomly initialised (tests and benchmarks only)."""
    random_init_seed: int = 0
    """Seed of the random teacher init, so that stage two can rebuild it for --online-teacher."""
    views: int = 4
    """K: replayable augmented views cached per image."""
    dtype: str = "float16"
    """Stored feature dtype: float16, bfloat16 (as uint16), int8 (per-token scale) or float32."""
    shard_size: int = 256
    """Images per store shard: the unit of work, of writing and of resume."""
    seed: int = 0
    """Seed of the view parameters (with each image's key and view index)."""
    batch_size: int = 32
    """Views per teacher forward."""
    workers: int = 1
    """Local dask worker processes (one per GPU on a GPU machine)."""
    threads_per_worker: int = 0
    """Torch threads per worker; 0 = cores / workers."""
    replay_threads: int = 0
    """Threads per worker that replay views ahead of the teacher; 0 = the worker's threads when the
    teacher runs on a GPU, 1 when it runs on the CPU (its forward already uses every core)."""
    scheduler: str | None = None
    """Address of a running dask scheduler to use instead of a local cluster."""
    use_slurm: bool = False
    """Start workers on SLURM through dask-jobqueue (see the slurm section)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    shards: str | None = None
    """Run only shards A:B in this process, without dask (for SLURM array jobs)."""
    strict: bool = False
    """Fail on the first bad corpus image instead of skipping and recording it."""
    embed_images: bool = True
    """Copy source images into WebDataset tars beside the features (stage two then needs only the store)."""
    max_pixels: int = 64_000_000
    """Images declaring more pixels are skipped as decompression bombs."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda[:i]."""
    progress_seconds: float = 60.0
    """Seconds between plain progress lines when stderr is not a terminal (a batch job's log)."""
    recipe: ViewRecipe = field(default_factory=ViewRecipe)

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 1:
            raise ValueError("shard_size, batch_size and workers must be >= 1")
        if self.shards is not None:
            shard_slice(self.shards, 10**12)
        for hw in (self.recipe.global_size, self.recipe.crowd_size):
            if hw[0] % 16 or hw[1] % 16:
                raise ValueError(f"recipe sizes must be multiples of 16 (the patch), got {hw}")

    @property
    def is_distributed(self) -> bool:
        return self.shards is None


def shard_slice(spec: str, num_shards: int) -> range:
    """Parse `A:B` (either side may be empty) into a range of shard indices."""
    try:
        a, b = spec.split(":")
        start = int(a) if a else 0
        stop = int(b) if b else num_shards
    except ValueError:
        raise ValueError(f"--shards {spec!r} must look like A:B (e.g. 0:10, 5:, :3)") from None
    if start < 0 or stop < start:
        raise ValueError(f"--shards {spec!r}: need 0 <= A <= B")
    return range(start, min(stop, num_shards))


@dataclass(frozen=True)
class DistillConfig:
    """`dpal distill`: train the student and D-PaDe against a store."""

    store: str = ""
    """Store written by `dpal cache-teacher`."""
    out: str = ""
    """Run directory: checkpoints, metrics.jsonl, config.yaml."""
    student: str = "dpal_vit_tiny"
    """dpal_vit_tiny (the paper's student) or any timm ViT name."""
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm.create_model arguments for the student, e.g. {depth: 2} (recorded for export)."""
    epochs: int = 200
    """Length of the schedule (warmup + cosine)."""
    max_steps: int | None = None
    """Stop at this optimizer step without changing the schedule (resume continues it)."""
    batch_size: int = 256
    """Images per rank per optimizer step (before accumulation)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; each rank's step sees batch_size images in total."""
    base_lr: float = 2.5e-4
    """Learning rate per 256 images; lr = base_lr * global_batch / 256."""
    min_lr: float = 0.0
    """Floor of the cosine decay."""
    warmup_epochs: float = 10.0
    """Linear warmup length (per step)."""
    weight_decay: float = 0.05
    """AdamW weight decay (none on 1-D parameters and biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    seed: int = 0
    """Seed of the sampler, the fresh local crops and the init."""
    num_workers: int | None = None
    """DataLoader worker processes (forkserver) that decode and replay views; 0 decodes in the main
    process. None: 2 on CPU; on a GPU, the CPUs each local rank may use minus one, at most 16."""
    resume: str = "auto"
    """auto (newest complete checkpoint in out/), a checkpoint path, or none (refused where out/ holds a
    run: see fresh)."""
    fresh: bool = False
    """Start over where out/ holds a run: move that run aside whole (to OUT.old-<UTC time>) first."""
    keep_last: int = 3
    """Whole checkpoints kept in out/checkpoints (the newest; each can resume the run)."""
    keep_weights_only_older: int = 0
    """Of the checkpoints older than those, how many to keep reduced to the student's weights
    (step-N.student.pt: for export and evaluation, not for resuming); 0 deletes them."""
    checkpoint_every: int = 500
    """Steps between checkpoints (plus one at the end and on SIGTERM/SIGUSR1)."""
    log_every: int = 10
    """Steps between metric lines."""
    progress_seconds: float = 60.0
    """Seconds between plain progress lines on stderr when it is not a terminal (a batch job's log);
    0 prints one per step. On a terminal a progress bar is drawn instead."""
    online_teacher: bool = False
    """Compute the targets with the teacher in the loop (same replayed views) instead of the store."""
    fix_mask_sign: bool = True
    """Orient the PCA shape mask so the image centre scores higher than its border (documented deviation)."""
    dpade_scale: float = 1.0 / 256.0
    """D-PaDe expert mixing scale (the paper's 1/256, its per-GPU batch)."""
    l2_weight: float = 0.025
    """Weight of the expert Frobenius regulariser."""
    recompute: bool | None = None
    """Recompute the step's largest activations in the backward pass instead of keeping them (D-PaDe's
    expert generator, the student's MLP GELUs): measured on CPU, 74.7 instead of 98.4 MiB per image
    for about 7% more time per step. None: yes on CUDA (memory traffic bounds the step there), no on
    CPU (matrix products bound it). Same values either way."""
    allow_incomplete: bool = False
    """Train on the finished shards of an incomplete store."""
    device: str = "auto"
    """auto, cpu or cuda; under torchrun each rank takes cuda:LOCAL_RANK."""
    recipe_local_size: tuple[int, int] | None = None
    """Override the local crop size (default: the store's recipe)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("epochs, batch_size and grad_accum must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if self.keep_last < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("keep_last, checkpoint_every and log_every must be >= 1")
        if self.keep_weights_only_older < 0 or self.progress_seconds < 0:
            raise ValueError("keep_weights_only_older and progress_seconds must be >= 0")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError("num_workers must be >= 0 (or none for the default)")
        if self.fresh and self.resume not in ("auto", "none"):
            raise ValueError(f"--fresh starts over; it cannot resume from {self.resume} (drop one of them)")


# ---------------------------------------------------------------- loading and overrides


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a parsed value (YAML scalar/list/dict) to the field type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping")
        return build(tp, value, prefix=name + ".")
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(value, name)
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, e.g. {{depth: 2}}")
        return dict(value)
    if origin is tuple:
        if isinstance(value, str):
            value = _yaml_value(value, name)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, e.g. [256, 128]")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{name} needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # --set strict=1 arrives as YAML's int 1
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            v = tp(value) if not isinstance(value, str) else tp(_yaml_value(value, name))
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e400), int(inf)
            raise ValueError(f"{name} must be {'an integer' if tp is int else 'a number'}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return v
    if tp is str:
        return str(value)
    return value


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) mapping; unknown keys raise ValueError."""
    types_ = _field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r}; known keys: {', '.join(prefix + k for k in types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (lists for tuples) for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def _yaml_value(text: str, where: str) -> Any:
    """`text` parsed as YAML; a syntax error is a one-line ValueError naming `where` and the spot."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where} is not valid YAML{at}: {problem}") from None


def load_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"config file {p} is not UTF-8 text (YAML or TOML expected)") from None
    if p.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {p} is not valid TOML: {e}") from None
    else:
        data = _yaml_value(text, f"config file {p}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a mapping of keys to values")
    return data


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ValueError(f"--set {dotted}: {p} is not a section")
    d[parts[-1]] = value


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """`key=value` strings -> nested mapping; values parsed as YAML (numbers, lists, true/false)."""
    out: dict[str, Any] = {}
    for s in sets:
        if "=" not in s:
            raise ValueError(f"--set {s!r} must look like key=value")
        k, v = s.split("=", 1)
        _set_dotted(out, k.strip(), _yaml_value(v, f"--set {s}") if v.strip() else "")
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(cls: type, config_file: str | None, flags: dict[str, Any], sets: list[str]) -> Any:
    """Defaults < config file < flags given on the command line (not None) < --set."""
    values: dict[str, Any] = load_file(config_file) if config_file else {}
    values = _merge(values, {k: v for k, v in flags.items() if v is not None})
    values = _merge(values, parse_sets(sets))
    return build(cls, values)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def dump_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), sort_keys=False)
