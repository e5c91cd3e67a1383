"""Writing a store: `create_store` makes the empty store atomically (arrays, index, attributes,
the integrity checksums, and a rotated codec's R), `write_shard` writes one store shard (each array
in one assignment, encoded by the store's codec) and then its marker, and `mark_complete_if_done`
flips `complete` once every shard is done.

Store shard s holds images [s * S, min((s + 1) * S, N)). It is written by exactly one writer and is
done when its marker exists.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import zarr

from dpal.corpus import ImageRef, sha256_file
from dpal.store.files import (
    _init_prefix,
    atomic_write_bytes,
    remove_all_temporaries,
    remove_shard_temporaries,
    remove_stale_init_dirs,
)
from dpal.store.integrity import (
    TOKEN_ERROR,
    VALUE_CRC32C,
    _array_metadata_files,
    _attrs_sha256,
    crc32c_of,
    done_shards,
    index_crc32c,
    marker_path,
    row_crc32c,
    shard_name,
)
from dpal.store.layout import Layout, _open_rw, create_arrays
from dpal.store.meta import StoreMeta
from dpal.store.read import _load_attrs
from dpal.store.rotation import create_rotation, read_token_rotation
from dpal.store.schema import (
    FEATURES,
    GLOBAL,
    IMAGE_OFFSET,
    IMAGE_SIZE,
    IMAGES_DIR,
    INDEX_ARRAYS,
    INTEGRITY,
    KEYS,
    LOCAL,
    MARKERS_DIR,
    PARAMS,
    SCALE_SUFFIX,
    SOURCE,
    SOURCE_OFFSET,
    SOURCE_SIZE,
    TOKEN_ROTATION,
    VALID,
)


def create_store(path: Path, meta: StoreMeta, refs: list[ImageRef]) -> None:
    """Create an empty store atomically: build it in a temporary folder, then rename it into place.
    Its attributes are `meta.to_attrs()` (written as not complete) plus the integrity checksums.

    If another process created `path` first (SLURM array jobs starting together), this is a no-op
    and the caller validates the existing store.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_init_dirs(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_init_prefix(path)))
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        create_arrays(group, meta.layout)
        _open_rw(tmp, KEYS)[:] = np.array([r.key for r in refs], dtype=object)
        _open_rw(tmp, SOURCE)[:] = np.array([r.source for r in refs], dtype=object)
        _open_rw(tmp, SOURCE_OFFSET)[:] = np.array([r.offset for r in refs], dtype=np.int64)
        _open_rw(tmp, SOURCE_SIZE)[:] = np.array([r.size for r in refs], dtype=np.int64)
        checked = list(INDEX_ARRAYS)
        if meta.layout.rotated:  # R exists once: created here, before the rename that publishes the store
            create_rotation(tmp, group, meta.embed_dim, meta.seed)
            checked.append(TOKEN_ROTATION)
        (tmp / MARKERS_DIR).mkdir()
        (tmp / IMAGES_DIR).mkdir()
        group.attrs.update(meta.to_attrs() | {"complete": False})
        group.attrs[INTEGRITY] = {
            "attrs_sha256": _attrs_sha256(group.attrs.asdict()),
            "array_metadata_sha256": {f.parent.name: sha256_file(f) for f in _array_metadata_files(tmp)},
            "index_crc32c": {name: index_crc32c(_open_rw(tmp, name)[:]) for name in checked},
        }
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "zarr.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class ShardData:
    """Everything one store shard holds, assembled in memory by its single writer.

    Arrays cover the shard's rows [start, stop); skipped rows are zeros with valid = 0.
    """

    shard: int
    features: dict[str, np.ndarray]  # name -> float32 (rows, K, ...)
    params: np.ndarray  # (rows, K, NUM_PARAMS) float64
    valid: np.ndarray  # (rows,) uint8
    images: list[tuple[str, bytes, str] | None]  # per row: (key, bytes, ext) or None
    skipped: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    """Measurements the marker records beside the data (`relation_kl` of a factor store)."""


def _chunk_files(root: Path, name: str, ndim: int, shard: int) -> list[Path]:
    return [root / name / "c" / "/".join([str(shard)] + ["0"] * (ndim - 1))]


def _image_tar(
    images: list[tuple[str, bytes, str] | None], start: int
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A shard's images as a WebDataset tar, and each row's byte offset and size in it (-1 for a
    skipped row). `start` is the shard's first store row."""
    offsets = np.full(len(images), -1, dtype=np.int64)
    sizes = np.full(len(images), -1, dtype=np.int64)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for row, item in enumerate(images):
            if item is None:
                continue
            key, blob, ext = item
            # WebDataset sample: __key__ is the store index (keys must not contain dots).
            wkey = f"{start + row:09d}"
            for member, payload in ((f"{wkey}.{ext}", blob), (f"{wkey}.key.txt", key.encode())):
                info = tarfile.TarInfo(member)
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tf.addfile(info, io.BytesIO(payload))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        for m in tf:
            if not m.name.endswith(".key.txt"):
                row = int(m.name.split(".", 1)[0]) - start
                offsets[row], sizes[row] = m.offset_data, m.size
    return raw, offsets, sizes


def _write_features(
    path: Path, layout: Layout, data: ShardData, files: list[Path], crcs: dict[str, str]
) -> dict[str, float]:
    """Write a shard's feature arrays (and scales), appending their chunk files to `files` and each
    array's `row_crc32c` to `crcs`; returns the mean relative int8 error of the global and local
    tokens of its cached rows (the codecs that measure it: int8, int8-rotated)."""
    start, stop = layout.shard_range(data.shard)
    # every writer uses the R stored when the store was created (never one of its own)
    rotation = read_token_rotation(path, _load_attrs(path), layout.embed_dim) if layout.rotated else None
    errors: dict[str, float] = {}
    good = np.flatnonzero(data.valid)
    for name, (storage, _) in layout.feature_arrays().items():
        if name in FEATURES:
            codec = layout.codec(name)
            x = np.asarray(data.features[name], dtype=np.float32)
            stored, scale = codec.encode(x, rotation)
            error = codec.token_error(x, stored, scale, good, rotation) if name in (GLOBAL, LOCAL) else None
            if error is not None:
                errors[name] = error
        else:  # the relation factor and diagonal: already what is stored (float16 Z, float32 diagonal)
            stored, scale = np.asarray(data.features[name], dtype=storage), None
        _open_rw(path, name)[start:stop] = stored
        files += _chunk_files(path, name, stored.ndim, data.shard)
        crcs[name] = row_crc32c(stored)
        if scale is not None:
            _open_rw(path, name + SCALE_SUFFIX)[start:stop] = scale
            files += _chunk_files(path, name + SCALE_SUFFIX, scale.ndim, data.shard)
            crcs[name + SCALE_SUFFIX] = row_crc32c(scale)
    return errors


def write_shard(path: Path, data: ShardData) -> dict[str, Any]:
    """Write one store shard (each array in one assignment), then its marker. Returns the marker."""
    path = Path(path)
    meta = StoreMeta.from_attrs(zarr.open_group(path, mode="r").attrs.asdict(), path)
    layout = meta.layout
    start, stop = layout.shard_range(data.shard)
    remove_shard_temporaries(path, data.shard)  # a killed earlier writer's
    files: list[Path] = []
    offsets = np.full(stop - start, -1, dtype=np.int64)
    sizes = np.full(stop - start, -1, dtype=np.int64)
    if meta.embed_images:
        tar_path = path / IMAGES_DIR / f"{shard_name(data.shard)}.tar"
        raw, offsets, sizes = _image_tar(data.images, start)
        atomic_write_bytes(tar_path, raw)
        files.append(tar_path)
    crcs: dict[str, str] = {}
    errors = _write_features(path, layout, data, files, crcs)
    shard_arrays = {
        PARAMS: np.asarray(data.params, dtype=np.float64),
        VALID: np.asarray(data.valid, dtype=np.uint8),
        IMAGE_OFFSET: offsets,
        IMAGE_SIZE: sizes,
    }
    for name, arr in shard_arrays.items():
        _open_rw(path, name)[start:stop] = arr
        files += _chunk_files(path, name, arr.ndim, data.shard)
    marker = (
        {
            "shard": data.shard,
            "start": start,
            "stop": stop,
            "num_cached": int(data.valid.sum()),
            "skipped": data.skipped,
            "seconds": round(data.seconds, 3),
            "files": {f.relative_to(path).as_posix(): sha256_file(f) for f in files},
            # What readers check cheaply on every open and image read (schema 2): the rows' values
            # of each per-shard array, and each cached image's bytes (null for a skipped row).
            "crc32c": {name: crc32c_of(arr) for name, arr in shard_arrays.items()},
            "image_crc32c": [
                None if item is None else int(google_crc32c.value(item[1])) for item in data.images
            ],
            # the values of each (row, view) of every target array, checked wherever they are read
            VALUE_CRC32C: crcs,
        }
        | ({TOKEN_ERROR: errors} if errors else {})
        | data.stats
    )
    atomic_write_bytes(marker_path(path, data.shard), json.dumps(marker, indent=1).encode())
    return marker


def mark_complete_if_done(path: Path) -> bool:
    """Set the `complete` attribute once every shard has its marker; returns the flag."""
    group = zarr.open_group(path, mode="r+")
    n = StoreMeta.from_attrs(group.attrs.asdict(), path).num_shards
    done = len(done_shards(path) & set(range(n))) == n
    if done and not group.attrs.get("complete"):
        group.attrs["complete"] = True
    if done:
        remove_all_temporaries(path)
    return done
