"""Typed, frozen run configuration for both stages: the one place each setting is stated.

Every field states its name, type, default, choices (a `Literal`) and help text once, here; the CLI
(cli.py) builds its options from these fields, and `--config FILE` / `--set key=value` fill the same
fields. Precedence: dataclass defaults < `--config FILE` < command-line flags < `--set key=value`.
Nested sections use dotted keys (`--set recipe.global_size=[128,64]`, `--set slurm.partition=gpu`).
Unknown keys are errors that list the known ones; a bad value names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dpal.common import MAX_PIXELS
from dpal.errors import ConfigError
from dpal.store.codecs import dtype_help, dtype_names

VAL_EVERY = 500  # steps between validations when --val-every is not given
# the groups --help lists the options in (each field's `panel`)
PANEL_DATA = "Data and output"
PANEL_SCHEDULE = "Schedule"
PANEL_OPTIMISER = "Optimiser"
PANEL_METHOD = "Method"
PANEL_RECIPES = "Recipes and ablations"
PANEL_VALIDATION = "Validation"
PANEL_RUNTIME = "Runtime and distributed"
PANEL_TEACHER = "Teacher"
PANEL_VIEWS = "Views and targets"
PANEL_CONFIG = "Config file and overrides"


def opt(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = dataclasses.MISSING,
    flag: str | None = None,
    default_help: str | None = None,
    panel: str | None = None,
    choices: Any = None,
) -> Any:
    """A config field with its help text. `flag`: the CLI option's name when it is not the field's
    (`--slurm` for `use_slurm`); `default_help`: what --help says for a default computed at run time;
    `panel`: the group of options that --help lists it in (`PANEL_*`); `choices`: a function giving
    the allowed values of a `str` field whose choices are registered at run time (store codecs)."""
    meta = {"help": help, "flag": flag, "default_help": default_help, "panel": panel, "choices": choices}
    return field(default=default, default_factory=factory, metadata=meta)


def section(cls: type, help: str) -> Any:
    """A nested config section: no option of its own, its keys are set with `--set name.key=value`."""
    return field(default_factory=cls, metadata={"help": help, "section": True})


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
                raise ConfigError(f"recipe.{name} must be positive, got {(h, w)}")
        ch, cw = self.crowd_size
        lh, lw = self.local_size
        # Two persons side by side, no horizontal overlap (docs/method.md, "Views": A col in [0, Wc - 2w - 1)).
        if cw < 2 * lw + 2 or ch < lh + 2:
            raise ConfigError(
                f"recipe.crowd_size {self.crowd_size} cannot hold two {self.local_size} persons side by "
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
                raise ConfigError(f"recipe.{name} must be in [0, 1], got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ViewRecipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(known)}")
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
    views: int = opt(4, "K: replayable augmented views cached per image.", panel=PANEL_VIEWS)
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
    recipe: ViewRecipe = section(ViewRecipe, "Sizes and augmentation ranges of the views.")

    def __post_init__(self) -> None:
        check_choices(self)
        if self.views < 1:
            raise ConfigError(f"views must be >= 1, got {self.views}")
        if self.shard_size < 1 or self.batch_size < 1 or self.workers < 1:
            raise ConfigError("shard_size, batch_size and workers must be >= 1")
        if self.relation_rank is not None and self.relation_rank < 1:
            raise ConfigError(f"relation_rank must be >= 1, got {self.relation_rank}")
        if self.shards is not None:
            shard_slice(self.shards, 10**12)
        for hw in (self.recipe.global_size, self.recipe.crowd_size):
            if hw[0] % 16 or hw[1] % 16:
                raise ConfigError(f"recipe sizes must be multiples of 16 (the patch), got {hw}")


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


# DistillConfig's keys that only some recipes read; another recipe refuses them at a value of their own
RECIPE_KEYS = {
    "dpal": ("global_weight", "local_weight", "relation_weight", "projector"),
    "feature-kd": ("global_weight", "local_weight"),
    "proteus": ("mask_ratio", "mask_probability"),
}


@dataclass(frozen=True)
class DistillConfig:
    """`dpal distill`: train the student and D-PaDe against a store."""

    store: str = opt("", "Store written by `dpal cache-teacher`.", panel=PANEL_DATA)
    out: str = opt("", "Run directory: checkpoints/, metrics.jsonl, config.yaml.", panel=PANEL_DATA)
    student: str = opt(
        "dpal_vit_tiny", "dpal_vit_tiny (the paper's student) or any timm ViT name.", panel=PANEL_METHOD
    )
    student_kwargs: dict[str, Any] = opt(
        help="Extra timm.create_model arguments for the student, e.g. {depth: 2} (recorded for export).",
        factory=dict,
        panel=PANEL_METHOD,
    )
    student_init: Literal["dpal", "timm"] = opt(
        "dpal",
        "How the student starts: dpal, as the authors' code (xavier-uniform weights, CLS from "
        "N(0, 0.02), position embedding from U[0, 1)); timm, timm's own ViT initialisation.",
        panel=PANEL_METHOD,
    )
    epochs: int = opt(200, "Length of the schedule in epochs (warmup + cosine).", panel=PANEL_SCHEDULE)
    max_steps: int | None = opt(
        None,
        "Stop at this optimizer step without changing the schedule; a later run resumes.",
        panel=PANEL_SCHEDULE,
    )
    batch_size: int = opt(
        256, "Images per rank per optimizer step (before accumulation).", panel=PANEL_SCHEDULE
    )
    grad_accum: int = opt(
        1,
        "Micro-batches per optimizer step; each rank's step sees batch_size images in total.",
        panel=PANEL_SCHEDULE,
    )
    base_lr: float = opt(
        2.5e-4, "Learning rate per 256 images; lr = base_lr * global_batch / 256.", panel=PANEL_OPTIMISER
    )
    min_lr: float = opt(0.0, "Floor of the cosine decay.", panel=PANEL_OPTIMISER)
    warmup_epochs: float = opt(
        10.0, "Linear warmup length in epochs (applied per step).", panel=PANEL_SCHEDULE
    )
    weight_decay: float = opt(
        0.05, "AdamW weight decay (none on 1-D parameters and biases).", panel=PANEL_OPTIMISER
    )
    betas: tuple[float, float] = opt((0.9, 0.95), "AdamW betas.", panel=PANEL_OPTIMISER)
    seed: int = opt(0, "Seed of the sampler, the fresh local crops and the init.", panel=PANEL_SCHEDULE)
    num_workers: int | None = opt(
        None,
        "DataLoader worker processes (forkserver) that decode and replay "
        "the views; 0 decodes in the main process.",
        default_help="2 on CPU; on a GPU, the CPUs per local rank minus one, at most 16",
        panel=PANEL_RUNTIME,
    )
    resume: str = opt(
        "auto",
        "auto (newest complete checkpoint in --out), a checkpoint PATH, or none "
        "(refused where --out holds a run: see --fresh).",
        panel=PANEL_DATA,
    )
    fresh: bool = opt(
        False,
        "Start over where --out holds a run: move that run aside whole (to OUT.old-<UTC time>) first.",
        panel=PANEL_DATA,
    )
    keep_last: int = opt(
        3,
        "Whole checkpoints kept in out/checkpoints (the newest; each can resume the run).",
        panel=PANEL_DATA,
    )
    keep_weights_only_older: int = opt(
        0,
        "Of the checkpoints older than those, how many to keep reduced to "
        "the student's weights (step-N.student.pt: for export and evaluation, "
        "not for resuming); 0 deletes them.",
        panel=PANEL_DATA,
    )
    checkpoint_every: int = opt(
        500, "Steps between checkpoints (plus one at the end and on SIGTERM/SIGUSR1).", panel=PANEL_DATA
    )
    log_every: int = opt(10, "Steps between metric lines.", panel=PANEL_RUNTIME)
    loggers: tuple[Literal["tensorboard", "wandb", "mlflow"], ...] = opt(
        (),
        "Also send metrics.jsonl's scalars and the config to this logger (repeatable; each an extra: "
        "pip install 'dpal[mlflow]'; docs/training.md, Loggers).",
        flag="logger",
        panel=PANEL_RUNTIME,
    )
    progress_seconds: float = opt(
        60.0,
        "Seconds between plain progress lines on stderr when it is not a "
        "terminal (a batch job's log); 0 prints one per step. On a terminal a "
        "progress bar is drawn instead.",
        panel=PANEL_RUNTIME,
    )
    online_teacher: bool = opt(
        False,
        "Run the teacher in the loop on the same replayed views instead of "
        "reading its targets from the store.",
        panel=PANEL_METHOD,
    )
    fix_mask_sign: bool = opt(
        True,
        "Orient the PCA shape mask so the image centre scores higher than its border (documented deviation).",
        panel=PANEL_METHOD,
    )
    dpade_scale: float = opt(
        1.0 / 256.0, "D-PaDe expert mixing scale (the paper's 1/256, its per-GPU batch).", panel=PANEL_METHOD
    )
    l2_weight: float = opt(0.025, "Weight of the expert Frobenius regulariser.", panel=PANEL_METHOD)
    recompute: bool | None = opt(
        None,
        "Recompute the step's largest activations in the backward pass "
        "instead of keeping them (D-PaDe's expert generator, the student's MLP "
        "GELUs): measured on CPU, 74.7 instead of 98.4 MiB per image for about 7% "
        "more time per step. Same values either way.",
        default_help="yes on CUDA (memory traffic bounds the step there), no on CPU "
        "(matrix products bound it)",
        panel=PANEL_RUNTIME,
    )
    allow_incomplete: bool = opt(
        False, "Train on the finished shards of an incomplete store.", panel=PANEL_DATA
    )
    device: str = opt(
        "auto", "auto, cpu or cuda; under torchrun each rank takes cuda:LOCAL_RANK.", panel=PANEL_RUNTIME
    )
    recipe_local_size: tuple[int, int] | None = opt(
        None,
        "Override the local crop size (H, W), e.g. [64, 48].",
        default_help="the store's recipe",
        panel=PANEL_METHOD,
    )
    recipe: Literal["dpal", "proteus", "feature-kd"] = opt(
        "dpal",
        "What to train against the store's targets (docs/training.md, Recipes): dpal (D-PaDe and its "
        "three objectives), proteus (LayerNorm + Linear heads on CLS and v0's tokens plus a masked branch, after "
        "Proteus, ICLR 2025) or feature-kd (one LayerNorm + Linear projector, MSE on the global target and v0's "
        "tokens). Fixed for a run: a resume keeps it.",
        panel=PANEL_RECIPES,
    )
    projector: Literal["dpade", "linear"] = opt(
        "dpade",
        "dpal's projector from student to teacher width: D-PaDe, "
        "or one plain Linear(d, D) shared by the three objectives "
        "(ablation). Fixed for a run.",
        panel=PANEL_RECIPES,
    )
    global_weight: float = opt(
        1.0,
        "Weight of the global objective (dpal, feature-kd); 0 switches it off and skips its forward passes.",
        panel=PANEL_RECIPES,
    )
    local_weight: float = opt(
        1.0, "Weight of the local objective (dpal, feature-kd); 0 switches it off.", panel=PANEL_RECIPES
    )
    relation_weight: float = opt(
        1.0,
        "Weight of dpal's relation objective; 0 switches it off and skips the student's pass over Ic.",
        panel=PANEL_RECIPES,
    )
    freeze_student: bool = opt(
        False,
        "Keep the student at its initialisation and train only the heads (D-PaDe or the recipe's): "
        "how much of the alignment the heads achieve alone.",
        panel=PANEL_RECIPES,
    )
    grad_shares: bool = opt(
        False,
        "On log steps, also measure each loss term's gradient norm on the student's parameters "
        "(one extra backward pass per term) and log it (grad_norm/<term>, metrics.jsonl).",
        panel=PANEL_RUNTIME,
    )
    mask_ratio: float = opt(
        0.5,
        "proteus: fraction of v0's patches (at least one) replaced by the mask token "
        "in a masked image (Proteus's 0.5).",
        panel=PANEL_RECIPES,
    )
    mask_probability: float = opt(
        0.5,
        "proteus: fraction of each micro-batch (its first images, at least one) "
        "that the masked branch sees (Proteus's 0.5).",
        panel=PANEL_RECIPES,
    )
    val_store: str = opt(
        "",
        "A store that stage one cached from held-out images with the run's teacher and "
        "views: every loss term of the recipe on it every --val-every steps and at the end "
        "(metrics.jsonl lines with split val; docs/training.md, Validation).",
        panel=PANEL_VALIDATION,
    )
    val_every: int = opt(
        VAL_EVERY,
        "Steps between validations (--val-store, --eval-reid); one more at the end of the run.",
        panel=PANEL_VALIDATION,
    )
    val_images: int | None = opt(
        None,
        "Validate on the first N images of --val-store only.",
        default_help="all of them",
        panel=PANEL_VALIDATION,
    )
    eval_reid: str = opt(
        "",
        "A Market-1501-style folder (query/, bounding_box_test/): mAP and rank-1 of the "
        "student's CLS feature at each validation.",
        panel=PANEL_VALIDATION,
    )
    strict: bool = opt(
        False,
        "Refuse an --eval-reid image that does not decode instead of leaving it out and counting it.",
        panel=PANEL_VALIDATION,
    )
    skip_nonfinite: int = opt(
        0,
        "Optimizer steps whose loss or gradient norm is not finite (NaN, inf) that are skipped, each "
        "recorded in metrics.jsonl, before the next one stops the run (docs/training.md).",
        panel=PANEL_RUNTIME,
    )

    def __post_init__(self) -> None:
        check_choices(self)
        self._check_numbers()
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("epochs, batch_size and grad_accum must be >= 1")
        if self.batch_size % self.grad_accum:
            raise ConfigError(
                f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps must be >= 1")
        if self.keep_last < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise ConfigError("keep_last, checkpoint_every and log_every must be >= 1")
        if self.keep_weights_only_older < 0 or self.progress_seconds < 0:
            raise ConfigError("keep_weights_only_older and progress_seconds must be >= 0")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError("num_workers must be >= 0 (or none for the default)")
        if self.fresh and self.resume not in ("auto", "none"):
            raise ConfigError(f"--fresh starts over; it cannot resume from {self.resume} (drop one of them)")
        if self.grad_shares and self.recipe != "dpal":
            raise ConfigError(f"--grad-shares measures dpal's terms; --recipe {self.recipe} has other ones")
        if self.val_every < 1 or (self.val_images is not None and self.val_images < 1):
            raise ConfigError("val_every and val_images must be >= 1")
        # a val_every at its default passes: the config.yaml of a run written before this check holds it
        if (self.val_every != VAL_EVERY or self.val_images is not None) and not (
            self.val_store or self.eval_reid
        ):
            raise ConfigError(
                "--val-every and --val-images say how to validate, but nothing is validated: "
                "add --val-store (a held-out store) or --eval-reid (a ReID folder), or drop them"
            )
        self._check_recipe()

    def _check_numbers(self) -> None:
        """The optimizer's and the schedule's numbers: finite and in range (a NaN or negative rate
        would train to the end on NaN weights, or ascend the loss)."""
        rules = (
            ("base_lr", self.base_lr, "a finite number > 0", lambda v: 0 < v < math.inf),
            ("min_lr", self.min_lr, "a finite number >= 0", lambda v: 0 <= v < math.inf),
            ("warmup_epochs", self.warmup_epochs, "a finite number >= 0", lambda v: 0 <= v < math.inf),
            ("weight_decay", self.weight_decay, "a finite number >= 0", lambda v: 0 <= v < math.inf),
            ("dpade_scale", self.dpade_scale, "a finite number > 0", lambda v: 0 < v < math.inf),
            ("l2_weight", self.l2_weight, "a finite number >= 0", lambda v: 0 <= v < math.inf),
            ("progress_seconds", self.progress_seconds, "a finite number >= 0", lambda v: 0 <= v < math.inf),
            ("skip_nonfinite", self.skip_nonfinite, "an integer >= 0", lambda v: v >= 0),
        )
        for name, value, rule, ok in rules:
            if not ok(value):  # every comparison with NaN is false: refused too
                raise ConfigError(f"{name} must be {rule}, got {value}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(
                f"betas must be two numbers in [0, 1) (AdamW's beta1 and beta2), got {list(self.betas)}"
            )

    def _check_recipe(self) -> None:
        """Each recipe's own keys: a setting that another recipe reads is refused, never ignored."""
        weights = {
            "global_weight": self.global_weight,
            "local_weight": self.local_weight,
            "relation_weight": self.relation_weight,
        }
        if any(not w >= 0 for w in weights.values()):  # `not >=` also catches nan
            raise ConfigError(f"global_weight, local_weight and relation_weight must be >= 0, got {weights}")
        if not 0 < self.mask_ratio < 1 or not 0 < self.mask_probability <= 1:
            raise ConfigError(
                f"mask_ratio must be in (0, 1) and mask_probability in (0, 1], got {self.mask_ratio} "
                f"and {self.mask_probability}"
            )
        own = RECIPE_KEYS[self.recipe]
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        foreign = [
            k
            for keys in RECIPE_KEYS.values()
            for k in keys
            if k not in own and getattr(self, k) != defaults[k]
        ]
        if foreign:
            raise ConfigError(
                f"{foreign[0]} does not apply to --recipe {self.recipe} (its keys: {', '.join(own)}); "
                "drop it or choose the recipe it belongs to"
            )
        if self.recipe != "proteus" and not any(weights[k] > 0 for k in own if k in weights):
            raise ConfigError(
                f"--recipe {self.recipe} has every objective's weight at 0; nothing would be trained"
            )


# ---------------------------------------------------------------- field types and choices


def field_types(cls: type) -> dict[str, Any]:
    """{field name: its resolved type} of dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def choices(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` type (or of `Literal[...] | None`); None for any other type."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,):  # tuple[Literal[...], ...]
        return choices(typing.get_args(tp)[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if (found := choices(a)) is not None:
                return found
    return None


def check_choices(cfg: Any) -> None:
    """Every `Literal` field of `cfg` (and every field with `opt`'s `choices`) holds one of its
    choices, however the config was built."""
    registered = {f.name: f.metadata.get("choices") for f in dataclasses.fields(cfg)}
    for name, tp in field_types(type(cfg)).items():
        allowed, value = choices(tp) or (registered[name] and registered[name]()), getattr(cfg, name)
        for v in value if isinstance(value, tuple) else (value,):
            if allowed is not None and v not in allowed and v is not None:
                raise ConfigError(f"{name} {v!r} is not one of {', '.join(map(str, allowed))}")
        if isinstance(value, tuple) and allowed is not None and len(set(value)) < len(value):
            raise ConfigError(f"{name} {list(value)} names one twice")


# ---------------------------------------------------------------- loading and overrides


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a parsed value (a YAML scalar, list or mapping, or a flag's text) to the field type `tp`.
    A text given for a number, list or mapping is read as YAML first."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), name)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping")
        return build(tp, value, prefix=name + ".")
    if origin is Literal or tp is str:
        return str(value)  # a Literal's choices are checked where the config is built (check_choices)
    if isinstance(value, str) and (origin in (dict, tuple) or tp in (int, float)):
        value = _yaml_value(value, name) if origin in (dict, tuple) else _number_text(value, name)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, e.g. {{depth: 2}}")
        return dict(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis and isinstance(value, str):
            value = [value]  # --set loggers=mlflow: a list of one
        if not isinstance(value, (list, tuple)):
            n = "" if len(args) == 2 and args[1] is Ellipsis else f" of {len(args)} values"
            raise ConfigError(
                f"{name} must be a list{n}: one YAML list such as [0.9, 0.95], or on the command line the "
                f"option once per value; got {value!r}"
            )
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{name} needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args, strict=True))
    if tp is bool:
        return _bool(value, name)
    if tp in (int, float):
        return _number(value, tp, name)
    return value


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # --set strict=1 arrives as YAML's int 1
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _number_text(text: str, name: str) -> Any:
    """A number's text as YAML reads it (1e3 stays text, which int() and float() then judge)."""
    value = _yaml_value(text, name)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text


def _number(value: Any, tp: type, name: str) -> int | float:
    what = "an integer" if tp is int else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        v = tp(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(1e400), int(inf)
        raise ConfigError(f"{name} must be {what}, got {value!r}") from None
    if tp is int and isinstance(value, float) and value != v:
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return v


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a (nested) mapping; unknown keys raise ConfigError."""
    types_ = field_types(cls)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ConfigError(
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
    """`text` parsed as YAML; a syntax error is a one-line ConfigError naming `where` and the spot."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None


def load_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; give a YAML or TOML file")
    if not p.is_file():
        raise ConfigError(f"config file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text (YAML or TOML expected)") from None
    if p.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    else:
        data = _yaml_value(text, f"config file {p}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys to values")
    return data


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
    d[parts[-1]] = value


def parse_sets(sets: list[str]) -> dict[str, Any]:
    """`key=value` strings -> nested mapping; values parsed as YAML (numbers, lists, true/false)."""
    out: dict[str, Any] = {}
    for s in sets:
        if "=" not in s:
            raise ConfigError(f"--set {s!r} must look like key=value")
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
