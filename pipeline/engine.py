"""Stage one's driver: prepare the store (`pipeline.prepare`), then run one `cache_shard` task per
pending shard, and summarise the run.

Where the tasks run: an embedded dask LocalCluster (default, `--workers N` processes), a running
dask scheduler (`--scheduler ADDRESS`), SLURM workers through dask-jobqueue (`--slurm`), or this
process alone for a slice of shards (`--shards A:B`, for SLURM array jobs). Each dask worker loads
the teacher once, through a WorkerPlugin, and uses one device; tasks carry only a shard index.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

try:
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # without the `engine` extra only --shards runs (in this process); _run_dask says so
    WorkerPlugin = object

from dpal import __version__
from dpal.common import resolve_device
from dpal.config import CacheConfig, shard_slice
from dpal.errors import UserError
from dpal.pipeline.cache import (
    DiskFullError,
    ShardReport,
    StrictModeError,
    cache_shard,
    replay_threads_for,
    teacher_spec,
)
from dpal.pipeline.prepare import check_inputs, local_worker_threads, prepare_store
from dpal.progress import Progress as PlainProgress
from dpal.store import (
    Layout,
    StoreError,
    done_shards,
    mark_complete_if_done,
    read_marker,
)
from dpal.teachers import Teacher, load_teacher

logger = logging.getLogger(__name__)
PLUGIN_NAME = "dpal-teacher"
WORKER_EXIT_S = 60.0  # grace for a dask worker process to exit after its worker closed
# A SLURM worker's memory is torch's (the teacher, its buffers), none of it dask's: dask's memory
# manager would pause the worker at 80% of the job's --mem, forever, since nothing it holds can be
# spilled (a 1 GB job pauses at startup and the run hangs), or restart it at 95%. SLURM enforces
# --mem itself.
WORKER_MEMORY_ENV = [
    f"export DASK_DISTRIBUTED__WORKER__MEMORY__{k}=False" for k in ("TARGET", "SPILL", "PAUSE", "TERMINATE")
]


@dataclass
class RunSummary:
    num_shards: int
    shards_run: int
    shards_already_done: int
    images: int
    cached: int
    skipped: int
    seconds: float
    complete: bool
    corpus_problems: int = 0
    """Corpus entries that could not be indexed (damaged tars, FIFOs, broken links, ...): the
    store's `corpus_problems` attribute lists them with reasons."""
    shards_done: int = 0
    """Shards of the store done at the end, by this run or any other."""
    skipped_images: list[dict[str, Any]] = field(default_factory=list)
    """The images this run skipped: {"index", "key", "reason"} each, from the shards' markers."""

    def line(self, max_listed: int = 20) -> str:
        """The end-of-run summary: the skipped images with their reasons (at most `max_listed`),
        then one line of counts (the last line, for scripts)."""
        listed = [f"skipped {s['key']}: {s['reason']}" for s in self.skipped_images[:max_listed]]
        if len(self.skipped_images) > max_listed:
            listed.append(
                f"... and {len(self.skipped_images) - max_listed} more (`dpal store info --json` lists all)"
            )
        return "\n".join([*listed, self._counts()])

    def _counts(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        lost = (
            f"{self.corpus_problems} corpus entries unreadable and lost (listed in the store's "
            "corpus_problems); "
            if self.corpus_problems
            else ""
        )
        return (
            f"cached {self.cached} images in {self.shards_run} shards ({rate:.1f} img/s, {self.seconds:.1f} s); "
            f"skipped {self.skipped} bad images; {lost}{self.shards_already_done} shards were already done; "
            f"store {
                'complete'
                if self.complete
                else f'INCOMPLETE ({self.shards_done}/{self.num_shards} shards done): '
                'rerun the same command to finish'
            }"
        )


# ---------------------------------------------------------------- dask


class TeacherPlugin(WorkerPlugin):
    """A dask WorkerPlugin that loads the teacher once per worker, on the worker's own device."""

    name = PLUGIN_NAME

    def __init__(self, cfg: CacheConfig, threads: int) -> None:
        self.cfg = cfg
        self.threads = threads
        self.teacher: Teacher | None = None
        self.device: torch.device | None = None
        self.replay_threads = 1

    def setup(self, worker: Any) -> None:
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        device = resolve_device(self.cfg.device)
        if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
            # One worker per GPU: local workers are named 0..N-1.
            try:
                device = torch.device("cuda", int(worker.name) % torch.cuda.device_count())
            except (TypeError, ValueError):
                device = torch.device("cuda", 0)
        self.device = device
        self.replay_threads = replay_threads_for(self.cfg, device, self.threads or torch.get_num_threads())
        self.teacher = load_teacher(teacher_spec(self.cfg), device=device)

    def teardown(self, worker: Any) -> None:
        self.teacher = None


def _dask_task(
    store_path: str, shard: int, cfg: CacheConfig
) -> ShardReport | StrictModeError | DiskFullError:
    from distributed import get_worker

    plugin = get_worker().plugins[PLUGIN_NAME]
    try:
        return cache_shard(store_path, shard, plugin.teacher, cfg, plugin.device, plugin.replay_threads)
    except (StrictModeError, DiskFullError) as e:
        # A bad image under --strict, or a full disk, is the user's to fix, not a worker failure:
        # returned as a value so that the worker does not log "Compute Failed" and a traceback;
        # the driver raises it.
        return e


def _shard_result(rep: ShardReport | StrictModeError | DiskFullError) -> ShardReport:
    if isinstance(rep, (StrictModeError, DiskFullError)):
        raise rep
    return rep


def slurm_cluster(cfg: CacheConfig) -> Any:
    """A dask-jobqueue SLURMCluster with one worker (one GPU) per job."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise StoreError("--slurm needs dask-jobqueue: pip install 'dpal[slurm]'") from None
    s = cfg.slurm
    extra = [f"--gres=gpu:{s.gpus_per_job}"] if s.gpus_per_job else []
    extra += list(s.job_extra)
    # One task at a time per worker (cores=1 -> --nthreads 1) on one GPU; the job still gets
    # `slurm.cores` CPUs (job_cpu) for torch, decoding and replay.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        return SLURMCluster(
            queue=s.partition,
            account=s.account,
            cores=1,
            job_cpu=s.cores,
            processes=1,
            memory=s.memory,
            walltime=s.walltime,
            job_extra_directives=extra,
            job_name="dpal-cache",
            scheduler_options={"dashboard_address": None},
            job_script_prologue=WORKER_MEMORY_ENV,
        )


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]caching"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TextColumn("{task.fields[rate]:.1f} img/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=False,
        console=Console(stderr=True),  # stdout carries the summary (or --json)
    )


def _drive(
    reports: Iterable[ShardReport],
    total_images: int,
    show: bool,
    on_report: Callable | None = None,
    interval_s: float = 60.0,
) -> list[ShardReport]:
    """Collect the shards' reports, showing progress: a bar on a terminal, else (a batch job's log)
    a plain line every `interval_s` seconds and one at the end, with images done, images/s and ETA."""
    out = []
    t0 = time.perf_counter()
    plain = (
        PlainProgress(
            "cache-teacher", total_images, unit="images", interval_s=interval_s, bar=False, main=None
        )
        if show and not sys.stderr.isatty()
        else None
    )
    with _progress() as bar:
        task = bar.add_task("cache", total=total_images, rate=0.0, visible=show and plain is None)
        done = 0
        for rep in reports:
            out.append(rep)
            done += rep.num_images
            bar.update(task, advance=rep.num_images, rate=done / max(time.perf_counter() - t0, 1e-9))
            if plain is not None:
                plain.update(done, rep.num_images)
            if on_report:
                on_report(rep)
    if plain is not None:
        plain.stop()
    return out


def run_cache(cfg: CacheConfig, show_progress: bool = True) -> RunSummary:
    """Run (or resume) stage one as configured; returns the summary."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    local = cfg.shards is not None
    corpus = check_inputs(cfg)  # a mistake in the corpus or --out is reported before the teacher loads
    # The driver needs the teacher's identity and width; in --shards mode it also computes.
    teacher = load_teacher(teacher_spec(cfg), device=device if local else torch.device("cpu"))
    layout = prepare_store(cfg, teacher, corpus)
    store = str(Path(cfg.out))
    wanted = shard_slice(cfg.shards, layout.num_shards) if local else range(layout.num_shards)
    already = done_shards(Path(store))
    for s in sorted(already & set(wanted)):
        read_marker(Path(store), s)  # a damaged marker is named now, not when stage two reads the shard
    pending = [s for s in wanted if s not in already]
    total = sum(layout.shard_range(s)[1] - layout.shard_range(s)[0] for s in pending)

    if local:
        threads = replay_threads_for(cfg, device, torch.get_num_threads())
        reports = _drive(
            (cache_shard(store, s, teacher, cfg, device, threads) for s in pending),
            total,
            show_progress,
            interval_s=cfg.progress_seconds,
        )
    else:
        del teacher
        reports = _run_dask(cfg, store, pending, total, show_progress)
    complete = mark_complete_if_done(Path(store))
    return summarize(
        Path(store), layout, len(wanted), reports, time.perf_counter() - t0, complete, len(corpus.problems)
    )


def summarize(
    store: Path,
    layout: Layout,
    num_wanted: int,
    reports: list[ShardReport],
    seconds: float,
    complete: bool,
    corpus_problems: int = 0,
) -> RunSummary:
    """The run's summary from its shard reports. A shard that another run sharing the store
    finished first (its report says already_done) counts as already done, not as run by this one."""
    ran = sorted((r for r in reports if not r.already_done), key=lambda r: r.shard)
    skipped = []
    for r in ran:
        if r.num_skipped:
            skipped += read_marker(store, r.shard)["skipped"]
    return RunSummary(
        num_shards=layout.num_shards,
        shards_run=len(ran),
        shards_already_done=num_wanted - len(ran),
        images=sum(r.num_images for r in ran),
        cached=sum(r.num_cached for r in ran),
        skipped=sum(r.num_skipped for r in ran),
        seconds=seconds,
        complete=complete,
        corpus_problems=corpus_problems,
        shards_done=len(done_shards(store) & set(range(layout.num_shards))),
        skipped_images=skipped,
    )


def _run_dask(cfg: CacheConfig, store: str, pending: list[int], total: int, show: bool) -> list[ShardReport]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise UserError(
            "stage one's dask engine (--workers, --scheduler, --slurm) needs dask.distributed: "
            "pip install 'dpal[engine]', or run in this process with --shards 0:"
        ) from None

    if not pending:
        return []
    cluster = None
    if cfg.scheduler:
        client = Client(cfg.scheduler)
        threads = 0
    elif cfg.use_slurm:
        cluster = slurm_cluster(cfg)
        cluster.scale(jobs=cfg.slurm.jobs)
        client = Client(cluster)
        threads = cfg.threads_per_worker or cfg.slurm.cores
    else:
        n = min(cfg.workers, len(pending))
        threads = local_worker_threads(cfg)
        with warnings.catch_warnings():  # "Port 8787 is already in use": no dashboard is wanted
            warnings.filterwarnings("ignore", message="Port .* is already in use")
            cluster = LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        client = Client(cluster)
    try:
        client.register_plugin(TeacherPlugin(cfg, threads), name=PLUGIN_NAME)
        futures = [
            client.submit(_dask_task, store, s, cfg, key=f"dpal-shard-{s}-{__version__}", pure=False)
            for s in pending
        ]
        return _drive(
            (_shard_result(f.result()) for f in as_completed(futures)),
            total,
            show,
            interval_s=cfg.progress_seconds,
        )
    finally:
        client.close()
        if cluster is not None:
            close_cluster(cluster)


def close_cluster(cluster: Any) -> None:
    """Close a dask cluster, letting each local worker process exit by itself.

    A worker process that held a torch teacher spends seconds in interpreter shutdown after the
    worker has closed (measured 2 to 7 s on a busy two-core machine, in C, no Python frame), and a
    nanny waits only 4 s before it kills it with "Worker process still alive after 4.0 seconds,
    killing". Closing the nannies first with `WORKER_EXIT_S` of grace ends every run cleanly.
    """
    import asyncio

    from distributed import LocalCluster

    if isinstance(cluster, LocalCluster) and cluster.workers:

        async def close_all(nannies: list[Any]) -> None:
            await asyncio.gather(*(n.close(timeout=WORKER_EXIT_S) for n in nannies))

        cluster.sync(close_all, list(cluster.workers.values()))
    cluster.close()
