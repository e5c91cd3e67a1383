"""Stage one's unit of work: one store shard, from corpus bytes to written, marked targets.

`cache_shard` is the one function that the dask engine, SLURM array jobs (`--shards A:B`) and the
tests all call. It is pure but for writing its own shard: it decodes the shard's images, samples
each view's parameters (views.sample_view), replays them into pixels, runs the teacher on v0 and
Ic, and hands everything to `store.write_shard`, which writes each array in one assignment and
then the marker. A shard whose marker exists is skipped before any image is decoded.
"""

from __future__ import annotations

import errno
import io
import logging
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dpal.config import CacheConfig
from dpal.corpus import BadImage, decode_image, read_bytes
from dpal.errors import UserError
from dpal.store import (
    FEATURES,
    GLOBAL,
    KEYS,
    LOCAL,
    RELATION,
    SOURCE,
    SOURCE_OFFSET,
    SOURCE_SIZE,
    Layout,
    ShardData,
    StoreError,
    StoreReader,
    marker_path,
    shift_rows,
    write_shard,
)
from dpal.store.relation import RELATION_KL, relation_code
from dpal.teachers import Teacher, TeacherSpec, autocast_context
from dpal.views import NUM_PARAMS, ViewRecipe, background_index, replay, sample_view

logger = logging.getLogger(__name__)
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}


class StrictModeError(UserError):
    """A bad corpus image under --strict."""


class DiskFullError(StoreError):
    """The disk holding the store is full (or over quota); rerunning resumes."""


def disk_full_message(path: str | Path, what: str, e: OSError, resumes: bool = True) -> str:
    """One line: which path is full and that a rerun resumes (finished shards are kept)."""
    detail = f" ({e.filename})" if e.filename else ""
    then = ": finished shards are kept and the run resumes" if resumes else ""
    return (
        f"disk full: {e.strerror or e} while writing {what} under {Path(path).absolute()}{detail}; free "
        f"space there and rerun the same command{then}"
    )


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


@dataclass
class ShardReport:
    """What one `cache_shard` call did."""

    shard: int
    num_images: int
    num_cached: int
    num_skipped: int
    seconds: float
    already_done: bool = False


def _image_ext(blob: bytes) -> str:
    """Extension of the embedded copy, from the bytes: tar keys carry none, and a WebDataset reader
    of the store's image tars decodes by extension."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(blob)) as img:
            return FORMAT_EXT.get(img.format or "", "img")


def teacher_spec(cfg: CacheConfig) -> TeacherSpec:
    return TeacherSpec(
        name=cfg.teacher,
        checkpoint=cfg.teacher_checkpoint,
        random_init=cfg.random_init,
        random_init_seed=cfg.random_init_seed,
        layer=cfg.teacher_layer,
        arch=cfg.teacher_arch,
        global_size=cfg.views.global_size,
        crowd_size=cfg.views.crowd_size,
        global_token=cfg.teacher_global_token,
        input_scale=cfg.teacher_input_scale,
    )


def replay_threads_for(cfg: CacheConfig, device: torch.device, cpu_threads: int) -> int:
    """Threads that replay views while the teacher runs (`cfg.replay_threads`, 0 = automatic).

    Automatic: with a GPU teacher the worker's CPU threads (`cpu_threads`) replay, since replay
    on one thread (about 10 ms a view) would starve the GPU; with a CPU teacher one thread, since
    the teacher's forward already keeps every core busy (97% of a shard's time).
    """
    if cfg.replay_threads > 0:
        return cfg.replay_threads
    return max(1, cpu_threads) if device.type == "cuda" else 1


def batches_ahead(
    jobs: list[Any], batch_size: int, fn: Callable[[Any], Any], threads: int
) -> Iterator[tuple[list[Any], list[Any]]]:
    """(batch of jobs, [fn(job) ...]) per batch, in order. With threads > 1 a pool computes the
    current and the next batch's results while the caller works on the one before."""
    batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
    if threads <= 1:
        for batch in batches:
            yield batch, [fn(j) for j in batch]
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="dpal-replay") as ex:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, [ex.submit(fn, j) for j in batch]))
            if len(pending) == 2:
                done, futures = pending.popleft()
                yield done, [f.result() for f in futures]
        while pending:
            done, futures = pending.popleft()
            yield done, [f.result() for f in futures]


@torch.inference_mode()
def teacher_targets(
    teacher: Teacher, v0: torch.Tensor, ic: torch.Tensor, device: torch.device, relation_rank: int = 0
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Teacher targets of a batch of views, numpy.

    Args:
        relation_rank: r of the relation factor (`--relation factor`); 0 for the logits.

    Returns:
        global (B, D) and local (B, P, D) float32, and the relation: {RELATION: (B, T, T) float32
        row-shifted logits}, or with a rank `relation_code`'s arrays.
    """
    with autocast_context(device):
        g, patches = teacher.encode_global(v0.to(device, non_blocking=True))
        if relation_rank:
            tokens = teacher.encode_crowd(ic.to(device, non_blocking=True))
        else:
            rel = teacher.relation_logits(ic.to(device, non_blocking=True))
    relation = (
        relation_code(tokens, relation_rank)
        if relation_rank
        else {RELATION: shift_rows(rel.float().cpu().numpy())}
    )
    return g.float().cpu().numpy(), patches.float().cpu().numpy(), relation


def _decode_rows(
    reader: StoreReader, start: int, stop: int, keys: np.ndarray, cfg: CacheConfig
) -> tuple[list[Any], list[Any], list[dict[str, Any]]]:
    """Rows [start, stop) of the corpus (`keys`: their keys), decoded: (images, (key, bytes, ext) for
    the image tar, skipped rows with their reason); a bad row is None in both lists (StrictModeError
    if strict)."""
    sources = reader.array(SOURCE)[start:stop]
    offsets = reader.array(SOURCE_OFFSET)[start:stop]
    sizes = reader.array(SOURCE_SIZE)[start:stop]
    rows = stop - start
    images: list[Any] = [None] * rows
    blobs: list[Any] = [None] * rows
    skipped = []
    for r in range(rows):
        key = str(keys[r])
        try:
            try:
                blob = read_bytes(str(sources[r]), int(offsets[r]), int(sizes[r]))
            except OSError as e:
                raise BadImage(f"unreadable: {e}") from None
            images[r] = decode_image(blob, cfg.max_pixels)
            blobs[r] = (key, blob, _image_ext(blob))
        except BadImage as e:
            if cfg.strict:
                raise StrictModeError(
                    f"bad image {key!r} ({e.reason}); rerun without --strict to skip it"
                ) from None
            skipped.append({"index": start + r, "key": key, "reason": e.reason})
    return images, blobs, skipped


def _targets(
    teacher: Teacher,
    cfg: CacheConfig,
    layout: Layout,
    start: int,
    keys: np.ndarray,
    images: list[Any],
    good: list[int],
    device: torch.device,
    replay_threads: int,
) -> tuple[np.ndarray, dict[str, np.ndarray], list[float]]:
    """The K views' parameters of each good row (rows, K, NUM_PARAMS), the teacher's targets on
    them (the layout's feature arrays: float32 but the relation factor's float16; zeros for bad
    rows) and, in a factor store, each view's mean row KL of its stored factor."""
    recipe: ViewRecipe = cfg.views
    rows, k_views = len(images), layout.num_views
    hw = {r: (images[r].height, images[r].width) for r in good}
    params = np.zeros((rows, k_views, NUM_PARAMS), dtype=np.float64)
    feats = {
        name: np.zeros(
            (rows, *shape[1:]), dtype=np.float32 if name in FEATURES else layout.feature_arrays()[name][0]
        )
        for name, shape in layout.feature_shapes().items()
    }
    kls: list[float] = []
    jobs = []
    for r in good:
        pool = [(start + b, hw[b]) for b in good if b != r] or [(start + r, hw[r])]
        for k in range(k_views):
            params[r, k] = sample_view(recipe, cfg.seed, str(keys[r]), k, hw[r], pool)
            jobs.append((r, k))

    def replay_job(job: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        r, k = job
        return replay(recipe, params[r, k], images[r], images[background_index(params[r, k]) - start])

    for batch, views in batches_ahead(jobs, cfg.batch_size, replay_job, replay_threads):
        v0s, ics = zip(*views, strict=True)
        g, loc, rel = teacher_targets(
            teacher, torch.stack(v0s), torch.stack(ics), device, layout.relation_rank
        )
        kls += rel.pop(RELATION_KL, np.empty(0)).tolist()
        for j, (r, k) in enumerate(batch):
            feats[GLOBAL][r, k], feats[LOCAL][r, k] = g[j], loc[j]
            for name, values in rel.items():
                feats[name][r, k] = values[j]
    return params, feats, kls


def cache_shard(
    store_path: str | Path,
    shard: int,
    teacher: Teacher,
    cfg: CacheConfig,
    device: torch.device | str = "cpu",
    replay_threads: int = 1,
) -> ShardReport:
    """Cache one store shard: decode, sample views, run the teacher, write, mark done.

    Args:
        store_path: an initialised store (see `pipeline.prepare.prepare_store`).
        shard: shard index.
        teacher: the loaded teacher (one per worker, never shipped in a task).
        cfg: the run's config (recipe, seed, K, batch size, strictness).
        device: where the teacher runs.
        replay_threads: threads replaying the next batches' views while the teacher runs
            (`replay_threads_for`); the shard's contents do not depend on it.

    Raises:
        StrictModeError: a bad image while `cfg.strict`.
    """
    t0 = time.perf_counter()
    store_path = Path(store_path)
    device = torch.device(device)
    reader = StoreReader(store_path, allow_incomplete=True)
    layout = reader.layout
    start, stop = layout.shard_range(shard)
    if marker_path(store_path, shard).exists():
        return ShardReport(shard, stop - start, 0, 0, 0.0, already_done=True)
    rows = stop - start
    keys = reader.array(KEYS)[start:stop]
    images, blobs, skipped = _decode_rows(reader, start, stop, keys, cfg)  # keys read once per shard
    good = [r for r in range(rows) if images[r] is not None]
    params, feats, kls = _targets(teacher, cfg, layout, start, keys, images, good, device, replay_threads)
    valid = np.zeros(rows, dtype=np.uint8)
    valid[good] = 1
    data = ShardData(
        shard=shard,
        features=feats,
        params=params,
        valid=valid,
        images=blobs,
        skipped=skipped,
        seconds=time.perf_counter() - t0,
        # the mean over the shard's views of each view's mean row KL (store info shows it)
        stats={RELATION_KL: float(np.mean(kls)) if kls else None} if layout.relation_rank else {},
    )
    try:
        write_shard(store_path, data)
    except OSError as e:
        if is_disk_full(e):  # the shard has no marker, so a rerun writes it again whole
            raise DiskFullError(disk_full_message(store_path, f"shard {shard}", e)) from None
        raise
    return ShardReport(shard, rows, len(good), len(skipped), time.perf_counter() - t0)
