"""Stage two's loop: student + D-PaDe against the store's targets, with exact resume and DDP.

One optimizer step per rank: `grad_accum` micro-batches, each with the five D-PaDe calls of
method.md (CLS of v0, v1, v2 -> pattern 0; patches of v0 -> 1; all tokens of Ic -> 2), the
three alignment losses, the router CE and the expert regulariser. The learning rate is a pure
function of the step (linear warmup per step, then half-cycle cosine). Checkpoints are plain dicts
that load with `torch.load(weights_only=True)`, written atomically, and hold everything needed to
continue bit for bit: model, D-PaDe, optimizer, schedule, scaler, sampler position, RNG states,
config and the store fingerprint. SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) make every rank stop at the
same step boundary and checkpoint; a second Ctrl-C aborts at once. The run directory's ownership,
its leftovers and a full disk are rundir.py's.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import math
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpal import __version__
from dpal.config import DistillConfig, dump_yaml, to_dict
from dpal.progress import Progress
from dpal.store import StoreError, StoreReader, atomic_write_bytes
from dpal.teachers import EFFICIENTNET_LITE2, PRESETS, TeacherSpec, autocast_context, load_teacher
from dpal.trainer.data import (
    BatchDataset,
    EpochSampler,
    LoaderError,
    collate_requests,
    ignore_stop_signals,
    valid_rows,
)
from dpal.trainer.dpade import PATTERN_GLOBAL, PATTERN_LOCAL, PATTERN_RELATION, DPaDe
from dpal.trainer.losses import global_mse, local_masked_mse, relation_kl, shape_mask, total_loss
from dpal.trainer.rundir import (
    CHECKPOINT_DIR,
    RunDirError,
    RunLock,
    clean_temporary_files,
    disk_full_error,
    existing_run,
    move_aside,
    refuse_mixing,
)
from dpal.trainer.student import create_student, recompute_mlp_activations, student_tokens
from dpal.views import ViewRecipe

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r"step-(\d+)\.pt$")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# config keys a resume must keep: they fix the model's shapes and the data stream
RESUME_KEYS = ("student", "student_kwargs", "batch_size", "seed")
# config keys that say how to run, not what is trained: a resume may change them without a word
RUNTIME_KEYS = ("store", "out", "resume", "fresh", "max_steps", "num_workers", "device", "log_every",
                "checkpoint_every", "keep_last", "keep_weights_only_older", "progress_seconds", "allow_incomplete")
WEIGHTS_ONLY_SUFFIX = ".student.pt"


# ---------------------------------------------------------------- schedule


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then half-cycle cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / decay, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def param_groups(modules: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only, none on 1-D parameters and biases."""
    decay, no_decay = [], []
    for name, p in modules.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, with the fused kernel (one pass per parameter group instead of
    a dozen element-wise ops per tensor: 0.15 -> 0.01 s of a CPU step). Learning rate 0 until the
    schedule sets it."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=0.0, betas=cfg.betas, fused=True)


def keep_freed_memory() -> bool:
    """Make glibc keep large freed blocks for reuse instead of returning them to the kernel.

    A CPU step allocates and frees the same few large tensors every time (the expert generator's
    28M-float weight gradient, 113 MB, among them). glibc serves blocks above 32 MB with fresh
    mmaps, and every fresh page costs a page fault: about 30 ms per such tensor, 13% of a CPU step
    (docs/benchmarks.md). With mmap disabled for the heap and trimming raised, those blocks come
    back from the heap. Peak memory is unchanged; freed memory stays with the process. Returns
    False where the C library has no `mallopt` (not glibc), which changes nothing else.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------- data loading

CPU_NUM_WORKERS = 2
MAX_GPU_NUM_WORKERS = 16


def default_num_workers(device: torch.device, local_world_size: int) -> int:
    """DataLoader workers when the config leaves them unset.

    On CPU, 2: a worker builds a batch in a tenth of a step, and more workers only compete with the
    training threads (1 and 2 workers measured the same). On a GPU the loader bounds training (one
    worker decodes and replays 80-95 images/s on the development CPU; an H200 trains about 1800 images/s), so every
    CPU this rank may use but one (which drives the GPU) decodes, at most 16.
    """
    if device.type != "cuda":
        return CPU_NUM_WORKERS
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(CPU_NUM_WORKERS, min(MAX_GPU_NUM_WORKERS, cpus // max(local_world_size, 1) - 1))


# ---------------------------------------------------------------- distributed and signals


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_pref == "auto":
        use_cuda = torch.cuda.is_available()
    else:
        use_cuda = device_pref.startswith("cuda")
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info, device


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT; ranks agree on it at each step boundary. A second SIGINT
    raises KeyboardInterrupt at once (the user asked twice), without a checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.signum = 0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.requested and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            # os.write: a handler may run while the main thread is inside a write to sys.stderr
            os.write(2, b"\nCtrl-C: stopping at the end of this step to checkpoint (Ctrl-C again aborts without)\n")

    def agreed(self, info: DistInfo, device: torch.device) -> bool:
        if info.world_size == 1:
            return self.requested
        # the largest signal number any rank got, so that rank 0 can say which stopped the run
        flag = torch.tensor([float(self.signum)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        got = int(flag.item())
        if got and not self.requested:
            self.signal_name = signal.Signals(got).name
        return got > 0


# ---------------------------------------------------------------- checkpoints


def checkpoint_paths(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.exists():
        return []
    found = [(int(m.group(1)), p) for p in d.glob("step-*.pt") if (m := _CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a dpal checkpoint of format {CHECKPOINT_VERSION}")
    return ckpt


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the newest checkpoint that loads; `none`: start fresh; else a path."""
    if resume == "none":
        return None
    if resume != "auto":
        p = Path(resume)
        if not p.is_file():
            raise ValueError(f"--resume {resume}: no such checkpoint")
        return p
    for p in reversed(checkpoint_paths(run_dir)):
        try:
            load_checkpoint(p)
            return p
        except ValueError:
            logger.warning("skipping unreadable checkpoint %s", p)
    return None


def weights_only_paths(run_dir: Path) -> list[Path]:
    """The reduced older checkpoints (`step-N.student.pt`: student weights only), oldest first."""
    found = [(int(p.name[5:-len(WEIGHTS_ONLY_SUFFIX)]), p)
             for p in (Path(run_dir) / CHECKPOINT_DIR).glob(f"step-*{WEIGHTS_ONLY_SUFFIX}")
             if p.name[5:-len(WEIGHTS_ONLY_SUFFIX)].isdigit()]
    return [p for _, p in sorted(found)]


def weights_only(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint reduced to what export and evaluation need: the student, its build and the config
    (not resumable: no D-PaDe, optimizer, RNG)."""
    keep = ("format_version", "dpal_version", "step", "model", "config", "store_fingerprint", "student_name",
            "img_size", "student_kwargs")
    return {**{k: ckpt[k] for k in keep if k in ckpt}, "weights_only": True}


def _write(path: Path, data: bytes, run_dir: Path) -> None:
    """`atomic_write_bytes`, with a full disk as one line (the previous checkpoints stay intact)."""
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        previous = checkpoint_paths(run_dir)
        err = disk_full_error(e, path, f"{previous[-1]}" if previous else "step 0 (no checkpoint yet)")
        if err is None:
            raise
        raise err from None


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` as checkpoints/step-N.pt; keep the last `keep_last` whole and, of the older ones,
    the newest `keep_weights_only_older` (a config key) as student weights only."""
    buf = io.BytesIO()
    torch.save(state, buf)
    path = Path(run_dir) / CHECKPOINT_DIR / f"step-{state['step']:08d}.pt"
    _write(path, buf.getvalue(), run_dir)
    keep_weights = int(state.get("config", {}).get("keep_weights_only_older", 0))
    for old in checkpoint_paths(run_dir)[:-keep_last]:
        if keep_weights > 0:
            reduced = weights_only(torch.load(old, map_location="cpu", weights_only=True, mmap=True))
            buf = io.BytesIO()
            torch.save(reduced, buf)
            _write(old.with_name(old.name[:-len(".pt")] + WEIGHTS_ONLY_SUFFIX), buf.getvalue(), run_dir)
        old.unlink(missing_ok=True)
    for old in weights_only_paths(run_dir)[:-keep_weights or None]:
        old.unlink(missing_ok=True)
    return path


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- model


class Distiller(nn.Module):
    """Student plus D-PaDe; `forward` returns the total loss and its terms for one micro-batch."""

    def __init__(self, student: nn.Module, dpade: DPaDe, grid_hw: tuple[int, int], fix_mask_sign: bool) -> None:
        super().__init__()
        self.student = student
        self.dpade = dpade
        self.grid_hw = grid_hw
        self.fix_mask_sign = fix_mask_sign

    def forward(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, float]]:
        # B batch, P patches of v0, T tokens of Ic, d student width, D teacher width
        b = batch["v0"].shape[0]
        tok0 = student_tokens(self.student, batch["v0"])  # (B, 1 + P, d)
        tok12 = student_tokens(self.student, torch.cat([batch["v1"], batch["v2"]]))  # (2B, 1 + P_local, d)
        tok_ic = student_tokens(self.student, batch["ic"])  # (B, T, d)
        npre = self.student.num_prefix_tokens
        # method.md's five D-PaDe calls. Student and D-PaDe treat every image on its own, so the
        # three global calls (CLS of v0, v1, v2) run as one call on 3B tokens, and the expert
        # generator runs once for all branches: the same values (up to float summation order)
        # for fewer, larger kernels and one weight-gradient pass.
        glob, loc, rel = self.dpade.forward_many([
            (torch.cat([tok0[:, :1], tok12[:, :1]]), PATTERN_GLOBAL),  # y (3B, 1, D)
            (tok0[:, npre:], PATTERN_LOCAL),  # y (B, P, D)
            (torch.cat([tok_ic[:, :1], tok_ic[:, npre:]], dim=1), PATTERN_RELATION),  # y (B, T, D)
        ])
        calls = [glob, glob, glob, loc, rel]  # the mean over 3B equals the mean of the three means
        g_t, local_t, rel_t = batch["g_t"], batch["local_t"], batch["rel_t"]
        l_g = global_mse(list(glob.y[:, 0].reshape(3, b, -1)), g_t)  # three (B, D)
        mask = batch.get("mask")  # (B, P, 1) from the loader (BatchDataset's mask_fix_sign) or:
        if mask is None:
            mask = shape_mask(local_t, self.grid_hw, self.fix_mask_sign)
        l_l = local_masked_mse(loc.y, local_t, mask)
        l_r = relation_kl(rel.y, rel_t)
        total, terms = total_loss(l_g, l_l, l_r, [c.route_loss for c in calls], [c.weight_l2 for c in calls], epoch)
        terms["route_acc"] = float(torch.stack([c.route_correct for c in calls]).mean())
        return total, terms


def build_distiller(cfg: DistillConfig, recipe: ViewRecipe, attrs: dict[str, Any]) -> Distiller:
    """The configured student and D-PaDe for a store (its attrs: teacher width, token grid), on CPU,
    initialised from `cfg.seed`."""
    torch.manual_seed(cfg.seed)
    student = create_student(cfg.student, img_size=tuple(recipe.global_size), **cfg.student_kwargs)
    recompute_mlp_activations(student, cfg.recompute)
    dpade = DPaDe(student.embed_dim, attrs["embed_dim"], scale=cfg.dpade_scale, l2_weight=cfg.l2_weight,
                  recompute=cfg.recompute)
    return Distiller(student, dpade, tuple(attrs["token_grid"]["global"]), cfg.fix_mask_sign)


def build_student_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The student of a run directory's newest checkpoint (or of a checkpoint file), on CPU."""
    path = Path(path)
    if path.is_dir():
        found = find_resume(path, "auto")
        if found is None:
            raise ValueError(f"{path} holds no dpal checkpoint (expected {path}/{CHECKPOINT_DIR}/step-*.pt)")
        path = found
    elif not path.is_file():
        raise ValueError(f"{path}: no such run directory or checkpoint")
    ckpt = load_checkpoint(path)
    student = create_student(ckpt["student_name"], img_size=tuple(ckpt["img_size"]), **ckpt.get("student_kwargs", {}))
    student.load_state_dict(ckpt["model"])
    return student.eval(), ckpt


def teacher_spec_from_store(attrs: dict[str, Any]) -> TeacherSpec:
    """Rebuild the teacher that wrote a store, for --online-teacher; checks the checkpoint hash."""
    t = attrs["teacher"]
    r = attrs["recipe"]
    packaged = t["name"] == EFFICIENTNET_LITE2  # weights come from its package, not a file
    return TeacherSpec(
        name=t["name"], checkpoint=None if packaged or t.get("random_init") else t.get("checkpoint"),
        random_init=t.get("random_init", False), random_init_seed=t.get("random_init_seed", 0),
        layer=t.get("layer"), arch=t.get("arch") if t["name"] in PRESETS else None,
        global_size=tuple(r["global_size"]), crowd_size=tuple(r["crowd_size"]),
        global_token="mean" if t.get("global_token") == "mean" else "auto",
    )


# ---------------------------------------------------------------- training


@dataclass
class TrainResult:
    step: int
    epoch: int
    stopped_by_signal: bool
    last_checkpoint: Path | None
    seconds: float
    signal_name: str = ""
    """The signal that stopped the run (SIGTERM, SIGUSR1, SIGINT), else empty."""


def _jsonl_truncate(path: Path, max_step: int) -> None:
    """Drop metric lines past a resumed checkpoint, so the log equals an uninterrupted run's."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln).get("step", 0) <= max_step:
                keep.append(ln)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
    path.write_text("".join(ln + "\n" for ln in keep))


def train(cfg: DistillConfig, show_progress: bool = True) -> TrainResult:
    """Run (or resume) stage two as configured, owning the run directory meanwhile (rundir.py)."""
    with ExitStack() as stack:  # releases the run directory's lock however the run ends
        return _train(cfg, show_progress, stack)


def _own_run_dir(cfg: DistillConfig, info: DistInfo, stack: ExitStack) -> None:
    """Rank 0 locks the run directory and, with --fresh, moves an old run aside; --resume none where
    a run exists is refused. Every rank learns rank 0's verdict, so that all stop together."""
    run_dir = Path(cfg.out)
    error = ""
    if info.is_main:
        try:
            lock = RunLock(run_dir).acquire()
            stack.callback(lambda: lock.release())  # the lock held at the end: move_aside replaces it
            what = existing_run(run_dir)
            if what is not None and cfg.fresh:
                lock, aside = move_aside(lock)
                logger.info("--fresh: moved the earlier run (%s) aside to %s", what, aside)
            elif what is not None and cfg.resume == "none":
                refuse_mixing(run_dir, what)
            for p in clean_temporary_files(run_dir):
                logger.info("removed %s, left by an interrupted checkpoint write", p)
        except RunDirError as e:
            error = str(e)
    if info.world_size > 1:
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        error = verdict[0]
    if error:
        raise RunDirError(error)


def _train(cfg: DistillConfig, show_progress: bool, stack: ExitStack) -> TrainResult:
    t_start = time.perf_counter()
    info, device = init_distributed(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    run_dir = Path(cfg.out)
    reader = StoreReader(cfg.store, allow_incomplete=cfg.allow_incomplete)
    attrs = reader.attrs
    recipe = ViewRecipe.from_dict(attrs["recipe"])
    if cfg.recipe_local_size is not None:
        recipe = ViewRecipe.from_dict({**recipe.to_dict(), "local_size": list(cfg.recipe_local_size)})
    fingerprint = reader.fingerprint()
    _own_run_dir(cfg, info, stack)

    model = build_distiller(cfg, recipe, attrs).to(device)
    ddp_model: nn.Module = model
    if info.world_size > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    optimizer = make_optimizer(model, cfg)

    sampler = EpochSampler(valid_rows(reader), cfg.batch_size, info.world_size, info.rank, cfg.seed)
    total_steps = cfg.epochs * sampler.steps_per_epoch
    warmup_steps = int(round(cfg.warmup_epochs * sampler.steps_per_epoch))
    global_batch = cfg.batch_size * info.world_size
    peak_lr = cfg.base_lr * global_batch / 256
    if info.is_main:  # a small batch scales the peak far down (batch 8: 7.8e-6); say so before training
        logger.info("peak lr %.3g = base_lr %g x global batch %d / 256 (linear scaling rule); warmup %d steps, "
                    "then cosine to %g at step %d", peak_lr, cfg.base_lr, global_batch, warmup_steps, cfg.min_lr,
                    total_steps)

    step, epoch, position = 0, 0, 0
    config_changes: list[dict[str, Any]] = []  # settings changed on resumes: [{step, changes}]
    resume_path = find_resume(run_dir, "none" if cfg.fresh else cfg.resume)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        if ckpt["store_fingerprint"] != fingerprint:
            raise StoreError(
                f"checkpoint {resume_path} was trained on another store (fingerprint "
                f"{ckpt['store_fingerprint'][:12]}, this store {fingerprint[:12]}: teacher, views or shard "
                "data differ); use a new --out, or --fresh to move this run aside and start over"
            )
        now = to_dict(cfg)
        changed = [f"{k} {ckpt['config'].get(k)!r} (now {now[k]!r})" for k in RESUME_KEYS
                   if ckpt["config"].get(k) != now[k]]
        if ckpt["world_size"] != info.world_size:
            changed.insert(0, f"{ckpt['world_size']} ranks (now {info.world_size})")
        if changed:
            raise ValueError(f"checkpoint {resume_path} was trained with {', '.join(changed)}; resume with the "
                             "same to keep the model and the data stream, or use a new --out (or --fresh to move this run aside)")
        model.student.load_state_dict(ckpt["model"])
        model.dpade.load_state_dict(ckpt["dpade"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        step, epoch, position = ckpt["step"], ckpt["sampler"]["epoch"], ckpt["sampler"]["position"]
        config_changes = list(ckpt.get("config_changes", []))
        notes = changed_settings(ckpt["config"], now)
        if notes:
            config_changes.append({"step": step, "changes": notes})
        if info.is_main:
            logger.info("resumed from %s at step %d (epoch %d)", resume_path, step, epoch)
            if notes:
                logger.warning("resuming at step %d with changed settings: %s; training follows them from here "
                               "(recorded in config.yaml and the checkpoints)", step, ", ".join(notes))
    elif info.is_main:
        why = "--fresh" if cfg.fresh else "--resume none" if cfg.resume == "none" else \
            f"no checkpoint in {run_dir / CHECKPOINT_DIR}"
        logger.info("starting fresh at step 0 (%s)", why)

    teacher = None
    if cfg.online_teacher:
        teacher = load_teacher(teacher_spec_from_store(attrs), device=device)
        if teacher.identity().get("checkpoint_sha256") != attrs["teacher"].get("checkpoint_sha256"):
            raise StoreError("the teacher checkpoint differs from the one that wrote the store (sha256)")

    end_steps = total_steps if cfg.max_steps is None else min(cfg.max_steps, total_steps)
    requests = collate_requests(sampler, epoch, position, cfg.epochs, end_steps - step, cfg.grad_accum)
    # On CPU the loader's workers compute the shape mask while the main process trains; on a GPU
    # it is cheaper on the device, inside the step (a batch of 256 would cost a worker ~1 s).
    loader_mask = device.type == "cpu" and not cfg.online_teacher
    dataset = BatchDataset(cfg.store, sampler, recipe, cfg.seed, cfg.grad_accum,
                           read_targets=not cfg.online_teacher, allow_incomplete=cfg.allow_incomplete,
                           mask_fix_sign=cfg.fix_mask_sign if loader_mask else None,
                           finish_on_cpu=device.type == "cpu")
    workers = cfg.num_workers
    if workers is None:
        workers = default_num_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if info.is_main:
        logger.info("DataLoader worker processes: %d", workers)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=requests, num_workers=workers,
        multiprocessing_context="forkserver" if workers > 0 else None,
        # batches waiting per worker; each holds its images and float32 targets (about 0.55 GB at
        # batch 256 and the paper's sizes), so many workers each keep fewer
        pin_memory=device.type == "cuda", prefetch_factor=(4 if workers <= 2 else 2) if workers > 0 else None,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
        # its own generator: `iter(loader)` draws a base seed, which must not advance the global
        # RNG (drop path) differently in a resumed run than in an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.seed),
    )

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write(run_dir / "config.yaml", config_text(cfg, config_changes).encode(), run_dir)
        _jsonl_truncate(run_dir / "metrics.jsonl", step)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if info.is_main else None  # noqa: SIM115
    tb = _tensorboard(run_dir) if info.is_main else None

    def state() -> dict[str, Any]:
        return {
            "format_version": CHECKPOINT_VERSION, "dpal_version": __version__, "step": step,
            "model": model.student.state_dict(), "dpade": model.dpade.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {"step": step, "peak_lr": peak_lr, "warmup_steps": warmup_steps,
                          "total_steps": total_steps, "min_lr": cfg.min_lr},
            "scaler": {}, "sampler": {"seed": cfg.seed, "epoch": epoch, "position": position},
            "rng": rng_state(), "config": to_dict(cfg), "store_fingerprint": fingerprint,
            "student_name": cfg.student, "img_size": list(recipe.global_size), "world_size": info.world_size,
            "student_kwargs": dict(getattr(model.student, "dpal_timm_kwargs", {})),
            "config_changes": config_changes,
        }

    stop = StopFlag()
    stop.install()
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    last_ckpt: Path | None = resume_path  # a finished run rerun trains nothing: its checkpoint is the last
    stopped = False
    progress = (Progress("distill", end_steps, step, interval_s=cfg.progress_seconds)
                if show_progress and info.is_main else None)
    t_log, imgs_log = time.perf_counter(), 0
    it = None
    try:
        with _children_ignore_stop_signals():
            it = iter(loader)  # starts the forkserver and the workers
        while step < end_steps:
            model.train()
            lr = lr_at(step, peak_lr, warmup_steps, total_steps, cfg.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr
            terms_acc: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                try:
                    batch = next(it)
                except StoreError as e:
                    raise StoreError(_worker_message(e)) from None
                except (RuntimeError, ConnectionError, EOFError) as e:
                    if workers == 0 or not _is_worker_failure(e):
                        raise
                    # Keep the steps done so far when this is a step boundary of a single process
                    # (other ranks would wait in their next collective, so DDP runs rely on the
                    # periodic checkpoints).
                    if micro == 0 and info.world_size == 1 and step > 0:
                        last_ckpt = save_checkpoint(run_dir, state(), cfg.keep_last)
                    raise LoaderError(_loader_message(e, workers, last_ckpt)) from None
                batch = dataset.model_inputs(batch, device)  # uint8 views and stored targets -> float32 inputs
                if teacher is not None:
                    # stage one's autocast (bf16 on CUDA), so online targets equal cached float32 ones
                    with torch.inference_mode(), autocast_context(device):
                        g, patches = teacher.encode_global(batch["v0"])
                        rel = teacher.relation_logits(batch["ic"])
                    batch.update(g_t=g.float().clone(), local_t=patches.float().clone(), rel_t=rel.float().clone())
                sync = micro == cfg.grad_accum - 1 or info.world_size == 1
                ctx = nullcontext() if sync else ddp_model.no_sync()
                with ctx, autocast:
                    loss, terms = ddp_model(batch, epoch)
                    (loss / cfg.grad_accum).backward()
                for k, v in terms.items():
                    terms_acc[k] = terms_acc.get(k, 0.0) + v / cfg.grad_accum
                imgs_log += batch["v0"].shape[0] * info.world_size
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_epoch = epoch  # the epoch this step trained in (its route weight), for the log
            step += 1
            position += 1
            if position >= sampler.steps_per_epoch:
                epoch, position = epoch + 1, 0
            if info.is_main and (step % cfg.log_every == 0 or step == end_steps):
                dt = time.perf_counter() - t_log
                line = {"step": step, "epoch": step_epoch, "lr": lr, **terms_acc,
                        "images_per_s": imgs_log / max(dt, 1e-9)}
                _append_line(metrics_file, json.dumps(line), run_dir, last_ckpt)
                if tb is not None:
                    for k, v in line.items():
                        if k != "step":
                            tb.add_scalar(k, v, step)
                t_log, imgs_log = time.perf_counter(), 0
            if progress is not None:
                progress.update(step, cfg.batch_size * info.world_size,
                                {k: terms_acc[k] for k in ("total", "global", "local", "relation") if k in terms_acc})
            stop_now = stop.agreed(info, device)
            if stop_now or step % cfg.checkpoint_every == 0 or step == end_steps:
                if info.is_main:
                    last_ckpt = save_checkpoint(run_dir, state(), cfg.keep_last)
                if info.world_size > 1:
                    dist.barrier()
            if stop_now:
                stopped = True
                break
    finally:
        # Shut the workers down now, also on an error (whose traceback keeps the iterator alive): they
        # ignore SIGTERM, and multiprocessing's exit handler would terminate() and join them forever.
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        stop.uninstall()
        if progress is not None:
            progress.stop()
        if metrics_file is not None:
            try:
                metrics_file.close()
            except OSError:  # the full disk already reported: a line it could not write stays unwritten
                pass
        if tb is not None:
            tb.close()
    return TrainResult(step, epoch, stopped, last_ckpt, time.perf_counter() - t_start,
                       stop.signal_name if stopped else "")


@contextmanager
def _children_ignore_stop_signals() -> Iterator[None]:
    """Processes started inside ignore SIGTERM and SIGUSR1; this one keeps its handlers.

    A scheduler signals the whole process group; the DataLoader's forkserver and workers must
    outlive it so that this process can finish the step and checkpoint. SIG_IGN is inherited
    through fork and exec (a blocked mask is not enough: multiprocessing unblocks SIGTERM when it
    starts its resource tracker). The signals are also blocked here meanwhile, so that one that
    arrives stays pending (Linux never discards a blocked signal) and reaches the handler after.
    """
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _worker_message(err: StoreError) -> str:
    """The message of a StoreError re-raised by a DataLoader worker, without the worker's traceback."""
    text = str(err)
    tag = f"{StoreError.__module__}.{StoreError.__name__}: "
    return text.rsplit(tag, 1)[1].strip() if text.startswith("Caught StoreError") and tag in text else text


def _is_worker_failure(err: BaseException) -> bool:
    """Whether an error from the DataLoader says that a worker process died or ran out of shared
    memory: the loader's own report, or the pipe to a worker broken mid-batch. An exception that the
    dataset raised inside a worker ("Caught ... in DataLoader worker process") is not one."""
    text = str(err)
    if text.startswith("Caught "):
        return False
    if isinstance(err, (ConnectionError, EOFError)):
        return True
    return "DataLoader worker" in text or "shared memory" in text or "No space left on device" in text


def _loader_message(err: BaseException, workers: int, checkpoint: Path | None) -> str:
    first = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}" if str(err).strip() else type(err).__name__
    kept = f"; the run resumes from {checkpoint} (--resume auto)" if checkpoint else ""
    return (f"the DataLoader's worker processes failed ({first}). A worker killed by the system has usually run "
            f"out of memory or of shared memory (/dev/shm; containers often allow 64 MB: raise it, e.g. docker "
            f"--shm-size 16g); retry with fewer workers than {workers} (--num-workers N, 0 builds the batches in "
            f"the main process){kept}")


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tb"))


def changed_settings(old: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key old -> new` for every training setting (neither a resume key nor a runtime key) that a
    resume changes: the schedule (epochs, base_lr, warmup_epochs, min_lr), the optimizer, the losses."""
    skip = set(RESUME_KEYS) | set(RUNTIME_KEYS)
    return [f"{k} {old[k]!r} -> {now[k]!r}" for k in now if k not in skip and k in old and old[k] != now[k]]


def config_text(cfg: DistillConfig, changes: list[dict[str, Any]]) -> str:
    """config.yaml: the config of this run, after comment lines listing the settings changed on resumes
    (comments, so that the file still loads with --config)."""
    head = "".join(f"# resumed at step {c['step']} with changed settings: {', '.join(c['changes'])}\n"
                   for c in changes)
    return head + dump_yaml(cfg)


def _append_line(f: Any, line: str, run_dir: Path, last_ckpt: Path | None) -> None:
    """One metrics line, flushed; a full disk is one error line (the run resumes from `last_ckpt`)."""
    try:
        f.write(line + "\n")
        f.flush()
    except OSError as e:
        err = disk_full_error(e, run_dir / "metrics.jsonl", str(last_ckpt) if last_ckpt else "step 0")
        if err is None:
            raise
        raise err from None
