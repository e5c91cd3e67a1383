"""D-PaDe benchmark: the lean expert path against the textbook formulation, time and memory.

Three sections, all at the paper's widths (student d = 192, teacher D = 768) and token counts
(v0 1 + 128 tokens, Ic 257 tokens), float32 on this CPU:

- time: forward plus backward of the five D-PaDe calls of one step, as `Distiller` makes them
  (`forward_many` on the CLS tokens of v0, v1, v2 as one 3B branch, the 128 patches of v0, the 257
  tokens of Ic). Variants: `reference` (`lean=False`: LayerNorm over each expert, einsum), `lean`
  (`_MixedExperts`, keeping the generator's pre-activation; the CPU default) and `lean_recompute`
  (recomputing the generator in the backward pass; the CUDA default). Same weights and inputs;
  the variants run alternately, `--reps` rounds after one warm-up round, and the per-round ratios
  reference / variant are reported with their median, so that other jobs slow all alike.
- step: one whole training step (`Distiller` forward and backward, fused AdamW) on a batch of
  random tensors of the shapes `train` feeds the model on CPU, for the same three variants, where
  `lean_recompute` is `recompute=true` as a whole (D-PaDe's generator and the student's MLP GELUs
  recomputed); alternated like the time section. What the lean path and recomputing cost or save
  in a CPU step.
- memory: the peak of live tensor bytes (torch profiler allocation events) of one whole training
  step (`Distiller` forward and backward and fused AdamW, after a warm-up step) at batch 2, 4, 8,
  16, in a fresh process per (variant, batch); the least-squares slope is the memory per image.
  There `lean_recompute` is `--set recompute=true` as a whole: D-PaDe recomputes its generator
  and the student's MLPs recompute their GELU (`trainer/student.py`); `reference` is the code
  before the lean path (textbook D-PaDe, nothing recomputed).
  The batch is random tensors of the shapes `train` feeds the model on CPU (views, targets and
  the shape mask); memory does not depend on the values.

    .venv/bin/python bench/bench_dpade.py --json /tmp/dpal_bench/dpade.json
    .venv/bin/python bench/bench_dpade.py --skip memory --batch-size 8 --reps 6   # time and step only
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import timing
import torch

from dpal.config import DistillConfig
from dpal.store import StoreMeta, TeacherIdentity, TokenGrid
from dpal.trainer.distiller import Schedule
from dpal.trainer.dpade import PATTERN_GLOBAL, PATTERN_LOCAL, PATTERN_RELATION, DPaDe
from dpal.trainer.runtime import keep_freed_memory
from dpal.trainer.train import Trainer
from dpal.views import ViewRecipe

STUDENT_DIM, TEACHER_DIM = 192, 768
NUM_PATCHES, NUM_CROWD_TOKENS = 128, 257
MEMORY_BATCHES = (2, 4, 8, 16)
VARIANTS = {
    "reference": {"lean": False},
    "lean": {"lean": True, "recompute": False},
    "lean_recompute": {"lean": True, "recompute": True},
}


def dpade_variants(seed: int = 0) -> dict[str, DPaDe]:
    torch.manual_seed(seed)
    base = DPaDe(STUDENT_DIM, TEACHER_DIM)
    out = {}
    for name, kw in VARIANTS.items():
        m = copy.deepcopy(base)
        for k, v in kw.items():
            setattr(m, k, v)
        out[name] = m
    return out


def branch_inputs(batch_size: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(3 * batch_size, 1, STUDENT_DIM, generator=g),
        torch.randn(batch_size, NUM_PATCHES, STUDENT_DIM, generator=g),
        torch.randn(batch_size, NUM_CROWD_TOKENS, STUDENT_DIM, generator=g),
    ]


def dpade_step(m: DPaDe, xs: list[torch.Tensor]) -> float:
    """Seconds of forward + backward of the five calls (a loss touching every output)."""
    x = [t.clone().requires_grad_() for t in xs]
    t0 = time.perf_counter()
    outs = m.forward_many([(x[0], PATTERN_GLOBAL), (x[1], PATTERN_LOCAL), (x[2], PATTERN_RELATION)])
    sum(o.y.square().mean() + o.route_loss + o.weight_l2 for o in outs).backward()
    dt = time.perf_counter() - t0
    m.zero_grad(set_to_none=True)
    return dt


def time_section(batch_size: int, reps: int) -> dict[str, Any]:
    models = dpade_variants()
    xs = branch_inputs(batch_size)
    return alternate({name: (lambda m=m: dpade_step(m, xs)) for name, m in models.items()}, batch_size, reps)


def alternate(runs: dict[str, Any], batch_size: int, reps: int) -> dict[str, Any]:
    """Time each zero-argument callable (returning seconds) once as a warm-up, then `reps` rounds in
    alternating order; per-round ratios against `reference`, printed and returned."""
    for fn in runs.values():
        fn()
    loads: list[float] = []
    times = timing.alternate(runs, reps, after_round=lambda _, __: loads.append(os.getloadavg()[0]))
    res: dict[str, Any] = {"batch_size": batch_size, "reps": reps, "load": loads, "seconds": times}
    for name, median_s in timing.medians(times).items():
        ratios = timing.pair_ratios(times["reference"], times[name])
        res[name] = {
            "median_s": median_s,
            "speedup_median": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
        }
        print(
            f"  {name:15s} {res[name]['median_s'] * 1000:8.1f} ms  reference / this: "
            f"{res[name]['speedup_median']:.3f}x (rounds {min(ratios):.3f} to {max(ratios):.3f})",
            flush=True,
        )
    print(f"  load {min(loads):.1f} to {max(loads):.1f}")
    return res


# ---------------------------------------------------------------- whole step


def build_variant(variant: str, recipe: ViewRecipe) -> Trainer:
    """The student + D-PaDe and fused AdamW as `train` builds them (a `Trainer`), set to `variant`."""
    cfg = DistillConfig(student="dpal_vit_tiny", recompute=VARIANTS[variant].get("recompute", False))
    trainer = Trainer(
        cfg, synthetic_meta(recipe), recipe, torch.device("cpu"), schedule=Schedule.constant(1e-4)
    )
    trainer.model.dpade.lean = VARIANTS[variant]["lean"]
    return trainer


def train_step(trainer: Trainer, batch: dict[str, torch.Tensor]) -> float:
    """Seconds of `Trainer.train_step` on `batch` (model inputs)."""
    t0 = time.perf_counter()
    trainer.train_step(iter([batch]))
    return time.perf_counter() - t0


def step_section(batch_size: int, reps: int) -> dict[str, Any]:
    recipe = ViewRecipe()
    batch = random_batch(batch_size, recipe)
    runs = {name: build_variant(name, recipe) for name in VARIANTS}  # the warm-up allocates AdamW's state
    return alternate({name: (lambda r=r: train_step(r, batch)) for name, r in runs.items()}, batch_size, reps)


# ---------------------------------------------------------------- memory


def synthetic_meta(recipe: ViewRecipe) -> StoreMeta:
    """A store's metadata for random targets of a ViT-B-sized teacher (D = 768, patch 16): the
    `Trainer` reads the teacher width and v0's token grid from it."""
    teacher = TeacherIdentity(
        name="synthetic",
        arch="vit_base_patch16_224",
        checkpoint=None,
        checkpoint_sha256=None,
        random_init=True,
        random_init_seed=0,
        layer=None,
        kind="vit",
        embed_dim=TEACHER_DIM,
        global_token="cls",
    )
    return StoreMeta(
        teacher=teacher,
        recipe=recipe,
        token_grid=TokenGrid.of(recipe, 16),
        seed=0,
        num_views=1,
        num_images=1,
        shard_size=1,
        dtype="float32",
        embed_dim=TEACHER_DIM,
        corpus="(synthetic)",
        corpus_fingerprint="",
        embed_images=False,
    )


def random_batch(batch_size: int, recipe: ViewRecipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    (hg, wg), (hl, wl), (hc, wc) = recipe.global_size, recipe.local_size, recipe.crowd_size
    b = batch_size
    return {
        "v0": torch.randn(b, 3, hg, wg, generator=g),
        "v1": torch.randn(b, 3, hl, wl, generator=g),
        "v2": torch.randn(b, 3, hl, wl, generator=g),
        "ic": torch.randn(b, 3, hc, wc, generator=g),
        "g_t": torch.randn(b, TEACHER_DIM, generator=g),
        "local_t": torch.randn(b, NUM_PATCHES, TEACHER_DIM, generator=g),
        "rel_t": torch.randn(b, NUM_CROWD_TOKENS, NUM_CROWD_TOKENS, generator=g),
        "mask": torch.rand(b, NUM_PATCHES, 1, generator=g),
    }


def memory_child(variant: str, batch_size: int) -> dict[str, Any]:
    """Peak live tensor bytes of one training step (after a warm-up step), in this process."""
    from torch.profiler import ProfilerActivity, profile

    recipe = ViewRecipe()
    trainer = build_variant(variant, recipe)
    batch = random_batch(batch_size, recipe)
    train_step(trainer, batch)  # allocates the AdamW state
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(trainer, batch)
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    live = np.cumsum([b for _, b in events]) if events else np.zeros(1)
    return {"variant": variant, "batch_size": batch_size, "tensor_peak_bytes": int(live.max())}


def memory_section(variants: list[str]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name in variants:
        rows = []
        for b in MEMORY_BATCHES:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, str(b)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        x = np.array([r["batch_size"] for r in rows], dtype=np.float64)
        y = np.array([r["tensor_peak_bytes"] for r in rows], dtype=np.float64)
        slope, intercept = np.polyfit(x, y, 1)
        res[name] = {"rows": rows, "per_image_bytes": float(slope), "intercept_bytes": float(intercept)}
        peaks = ", ".join(f"{r['batch_size']}: {r['tensor_peak_bytes'] / 2**20:.0f}" for r in rows)
        print(
            f"  {name:15s} peak MiB by batch {peaks}; {slope / 2**20:.1f} MiB per image "
            f"+ {intercept / 2**20:.0f} MiB",
            flush=True,
        )
    ref = res.get("reference")
    if ref:
        for name in variants:
            res[name]["per_image_vs_reference"] = res[name]["per_image_bytes"] / ref["per_image_bytes"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: time,step,memory")
    ap.add_argument("--memory-variants", default="reference,lean,lean_recompute")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--memory-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:
        keep_freed_memory()
        print(json.dumps(memory_child(args.memory_child[0], int(args.memory_child[1]))))
        return
    keep_freed_memory()  # as `train` does on CPU
    skip = set(filter(None, args.skip.split(",")))
    out: dict[str, Any] = {"threads": args.threads, "torch": torch.__version__}
    if "time" not in skip:
        print(f"D-PaDe forward + backward of one step's five calls, batch {args.batch_size}:", flush=True)
        out["time"] = time_section(args.batch_size, args.reps)
    if "step" not in skip:
        print(f"whole training step, batch {args.batch_size}:", flush=True)
        out["step"] = step_section(args.batch_size, args.reps)
    if "memory" not in skip:
        print("whole training step, peak live tensor memory:", flush=True)
        out["memory"] = memory_section(args.memory_variants.split(","))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
