"""Stage one's store preparation: index the corpus and check --out before the teacher loads
(`check_inputs`), then create the store, or check that an existing one was made by the same command
(`prepare_store`). `store_meta` is what the store holds: its identity, its codecs (whose schema
version the store takes) and the run settings that change stored values (`value_settings`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from dpal.common import resolve_device
from dpal.config import CacheConfig, stored_keys, to_dict
from dpal.corpus import Corpus, scan_corpus
from dpal.pipeline.cache import DiskFullError, StrictModeError, disk_full_message, is_disk_full
from dpal.store import (
    Layout,
    StoreError,
    StoreMeta,
    TeacherIdentity,
    TokenGrid,
    corpus_fingerprint,
    create_store,
    identity_diff,
    read_attrs,
)
from dpal.store.codecs import schema_for
from dpal.store.relation import relation_rank
from dpal.teachers import Teacher

logger = logging.getLogger(__name__)
MAX_LOGGED_PROBLEMS = 20  # corpus problems logged one line each; the store records all


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
    grid = TokenGrid.of(cfg.views, teacher.patch_size)
    rank = relation_rank(cfg.relation, cfg.relation_rank, grid.num_crowd_tokens)
    return StoreMeta(
        teacher=TeacherIdentity.from_attrs(teacher.identity(), "teacher identity"),
        recipe=cfg.views,
        token_grid=grid,
        seed=cfg.seed,
        num_views=cfg.num_views,
        num_images=num_images,
        shard_size=cfg.shard_size,
        dtype=cfg.dtype,
        embed_dim=teacher.embed_dim,
        corpus=cfg.corpus,
        corpus_fingerprint=fingerprint,
        embed_images=cfg.embed_images,
        value_settings=value_settings(cfg),
        config=stored_keys(CacheConfig, to_dict(cfg)),  # the attribute's spelling (config_load.RENAMED)
        corpus_problems=corpus_problems,
        relation_rank=rank,
        schema_version=schema_for(cfg.dtype, rank),
    )


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
