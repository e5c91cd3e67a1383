"""Stage one's dry run (`dpal cache-teacher --dry-run`): time the teacher on a few images and size
the store for this corpus, K and codecs, without writing anything.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from dpal.common import resolve_device
from dpal.config import CacheConfig
from dpal.corpus import index_corpus
from dpal.pipeline.cache import teacher_spec, teacher_targets
from dpal.store import Layout, StoreError, TokenGrid
from dpal.store.relation import relation_rank
from dpal.teachers import load_teacher, qkv_std_ratio
from dpal.views import background_index, replay, sample_view


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
            cfg.views, cfg.seed, key, 0, (im.height, im.width), [b for b in pool if b[0] != i] or pool
        )
        v0, ic = replay(cfg.views, p, im, imgs[background_index(p)][1])
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
    grid = TokenGrid.of(cfg.views, teacher.patch_size)
    rank = relation_rank(cfg.relation, cfg.relation_rank, grid.num_crowd_tokens)
    teacher_targets(teacher, v0[:2], ic[:2], device, rank)  # warm up
    t0 = time.perf_counter()
    teacher_targets(teacher, v0, ic, device, rank)
    per_view = (time.perf_counter() - t0) / len(v0)
    layout = Layout(
        len(refs), cfg.num_views, cfg.shard_size, teacher.embed_dim, grid.num_patches, grid.num_crowd_tokens,
        cfg.dtype, rank,
    )  # fmt: skip
    image_bytes = _image_bytes(cfg, refs)
    views = len(refs) * cfg.num_views
    workers = 1 if cfg.shards else (cfg.slurm.jobs if cfg.use_slurm else cfg.workers)
    return {
        "teacher": teacher.identity(),
        "device": str(device),
        "num_images": len(refs),
        "num_views": cfg.num_views,
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
