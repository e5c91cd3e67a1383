"""Stage two's loop: the `Trainer`, which trains the student + D-PaDe (or another recipe's heads,
recipes.py) against a store's targets, with exact resume and DDP.

The training step is `Trainer.train_step`: `grad_accum` micro-batches, each finished into the
model's inputs (`model_inputs`: the loader's batch on the device, the teacher's targets when
online) and run forward and backward (`forward_backward_step`: `Distiller` in distiller.py, the
loss of docs/method.md, or the --recipe's model from recipes.py), then one AdamW step at the schedule's learning rate. `Trainer.train` is the
loop around it: metrics (metrics.py, read from the device only on log steps), progress,
checkpoints (checkpoint.py) and the stop signals (runtime.py). `Trainer.from_config` builds a whole
run (store, run directory, resume, DataLoader); `Trainer(cfg, meta, recipe, device)` builds only
the model and optimizer, for benchmarks and tests that feed batches themselves. `state_dict` /
`load_state_dict` hold everything needed to continue bit for bit: model, D-PaDe (or the recipe's
heads), optimizer, sampler position, RNG states, config and the store fingerprint. The run directory's ownership,
its leftovers and a full disk are rundir.py's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dpal import __version__
from dpal.config import DistillConfig, dump_yaml, to_dict, upgrade_keys
from dpal.errors import InputError, UserError
from dpal.progress import Progress
from dpal.store import FEATURES, KEYS, StoreError, StoreMeta, StoreReader
from dpal.teachers import autocast_context, load_teacher
from dpal.trainer.checkpoint import (
    CHECKPOINT_VERSION,
    find_resume,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_run_file,
)
from dpal.trainer.data import (
    BatchDataset,
    EpochSampler,
    LoaderError,
    collate_requests,
    ignore_stop_signals,
    valid_rows,
)
from dpal.trainer.distiller import Schedule, make_optimizer
from dpal.trainer.loggers import require as require_loggers
from dpal.trainer.metrics import MetricsLog, StepTerms
from dpal.trainer.recipes import batch_needs, build_model, check_targets
from dpal.trainer.rundir import (
    CHECKPOINT_DIR,
    RunDirError,
    RunLock,
    clean_temporary_files,
    existing_run,
    move_aside,
    refuse_mixing,
    remove_if_unused,
)
from dpal.trainer.runtime import (
    DistInfo,
    StopFlag,
    children_ignore_stop_signals,
    default_num_workers,
    init_distributed,
    keep_freed_memory,
)
from dpal.trainer.validate import Validator
from dpal.views import ViewRecipe

logger = logging.getLogger(__name__)

# config keys a resume must keep: they fix the model's shapes and the data stream
RESUME_KEYS = ("student", "student_kwargs", "batch_size", "seed", "recipe", "projector")
# what a checkpoint written before a resume key existed was trained with
RESUME_KEY_DEFAULTS = {"recipe": "dpal", "projector": "dpade"}
# config keys that say how to run, not what is trained: a resume may change them without a word
RUNTIME_KEYS = (
    "store",
    "out",
    "resume",
    "fresh",
    "max_steps",
    "num_workers",
    "device",
    "log_every",
    "loggers",
    "checkpoint_every",
    "keep_last",
    "keep_weights_only_older",
    "progress_seconds",
    "allow_incomplete",
    "val_store",
    "val_every",
    "val_images",
    "eval_reid",
)


@dataclass
class TrainResult:
    step: int
    epoch: int
    stopped_by_signal: bool
    last_checkpoint: Path | None
    seconds: float
    signal_name: str = ""
    """The signal that stopped the run (SIGTERM, SIGUSR1, SIGINT), else empty."""


@dataclass
class StepResult:
    """What one optimizer step leaves for the log: its lr, the epoch it trained in (its route
    weight), its loss terms (still on the device) and the images of all ranks."""

    lr: float
    epoch: int
    terms: StepTerms
    images: int
    skipped: str = ""
    """A step skipped for a value that is not finite (--skip-nonfinite): what was not finite."""


class NonFiniteError(UserError):
    """A loss term or the gradient norm of a step is NaN or infinite: the run stops before the
    optimizer applies it and before any checkpoint (exit 2, as every user-facing stop)."""


def train(
    cfg: DistillConfig, show_progress: bool = True, dataset_class: type[BatchDataset] = BatchDataset
) -> TrainResult:
    """Run (or resume) stage two as configured, owning the run directory meanwhile (rundir.py).
    `dataset_class` builds the batches (a benchmark passes one that serves targets from memory)."""
    with ExitStack() as stack:  # releases the run directory's lock however the run ends
        # The stop signals are caught from here on, not only once the loop starts: SLURM may send
        # its warning signal while the store opens and the model builds, and SIGUSR1's default
        # action would kill the rank. A stop asked for by then takes effect after the first step.
        stop = StopFlag()
        stop.install()
        stack.callback(stop.uninstall)
        return Trainer.from_config(cfg, stack, show_progress, dataset_class).train(stop)


class Trainer:
    """Stage two's model, optimizer and step; with `from_config`, also the run around them.

    Args:
        cfg: the run's config (student, optimizer, losses, grad_accum).
        meta: the store's metadata (`store.StoreMeta`: teacher width, v0's token grid; the teacher
            itself when online).
        recipe: the view recipe (the student's input size).
        device: where the model trains (bf16 autocast on CUDA).
        info: this rank's place under torchrun (DDP when world_size > 1).
        schedule: the learning rate per step; a whole run sets its own.
        finish: a loader batch -> the model's inputs on `device`; None: batches come as model inputs.
    """

    def __init__(
        self,
        cfg: DistillConfig,
        meta: StoreMeta,
        recipe: ViewRecipe,
        device: torch.device,
        info: DistInfo | None = None,
        schedule: Schedule | None = None,
        finish: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
    ) -> None:
        self.cfg, self.meta, self.recipe, self.device = cfg, meta, recipe, torch.device(device)
        self.info = info or DistInfo()
        self.model = build_model(cfg, recipe, meta.embed_dim, meta.token_grid.global_grid).to(self.device)
        if cfg.freeze_student:  # the heads alone align (no graph through the student, no updates)
            self.model.student.requires_grad_(False)
        self.ddp_model: nn.Module = self.model
        if self.info.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.model, cfg)
        self.schedule = schedule or Schedule.constant(0.0)
        self.finish = finish
        self.autocast = autocast_context(self.device)  # bf16 on CUDA, as stage one's teacher ran
        self.teacher: Any = None  # with --online-teacher: computes the targets in the step
        self.step, self.epoch, self.position = 0, 0, 0  # position: the step within the epoch
        self.steps_per_epoch: int | None = None  # None: the epoch never advances (no sampler)
        self.config_changes: list[dict[str, Any]] = []  # settings changed on resumes: [{step, changes}]
        self.fingerprint: str | None = None
        self.last_ckpt: Path | None = None
        self.metrics: MetricsLog | None = None  # rank 0's sinks, in a whole run
        self.validator: Validator | None = None  # rank 0's, with --val-store or --eval-reid
        # store rows -> image keys (a whole run's; a non-finite step names its batch's images)
        self.image_keys: Callable[[Any], list[str]] | None = None
        self.nonfinite_steps: list[int] = []  # steps skipped so far (--skip-nonfinite), over resumes

    # ------------------------------------------------------------ the step

    def model_inputs(self, loaded: dict[str, Tensor]) -> dict[str, Tensor]:
        """A loader batch -> the model's inputs: views and targets on the device (uint8 views and
        stored targets -> float32), with the teacher's targets in online mode."""
        batch = self.finish(loaded) if self.finish is not None else loaded
        if self.teacher is not None:
            # stage one's autocast (bf16 on CUDA), so online targets equal cached float32 ones
            with torch.inference_mode(), autocast_context(self.device):
                g, patches = self.teacher.encode_global(batch["v0"])
                rel = self.teacher.relation_logits(batch["ic"])
            batch.update(g_t=g.float().clone(), local_t=patches.float().clone(), rel_t=rel.float().clone())
        return batch

    def forward_backward_step(self, batch: dict[str, Tensor], sync: bool = True) -> dict[str, Tensor | float]:
        """Forward and backward of one micro-batch of model inputs (gradients added to the parameters',
        the loss divided by `grad_accum`); its loss terms, on the device. `sync` False: DDP keeps the
        gradients local (a micro-batch before the step's last)."""
        ctx = nullcontext() if sync or self.info.world_size == 1 else self.ddp_model.no_sync()
        measure = self.cfg.grad_shares and self._is_log_step(self.step + 1)
        self.model.record_parts = measure
        with ctx, self.autocast:
            loss, terms = self.ddp_model(batch, self.epoch)
            if measure:
                terms = {**terms, **self._grad_norms()}
            (loss / self.cfg.grad_accum).backward()
        return terms

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == getattr(self, "end_steps", None)

    def _grad_norms(self) -> dict[str, Tensor]:
        """`grad_norm/<term>`: the L2 norm of each weighted loss term's gradient on the student's
        parameters (this rank's micro-batch, one backward pass per term; --grad-shares)."""
        params = [p for p in self.model.student.parameters() if p.requires_grad]
        out = {}
        for name, part in self.model.parts.items():
            grads = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
            sq = [g.float().pow(2).sum() for g in grads if g is not None]
            out[f"grad_norm/{name}"] = torch.stack(sq).sum().sqrt() if sq else part.new_zeros(())
        self.model.parts = {}
        return out

    def train_step(self, batches: Iterator[dict[str, Tensor]]) -> StepResult:
        """One optimizer step on the next `grad_accum` loader batches of `batches`."""
        self.model.train()
        lr = self.schedule.lr(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        micro: list[dict[str, Tensor | float]] = []
        images, rows = 0, []
        for i in range(self.cfg.grad_accum):
            batch = self.model_inputs(next(batches))
            micro.append(self.forward_backward_step(batch, sync=i == self.cfg.grad_accum - 1))
            images += batch["v0"].shape[0] * self.info.world_size
            if "index" in batch:
                rows.append(batch["index"])
        skipped = self.check_finite(micro, rows)  # raises past --skip-nonfinite
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        result = StepResult(lr, self.epoch, StepTerms(micro, self.cfg.grad_accum), images, skipped)
        self.step += 1
        self.position += 1
        if self.steps_per_epoch is not None and self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return result

    def check_finite(self, micro: list[dict[str, Tensor | float]], rows: list[Tensor]) -> str:
        """Whether this step's loss terms and gradient norm are finite: one `isfinite` over them
        stacked, one device sync (and under DDP one all-reduce, so that every rank decides alike).
        Finite: "". Else, within --skip-nonfinite, what was not finite (the caller skips the
        optimizer step); past it, NonFiniteError naming the step, the terms and the images."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # the 2-norm of each gradient tensor, as clip_grad_norm_ computes it (a norm that overflows
        # float32, gradients past about 1e19, counts as not finite, as GradScaler treats it)
        norms = torch.stack(torch._foreach_norm(grads)) if grads else None
        terms = [(k, v) for m in micro for k, v in m.items() if isinstance(v, Tensor)]
        values = torch.cat(
            [torch.stack([v.float().reshape(()) for _, v in terms]), *([norms] if grads else [])]
        )
        ok = torch.isfinite(values).all()
        if self.info.world_size > 1:
            ok = ok.to(torch.int32)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok):
            return ""
        bad = {k: float(v) for k, v in terms if not torch.isfinite(v).all()}
        if grads and not torch.isfinite(norms).all():
            bad["gradient norm"] = float(torch.linalg.vector_norm(norms))
        what = ", ".join(f"{k} {v}" for k, v in bad.items()) or "on another rank"
        step = self.step + 1
        images = self._image_names(rows)
        if len(self.nonfinite_steps) < self.cfg.skip_nonfinite:
            self.nonfinite_steps.append(step)
            logger.warning(
                "step %d skipped: not finite: %s%s (%d of --skip-nonfinite %d)",
                step, what, images, len(self.nonfinite_steps), self.cfg.skip_nonfinite,
            )  # fmt: skip
            return what
        kept = (
            f"the last checkpoint, {self.last_ckpt}, is kept"
            if self.last_ckpt
            else "no checkpoint was written"
        )
        raise NonFiniteError(
            f"step {step}: not finite: {what}{images}; stopped before the optimizer step, {kept}. "
            f"Find the cause (`dpal store verify --deep {self.cfg.store}` checks the stored targets; a "
            "learning rate too high diverges), or rerun with --skip-nonfinite N to skip up to N such steps"
            + (f" ({len(self.nonfinite_steps)} skipped so far)" if self.nonfinite_steps else "")
        )

    def _image_names(self, rows: list[Tensor]) -> str:
        """`, images KEY, KEY (store rows R, R)` of a step's batches (the first 8), or ""."""
        if not rows or self.image_keys is None:
            return ""
        index = torch.cat(rows).cpu().numpy()
        keys = self.image_keys(index[:8])
        more = f" and {len(index) - 8} more" if len(index) > 8 else ""
        return f", images {', '.join(keys)}{more} (store rows {', '.join(map(str, index[:8]))}{more})"

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: everything a resume reads (checkpoint.py writes and checks it)."""
        return {
            "format_version": CHECKPOINT_VERSION,
            "dpal_version": __version__,
            "step": self.step,
            "model": self.model.student.state_dict(),
            self.model.checkpoint_key: self.model.heads.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": {"epoch": self.epoch, "position": self.position},
            "rng": rng_state(),
            "config": to_dict(self.cfg),
            "store_fingerprint": self.fingerprint,
            "student_name": self.cfg.student,
            "img_size": list(self.recipe.global_size),
            "world_size": self.info.world_size,
            "student_kwargs": dict(getattr(self.model.student, "dpal_timm_kwargs", {})),
            "config_changes": self.config_changes,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Continue from `state_dict`'s dict (checked by `check_resumable` first): weights, optimizer,
        the global RNG, the step and the sampler's position, the settings changed so far."""
        self.model.student.load_state_dict(ckpt["model"])
        self.model.heads.load_state_dict(ckpt[self.model.checkpoint_key])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        self.step, self.epoch, self.position = (
            ckpt["step"],
            ckpt["sampler"]["epoch"],
            ckpt["sampler"]["position"],
        )
        self.config_changes = list(ckpt.get("config_changes", []))
        self.nonfinite_steps = list(ckpt.get("nonfinite_steps", []))

    def check_resumable(self, ckpt: dict[str, Any], path: Path) -> None:
        """Refuse, in one line, a checkpoint of another store, model, data stream or world size."""
        if ckpt.get("weights_only"):
            raise InputError(
                f"{path} holds the student's weights only (for export and eval); resume from a whole "
                "checkpoint (step-N.pt)"
            )
        if ckpt["store_fingerprint"] != self.fingerprint:
            raise StoreError(
                f"checkpoint {path} was trained on another store (fingerprint "
                f"{ckpt['store_fingerprint'][:12]}, this store {self.fingerprint[:12]}: teacher, views or shard "
                "data differ); use a new --out, or --fresh to move this run aside and start over"
            )
        now, then = to_dict(self.cfg), {**RESUME_KEY_DEFAULTS, **upgrade_keys(DistillConfig, ckpt["config"])}
        changed = [f"{k} {then.get(k)!r} (now {now[k]!r})" for k in RESUME_KEYS if then.get(k) != now[k]]
        if ckpt["world_size"] != self.info.world_size:
            changed.insert(0, f"{ckpt['world_size']} ranks (now {self.info.world_size})")
        if changed:
            raise InputError(
                f"checkpoint {path} was trained with {', '.join(changed)}; resume with the "
                "same to keep the model and the data stream, or use a new --out (or --fresh to move this run aside)"
            )

    # ------------------------------------------------------------ a whole run

    @classmethod
    def from_config(
        cls,
        cfg: DistillConfig,
        stack: ExitStack,
        show_progress: bool = True,
        dataset_class: type[BatchDataset] = BatchDataset,
    ) -> Trainer:
        """A run as configured: the store opened and checked, the run directory owned (released by
        `stack`), the model built and resumed, the DataLoader ready."""
        t_start = time.perf_counter()
        require_loggers(cfg.loggers)  # a logger not installed: one line on every rank, before anything
        info, device = init_distributed(cfg.device)
        if device.type == "cpu":
            keep_freed_memory()
        reader = StoreReader(cfg.store, allow_incomplete=cfg.allow_incomplete)
        meta = reader.store_meta
        recipe = meta.recipe
        if cfg.local_size is not None:
            recipe = ViewRecipe.from_dict({**recipe.to_dict(), "local_size": list(cfg.local_size)})
        check_targets(cfg, FEATURES, f"store {cfg.store}")  # every store of this schema holds all three
        fingerprint = reader.fingerprint()
        rows = _training_rows(reader, cfg.store)
        # Everything that can refuse the run does so before the run directory is written: the side
        # inputs (rank 0's validation store and ReID folder), the model (student_kwargs timm refuses)
        validator = (
            Validator(cfg, meta, recipe, device)
            if info.is_main and (cfg.val_store or cfg.eval_reid)
            else None
        )
        trainer = cls(cfg, meta, recipe, device, info)
        sampler = EpochSampler(rows, cfg.batch_size, info.world_size, info.rank, cfg.seed)
        _own_run_dir(cfg, info, stack)
        trainer.validator = validator
        trainer.t_start, trainer.show_progress = t_start, show_progress
        trainer.run_dir, trainer.fingerprint = Path(cfg.out), fingerprint
        trainer.image_keys = lambda rows: [str(k) for k in reader.meta(KEYS)[rows]]  # read when needed
        trainer.sampler = sampler
        trainer.steps_per_epoch = trainer.sampler.steps_per_epoch
        trainer.schedule = Schedule.for_run(cfg, trainer.steps_per_epoch, info.world_size)
        if info.is_main:  # a small batch scales the peak far down (batch 8: 7.8e-6); say so before training
            s = trainer.schedule
            logger.info(
                "peak lr %.3g = base_lr %g x global batch %d / 256 (linear scaling rule); warmup %d steps, "
                "then cosine to %g at step %d",
                s.peak_lr,
                cfg.base_lr,
                cfg.batch_size * info.world_size,
                s.warmup_steps,
                cfg.min_lr,
                s.total_steps,
            )
        trainer.resume()
        if cfg.online_teacher:
            trainer.load_teacher()
        trainer._build_loader(dataset_class)
        if info.is_main:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_file(
                trainer.run_dir / "config.yaml",
                config_text(cfg, trainer.config_changes).encode(),
                trainer.run_dir,
            )
            trainer.metrics = MetricsLog(trainer.run_dir, trainer.step, cfg)
        return trainer

    def resume(self) -> None:
        """Continue from the checkpoint `--resume` names (the newest that loads, by default), if any."""
        cfg, run_dir = self.cfg, self.run_dir
        resume_path = find_resume(run_dir, "none" if cfg.fresh else cfg.resume)
        self.last_ckpt = resume_path  # a finished run rerun trains nothing: its checkpoint is the last
        if resume_path is None:
            if self.info.is_main:
                why = (
                    "--fresh"
                    if cfg.fresh
                    else "--resume none"
                    if cfg.resume == "none"
                    else f"no checkpoint in {run_dir / CHECKPOINT_DIR}"
                )
                logger.info("starting fresh at step 0 (%s)", why)
            return
        ckpt = load_checkpoint(resume_path)
        self.check_resumable(ckpt, resume_path)
        self.load_state_dict(ckpt)
        notes = changed_settings(upgrade_keys(DistillConfig, ckpt["config"]), to_dict(cfg))
        if notes:
            self.config_changes.append({"step": self.step, "changes": notes})
        if self.info.is_main:
            logger.info("resumed from %s at step %d (epoch %d)", resume_path, self.step, self.epoch)
            if notes:
                logger.warning(
                    "resuming at step %d with changed settings: %s; training follows them from here "
                    "(recorded in config.yaml and the checkpoints)",
                    self.step,
                    ", ".join(notes),
                )

    def load_teacher(self) -> None:
        """The teacher that wrote the store, for --online-teacher; refused if its checkpoint differs."""
        self.teacher = load_teacher(self.meta.teacher_spec(), device=self.device)
        self.meta.check_teacher(self.teacher.identity())

    def _build_loader(self, dataset_class: type[BatchDataset]) -> None:
        cfg, device = self.cfg, self.device
        total_steps = cfg.epochs * self.sampler.steps_per_epoch
        self.end_steps = total_steps if cfg.max_steps is None else min(cfg.max_steps, total_steps)
        requests = collate_requests(
            self.sampler, self.epoch, self.position, cfg.epochs, self.end_steps - self.step, cfg.grad_accum
        )
        # On CPU the loader's workers compute the shape mask while the main process trains; on a GPU
        # it is cheaper on the device, inside the step (a batch of 256 would cost a worker ~1 s).
        loader_mask = device.type == "cpu" and not cfg.online_teacher and self.model.needs_shape_mask
        dataset = dataset_class(
            cfg.store,
            self.sampler,
            self.recipe,
            cfg.seed,
            cfg.grad_accum,
            read_targets=not cfg.online_teacher,
            allow_incomplete=cfg.allow_incomplete,
            mask_fix_sign=cfg.fix_mask_sign if loader_mask else None,
            finish_on_cpu=device.type == "cpu",
            needs=batch_needs(cfg),
        )
        self.finish = lambda loaded: dataset.model_inputs(loaded, device)
        workers = cfg.num_workers
        if workers is None:
            workers = default_num_workers(device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if self.info.is_main:
            logger.info("DataLoader worker processes: %d", workers)
        self.workers = workers
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=requests,
            num_workers=workers,
            multiprocessing_context="forkserver" if workers > 0 else None,
            # batches waiting per worker; each holds its images and float32 targets (about 0.55 GB at
            # batch 256 and the paper's sizes), so many workers each keep fewer
            pin_memory=device.type == "cuda",
            prefetch_factor=(4 if workers <= 2 else 2) if workers > 0 else None,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
            # its own generator: `iter(loader)` draws a base seed, which must not advance the global
            # RNG (drop path) differently in a resumed run than in an uninterrupted one
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def train(self, stop: StopFlag | None = None) -> TrainResult:
        """Train to the end (or `max_steps`), or until a stop signal: then checkpoint and return.
        `stop`: a flag its caller installed earlier; None installs one for the loop."""
        own_flag = stop is None
        if stop is None:
            stop = StopFlag()
            stop.install()
        stopped = False
        progress = (
            Progress("distill", self.end_steps, self.step, interval_s=self.cfg.progress_seconds)
            if self.show_progress and self.info.is_main
            else None
        )
        if self.metrics is not None:
            self.metrics.restart_clock()
        it = None
        try:
            with children_ignore_stop_signals():
                it = iter(self.loader)  # starts the forkserver and the workers
            batches = self._loader_batches(it)
            while self.step < self.end_steps:
                result = self.train_step(batches)
                self._report(result, progress)
                stop_now = stop.agreed(self.info, self.device)
                # before the checkpoint: a checkpoint of a validation step always has its val line
                if self.validator is not None and (
                    self.step % self.cfg.val_every == 0 or self.step == self.end_steps
                ):
                    self.validate_or_checkpoint(result.epoch)
                if stop_now or self.step % self.cfg.checkpoint_every == 0 or self.step == self.end_steps:
                    self.checkpoint()
                if stop_now:
                    stopped = True
                    break
        finally:
            # Shut the workers down now, also on an error (whose traceback keeps the iterator alive): they
            # ignore SIGTERM, and multiprocessing's exit handler would terminate() and join them forever.
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            if own_flag:
                stop.uninstall()
            if progress is not None:
                progress.stop()
            if self.metrics is not None:
                self.metrics.close()
        return TrainResult(
            self.step,
            self.epoch,
            stopped,
            self.last_ckpt,
            time.perf_counter() - self.t_start,
            stop.signal_name if stopped else "",
        )

    def validate(self, epoch: int) -> dict[str, float]:
        """Rank 0's validation of the model now (validate.py; the RNG and the model's mode are left as
        they were), written to the metrics as a val line. `epoch`: the one the last step trained in."""
        assert self.validator is not None
        t0 = time.perf_counter()
        values = self.validator.run(self.model, epoch, self.autocast)
        if self.metrics is not None:
            self.metrics.log_val(self.step, epoch, values, self.last_ckpt, time.perf_counter() - t0)
        return values

    def validate_or_checkpoint(self, epoch: int) -> None:
        """`validate`; a side input that fails now (a folder changed since the start) stops the run
        only after the steps trained are checkpointed (one process: other ranks would wait)."""
        try:
            self.validate(epoch)
        except UserError:
            if self.info.world_size == 1:
                self.checkpoint()
            raise

    def checkpoint(self) -> None:
        """Rank 0 writes `state_dict` (keeping the last `keep_last`); every rank waits for it."""
        if self.info.is_main:
            weights = [*self.model.parameters()]
            if weights and not torch.isfinite(torch.stack(torch._foreach_norm(weights))).all():
                # never reached through train_step's check; a checkpoint of NaN weights would prune good ones
                kept = (
                    f"the last one, {self.last_ckpt}, is kept"
                    if self.last_ckpt
                    else "none was written before"
                )
                raise NonFiniteError(
                    f"the weights at step {self.step} are not finite: no checkpoint written, {kept}"
                )
            self.last_ckpt = save_checkpoint(self.run_dir, self.state_dict(), self.cfg.keep_last)
        if self.info.world_size > 1:
            dist.barrier()

    def _report(self, result: StepResult, progress: Progress | None) -> None:
        """The step's metrics line on log steps, and the progress display (terms read only if drawn)."""
        if self.metrics is not None:
            self.metrics.images += result.images
            if result.skipped:  # always logged: the step changed nothing
                self.metrics.log_skipped(self.step, result.epoch, result.lr, result.skipped, self.last_ckpt)
            elif self.step % self.cfg.log_every == 0 or self.step == self.end_steps:
                self.metrics.log(self.step, result.epoch, result.lr, result.terms, self.last_ckpt)
        if progress is not None:
            progress.update(
                self.step, self.cfg.batch_size * self.info.world_size, result.terms.progress_fields
            )

    def _loader_batches(self, it: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """The loader's batches, its failures as one line (a dead worker: LoaderError naming the fix)."""
        taken = 0
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except StoreError as e:
                raise StoreError(_worker_message(e)) from None
            except (RuntimeError, ConnectionError, EOFError) as e:
                if self.workers == 0 or not _is_worker_failure(e):
                    raise
                # Keep the steps done so far when this is a step boundary of a single process
                # (other ranks would wait in their next collective, so DDP runs rely on the
                # periodic checkpoints).
                if taken % self.cfg.grad_accum == 0 and self.info.world_size == 1 and self.step > 0:
                    self.last_ckpt = save_checkpoint(self.run_dir, self.state_dict(), self.cfg.keep_last)
                raise LoaderError(_loader_message(e, self.workers, self.last_ckpt)) from None
            taken += 1
            yield batch


def _training_rows(reader: StoreReader, store: str) -> Any:
    """The store's cached rows; none is one line (InputError), before anything is written."""
    rows = valid_rows(reader)
    if len(rows) == 0:
        raise InputError(
            f"store {store} has 0 cached images of its {reader.store_meta.layout.num_images} (every one "
            f"skipped, or in shards not finished): nothing to train on; `dpal store info {store}` lists "
            "the skipped images and why"
        )
    return rows


def _own_run_dir(cfg: DistillConfig, info: DistInfo, stack: ExitStack) -> None:
    """Rank 0 locks the run directory and, with --fresh, moves an old run aside; --resume none where
    a run exists is refused. Every rank learns rank 0's verdict, so that all stop together."""
    run_dir = Path(cfg.out)
    error = ""
    if info.is_main:
        if not run_dir.exists():  # a run refused before it wrote anything leaves no --out behind
            stack.callback(remove_if_unused, run_dir)
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
    first = (
        f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
        if str(err).strip()
        else type(err).__name__
    )
    kept = f"; the run resumes from {checkpoint} (--resume auto)" if checkpoint else ""
    return (
        f"the DataLoader's worker processes failed ({first}). A worker killed by the system has usually run "
        f"out of memory or of shared memory (/dev/shm; containers often allow 64 MB: raise it, e.g. docker "
        f"--shm-size 16g); retry with fewer workers than {workers} (--num-workers N, 0 builds the batches in "
        f"the main process){kept}"
    )


def changed_settings(old: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key old -> new` for every training setting (neither a resume key nor a runtime key) that a
    resume changes: the schedule (epochs, base_lr, warmup_epochs, min_lr), the optimizer, the losses."""
    skip = set(RESUME_KEYS) | set(RUNTIME_KEYS)
    return [f"{k} {old[k]!r} -> {now[k]!r}" for k in now if k not in skip and k in old and old[k] != now[k]]


def config_text(cfg: DistillConfig, changes: list[dict[str, Any]]) -> str:
    """config.yaml: the config of this run, after comment lines listing the settings changed on resumes
    (comments, so that the file still loads with --config)."""
    head = "".join(
        f"# resumed at step {c['step']} with changed settings: {', '.join(c['changes'])}\n" for c in changes
    )
    return head + dump_yaml(cfg)
