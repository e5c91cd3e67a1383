"""Stage-two benchmark: speedup of the cached teacher, loader overhead, and memory per image.

Timings measure the real training step: `Variant.step` builds a `BatchDataset` item as a CPU run
builds it (`finish_on_cpu`: targets, decode, replay, fresh local crops, the float composition) and
hands it to `Trainer.train_step`, the step `dpal distill` takes (the teacher under inference mode
when online; `Distiller` forward, backward, AdamW step). Two variants, each with its own model and optimizer,
take single steps alternately (A B, B A, ...) in one process, so that load from other jobs hits
both alike; the figure is the median over adjacent pairs of the step-time ratio. As a check, whole
`train` runs (metrics.jsonl, `log_every=1`, first step dropped) are alternated too.

1. Speedup: steps/s from the store over steps/s with `online_teacher=True` (the teacher runs in
   the loop on the same replayed views). Target >= 3.5. Beside it, the FLOP bound
   (offline step + teacher forward) / offline step, counted with `FlopCounterMode` on one step
   (student and D-PaDe forward and backward) and one teacher forward on v0 and Ic.
2. Loader overhead: steps/s reading targets from the store over steps/s with the same targets held
   in memory (a `BatchDataset` whose reader serves preloaded, decoded tensors); same images and
   replay. Target >= 0.9.
3. Parts: median seconds per batch of each piece of a step (data, target read, forward of the
   student, of D-PaDe and of the rest, backward, optimizer, shape mask, teacher), to see where the
   time goes.
4. Ceiling: one offline step under the torch profiler, split into matrix products (mm, addmm, bmm,
   with their FLOPs), the attention kernels and everything else, beside this machine's float32
   GEMM peak (a 2048^3 product). If every matrix product ran at that peak, the step would lose
   their excess time; the speedup that step would give against the measured teacher forward is
   the most that faster matrix products alone can buy.
5. Memory: peak memory of one student + D-PaDe training step (D = 768) at several batch sizes,
   each in a fresh process; per image = the slope of a least-squares line. Two measures: the
   peak of live tensor bytes seen by the torch profiler, and the peak resident set size (VmHWM,
   reset before the step).

The store (ViT-B/16 random-init teacher, K = 2, float16) is created once with `run_cache` and
reused. Run from the repository root (2 CPU cores, about ten minutes on an idle machine):

    .venv/bin/python bench/bench_distill.py --json /tmp/dpal_bench/distill.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dpal.config import CacheConfig, DistillConfig
from dpal.pipeline.engine import run_cache
from dpal.store import StoreError, StoreMeta, StoreReader, Targets
from dpal.teachers import load_teacher
from dpal.trainer.data import BatchDataset, BatchRequest, EpochSampler, valid_rows
from dpal.trainer.distiller import Schedule
from dpal.trainer.losses import shape_mask
from dpal.trainer.runtime import default_num_workers, keep_freed_memory
from dpal.trainer.train import Trainer, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache import TEACHER, make_corpus  # noqa: E402
from timing import alternate, medians, pair_ratios  # noqa: E402

# B batch, K views, P patches of v0, T crowd tokens, D teacher width

STUDENT = "dpal_vit_tiny"
CPU = torch.device("cpu")
MEMORY_BATCHES = (2, 4, 8, 16)


# ---------------------------------------------------------------- store


def ensure_store(work: Path, num_images: int, views: int, batch_size: int) -> tuple[Path, str]:
    """The benchmark store: reused when it exists and is complete, else built with run_cache."""
    corpus, desc = make_corpus(work / f"corpus-{num_images}", num_images)
    tag = hashlib.sha256(desc.encode()).hexdigest()[:8]  # a new corpus selection gets a new store
    store = work / f"store-vitb-n{num_images}-k{views}-f16-{tag}"
    try:
        StoreReader(store)
        return store, desc
    except StoreError:
        pass
    cfg = CacheConfig(
        corpus=str(corpus),
        out=str(store),
        teacher=TEACHER,
        random_init=True,
        num_views=views,
        dtype="float16",
        shard_size=max(1, num_images // 2),
        batch_size=batch_size,
        shards="0:",
        device="cpu",
    )
    t0 = time.perf_counter()
    summary = run_cache(cfg, show_progress=False)
    print(f"built {store}: {summary.line()} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return store, desc


# ---------------------------------------------------------------- training runs


class MemoryTargetsReader(StoreReader):
    """A StoreReader whose targets come from decoded tensors preloaded in memory."""

    preloaded: dict[str, Any] = {}

    def read_targets(
        self, indices: np.ndarray, view: int, raw: bool = False, targets: object = None
    ) -> Targets:
        # `targets` is ignored: the benchmarks' runs read every target (BatchDataset's default needs)
        p = self.preloaded  # decoded float32 also when asked raw: decoding float32 is the identity
        idx = torch.as_tensor(np.asarray(indices))
        return Targets(
            p["global"][idx, view],
            p["local"][idx, view],
            p["relation"][idx, view],
            p["params"][np.asarray(indices), view],
        )


class MemoryBatchDataset(BatchDataset):
    """`BatchDataset` with in-memory targets; images, replay and local crops are unchanged."""

    @property
    def reader(self) -> StoreReader:
        if self._reader is None:
            self._reader = MemoryTargetsReader(self.store_path, allow_incomplete=self.allow_incomplete)
        return self._reader


def preload_targets(store: Path) -> dict[str, Any]:
    """Every target of the store, decoded to float32 once: (N, K, ...) tensors and params."""
    reader = StoreReader(store)
    n, k = reader.layout.num_images, reader.layout.num_views
    rows = np.arange(n)
    per_view = [reader.read_targets(rows, v) for v in range(k)]
    return {
        "global": torch.stack([t.global_ for t in per_view], 1),
        "local": torch.stack([t.local for t in per_view], 1),
        "relation": torch.stack([t.relation for t in per_view], 1),
        "params": np.stack([t.params for t in per_view], 1),
    }


def train_steps(
    store: Path,
    work: Path,
    batch_size: int,
    steps: int,
    online: bool = False,
    memory_targets: dict[str, Any] | None = None,
    num_workers: int = 0,
) -> list[float]:
    """Run `train` for `steps` steps; returns each step's seconds (load + step), from metrics.jsonl.

    With `num_workers` > 0 the DataLoader's workers build the batches while the main process
    trains, as `dpal distill` does by default (2 workers); with 0 the main process builds them.
    """
    run = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
    cfg = DistillConfig(
        store=str(store),
        out=str(run),
        student=STUDENT,
        max_steps=steps,
        batch_size=batch_size,
        num_workers=num_workers,
        resume="none",
        log_every=1,
        checkpoint_every=10**6,
        keep_last=1,
        online_teacher=online,
        device="cpu",
    )
    try:
        if memory_targets is not None:
            MemoryTargetsReader.preloaded = memory_targets
        train(
            cfg,
            show_progress=False,
            dataset_class=BatchDataset if memory_targets is None else MemoryBatchDataset,
        )
        lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]
    finally:
        MemoryTargetsReader.preloaded = {}
        shutil.rmtree(run, ignore_errors=True)
    assert [ln["step"] for ln in lines] == list(range(1, steps + 1)), lines
    return [batch_size / ln["images_per_s"] for ln in lines]


def compare(runs: dict[str, Callable[[], list[float]]], reps: int, warmup: int) -> dict[str, Any]:
    """Alternate two training variants (each a call returning its steps' seconds); per pair, the
    median step time of each (warmup steps dropped) and `ratio` = steps/s of the first over steps/s
    of the second."""
    name_a, name_b = runs
    pairs = []

    def record(rep: int, med: dict[str, float]) -> None:
        pair = {
            f"{name_a}_steps_per_s": 1 / med[name_a],
            f"{name_b}_steps_per_s": 1 / med[name_b],
            "ratio": med[name_b] / med[name_a],
            "loadavg_1min": os.getloadavg()[0],
        }
        pairs.append(pair)
        print(
            f"  pair {rep + 1}: {name_a} {pair[f'{name_a}_steps_per_s']:.4f} steps/s, {name_b} "
            f"{pair[f'{name_b}_steps_per_s']:.4f} steps/s, steps/s ratio {name_a}/{name_b} {pair['ratio']:.3f} "
            f"(load {pair['loadavg_1min']:.2f})",
            flush=True,
        )

    alternate(
        {n: (lambda fn=fn: statistics.median(fn()[warmup:])) for n, fn in runs.items()}, reps, 0, record
    )
    return {
        "pairs": pairs,
        "median_ratio": statistics.median(p["ratio"] for p in pairs),
        f"median_{name_a}_steps_per_s": statistics.median(p[f"{name_a}_steps_per_s"] for p in pairs),
        f"median_{name_b}_steps_per_s": statistics.median(p[f"{name_b}_steps_per_s"] for p in pairs),
    }


class Variant:
    """One way of running `train`'s step (num_workers 0, one micro-batch per step): its own `Trainer`
    (model and optimizer built as `train` builds them).

    `step()` takes the next batch request, builds the batch (`BatchDataset.__getitem__`: targets,
    decode, replay, local crops) and runs `Trainer.train_step` on it (the teacher under inference
    mode when online, then `Distiller` forward, backward, AdamW step and zero_grad). Returns the
    step's seconds.
    """

    def __init__(
        self,
        store: Path,
        batch_size: int,
        online: bool = False,
        memory_targets: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        reader = StoreReader(store)
        recipe = reader.store_meta.recipe
        sampler = EpochSampler(valid_rows(reader), batch_size, 1, 0, seed)
        self.sampler = sampler
        self.trainer = build_trainer(reader.store_meta)
        self.trainer.steps_per_epoch = sampler.steps_per_epoch
        self.trainer.finish = lambda loaded: self.dataset.model_inputs(loaded, CPU)
        if online:
            self.trainer.load_teacher()
        if memory_targets is not None:
            MemoryTargetsReader.preloaded = memory_targets
            self.dataset: BatchDataset = MemoryBatchDataset(store, sampler, recipe, seed, finish_on_cpu=True)
        else:
            self.dataset = BatchDataset(
                store, sampler, recipe, seed, read_targets=not online, finish_on_cpu=True
            )
        self.position = 0

    def step(self) -> float:
        epoch, s = divmod(self.position, self.sampler.steps_per_epoch)
        self.position += 1
        t0 = time.perf_counter()
        self.trainer.train_step(iter([self.dataset[BatchRequest(epoch, s, 0)]]))
        return time.perf_counter() - t0


def interleaved(
    store: Path,
    batch_size: int,
    variants: dict[str, dict[str, Any]],
    steps: int,
    slow: str,
    fast: str,
    warmup: int,
) -> dict[str, Any]:
    """Alternate single steps of the variants (A B, B A, ...), each a `Variant(store, batch_size,
    **options)`: median seconds per step and steps/s of each (printed), and the ratio seconds[slow]
    / seconds[fast] (= steps/s fast / steps/s slow) per adjacent pair of steps and of the medians."""
    runs = {name: Variant(store, batch_size, **options) for name, options in variants.items()}
    t = alternate({n: v.step for n, v in runs.items()}, steps, warmup)
    res: dict[str, Any] = {
        "seconds_per_step": t,
        "median_seconds": medians(t),
        "loadavg_1min": os.getloadavg()[0],
    }
    pairs = pair_ratios(t[slow], t[fast])
    res["steps_per_s"] = {n: 1 / v for n, v in res["median_seconds"].items()}
    res["pair_ratios"] = pairs
    res["median_pair_ratio"] = statistics.median(pairs)
    res["ratio_of_medians"] = res["median_seconds"][slow] / res["median_seconds"][fast]
    print(
        f"  {fast} {res['steps_per_s'][fast]:.4f} steps/s, {slow} {res['steps_per_s'][slow]:.4f} "
        f"steps/s; per-pair ratios {fmt(pairs)}"
    )
    return res


def fmt(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


# ---------------------------------------------------------------- model, batches, FLOPs, parts


def build_trainer(meta: StoreMeta) -> Trainer:
    """The student + D-PaDe and optimizer exactly as `train` builds them (CPU, float32), lr 1e-4;
    its steps take batches of model inputs (`real_batch`) unless `finish` is set."""
    return Trainer(DistillConfig(student=STUDENT), meta, meta.recipe, CPU, schedule=Schedule.constant(1e-4))


def trainer_and_batch(store: Path, batch_size: int) -> tuple[StoreMeta, Trainer, dict[str, torch.Tensor]]:
    """The store's metadata, `build_trainer`'s trainer, and the store's first real batch."""
    meta = StoreReader(store).store_meta
    return meta, build_trainer(meta), real_batch(store, batch_size)


def real_batch(store: Path, batch_size: int) -> dict[str, torch.Tensor]:
    reader = StoreReader(store)
    recipe = reader.store_meta.recipe
    sampler = EpochSampler(valid_rows(reader), batch_size, 1, 0, 0)
    ds = BatchDataset(store, sampler, recipe, 0, finish_on_cpu=True)
    return ds.model_inputs(ds[BatchRequest(0, 0, 0)], CPU)


def flops(store: Path, batch_size: int) -> dict[str, Any]:
    """Matmul/conv/attention FLOPs of one offline step and of the teacher on v0 + Ic (same batch)."""
    meta, trainer, batch = trainer_and_batch(store, batch_size)
    with FlopCounterMode(display=False) as fc:
        loss, _ = trainer.model(batch, 0)
        fwd = fc.get_total_flops()
        loss.backward()
    step_flops = fc.get_total_flops()
    teacher = load_teacher(meta.teacher_spec(), device="cpu")
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        teacher.encode_global(batch["v0"])
        g_flops = fc.get_total_flops()
        teacher.relation_logits(batch["ic"])
    t_flops = fc.get_total_flops()
    return {
        "batch_size": batch_size,
        "offline_step": step_flops,
        "offline_forward": fwd,
        "teacher_forward": t_flops,
        "teacher_v0": g_flops,
        "teacher_ic": t_flops - g_flops,
        "bound": (step_flops + t_flops) / step_flops,
    }


class ForwardTimer:
    """Adds up the wall time of forward calls of some submodules (forward pre/post hooks), and of
    methods named in `methods` (module, method name), which hooks do not see (`DPaDe.forward_many`)."""

    def __init__(self, groups: dict[str, list[nn.Module]], methods: dict[str, tuple[nn.Module, str]]) -> None:
        self.seconds = dict.fromkeys([*groups, *methods], 0.0)
        self._t0: dict[int, float] = {}
        self._handles = []
        self._wrapped: list[tuple[nn.Module, str]] = []
        for name, modules in groups.items():
            for m in modules:
                self._handles.append(m.register_forward_pre_hook(self._pre))
                self._handles.append(
                    m.register_forward_hook(lambda mod, a, out, _n=name: self._post(mod, _n))
                )
        for name, (mod, attr) in methods.items():
            self._wrap(mod, attr, name)

    def _wrap(self, mod: nn.Module, attr: str, name: str) -> None:
        inner = getattr(mod, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        setattr(mod, attr, timed)  # an instance attribute shadowing the method
        self._wrapped.append((mod, attr))

    def _pre(self, mod: nn.Module, args: Any) -> None:
        self._t0[id(mod)] = time.perf_counter()

    def _post(self, mod: nn.Module, name: str) -> None:
        self.seconds[name] += time.perf_counter() - self._t0.pop(id(mod))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for mod, attr in self._wrapped:
            delattr(mod, attr)


def parts(store: Path, batch_size: int, reps: int) -> dict[str, Any]:
    """Median seconds per batch of the pieces of a step, timed alternately in one process.

    data_store / data_memory: one `BatchDataset` item (decode, replay, local crops, targets) with
    targets from the store / from memory; read_targets: the store read alone; train_step: the real
    `Distiller` forward, backward and AdamW step, split into forward (student: patch embedding,
    blocks and final norm; D-PaDe: its calls; rest: losses, shape mask, concatenations), backward
    and optimizer; shape_mask: the mask alone; teacher_forward: the teacher on v0 and Ic (what
    online mode adds).
    """
    reader = StoreReader(store)
    meta = reader.store_meta
    recipe, grid = meta.recipe, meta.token_grid.global_grid
    trainer = build_trainer(meta)
    model, opt = trainer.model, trainer.optimizer  # the step's pieces, timed one by one
    teacher = load_teacher(meta.teacher_spec(), device="cpu")
    sampler = EpochSampler(valid_rows(reader), batch_size, 1, 0, 0)
    ds_store = BatchDataset(store, sampler, recipe, 0, finish_on_cpu=True)
    MemoryTargetsReader.preloaded = preload_targets(store)
    ds_mem = MemoryBatchDataset(store, sampler, recipe, 0, finish_on_cpu=True)
    req = BatchRequest(0, 0, 0)
    idx = ds_store.indices(req)
    batch = ds_store[req]
    st = model.student
    timer = ForwardTimer(
        {"student": [st.patch_embed, st.blocks, st.norm]}, {"dpade": (model.dpade, "forward_many")}
    )
    split: dict[str, list[float]] = {
        k: []
        for k in ("forward", "forward_student", "forward_dpade", "forward_rest", "backward", "optimizer")
    }

    def train_step() -> None:
        timer.reset()
        model.train()
        t0 = time.perf_counter()
        loss, _ = model(batch, 0)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for k, v in (
            ("forward", t1 - t0),
            ("forward_student", timer.seconds["student"]),
            ("forward_dpade", timer.seconds["dpade"]),
            ("forward_rest", t1 - t0 - timer.seconds["student"] - timer.seconds["dpade"]),
            ("backward", t2 - t1),
            ("optimizer", t3 - t2),
        ):
            split[k].append(v)

    def teacher_fwd() -> None:
        with torch.inference_mode():
            teacher.encode_global(batch["v0"])
            teacher.relation_logits(batch["ic"])

    fns = {
        "data_store": lambda: ds_store[req],
        "data_memory": lambda: ds_mem[req],
        "read_targets": lambda: reader.read_targets(idx, 0),
        "train_step": train_step,
        "shape_mask": lambda: shape_mask(batch["local_t"], grid, True),
        "teacher_forward": teacher_fwd,
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):  # rep 0 is a warmup
        for name in list(fns) if rep % 2 == 0 else list(reversed(fns)):
            t0 = time.perf_counter()
            fns[name]()
            if rep:
                times[name].append(time.perf_counter() - t0)
        if rep == 0:
            split = {k: [] for k in split}
    timer.remove()
    MemoryTargetsReader.preloaded = {}
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"train_step_{k}": statistics.median(v) for k, v in split.items()})
    return out


# ---------------------------------------------------------------- ceiling

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
ATTENTION_PREFIX = "aten::_scaled_dot_product"


def gemm_peak(threads: int, n: int = 2048, reps: int = 3) -> float:
    """FLOP/s of a float32 n x n x n matrix product on this machine (median of `reps`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def ceiling(store: Path, batch_size: int, threads: int, reps: int) -> dict[str, Any]:
    """Where one offline step's time goes by kind of kernel, and what perfect matrix products would buy.

    The step is `train`'s CPU step (the shape mask comes with the batch, as the loader workers
    compute it). Self times come from one profiled step; the step and teacher times are medians of
    `reps` unprofiled runs.
    """
    from torch.profiler import ProfilerActivity, profile

    meta, trainer, batch = trainer_and_batch(store, batch_size)
    batch["mask"] = shape_mask(batch["local_t"], meta.token_grid.global_grid, True)
    teacher = load_teacher(meta.teacher_spec(), device="cpu")

    def teacher_fwd() -> None:
        with torch.inference_mode():
            teacher.encode_global(batch["v0"])
            teacher.relation_logits(batch["ic"])

    trainer.train_step(iter([batch]))  # warmup: AdamW state, allocator
    step_s, teacher_s = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        trainer.train_step(iter([batch]))
        t1 = time.perf_counter()
        teacher_fwd()
        step_s.append(t1 - t0)
        teacher_s.append(time.perf_counter() - t1)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        trainer.train_step(iter([batch]))
    gemm_s = gemm_flops = attention_s = total_s = 0.0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total / 1e6
        total_s += t
        if ev.key in GEMM_OPS:
            gemm_s += t
            gemm_flops += ev.flops or 0
        elif ev.key.startswith(ATTENTION_PREFIX):
            attention_s += t
    peak = gemm_peak(threads)
    step_med, teacher_med = statistics.median(step_s), statistics.median(teacher_s)
    excess = max(gemm_s - gemm_flops / peak, 0.0)
    ideal = step_med - excess
    return {
        "batch_size": batch_size,
        "step_s": step_med,
        "teacher_forward_s": teacher_med,
        "speedup_now": (step_med + teacher_med) / step_med,
        "profiled_total_s": total_s,
        "gemm_s": gemm_s,
        "gemm_flops": gemm_flops,
        "gemm_flops_per_s": gemm_flops / gemm_s,
        "attention_s": attention_s,
        "other_s": total_s - gemm_s - attention_s,
        "machine_gemm_peak_flops_per_s": peak,
        "gemm_excess_s": excess,
        "step_at_gemm_peak_s": ideal,
        "speedup_at_gemm_peak": (ideal + teacher_med) / ideal,
    }


# ---------------------------------------------------------------- memory


def memory_child(store: Path, batch_size: int) -> dict[str, Any]:
    """Peak memory of one training step at `batch_size`, after a warmup step (in this process)."""
    _, trainer, batch = trainer_and_batch(store, batch_size)
    trainer.train_step(iter([batch]))  # allocates the AdamW state
    from torch.profiler import ProfilerActivity, profile

    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.train_step(iter([batch]))
    rss_peak = _status_kib("VmHWM")
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    live = np.cumsum([b for _, b in events]) if events else np.zeros(1)
    return {
        "batch_size": batch_size,
        "tensor_peak_bytes": int(live.max()),
        "rss_before_kib": rss_before,
        "rss_peak_kib": rss_peak,
        "rss_peak_increase_bytes": (rss_peak - rss_before) * 1024,
    }


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory(store: Path, threads: int) -> dict[str, Any]:
    rows = []
    for b in MEMORY_BATCHES:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # large tensors are returned on free
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-child",
                str(b),
                "--store",
                str(store),
                "--threads",
                str(threads),
            ],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"  batch {b}: live tensor peak {row['tensor_peak_bytes'] / 2**20:.0f} MiB, RSS peak increase "
            f"{row['rss_peak_increase_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    x = np.array([r["batch_size"] for r in rows], dtype=np.float64)
    res: dict[str, Any] = {"rows": rows}
    for key in ("tensor_peak_bytes", "rss_peak_increase_bytes"):
        slope, intercept = np.polyfit(x, np.array([r[key] for r in rows], dtype=np.float64), 1)
        res[key] = {"per_image_bytes": float(slope), "intercept_bytes": float(intercept)}
    return res


# ---------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/dpal_bench", help="scratch folder (corpus, store, runs)")
    ap.add_argument("--images", type=int, default=32, help="images in the store")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--steps", type=int, default=8, help="timed steps per variant (after 1 warmup), interleaved"
    )
    ap.add_argument("--train-steps", type=int, default=4, help="steps per whole `train` run (first dropped)")
    ap.add_argument("--train-reps", type=int, default=2, help="alternated pairs of `train` runs (0: skip)")
    ap.add_argument("--reps", type=int, default=3, help="rounds of the parts timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--skip", default="", help="comma list of sections to skip: speedup,loader,parts,ceiling,memory"
    )
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child is not None:  # its own malloc settings, so that freed tensors leave the RSS
        print(json.dumps(memory_child(Path(args.store), args.memory_child)))
        return
    keep_freed_memory()  # as `train` does on CPU

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    store, corpus_desc = ensure_store(work, args.images, args.views, args.batch_size)
    print(
        f"store {store} ({corpus_desc}); teacher {TEACHER} random init; student {STUDENT}; batch "
        f"{args.batch_size}; torch threads {torch.get_num_threads()}"
    )
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "corpus": corpus_desc,
        "store": str(store),
        "teacher": TEACHER,
        "student": STUDENT,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "train_steps": args.train_steps,
        "train_reps": args.train_reps,
        "threads": torch.get_num_threads(),
    }
    warmup = 1

    def whole(**kw: Any) -> Callable[[], list[float]]:
        """A whole `train` run of `--train-steps` steps with `train_steps`'s options `kw`."""
        return lambda: train_steps(store, work, args.batch_size, args.train_steps, **kw)

    if "speedup" not in skip:
        fl = flops(store, args.batch_size)
        result["flops"] = fl
        print(
            f"FLOPs per step of batch {args.batch_size}: offline step {fl['offline_step'] / 1e9:.1f} G "
            f"(forward {fl['offline_forward'] / 1e9:.1f} G), teacher forward {fl['teacher_forward'] / 1e9:.1f} G "
            f"(v0 {fl['teacher_v0'] / 1e9:.1f} G, Ic {fl['teacher_ic'] / 1e9:.1f} G); bound {fl['bound']:.2f}x"
        )
        print("speedup (store vs online teacher), steps interleaved in one process:", flush=True)
        offline_online = {"offline": {}, "online": {"online": True}}
        sp = interleaved(store, args.batch_size, offline_online, args.steps, "online", "offline", warmup)
        result["speedup"] = sp
        if args.train_reps:
            print(
                "  check with whole `train` runs (offline, online alternated), loader in the main process:",
                flush=True,
            )
            sp["train_runs"] = compare(
                {"offline": whole(), "online": whole(online=True)}, args.train_reps, warmup
            )
            nw = default_num_workers(torch.device("cpu"), 1)
            print(
                f"  whole `train` runs with dpal distill's default loader ({nw} worker processes):",
                flush=True,
            )
            sp["train_runs_workers"] = compare(
                {"offline": whole(num_workers=nw), "online": whole(online=True, num_workers=nw)},
                args.train_reps,
                warmup,
            )
            sp["train_runs_workers"]["num_workers"] = nw
        r = sp["median_pair_ratio"]
        print(
            f"speedup, loader in the main process: median {r:.2f}x ({'meets' if r >= 3.5 else 'MISSES'} "
            f"target >= 3.5x; FLOP bound {fl['bound']:.2f}x)",
            flush=True,
        )
        if "train_runs_workers" in sp:
            r = sp["train_runs_workers"]["median_ratio"]
            print(
                f"speedup, whole `train` runs with the default loader: median {r:.2f}x "
                f"({'meets' if r >= 3.5 else 'MISSES'} target >= 3.5x)",
                flush=True,
            )
    if "loader" not in skip:
        pre = preload_targets(store)
        print("loader overhead (store vs in-memory targets), steps interleaved in one process:", flush=True)
        store_memory = {"store": {}, "memory": {"memory_targets": pre}}
        lo = interleaved(store, args.batch_size, store_memory, args.steps, "memory", "store", warmup)
        result["loader"] = lo
        if args.train_reps:
            print("  check with whole `train` runs (store, memory alternated):", flush=True)
            lo["train_runs"] = compare(
                {"store": whole(), "memory": whole(memory_targets=pre)}, args.train_reps, warmup
            )
        MemoryTargetsReader.preloaded = {}
        r = lo["median_pair_ratio"]
        print(
            f"loader: store / memory steps/s median {r:.3f} ({'meets' if r >= 0.9 else 'MISSES'} target >= 0.9)",
            flush=True,
        )
    if "parts" not in skip:
        pt = parts(store, args.batch_size, args.reps)
        result["parts_seconds_per_batch"] = pt
        print(
            "parts, median seconds per batch: " + ", ".join(f"{k} {v:.3f}" for k, v in pt.items()), flush=True
        )
    if "ceiling" not in skip:
        ce = ceiling(store, args.batch_size, args.threads, args.reps)
        result["ceiling"] = ce
        print(
            f"ceiling: offline step {ce['step_s']:.3f} s, teacher forward {ce['teacher_forward_s']:.3f} s "
            f"(step speedup {ce['speedup_now']:.2f}x); profiled step {ce['profiled_total_s']:.3f} s = matrix "
            f"products {ce['gemm_s']:.3f} s ({ce['gemm_flops'] / 1e9:.1f} GFLOP at "
            f"{ce['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s) + attention {ce['attention_s']:.3f} s + other "
            f"{ce['other_s']:.3f} s; GEMM peak {ce['machine_gemm_peak_flops_per_s'] / 1e9:.0f} GFLOP/s; with "
            f"every product at peak the step takes {ce['step_at_gemm_peak_s']:.3f} s and the speedup is "
            f"{ce['speedup_at_gemm_peak']:.2f}x",
            flush=True,
        )
    if "memory" not in skip:
        print("memory of one student + D-PaDe training step (D = 768):", flush=True)
        mem = memory(store, args.threads)
        result["memory"] = mem
        for key in ("tensor_peak_bytes", "rss_peak_increase_bytes"):
            print(
                f"  {key}: {mem[key]['per_image_bytes'] / 2**20:.1f} MiB per image "
                f"(+ {mem[key]['intercept_bytes'] / 2**20:.0f} MiB fixed)"
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
