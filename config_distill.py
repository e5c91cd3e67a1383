"""`dpal distill`'s settings: `DistillConfig`, one typed, frozen dataclass (see config.py).

Each field states its type, default, choices and help once (`opt`); `__post_init__` refuses a
value out of range, an option that another recipe reads, and validation options with nothing to
validate. Re-exported by dpal.config, where callers import it from.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from dpal.config_load import (
    PANEL_DATA,
    PANEL_METHOD,
    PANEL_OPTIMISER,
    PANEL_RECIPES,
    PANEL_RUNTIME,
    PANEL_SCHEDULE,
    PANEL_VALIDATION,
    check_choices,
    opt,
)
from dpal.errors import ConfigError

VAL_EVERY = 500  # steps between validations when --val-every is not given

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
    local_size: tuple[int, int] | None = opt(
        None,
        "Override the local crop size (H, W), e.g. [64, 48].",
        default_help="the store's views.local_size",
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
