"""Stage one's engine: prepare the store, then run one `cache_shard` task per pending shard.

Where the tasks run: an embedded dask LocalCluster (default, `--workers N` processes), a running
dask scheduler (`--scheduler ADDRESS`), SLURM workers through dask-jobqueue (`--slurm`), or this
process alone for a slice of shards (`--shards A:B`, for SLURM array jobs). Each dask worker loads
the teacher once, through a WorkerPlugin, and uses one device; tasks carry only a shard index.
"""

from __future__ import annotations

import logging
import os
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
from dpal.config import CacheConfig, shard_slice, to_dict
from dpal.corpus import Corpus, index_corpus, scan_corpus
from dpal.errors import UserError
from dpal.pipeline.cache import (
    DiskFullError,
    ShardReport,
    StrictModeError,
    cache_shard,
    disk_full_message,
    is_disk_full,
    relation_rank,
    replay_threads_for,
    teacher_spec,
    teacher_targets,
)
from dpal.progress import Progress as PlainProgress
from dpal.store import (
    FACTOR_SCHEMA,
    ROTATED_DTYPE,
    ROTATED_SCHEMA,
    SCHEMA_VERSION,
    Layout,
    StoreError,
    StoreMeta,
    TeacherIdentity,
    TokenGrid,
    corpus_fingerprint,
    create_store,
    done_shards,
    identity_diff,
    mark_complete_if_done,
    read_attrs,
    read_marker,
)
from dpal.teachers import Teacher, load_teacher, qkv_std_ratio
from dpal.views import background_index, replay, sample_view

logger = logging.getLogger(__name__)
PLUGIN_NAME = "dpal-teacher"
MAX_LOGGED_PROBLEMS = 20  # corpus problems logged one line each; the store records all
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


def store_meta(
    cfg: CacheConfig,
    teacher: Teacher,
    fingerprint: str,
    num_images: int,
    corpus_problems: list[dict[str, Any]] | None = None,
) -> StoreMeta:
    """What the store holds: the identity a resume must match, and the records beside it.

    Args:
        corpus_problems: corpus entries that could not be indexed (not identity: for `store info`).
    """
    grid = TokenGrid.of(cfg.recipe, teacher.patch_size)
    rank = relation_rank(cfg, grid.num_crowd_tokens)
    return StoreMeta(
        teacher=TeacherIdentity.from_attrs(teacher.identity(), "teacher identity"),
        recipe=cfg.recipe,
        token_grid=grid,
        seed=cfg.seed,
        num_views=cfg.views,
        num_images=num_images,
        shard_size=cfg.shard_size,
        dtype=cfg.dtype,
        embed_dim=teacher.embed_dim,
        corpus=cfg.corpus,
        corpus_fingerprint=fingerprint,
        embed_images=cfg.embed_images,
        value_settings=value_settings(cfg),
        config=to_dict(cfg),
        corpus_problems=corpus_problems,
        relation_rank=rank,
        schema_version=schema_version(cfg.dtype, rank),
    )


def schema_version(dtype: str, relation_rank: int) -> int:
    """The schema a new store is written in: 4 for int8-rotated (either relation codec), 3 for a
    relation factor, else 2 (docs/store.md, "Changelog")."""
    if dtype == ROTATED_DTYPE:
        return ROTATED_SCHEMA
    return FACTOR_SCHEMA if relation_rank else SCHEMA_VERSION


def value_settings(cfg: CacheConfig) -> dict[str, Any]:
    """Run settings outside the teacher and recipe that change stored values, so a resume must match.

    `max_pixels` decides which images are skipped. `batch_size` changes the teacher's outputs in the
    last bits (matrix kernels split a batch of B rows differently; measured: 8 to 406 elements of a
    shard differ between batch sizes). The device type changes them more: a GPU teacher runs under
    bf16 autocast, a CPU one in float32. A CPU teacher's torch thread count changes the last bit too
    (MKL splits a small matrix product differently for 1 and 2 threads); on a GPU the threads only
    replay views, and `replay_threads` is proven not to change a value (a test). With remote workers
    (`--scheduler`, `--slurm`) and `device: auto` the driver cannot see the workers' device, and
    records `auto`.
    """
    device = cfg.device
    if device == "auto" and not (cfg.scheduler or cfg.use_slurm):
        device = resolve_device(device).type
    device = device.split(":")[0]
    precision = {"cuda": "bfloat16 autocast", "cpu": "float32"}.get(
        device, "bfloat16 autocast on cuda, float32 on cpu"
    )
    return {
        "max_pixels": cfg.max_pixels,
        "batch_size": cfg.batch_size,
        "teacher_device": device,
        "teacher_precision": precision,
        "teacher_threads": teacher_threads(cfg) if device == "cpu" else None,
    }


def teacher_threads(cfg: CacheConfig) -> int | str:
    """Torch threads that run a CPU teacher: this process's (`--shards`), or each worker's."""
    if cfg.shards is not None:
        return torch.get_num_threads()
    if cfg.scheduler:
        return "the scheduler's workers' own"
    if cfg.use_slurm:
        return cfg.threads_per_worker or cfg.slurm.cores
    return local_worker_threads(cfg)


def local_worker_threads(cfg: CacheConfig) -> int:
    """Torch threads of each local dask worker: from --workers, never from the shards left, so that
    a resume with fewer pending shards than workers runs a CPU teacher as the first run did."""
    return cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // cfg.workers)


def _value_settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Differences in `value_settings`; a store made before the attribute existed is compared on
    the settings its `config` attribute recorded (max_pixels, batch_size)."""
    before = old.get("value_settings")
    if before is None:
        config = old.get("config") or {}
        before = {k: config[k] for k in ("max_pixels", "batch_size") if k in config}
    now = new["value_settings"]
    return [
        f"value_settings.{k}: store has {before[k]!r}, this run has {now.get(k)!r}"
        for k in sorted(before)
        if before[k] != now.get(k)
    ]


def _check_out(out: Path) -> bool:
    """Whether `out` is an existing store; raises StoreError if the store cannot be made there."""
    is_store = (out / "zarr.json").exists()
    if out.exists() and not is_store and (not out.is_dir() or any(out.iterdir())):
        raise StoreError(f"--out {out} exists and is not a dpal store; choose a new path")
    if not out.exists():
        above = next(p for p in out.absolute().parents if p.exists())
        if not above.is_dir():
            raise StoreError(f"--out {out}: cannot create the store there ({above} is not a folder)")
        if not os.access(above, os.W_OK | os.X_OK):
            raise StoreError(f"--out {out}: cannot create the store there (no write permission in {above})")
    return is_store


def check_inputs(cfg: CacheConfig) -> Corpus:
    """Index the corpus and check --out, before the teacher loads (which takes many seconds).

    Corpus entries that cannot be indexed are logged, one line each, and recorded in the store;
    under --strict the first one stops the run.

    Raises:
        ValueError: no corpus there, or no image in it.
        StoreError: --out cannot hold a store.
        StrictModeError: a corpus problem under --strict.
    """
    _check_out(Path(cfg.out))
    corpus = scan_corpus(cfg.corpus)
    for p in corpus.problems[:MAX_LOGGED_PROBLEMS]:
        logger.warning("corpus: %s: %s", p["entry"], p["reason"])
    if len(corpus.problems) > MAX_LOGGED_PROBLEMS:
        logger.warning(
            "corpus: %d more unreadable entries (the store's corpus_problems lists all)",
            len(corpus.problems) - MAX_LOGGED_PROBLEMS,
        )
    if corpus.problems and cfg.strict:
        p = corpus.problems[0]
        raise StrictModeError(
            f"corpus entry {p['entry']}: {p['reason']}; rerun without --strict to skip and record it"
        )
    return corpus


def prepare_store(cfg: CacheConfig, teacher: Teacher, corpus: Corpus | None = None) -> Layout:
    """Create the store, or check that an existing one was made by the same command.

    Args:
        corpus: the indexed corpus (`check_inputs`); indexed here when None.

    Raises:
        StoreError: the existing store differs in teacher, recipe, seed, K, dtype, ...; the
            message names each difference.
    """
    out = Path(cfg.out)
    is_store = _check_out(out)
    corpus = corpus if corpus is not None else scan_corpus(cfg.corpus)
    refs = corpus.refs
    meta = store_meta(cfg, teacher, corpus_fingerprint(refs), len(refs), corpus.problems)
    if not is_store:  # a new path, or an empty folder made for it
        try:
            create_store(out, meta, refs)
        except OSError as e:
            if is_disk_full(e):
                raise DiskFullError(disk_full_message(out, "the new store", e, resumes=False)) from None
            raise StoreError(
                f"--out {out}: cannot create the store there ({e.strerror or e}: {e.filename})"
            ) from None
    old = read_attrs(out)
    new = meta.to_attrs()
    diff = identity_diff(old, new) + _value_settings_diff(old, new)
    if diff:
        raise StoreError(
            f"{out} was made with different settings, refusing to mix them: "
            + "; ".join(diff)
            + ". Use a new --out, or rerun with the store's settings."
        )
    return StoreMeta.from_attrs(old, out).layout


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


# ---------------------------------------------------------------- dry run


def _sample_views(cfg: CacheConfig, refs: list[Any], num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v0 and Ic (view 0) of the first `num_images` decodable corpus images, for timing the teacher."""
    from dpal.corpus import BadImage, decode_image, read_bytes

    imgs = []
    for ref in refs:
        try:
            imgs.append((ref.key, decode_image(read_bytes(ref.source, ref.offset, ref.size), cfg.max_pixels)))
        except (BadImage, OSError):
            continue
        if len(imgs) >= num_images:
            break
    if not imgs:
        raise StoreError(f"no decodable image among the first images of {cfg.corpus}")
    pool = [(i, (im.height, im.width)) for i, (_, im) in enumerate(imgs)]
    v0s, ics = [], []
    for i, (key, im) in enumerate(imgs):
        p = sample_view(
            cfg.recipe, cfg.seed, key, 0, (im.height, im.width), [b for b in pool if b[0] != i] or pool
        )
        v0, ic = replay(cfg.recipe, p, im, imgs[background_index(p)][1])
        v0s.append(v0)
        ics.append(ic)
    return torch.stack(v0s), torch.stack(ics)


def _image_bytes(cfg: CacheConfig, refs: list[Any]) -> int:
    """The image tars' size estimated from up to 256 images' sizes (0 without --embed-images)."""
    if not cfg.embed_images:
        return 0
    sample = refs[: min(len(refs), 256)]
    sizes = [
        ref.size if ref.size >= 0 else os.path.getsize(ref.source)
        for ref in sample
        if ref.size >= 0 or os.path.exists(ref.source)
    ]
    return int(sum(sizes) / max(len(sizes), 1) * len(refs))


def dry_run(cfg: CacheConfig, num_images: int = 8) -> dict[str, Any]:
    """Time the teacher on a few images and size the store for this corpus and K."""
    device = resolve_device(cfg.device)
    refs = index_corpus(cfg.corpus)  # before the teacher: a corpus mistake is reported at once
    teacher = load_teacher(teacher_spec(cfg), device=device)
    v0, ic = _sample_views(cfg, refs, num_images)
    grid = TokenGrid.of(cfg.recipe, teacher.patch_size)
    rank = relation_rank(cfg, grid.num_crowd_tokens)
    teacher_targets(teacher, v0[:2], ic[:2], device, rank)  # warm up
    t0 = time.perf_counter()
    teacher_targets(teacher, v0, ic, device, rank)
    per_view = (time.perf_counter() - t0) / len(v0)
    layout = Layout(
        len(refs), cfg.views, cfg.shard_size, teacher.embed_dim, grid.num_patches, grid.num_crowd_tokens,
        cfg.dtype, rank,
    )  # fmt: skip
    image_bytes = _image_bytes(cfg, refs)
    views = len(refs) * cfg.views
    workers = 1 if cfg.shards else (cfg.slurm.jobs if cfg.use_slurm else cfg.workers)
    return {
        "teacher": teacher.identity(),
        "device": str(device),
        "num_images": len(refs),
        "num_views": cfg.views,
        "dtype": cfg.dtype,
        "relation_codec": layout.relation_codec,
        "relation_rank": layout.relation_rank or None,
        "bytes_per_view": layout.bytes_per_view(),
        "rotation_bytes": layout.rotation_bytes(),  # R, once per store (int8-rotated)
        "feature_bytes": layout.bytes_per_view() * views + layout.rotation_bytes(),
        "image_bytes": image_bytes,
        "store_bytes": layout.bytes_per_view() * views + layout.rotation_bytes() + image_bytes,
        "seconds_per_view": per_view,
        "estimated_seconds": per_view * views / workers,
        "workers": workers,
        "qkv_std_ratio": qkv_std_ratio(teacher),
        "num_shards": layout.num_shards,
    }
