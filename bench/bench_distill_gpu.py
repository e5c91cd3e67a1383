"""Stage two on a GPU: training steps/s from the cache against steps/s with the teacher in the loop.

The GPU rows of docs/benchmarks.md. One process, one GPU, bf16 autocast as `dpal distill` uses on
CUDA. For each batch size it builds a `Trainer` (the student + D-PaDe and its fused AdamW as `train`
builds them) and times single `Trainer.train_step` calls of two variants alternately (A B, B A,
...), after warm-up steps:

- offline: the loader's batch (uint8 views, local-crop parameters, stored targets; already on the
  GPU) -> `trainer.augment.model_inputs` (v0 and Ic composed, v1 and v2 drawn, targets decoded, on
  the GPU, as `train` does) -> Distiller forward, backward, AdamW step;
- online: the same device-side batch work, the teacher's forward on v0 and Ic under inference mode
  (as `--online-teacher` runs it), then the same step.

Each step ends with `torch.cuda.synchronize()`. The ratio of the medians is the speedup; the FLOP
bound is (step + teacher) / step FLOPs, counted by torch's FlopCounterMode. Also: peak GPU memory
per image of the offline step, and how many images/s one loader process builds (store read,
decode, the PIL part of the v0/Ic replay, the local crops' parameters) on this machine's CPU, which
says how many DataLoader workers keep the GPU fed, with the device-side batch work per image.

The batch is real (a store's first batch of 8: replayed views, cached targets), repeated to the
batch size; repetition changes no FLOP and no kernel. Run from the repository root, with a store
made by bench_distill.py on any machine (ViT-B/16 random-init teacher, paper view sizes):

    python bench/bench_distill_gpu.py --store /tmp/dpal_bench/store-vitb-n32-k2-f16-8f7c000e \\
        --batch-sizes 64,128,256 --profile --json /tmp/dpal_bench/gpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from timing import alternate, medians
from torch.utils.flop_counter import FlopCounterMode

from dpal.config import DistillConfig
from dpal.store import StoreMeta, StoreReader
from dpal.teachers import autocast_context, load_teacher
from dpal.trainer.augment import model_inputs
from dpal.trainer.data import BatchDataset, BatchRequest, EpochSampler, valid_rows
from dpal.trainer.distiller import Schedule
from dpal.trainer.train import Trainer

STUDENT = "dpal_vit_tiny"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def base_batch(store: Path, n: int, read_targets: bool = True) -> dict[str, torch.Tensor]:
    """The store's first batch as a DataLoader worker ships it (uint8 views, parameters, raw targets)."""
    reader = StoreReader(store)
    recipe = reader.store_meta.recipe
    sampler = EpochSampler(valid_rows(reader), n, 1, 0, 0)
    return BatchDataset(store, sampler, recipe, 0, read_targets=read_targets)[BatchRequest(0, 0, 0)]


def tile(batch: dict[str, torch.Tensor], size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """`batch` repeated to `size` images, on `device` (the local crops' parameters stay on the CPU,
    where `model_inputs` reads them)."""
    out = {}
    for k, v in batch.items():
        reps = -(-size // v.shape[0])
        out[k] = (
            v.repeat(reps, *([1] * (v.dim() - 1)))[:size]
            .to("cpu" if k == "local_aug" else device)
            .contiguous()
        )
    return out


class Runner:
    """One variant: its own `Trainer` (student + D-PaDe + optimizer, as `train` builds them, lr 1e-4),
    whose steps finish loader batches on the device (`model_inputs`) and, given a teacher, compute
    the targets with it."""

    def __init__(self, meta: StoreMeta, device: torch.device, teacher: Any = None) -> None:
        self.device = device
        self.recipe = meta.recipe
        self.layout = meta.layout  # its codecs decode the targets
        self.trainer = Trainer(
            DistillConfig(student=STUDENT),
            meta,
            self.recipe,
            device,
            schedule=Schedule.constant(1e-4),
            finish=lambda loaded: model_inputs(loaded, self.recipe, device, self.layout),
        )
        self.trainer.teacher = teacher

    def step(self, loaded: dict[str, torch.Tensor]) -> float:
        """One `Trainer.train_step` from a loader batch (`tile`d, on the device), timed with its
        device-side work."""
        sync(self.device)
        t0 = time.perf_counter()
        self.trainer.train_step(iter([loaded]))
        sync(self.device)
        return time.perf_counter() - t0


def flops(runner: Runner, teacher: Any, loaded: dict[str, torch.Tensor]) -> dict[str, float]:
    batch = model_inputs(loaded, runner.recipe, runner.device, runner.layout)
    with FlopCounterMode(display=False) as fc:
        runner.trainer.forward_backward_step(batch)  # the student's forward and backward, under its autocast
    step = fc.get_total_flops()
    runner.trainer.optimizer.zero_grad(set_to_none=True)
    with torch.inference_mode(), autocast_context(runner.device), FlopCounterMode(display=False) as fc:
        teacher.encode_global(batch["v0"])
        teacher.relation_logits(batch["ic"])
    t = fc.get_total_flops()
    return {"offline_step": step, "teacher_forward": t, "bound": (step + t) / step}


def profile_step(runner: Runner, batch: dict[str, torch.Tensor]) -> None:
    """Print where one offline step's time goes, by operator (self time, device first)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        runner.step(batch)
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60), flush=True)


def loader_rate(store: Path, batch_size: int, reps: int, device: torch.device) -> dict[str, float]:
    """Images/s one process builds, single-threaded like a DataLoader worker, and the milliseconds
    per image of the batch's device-side work (`model_inputs`) on `device`."""
    reader = StoreReader(store)
    recipe = reader.store_meta.recipe
    sampler = EpochSampler(valid_rows(reader), batch_size, 1, 0, 0)
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, read_targets in (("offline", True), ("online", False)):
            ds = BatchDataset(store, sampler, recipe, 0, read_targets=read_targets)
            ds[BatchRequest(0, 0, 0)]
            secs = []
            for i in range(reps):
                t0 = time.perf_counter()
                ds[BatchRequest(1 + i // sampler.steps_per_epoch, i % sampler.steps_per_epoch, 0)]
                secs.append(time.perf_counter() - t0)
            out[f"{name}_images_per_s_per_worker"] = batch_size / statistics.median(secs)
    finally:
        torch.set_num_threads(threads)
    loaded = tile(ds[BatchRequest(0, 0, 0)], batch_size, device)
    model_inputs(loaded, recipe, device, ds.reader.layout)
    secs = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        model_inputs(loaded, recipe, device, ds.reader.layout)
        sync(device)
        secs.append(time.perf_counter() - t0)
    out["device_side_ms_per_image"] = 1000 * statistics.median(secs) / batch_size
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--batch-sizes", default="64,128,256")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant, interleaved")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile one offline step at the largest batch (torch.profiler, top kernels)",
    )
    ap.add_argument(
        "--device", default="cuda", help="cuda; cpu only to try the script (bench_distill.py measures CPUs)"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: no CUDA device; this benchmark is for GPUs (bench_distill.py is the CPU one)"
        )
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    store = Path(args.store)
    meta = StoreReader(store).store_meta
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "student": STUDENT,
        "teacher": meta.teacher.name,
        "rows": [],
    }
    print(f"{result['device']}, torch {torch.__version__}; store {store}", flush=True)
    teacher = load_teacher(meta.teacher_spec(), device=device)
    small, small_online = base_batch(store, 8), base_batch(store, 8, read_targets=False)
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        batch, batch_online = tile(small, bs, device), tile(small_online, bs, device)
        off, on = Runner(meta, device), Runner(meta, device, teacher)
        fl = flops(off, teacher, batch)
        contenders = {"offline": (off, batch), "online": (on, batch_online)}
        times = alternate(
            {k: (lambda r=r, b=b: r.step(b)) for k, (r, b) in contenders.items()}, args.steps, args.warmup
        )
        del contenders
        med = medians(times)
        del on
        peak = 0
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            off.step(batch)
            peak = torch.cuda.max_memory_allocated() - base
        row = {
            "batch_size": bs,
            "offline_steps_per_s": 1 / med["offline"],
            "online_steps_per_s": 1 / med["online"],
            "speedup": med["online"] / med["offline"],
            "offline_images_per_s": bs / med["offline"],
            "flops": fl,
            "offline_step_peak_bytes_per_image": peak / bs,
            "seconds": times,
        }
        result["rows"].append(row)
        print(
            f"batch {bs}: offline {row['offline_steps_per_s']:.2f} steps/s ({row['offline_images_per_s']:.0f} "
            f"images/s), online {row['online_steps_per_s']:.2f} steps/s, speedup {row['speedup']:.2f}x "
            f"(FLOP bound {fl['bound']:.2f}x; step {fl['offline_step'] / 1e12:.2f} TFLOP, teacher "
            f"{fl['teacher_forward'] / 1e12:.2f} TFLOP); offline step peak {peak / bs / 2**20:.1f} MiB per image",
            flush=True,
        )
        if args.profile and bs == max(int(b) for b in args.batch_sizes.split(",")):
            profile_step(off, batch)
        del off, batch
        if cuda:
            torch.cuda.empty_cache()
    lr = loader_rate(store, 32, 4, device)
    result["loader"] = lr
    print("loader, one process (1 thread): " + ", ".join(f"{k} {v:.1f}" for k, v in lr.items()), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
