"""What issue 19's checks cost: the trainer's non-finite check per step and the store's value check
per batch read, at the paper's shapes, on this machine's CPU.

1. `Trainer.check_finite`: one `isfinite` over a step's loss terms and the 2-norm of every
   gradient tensor, one sync. Measured on the run's own model (the paper's student, `dpal_vit_tiny`,
   with D-PaDe at teacher width D) with random gradients, beside AdamW's `optimizer.step()` on the
   same parameters, which every step takes anyway.
2. `StoreReader.check_values`: the crc32c of every (row, view) read and the NaN/inf scan, on one
   batch of stored targets at the paper's view sizes (v0 256 x 128: P = 128 tokens; Ic 256 x 256:
   T = 257), float16, D = 768 and 1280.

Medians over `--repeats` calls, one torch thread (as a DataLoader worker runs). Run from the
repository root:

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_reliability.py --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch

from dpal.config import DistillConfig
from dpal.store import crc32c_of, nonfinite_rows
from dpal.trainer.train import Trainer
from dpal.views import ViewRecipe


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def step_check(embed_dim: int, repeats: int) -> dict[str, float]:
    """ms of check_finite and of optimizer.step on the student + D-PaDe at teacher width D."""
    cfg = DistillConfig(store="-", out="-", device="cpu")
    recipe = ViewRecipe()
    meta = SimpleNamespace(embed_dim=embed_dim, token_grid=SimpleNamespace(global_grid=(16, 8)))
    trainer = Trainer(cfg, meta, recipe, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for p in trainer.model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    terms = [{k: torch.rand(()) for k in ("global", "local", "relation", "route", "weight_l2", "total")}]
    check = _median_ms(lambda: trainer.check_finite(terms, []), repeats)
    opt = _median_ms(trainer.optimizer.step, max(3, repeats // 4))
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"D": embed_dim, "parameters": params, "check_ms": check, "optimizer_step_ms": opt}


def read_check(embed_dim: int, batch: int, repeats: int) -> dict[str, float]:
    """ms of the per-row crc32c and NaN/inf scan of one batch of stored float16 targets."""
    rng = np.random.default_rng(0)
    arrays = {
        "global": rng.standard_normal((batch, embed_dim)).astype(np.float16),
        "local": rng.standard_normal((batch, 128, embed_dim)).astype(np.float16),
        "relation": rng.standard_normal((batch, 257, 257)).astype(np.float16),
    }

    def crcs() -> None:
        for a in arrays.values():
            for i in range(len(a)):
                crc32c_of(a[i])

    def finite() -> None:
        for a in arrays.values():
            nonfinite_rows(a, "float16")

    nbytes = sum(a.nbytes for a in arrays.values())
    crc_ms, finite_ms = _median_ms(crcs, repeats), _median_ms(finite, repeats)
    return {
        "D": embed_dim,
        "batch": batch,
        "MB": nbytes / 1e6,
        "crc32c_ms": crc_ms,
        "nonfinite_ms": finite_ms,
        "total_ms": crc_ms + finite_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {
        "step_check": [step_check(d, args.repeats) for d in (768, 1280)],
        "read_check": [read_check(d, args.batch, args.repeats) for d in (768, 1280)],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
