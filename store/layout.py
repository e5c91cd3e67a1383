"""A store's shapes and chunking: `Layout` (what each array holds, from the store's attributes and
its codecs) and the creation of its empty Zarr arrays (`create_arrays`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from dpal.store.codecs import RelationCodec, TargetCodec, relation_codec, target_codec
from dpal.store.schema import (
    FEATURES,
    GLOBAL,
    IMAGE_OFFSET,
    IMAGE_SIZE,
    KEYS,
    LOCAL,
    PARAMS,
    RELATION,
    SCALE_SUFFIX,
    SOURCE,
    SOURCE_OFFSET,
    SOURCE_SIZE,
    VALID,
)
from dpal.views import NUM_PARAMS


@dataclass(frozen=True)
class Layout:
    """Shapes of one store. P patches and T crowd tokens follow the student's patch grid."""

    num_images: int
    num_views: int
    shard_size: int
    embed_dim: int
    num_patches: int
    num_crowd_tokens: int
    dtype: str
    relation_rank: int = 0
    """r of the relation factor; 0: the relation is stored as T x T logits (schema 1, 2)."""

    @property
    def relation_codec(self) -> str:
        return self.relation.name

    @property
    def relation(self) -> RelationCodec:
        return relation_codec(self.relation_rank)

    def codec(self, feature: str) -> TargetCodec:
        """The target codec of FEATURES array `feature` (the relation logits may have their own)."""
        codec = target_codec(self.dtype)
        return target_codec(codec.relation) if feature == RELATION and codec.relation else codec

    def feature_arrays(self) -> dict[str, tuple[str, bool]]:
        """Each feature array's storage dtype, and whether it has a float32 `_scale` array."""
        codec = target_codec(self.dtype)
        out = {name: (codec.storage, codec.scaled) for name in (GLOBAL, LOCAL)}
        rel = self.relation.arrays(self.num_crowd_tokens, self.relation_rank, self.dtype)
        return out | {name: (storage, scaled) for name, (_, storage, scaled) in rel.items()}

    @property
    def rotated(self) -> bool:
        """Whether GLOBAL and LOCAL are stored through the store's rotation R (int8-rotated)."""
        return target_codec(self.dtype).rotated

    def feature_dtype(self, name: str) -> str:
        """The codec name feature array `name` is encoded with: the relation logits of an
        int8-rotated store are plain int8 (R is D x D; the logits are T x T)."""
        return self.codec(name).name

    def rotation_bytes(self) -> int:
        """Bytes of R, stored once per store (0 unless rotated); not in `bytes_per_view`."""
        return self.embed_dim * self.embed_dim * 4 if self.rotated else 0

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        n, k, d, p = self.num_images, self.num_views, self.embed_dim, self.num_patches
        rel = self.relation.arrays(self.num_crowd_tokens, self.relation_rank, self.dtype)
        return {GLOBAL: (n, k, d), LOCAL: (n, k, p, d)} | {
            name: (n, k, *shape) for name, (shape, _, _) in rel.items()
        }

    def bytes_per_view(self) -> int:
        """Bytes of targets per cached view, scales and parameters included."""
        n = NUM_PARAMS * 8
        for name, shape in self.feature_shapes().items():
            tokens = int(np.prod(shape[2:-1]))
            if name in FEATURES:  # as its codec declares: values and scales
                n += tokens * self.codec(name).value_bytes(shape[-1])
            else:  # the relation factor's arrays, stored as they are
                n += tokens * shape[-1] * np.dtype(self.feature_arrays()[name][0]).itemsize
        return n


def _open_rw(path: Path, name: str) -> zarr.Array:
    # write_empty_chunks is a runtime setting, not metadata: a chunk equal to the fill value (a
    # shard of skipped images, offsets of -1) must still be written, or readers would see it missing.
    return zarr.open_array(Path(path) / name, mode="r+", config={"write_empty_chunks": True})


def create_arrays(group: zarr.Group, layout: Layout) -> None:
    s, k = layout.shard_size, layout.num_views
    cfg = {"write_empty_chunks": True}
    for name, shape in layout.feature_shapes().items():
        storage, scaled = layout.feature_arrays()[name]
        # One Zarr shard per store shard; one inner chunk per (image, view) so that stage two reads
        # single views without touching the rest of the shard.
        # No compression (float16 tokens gain at most ~1.15x), but a crc32c per inner chunk, so
        # that a flipped byte fails the read instead of training on wrong targets.
        group.create_array(
            name,
            shape=shape,
            dtype=storage,
            shards=(s, k, *shape[2:]),
            chunks=(1, 1, *shape[2:]),
            compressors=[Crc32cCodec()],
            fill_value=0,
            config=cfg,
        )
        if scaled:
            sshape = shape[:-1]
            group.create_array(
                name + SCALE_SUFFIX,
                shape=sshape,
                dtype="float32",
                shards=(s, k, *sshape[2:]),
                chunks=(1, 1, *sshape[2:]),
                compressors=[Crc32cCodec()],
                fill_value=0,
                config=cfg,
            )
    n = layout.num_images
    group.create_array(
        PARAMS,
        shape=(n, k, NUM_PARAMS),
        dtype="float64",
        chunks=(s, k, NUM_PARAMS),
        compressors=[ZstdCodec(level=3, checksum=True)],
        fill_value=0,
        config=cfg,
    )
    for name in (VALID,):
        group.create_array(name, shape=(n,), dtype="uint8", chunks=(s,), fill_value=0, config=cfg)
    for name in (IMAGE_OFFSET, IMAGE_SIZE, SOURCE_OFFSET, SOURCE_SIZE):
        group.create_array(name, shape=(n,), dtype="int64", chunks=(s,), fill_value=-1, config=cfg)
    for name in (KEYS, SOURCE):
        group.create_array(name, shape=(n,), dtype=str, chunks=(s,), config=cfg)
