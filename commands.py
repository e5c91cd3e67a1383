"""The `dpal` command lines that the demo and the benchmarks at the demo's settings run.

scripts/demo.py, bench/recipes.py and bench/reid_quality.py drive the CLI in subprocesses, as a
user would, with the demo's view sizes, teacher and schedule; the argument lists live here once so
that the benchmarks train exactly what the demo trains. It sits in the package because scripts/
and bench/ run as scripts from their own folders and neither can import the other's modules,
while all three import `dpal`. Each function returns an argv list for `subprocess.run`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

DPAL = [sys.executable, "-m", "dpal.cli"]
# the demo's views, half the paper's sizes: v0 128 x 64, local crops 64 x 48, Ic 128 x 128
DEMO_RECIPE = [
    "--set",
    "views.global_size=[128,64]",
    "--set",
    "views.local_size=[64,48]",
    "--set",
    "views.crowd_size=[128,128]",
]
DEMO_TEACHER = "efficientnet-lite2"
DEMO_STUDENT = "dpal_vit_tiny"


def cache_teacher_command(
    corpus: str, store: Path, views: int, teacher_layer: str | None = None, quiet: bool = False
) -> list[str]:
    """`dpal cache-teacher` with the demo's teacher, shards of 64 images, one worker, demo views."""
    layer = ["--teacher-layer", teacher_layer] if teacher_layer is not None else []
    return [
        *DPAL,
        "cache-teacher",
        "--corpus",
        corpus,
        "--out",
        str(store),
        "--teacher",
        DEMO_TEACHER,
        *layer,
        "--views",
        str(views),
        "--shard-size",
        "64",
        "--workers",
        "1",
        *(["-q"] if quiet else []),
        *DEMO_RECIPE,
    ]


class Schedule(Protocol):
    """The schedule's options as the scripts' parsed arguments (`argparse.Namespace`) hold them."""

    epochs: int
    batch_size: int
    base_lr: float


def distill_command(
    store: str | Path,
    run_dir: Path,
    schedule: Schedule,
    warmup_epochs: float = 1,
    num_workers: int | None = None,
    seed: int | None = None,
    quiet: bool = False,
    settings: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> list[str]:
    """`dpal distill` of the demo's student: `schedule`'s options, then `--num-workers`,
    `--seed` and `-q` when given, a `--set` per entry of `settings` ("key=value"), then `extra`."""
    return [
        *DPAL,
        "distill",
        "--store",
        str(store),
        "--out",
        str(run_dir),
        "--student",
        DEMO_STUDENT,
        "--epochs",
        str(schedule.epochs),
        "--batch-size",
        str(schedule.batch_size),
        "--base-lr",
        str(schedule.base_lr),
        "--warmup-epochs",
        str(warmup_epochs),
        *(["--num-workers", str(num_workers)] if num_workers is not None else []),
        *(["--seed", str(seed)] if seed is not None else []),
        *(["-q"] if quiet else []),
        *(arg for setting in settings for arg in ("--set", setting)),
        *extra,
    ]
