"""Stage-two loader benchmark: where one DataLoader worker's time goes, per operation, and what the
training device then does with the batch.

Three sections, in CPU milliseconds of this process per image (`--reps` batches of `--batch-size`,
one torch thread, as in a DataLoader worker). CPU time, not wall time, so that other jobs on a
shared machine barely change the figures; on an idle machine the two agree:

1. `legacy`: the worker of dpal <= 0.x as it was before the device-side batch work (issue 9):
   float32 targets, JPEG decode, every PIL operation of v0, person A and the Ic background
   (`views.apply_aug` op by op), person B, the float composition and normalisation of v0 and Ic
   in numpy, the two local crops drawn and augmented with PIL, the collation and the copy of the
   batch into shared memory (what the DataLoader's queue does with each tensor).
2. `worker`: today's `BatchDataset.__getitem__`, split the same way (raw stored targets, decode,
   the PIL ops of v0, A, background, the local crops' parameters and padded source images,
   collation, shared memory), and the whole `__getitem__` timed on its own: images/s per worker.
3. `device`: `trainer.augment.model_inputs` on the batch (the exact v0/Ic composition, the
   batched local crops, the target decode) on `--device`, ms per batch and per image.

`--recipe` builds the worker's batches as a run of that recipe does (`recipes.batch_needs`: proteus
and feature-kd need no v1, v2, Ic nor relation target); `legacy` is dpal's whatever it says.

    .venv/bin/python bench/bench_loader.py --store STORE [--recipe dpal|proteus|feature-kd] [--json out.json]

STORE is any stage-one store (bench_distill.py builds a ViT-B one at the paper's sizes in
/tmp/dpal_bench). The `legacy` op-by-op replay mirrors `views.apply_aug` and `views.replay`; keep
it in step with them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps

from dpal.config import DistillConfig
from dpal.corpus import decode_image
from dpal.store import StoreReader
from dpal.trainer.data import BatchDataset, BatchRequest, EpochSampler, valid_rows
from dpal.trainer.recipes import batch_needs
from dpal.views import (
    _A,
    _BG,
    _PASTE,
    _V0,
    background_index,
    normalize,
    random_local,
    to_normalized,
    to_unit,
    view_rng,
)


class Clock:
    """Accumulates seconds per named operation."""

    def __init__(self) -> None:
        self.s: dict[str, float] = defaultdict(float)

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.process_time()
        out = fn()
        self.s[name] += time.process_time() - t0
        return out


def timed_aug(
    clock: Clock, prefix: str, image: Image.Image, aug: np.ndarray, size: tuple[int, int]
) -> Image.Image:
    """`views.apply_aug`, one clock entry per PIL operation."""
    top, left, h, w = (int(v) for v in aug[0:4])
    out = clock(
        f"{prefix} resize",
        lambda: image.resize(
            (size[1], size[0]), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
        ),
    )
    if aug[4]:
        out = clock(f"{prefix} flip", lambda: out.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    if aug[5]:
        b, c, s, hue = (float(v) for v in aug[6:10])
        ops = (
            ("brightness", lambda im: TF.adjust_brightness(im, b)),
            ("contrast", lambda im: TF.adjust_contrast(im, c)),
            ("saturation", lambda im: TF.adjust_saturation(im, s)),
            ("hue", lambda im: TF.adjust_hue(im, hue)),
        )
        for o in aug[10:14]:
            name, op = ops[int(o)]
            out = clock(f"{prefix} {name}", lambda op=op, out=out: op(out))
    if aug[14]:
        out = clock(f"{prefix} gray", lambda: out.convert("L").convert("RGB"))
    if aug[15] > 0:
        out = clock(f"{prefix} blur", lambda: out.filter(ImageFilter.GaussianBlur(radius=float(aug[15]))))
    if aug[16]:
        out = clock(f"{prefix} solarize", lambda: ImageOps.solarize(out, threshold=128))
    return out


def share(batch: dict[str, torch.Tensor]) -> None:
    """What the DataLoader's queue does with a worker's batch: each tensor into shared memory."""
    for v in batch.values():
        v.clone().share_memory_()


def legacy_batch(clock: Clock, ds: BatchDataset, req: BatchRequest) -> None:
    """The worker's batch before issue 9, op by op (float32 targets, all views as float32)."""
    reader, recipe = ds.reader, ds.recipe
    idx = ds.indices(req)
    t = clock("read targets (float32)", lambda: reader.read_targets(idx, req.epoch % reader.layout.num_views))
    images = {}
    for i in sorted(set(idx.tolist()) | {background_index(p) for p in t.params}):
        images[i] = clock("decode", lambda i=i: decode_image(reader.image_bytes(i)))
    lh, lw = recipe.local_size
    v0s, ics, v1s, v2s = [], [], [], []
    for i, index in enumerate(idx.tolist()):
        p = t.params[i]
        img, bg_img = images[index], images[background_index(p)]
        v0 = timed_aug(clock, "v0", img, p[_V0], recipe.global_size)
        pa = timed_aug(clock, "A", img, p[_A], recipe.local_size)
        pb = clock("B nearest", lambda v0=v0: v0.resize((lw, lh), Image.Resampling.NEAREST))
        bg = timed_aug(clock, "bg", bg_img, p[_BG], recipe.crowd_size)

        def compose(v0=v0, pa=pa, pb=pb, bg=bg, p=p) -> None:
            crowd = to_unit(bg)
            alpha = np.float32(recipe.person_alpha)
            a_row, a_col, b_row, b_col = (int(v) for v in p[_PASTE])
            for person, r, c in ((pa, a_row, a_col), (pb, b_row, b_col)):
                box = crowd[:, r : r + lh, c : c + lw]
                crowd[:, r : r + lh, c : c + lw] = alpha * to_unit(person) + (np.float32(1.0) - alpha) * box
            v0s.append(to_normalized(v0))
            ics.append(normalize(crowd))

        clock("compose + normalise", compose)
        rng = view_rng(ds.seed, str(index), req.epoch, stream="local")
        v1s.append(clock("local crops (PIL)", lambda rng=rng, img=img: random_local(recipe, rng, img)))
        v2s.append(clock("local crops (PIL)", lambda rng=rng, img=img: random_local(recipe, rng, img)))
    batch = clock(
        "collate",
        lambda: {
            "v0": torch.stack(v0s),
            "v1": torch.stack(v1s),
            "v2": torch.stack(v2s),
            "ic": torch.stack(ics),
            "g_t": t.global_,
            "local_t": t.local,
            "rel_t": t.relation,
        },
    )
    clock("shared memory", lambda: share(batch))


def worker_batch(clock: Clock, ds: BatchDataset, req: BatchRequest) -> dict[str, torch.Tensor]:
    """Today's `BatchDataset.__getitem__`, with its parts on `clock`."""
    batch = ds.build(req, clock.s)
    clock("shared memory", lambda: share(batch))
    return batch


def per_image(clock: Clock, images: int) -> dict[str, float]:
    return {k: 1000 * v / images for k, v in sorted(clock.s.items(), key=lambda kv: -kv[1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, type=Path)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--recipe",
        default="dpal",
        choices=("dpal", "proteus", "feature-kd"),
        help="build the batches this recipe's run reads",
    )
    ap.add_argument("--skip", default="", help="comma list of sections to skip: legacy,worker,device")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(1)
    reader = StoreReader(args.store)
    recipe = reader.store_meta.recipe
    sampler = EpochSampler(valid_rows(reader), args.batch_size, 1, 0, 0)
    needs = batch_needs(DistillConfig(store=str(args.store), out="unused", recipe=args.recipe))
    ds = BatchDataset(args.store, sampler, recipe, 0, needs=needs)
    reqs = [
        BatchRequest(1 + i // sampler.steps_per_epoch, i % sampler.steps_per_epoch, 0)
        for i in range(args.reps)
    ]
    n = args.batch_size * args.reps
    ds[BatchRequest(0, 0, 0)]  # open the arrays, warm the caches
    result: dict[str, Any] = {
        "store": str(args.store),
        "batch_size": args.batch_size,
        "reps": args.reps,
        "dtype": reader.dtype,
        "recipe": args.recipe,
    }
    for name, fn in (("legacy", legacy_batch), ("worker", worker_batch)):
        if name in skip:
            continue
        clock = Clock()
        for req in reqs:
            fn(clock, ds, req)
        ms = per_image(clock, n)
        result[name] = {"ms_per_image": ms, "total_ms_per_image": sum(ms.values())}
        print(f"{name}: {sum(ms.values()):.2f} ms/image", flush=True)
        for k, v in ms.items():
            print(f"  {k:28s} {v:7.3f}", flush=True)
    secs = []
    for req in reqs:
        t0 = time.process_time()
        ds[req]
        secs.append(time.process_time() - t0)
    rate = args.batch_size / statistics.median(secs)  # per CPU second of one thread
    result["images_per_s_per_worker"] = rate
    print(
        f"worker __getitem__: {rate:.1f} images/s per worker (median of {args.reps} batches of "
        f"{args.batch_size})",
        flush=True,
    )
    if "device" not in skip:
        device = torch.device(args.device)
        batches = [ds[req] for req in reqs]
        ds.model_inputs(batches[0], device)
        secs = []
        clock = time.perf_counter if device.type == "cuda" else time.process_time
        for b in batches:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = clock()
            ds.model_inputs(b, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            secs.append(clock() - t0)
        ms = 1000 * statistics.median(secs)
        result["device"] = {
            "device": str(device),
            "ms_per_batch": ms,
            "ms_per_image": ms / args.batch_size,
            "threads": torch.get_num_threads(),
        }
        print(
            f"device side ({device}, {torch.get_num_threads()} thread): {ms:.1f} ms per batch of "
            f"{args.batch_size} ({ms / args.batch_size:.2f} ms/image)",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
