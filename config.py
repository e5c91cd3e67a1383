"""Typed, frozen run configuration for both stages: the one place each setting is stated.

Every field states its name, type, default, choices (a `Literal`) and help text once; the CLI
(cli.py) builds its options from these fields, and `--config FILE` / `--set key=value` fill the same
fields. Precedence: dataclass defaults < `--config FILE` < command-line flags < `--set key=value`.
Nested sections use dotted keys (`--set views.global_size=[128,64]`, `--set slurm.partition=gpu`).
Unknown keys are errors that list the known ones; a bad value names the field and the fix.

Here: stage one's `CacheConfig` with its sections `ViewRecipe` and `SlurmConfig`. `DistillConfig`
(stage two) is in config_distill.py, and the machinery (`opt`, the field types and choices, loading,
overrides, `dump_yaml`) in config_load.py; this module re-exports both, so every caller imports
from dpal.config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from dpal.common import MAX_PIXELS
from dpal.config_distill import RECIPE_KEYS, VAL_EVERY, DistillConfig
from dpal.config_load import (
    PANEL_CONFIG,
    PANEL_DATA,
    PANEL_METHOD,
    PANEL_OPTIMISER,
    PANEL_RECIPES,
    PANEL_RUNTIME,
    PANEL_SCHEDULE,
    PANEL_TEACHER,
    PANEL_VALIDATION,
    PANEL_VIEWS,
    build,
    check_choices,
    choices,
    dump_yaml,
    field_types,
    load_file,
    opt,
    parse_sets,
    resolve,
    section,
    stored_keys,
    to_dict,
    upgrade_keys,
)
from dpal.errors import ConfigError
from dpal.store.codecs import dtype_help, dtype_names

# what callers import from dpal.config: the settings of both stages and the machinery to load them
__all__ = [
    "PANEL_CONFIG",
    "PANEL_DATA",
    "PANEL_METHOD",
    "PANEL_OPTIMISER",
    "PANEL_RECIPES",
    "PANEL_RUNTIME",
    "PANEL_SCHEDULE",
    "PANEL_TEACHER",
    "PANEL_VALIDATION",
    "PANEL_VIEWS",
    "RECIPE_KEYS",
    "VAL_EVERY",
    "CacheConfig",
    "DistillConfig",
    "SlurmConfig",
    "ViewRecipe",
    "build",
    "check_choices",
    "choices",
    "dump_yaml",
    "field_types",
    "load_file",
    "opt",
    "parse_sets",
    "resolve",
    "section",
    "shard_slice",
    "stored_keys",
    "to_dict",
    "upgrade_keys",
]


@dataclass(frozen=True)
class ViewRecipe:
    """Sizes and augmentation ranges of DPAL's views (docs/method.md, "Views"); views.py
    samples and replays them. Stated here, with the other settings, so that reading a config needs
    no torch."""

    global_size: tuple[int, int] = opt((256, 128), "(H, W) of v0, seen by teacher and student.")
    local_size: tuple[int, int] = opt(
        (128, 96), "(H, W) of the local crops v1, v2; also the size of each person pasted into Ic."
    )
    crowd_size: tuple[int, int] = opt((256, 256), "(H, W) of the crowd image Ic.")
    global_scale: tuple[float, float] = opt((0.8, 1.0), "RandomResizedCrop area fraction for v0.")
    local_scale: tuple[float, float] = opt((0.05, 0.8), "RandomResizedCrop area fraction for v1, v2.")
    person_ratio: tuple[float, float] = opt((0.4, 0.6), "Aspect range w/h of v0, v1, v2 crops (log-uniform).")
    crowd_scale: tuple[float, float] = opt(
        (0.2, 1.0), "RandomResizedCrop area fraction for the Ic background."
    )
    crowd_ratio: tuple[float, float] = opt((3 / 4, 4 / 3), "Aspect range w/h of the Ic background crop.")
    flip_p: float = opt(0.5, "Probability of a horizontal flip, drawn for each view.")
    jitter: tuple[float, float, float, float] = opt(
        (0.4, 0.4, 0.2, 0.1), "ColorJitter strengths: brightness, contrast, saturation, hue."
    )
    jitter_p: float = opt(0.8, "Probability of colour jitter.")
    gray_p: float = opt(0.2, "Probability of grayscale.")
    blur_sigma: tuple[float, float] = opt((0.1, 2.0), "Gaussian blur radius range (PIL GaussianBlur radius).")
    global_blur_p: float = opt(1.0, "Probability of blur on v0.")
    local_blur_p: float = opt(0.5, "Probability of blur on v1, v2 and the person pasted into Ic.")
    crowd_blur_p: float = opt(0.1, "Probability of blur on the Ic background.")
    crowd_solarize_p: float = opt(0.2, "Probability of solarizing the Ic background.")
    person_alpha: float = opt(
        0.7, "Ic pixel = alpha * person + (1 - alpha) * background inside each pasted box."
    )

    def __post_init__(self) -> None:
        for name in ("global_size", "local_size", "crowd_size"):
            h, w = getattr(self, name)
            if h <= 0 or w <= 0:
                raise ConfigError(f"views.{name} must be positive, got {(h, w)}")
        ch, cw = self.crowd_size
        lh, lw = self.local_size
        # Two persons side by side, no horizontal overlap (docs/method.md, "Views": A col in [0, Wc - 2w - 1)).
        if cw < 2 * lw + 2 or ch < lh + 2:
            raise ConfigError(
                f"views.crowd_size {self.crowd_size} cannot hold two {self.local_size} persons side by "
                f"side; it needs width >= {2 * lw + 2} and height >= {lh + 2}"
            )
        for name in (
            "flip_p",
            "jitter_p",
            "gray_p",
            "global_blur_p",
            "local_blur_p",
            "crowd_blur_p",
            "crowd_solarize_p",
            "person_alpha",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"views.{name} must be in [0, 1], got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ViewRecipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown view keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class SlurmConfig:
    """Stage-one workers on SLURM through dask-jobqueue (one worker per GPU)."""

    partition: str | None = opt(None, "SLURM partition (queue).")
    account: str | None = opt(None, "SLURM account to charge.")
    jobs: int = opt(1, "Number of SLURM jobs, each running one dask worker with one GPU.")
    gpus_per_job: int = opt(1, "GPUs requested per job (one worker uses one).")
    cores: int = opt(8, "CPU cores per job (decoding and views).")
    memory: str = opt("32GB", "Memory per job.")
    walltime: str = opt("04:00:00", "Walltime per job; shards left over are picked up by a rerun.")
    job_extra: tuple[str, ...] = opt((), 'Extra #SBATCH directives, e.g. ["--constraint=a100"].')

    def __post_init__(self) -> None:
        if self.jobs < 1 or self.gpus_per_job < 0 or self.cores < 1:
            raise ConfigError("slurm.jobs and slurm.cores must be >= 1 and slurm.gpus_per_job >= 0")


@dataclass(frozen=True)
class CacheConfig:
    """`dpal cache-teacher`: run the teacher once over a corpus and write the store."""

    corpus: str = opt(
        "",
        "Folder of images, a .txt list of image paths, or WebDataset .tar shards (path, "
        "glob, {a..b}, fsspec URL).",
        panel=PANEL_DATA,
    )
    out: str = opt(
        "",
        "Store to create, or to resume if it exists (rerunning the same command resumes).",
        panel=PANEL_DATA,
    )
    teacher: str = opt(
        "efficientnet-lite2",
        "Teacher preset (path-b, efficientnet-lite2) or any timm model name.",
        panel=PANEL_TEACHER,
    )
    teacher_checkpoint: str | None = opt(
        None,
        "Teacher weights file (PATH-B .pth, timm state dict); required for path-b and plain timm names.",
        panel=PANEL_TEACHER,
    )
    teacher_arch: str | None = opt(
        None,
        "Override the timm architecture of a preset (e.g. a smaller ViT in PATH layout).",
        panel=PANEL_TEACHER,
    )
    teacher_layer: int | None = opt(
        None,
        "Use the output of ViT block i, or of CNN feature stage i (timm's feature_info; -1: the last "
        "stage, before a head convolution), instead of the final output (negative counts from the end).",
        panel=PANEL_TEACHER,
    )
    teacher_input_scale: int = opt(
        0,
        "Upsample each view by this factor before the teacher, so that its feature grid is the "
        "student's token grid: 0 = automatic (teacher stride / student patch: 2 for "
        "EfficientNet-Lite2); 1 = as is (a coarser CNN map is then interpolated).",
        panel=PANEL_TEACHER,
    )
    teacher_global_token: Literal["auto", "mean"] = opt(
        "auto",
        "auto: the teacher's CLS token where it has one, else the mean patch token; mean: always the mean.",
        panel=PANEL_TEACHER,
    )
    random_init: bool = opt(
        False,
        "Allow a teacher without weights, randomly initialised (tests and benchmarks only).",
        panel=PANEL_TEACHER,
    )
    random_init_seed: int = opt(
        0,
        "Seed of the random teacher init, so that stage two can rebuild it for --online-teacher.",
        panel=PANEL_TEACHER,
    )
    num_views: int = opt(
        4, "K: replayable augmented views cached per image.", flag="views", panel=PANEL_VIEWS
    )
    dtype: str = opt("float16", dtype_help(), panel=PANEL_VIEWS, choices=dtype_names)
    relation: Literal["logits", "factor"] = opt(
        "logits",
        "How Ic's relation target is stored: logits, T x T in "
        "--dtype; factor, a rank-r float16 factor Z with Z Z^T ~= "
        "the logits plus their exact float32 diagonal (store schema 3; "
        "docs/store.md).",
        panel=PANEL_VIEWS,
    )
    relation_rank: int | None = opt(
        None,
        "r of --relation factor, 1 to T; default min(64, T // 4) (store.relation.default_relation_rank).",
        panel=PANEL_VIEWS,
    )
    shard_size: int = opt(
        256, "Images per store shard: the unit of work, of writing and of resume.", panel=PANEL_DATA
    )
    seed: int = opt(
        0, "Seed of the view parameters (with each image's key and view index).", panel=PANEL_VIEWS
    )
    batch_size: int = opt(32, "Views per teacher forward.", panel=PANEL_RUNTIME)
    workers: int = opt(1, "Local dask worker processes (one per GPU on a GPU machine).", panel=PANEL_RUNTIME)
    threads_per_worker: int = opt(0, "Torch threads per worker; 0 = cores / workers.", panel=PANEL_RUNTIME)
    replay_threads: int = opt(
        0,
        "Threads per worker that replay views ahead of the teacher; 0 = the "
        "worker's threads when the teacher runs on a GPU, 1 when it runs on the CPU "
        "(its forward already uses every core).",
        panel=PANEL_RUNTIME,
    )
    scheduler: str | None = opt(
        None,
        "Address of a running dask scheduler (tcp://host:8786) to use instead of a local cluster.",
        panel=PANEL_RUNTIME,
    )
    use_slurm: bool = opt(
        False,
        "Start dask workers on SLURM through dask-jobqueue; see --set "
        "slurm.partition=..., slurm.jobs, slurm.gpus_per_job, slurm.walltime.",
        flag="slurm",
        panel=PANEL_RUNTIME,
    )
    slurm: SlurmConfig = section(SlurmConfig, "SLURM jobs for --slurm.")
    shards: str | None = opt(
        None, "Run only shards A:B in this process, without dask (SLURM array jobs).", panel=PANEL_RUNTIME
    )
    strict: bool = opt(
        False, "Fail on the first bad corpus image instead of skipping and recording it.", panel=PANEL_DATA
    )
    embed_images: bool = opt(
        True,
        "Copy source images into WebDataset tars beside the features (stage two "
        "then needs only the store); --no-embed-images references the corpus instead.",
        panel=PANEL_DATA,
    )
    max_pixels: int = opt(
        MAX_PIXELS, "Images declaring more pixels are skipped as decompression bombs.", panel=PANEL_DATA
    )
    device: str = opt("auto", "auto (cuda if available), cpu or cuda[:i].", panel=PANEL_RUNTIME)
    progress_seconds: float = opt(
        60.0,
        "Seconds between plain progress lines when stderr is not a terminal (a batch job's log).",
        panel=PANEL_RUNTIME,
    )
    views: ViewRecipe = section(ViewRecipe, "Sizes and augmentation ranges of the views.")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.num_views < 1:
            raise ConfigError(f"num_views (--views) must be >= 1, got {self.num_views}")
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 1:
            raise ConfigError("shard_size, batch_size and workers must be >= 1")
        if self.relation_rank is not None and self.relation_rank < 1:
            raise ConfigError(f"relation_rank must be >= 1, got {self.relation_rank}")
        if self.shards is not None:
            shard_slice(self.shards, 10**12)
        for hw in (self.views.global_size, self.views.crowd_size):
            if hw[0] % 16 or hw[1] % 16:
                raise ConfigError(f"views sizes must be multiples of 16 (the patch), got {hw}")


def shard_slice(spec: str, num_shards: int) -> range:
    """Parse `A:B` (either side may be empty) into a range of shard indices."""
    try:
        a, b = spec.split(":")
        start = int(a) if a else 0
        stop = int(b) if b else num_shards
    except ValueError:
        raise ConfigError(f"--shards {spec!r} must look like A:B (e.g. 0:10, 5:, :3)") from None
    if start < 0 or stop < start:
        raise ConfigError(f"--shards {spec!r}: need 0 <= A <= B")
    return range(start, min(stop, num_shards))
