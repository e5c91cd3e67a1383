"""Shared helpers of the stage-two tests (test_train.py, test_distributed.py): a tiny corpus, a tiny
store, a tiny run config and the comparisons an exact resume needs.

Not a test module and not a conftest: conftest.py registers it as `dpal_tests_stage2_util` (pytest's importlib mode
gives test files no package to import siblings from). Sizes are chosen so that a whole run takes
about a second on one CPU thread: 10 noise JPEGs of 48 x 32, a random-init ViT-Ti teacher
(D = 192) at 32 x 16 (v0) and 32 x 48 (Ic), 16 x 16 local crops, a two-block student of width 48.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dpal.config import CacheConfig, DistillConfig
from dpal.views import ViewRecipe

NUM_IMAGES = 10
SHARD_SIZE = 4  # 3 shards: 4 + 4 + 2 images
STUDENT = "vit_tiny_patch16_224"
# width 48 is the smallest that D-PaDe's 16 and 12 heads divide (checkpoints of 7 MB); drop path makes
# the step use the global RNG, so that an exact resume must restore it
STUDENT_KWARGS: dict[str, Any] = {"depth": 2, "embed_dim": 48, "num_heads": 3, "drop_path_rate": 0.1}
RECIPE = ViewRecipe(global_size=(32, 16), local_size=(16, 16), crowd_size=(32, 48))
# metrics that depend on the wall clock, not on the computation
TIMING_KEYS = ("images_per_s",)
REPO_ROOT = Path(__file__).resolve().parent.parent
DPAL = [sys.executable, "-m", "dpal.cli"]


def env() -> dict[str, str]:
    """Environment for subprocesses: one thread each (the machine has two cores, shared)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_corpus(folder: Path, num_images: int = NUM_IMAGES) -> Path:
    """A folder of seeded noise JPEGs (48 x 32)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num_images):
        Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.jpg")
    return folder


def make_store(corpus: Path, out: Path, dtype: str = "float32", shards: str = "0:", seed: int = 0) -> Path:
    """Stage one in-process, over `shards` (`0:1` leaves the store incomplete)."""
    from dpal.pipeline.engine import run_cache

    cfg = CacheConfig(
        corpus=str(corpus),
        out=str(out),
        teacher=STUDENT,
        random_init=True,
        num_views=2,
        dtype=dtype,
        shard_size=SHARD_SIZE,
        seed=seed,
        batch_size=8,
        shards=shards,
        device="cpu",
        views=RECIPE,
    )
    run_cache(cfg, show_progress=False)
    return out


def distill_config(store: Path, out: Path, **overrides: Any) -> DistillConfig:
    """The tiny run: 10 images / batch 4 = 2 steps per epoch, 3 epochs = 6 steps, warmup 2 steps."""
    values: dict[str, Any] = dict(
        store=str(store),
        out=str(out),
        student=STUDENT,
        student_kwargs=STUDENT_KWARGS,
        epochs=3,
        batch_size=4,
        num_workers=0,
        log_every=1,
        warmup_epochs=1.0,
        device="cpu",
        keep_last=10,
    )
    values.update(overrides)
    return DistillConfig(**values)


def distill_args(store: Path, out: Path, *extra: str) -> list[str]:
    """`dpal distill` arguments of `distill_config` (for subprocesses and CliRunner)."""
    return [
        "distill",
        "--store",
        str(store),
        "--out",
        str(out),
        "--student",
        STUDENT,
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--warmup-epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--set",
        "log_every=1",
        "--set",
        "keep_last=10",
        "--set",
        "student_kwargs=" + json.dumps(STUDENT_KWARGS),
        *extra,
    ]


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the timing fields."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(ln).items() if k not in TIMING_KEYS} for ln in lines if ln]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.pt"))


def load_last(run_dir: Path) -> dict[str, Any]:
    step = checkpoint_steps(run_dir)[-1]
    return torch.load(run_dir / "checkpoints" / f"step-{step:08d}.pt", map_location="cpu", weights_only=True)


def tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list, by path."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(tensors(v, f"{prefix}/{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(tensors(v, f"{prefix}/{i}"))
    return out


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Student, D-PaDe (or another recipe's heads), optimizer, sampler and RNG of two checkpoints are
    equal bit for bit."""
    assert a["step"] == b["step"]
    assert a["sampler"] == b["sampler"]
    heads = "dpade" if "dpade" in a else "heads"
    assert heads in b
    for part in ("model", heads, "optimizer", "rng"):
        ta, tb = tensors(a[part]), tensors(b[part])
        assert ta.keys() == tb.keys(), part
        unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not unequal, f"{part}: {unequal[:5]}"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll `predicate` until true; fail with the process's output if it ends first or time runs out."""
    import pytest

    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the condition:\n{out}\n{err}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.005)


def start_until_steps(
    args: list[str], out: Path, steps: int = 2, launcher: list[str] = DPAL, **popen: Any
) -> subprocess.Popen:
    """`dpal ARGS` in its own session (process group), returned once it has logged `steps` steps.
    `launcher`: what runs dpal (a torchrun agent's command, ending in `-m dpal.cli`)."""
    proc = subprocess.Popen(
        [*launcher, *args],
        env=popen.pop("env", env()),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )

    def logged() -> bool:
        f = out / "metrics.jsonl"
        return f.exists() and f.read_text().count("\n") >= steps

    wait_for(logged, proc)
    return proc


def one_torch_thread() -> Iterator[None]:
    """Body of a module fixture: one torch thread meanwhile (two shared cores; more only oversubscribe)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
