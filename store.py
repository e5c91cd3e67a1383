"""The teacher store: the on-disk contract between stage one (writer) and stage two (reader).

The store's modules alone spell its layout: `store_schema.py` the schema (`SCHEMA_VERSION`, array
names, dtypes, shapes, and the group attributes as a typed `StoreMeta`), this module the chunking,
the checksums, and the writing and reading. Every name of `store_schema` is importable from here.
A store is a Zarr v3 group plus two folders:

    STORE/zarr.json            group attributes (identity, recipe, dtype, grid, complete flag)
    STORE/<array>/...          Zarr v3 arrays, one Zarr shard file per store shard
    STORE/images/000012.tar    WebDataset tar of shard 12's source images (unless not embedded)
    STORE/shards/000012.json   shard 12's marker: written atomically after all its data

Store shard s holds images [s * S, min((s + 1) * S, N)). It is written by exactly one writer,
each array in one assignment, and is done when its marker exists. Readers refuse other schema
versions, incomplete stores (unless asked) and missing chunks (they raise, never read zeros).
docs/store.md documents the schema and keeps the changelog.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch
import zarr
from torch import Tensor
from zarr.codecs import Crc32cCodec, ZstdCodec

from dpal.codec import (
    RelationCode,
    check_relation_code,
    check_rotation,
    int8_token_error,
    rebuild_logits,
    rotate_tokens,
    token_rotation,
)
from dpal.corpus import ImageRef, read_bytes, sha256_file
from dpal.store_schema import (
    CHECKED_SHARD_ARRAYS,
    FACTOR_DTYPE,
    FEATURES,
    GLOBAL,
    IDENTITY_ATTRS,
    IMAGE_OFFSET,
    IMAGE_SIZE,
    IMAGES_DIR,
    INDEX_ARRAYS,
    INT8_DTYPES,
    INTEGRITY,
    KEYS,
    LOCAL,
    MARKERS_DIR,
    PARAMS,
    RELATION,
    RELATION_DIAG,
    RELATION_FACTOR,
    ROTATED_DTYPE,
    ROTATED_FEATURES,
    SCALE_SUFFIX,
    SOURCE,
    SOURCE_OFFSET,
    SOURCE_SIZE,
    TOKEN_ROTATION,
    VALID,
    Layout,
    StoreError,
    StoreMeta,
    check_header,
)
from dpal.store_schema import DTYPES as DTYPES  # noqa: F401 - the names below are re-exported: `dpal.store`
from dpal.store_schema import FACTOR_SCHEMA as FACTOR_SCHEMA
from dpal.store_schema import FORMAT as FORMAT  # is where callers find the whole contract
from dpal.store_schema import READABLE_SCHEMAS as READABLE_SCHEMAS
from dpal.store_schema import ROTATED_SCHEMA as ROTATED_SCHEMA
from dpal.store_schema import SCHEMA_VERSION as SCHEMA_VERSION
from dpal.store_schema import SHARD_ARRAYS as SHARD_ARRAYS
from dpal.store_schema import Preprocessing as Preprocessing
from dpal.store_schema import TeacherIdentity as TeacherIdentity
from dpal.store_schema import TokenGrid as TokenGrid
from dpal.views import NUM_PARAMS

_UNCHECKED_ATTRS = ("complete", INTEGRITY)  # attributes the integrity checksum leaves out
# A marker's mean relative error of the int8 tokens of its cached views, measured while writing:
# {"global": e, "local": e}, ||x - decoded|| / ||x|| per token (int8 and int8-rotated stores)
TOKEN_ERROR = "token_error"
# A marker's crc32c of each (row, view) of every target array as stored (`row_crc32c`), compared
# wherever values are read: a value written through zarr after stage one (every chunk checksum then
# valid) is caught. Markers of stores written before dpal recorded it lack it: those read unchecked.
VALUE_CRC32C = "value_crc32c"


def shard_name(shard: int) -> str:
    return f"{shard:06d}"


def corpus_fingerprint(refs: list[ImageRef]) -> str:
    h = hashlib.sha256()
    for r in refs:
        h.update(f"{r.key}\x00{r.offset}\x00{r.size}\n".encode())
    return h.hexdigest()


def crc32c_of(values: np.ndarray) -> int:
    """crc32c of an array's values (little-endian bytes, C order): what a marker records and a
    reader recomputes from what Zarr returns, independent of how the chunk is encoded."""
    a = np.ascontiguousarray(values)
    return int(google_crc32c.value(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a shared store must stay readable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- encoding


def encode(
    x: np.ndarray, dtype: str, rotation: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 (..., C) -> stored array (and, for int8, a per-token float32 scale (...,)).
    int8-rotated is int8 of x @ R: `rotation` is the store's R (D, D)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == ROTATED_DTYPE:
        if rotation is None:
            raise ValueError("int8-rotated needs the store's rotation R")
        return encode(rotate_tokens(x, rotation), "int8")
    if dtype == "float32":
        return x, None
    if dtype == "float16":
        return x.astype(np.float16), None
    if dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16), None
    if dtype == "int8":
        amax = np.abs(x).max(axis=-1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
        return q, scale
    raise ValueError(f"unknown dtype {dtype!r}; choose one of {DTYPES}")


def decode(
    data: np.ndarray, scale: np.ndarray | None, dtype: str, rotation: np.ndarray | None = None
) -> Tensor:
    """Stored array -> float32 tensor (inverse of `encode`); int8-rotated: (q * scale) @ R^T."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16).float()
    if dtype == ROTATED_DTYPE:
        if rotation is None:
            raise ValueError("int8-rotated needs the store's rotation R")
        return decode(data, scale, "int8") @ torch.from_numpy(rotation).T
    if dtype == "int8":
        return torch.from_numpy(data.astype(np.float32) * scale[..., None])
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))


def _raw_tensor(data: np.ndarray, dtype: str) -> Tensor:
    """A stored array as a tensor of the stored dtype (bfloat16's uint16 bits as torch.bfloat16)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(data))


# the exponent bits that are all ones in a NaN or an infinity, by stored dtype: a test of the bits
# is 4.5x faster than np.isfinite on float16, which converts every value first (docs/benchmarks.md)
_NONFINITE_BITS = {
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),
    "float32": (np.uint32, 0x7F800000),
}


def nonfinite_rows(data: np.ndarray, dtype: str = "") -> np.ndarray:
    """Indices of the rows (first axis) of a stored array that hold a NaN or an infinity: float16
    and float32 arrays, and bfloat16's uint16 bits (`dtype` "bfloat16"), by their exponent bits;
    int8 has none."""
    kind = "bfloat16" if dtype == "bfloat16" else str(data.dtype)
    if kind not in _NONFINITE_BITS:
        return np.empty(0, dtype=np.int64)
    bits, mask = _NONFINITE_BITS[kind]
    flat = np.ascontiguousarray(data).view(bits).reshape(len(data), -1)
    return np.flatnonzero(((flat & bits(mask)) == bits(mask)).any(axis=1))


def shift_rows(logits: np.ndarray) -> np.ndarray:
    """Subtract each row's max. softmax_row is unchanged; values become <= 0, which keeps the
    largest (most probable) logits precise in float16 and int8."""
    return logits - logits.max(axis=-1, keepdims=True)


# ---------------------------------------------------------------- layout


def _open_rw(path: Path, name: str) -> zarr.Array:
    # write_empty_chunks is a runtime setting, not metadata: a chunk equal to the fill value (a
    # shard of skipped images, offsets of -1) must still be written, or readers would see it missing.
    return zarr.open_array(Path(path) / name, mode="r+", config={"write_empty_chunks": True})


def _create_arrays(group: zarr.Group, layout: Layout) -> None:
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


def _create_rotation(root: Path, group: zarr.Group, meta: StoreMeta) -> None:
    """R of an int8-rotated store (`codec.token_rotation` of D and the store's seed), one chunk
    with a crc32c; its values' crc32c goes into `integrity` with the index arrays'."""
    d = meta.embed_dim
    group.create_array(
        TOKEN_ROTATION,
        shape=(d, d),
        dtype="float32",
        chunks=(d, d),
        compressors=[Crc32cCodec()],
        fill_value=0,
    )
    _open_rw(root, TOKEN_ROTATION)[:] = token_rotation(d, meta.seed)


def read_token_rotation(path: Path, attrs: dict[str, Any], embed_dim: int) -> np.ndarray:
    """An int8-rotated store's R (D, D) float32, checked: its crc32c against the one recorded when
    the store was created, and finite and orthogonal (`codec.check_rotation`).

    Raises:
        StoreError: R is missing, unreadable or damaged; one line.
    """
    where = f"{path}: the token rotation ({TOKEN_ROTATION})"
    fix = "restore the store from a copy, or rebuild it with `dpal cache-teacher --out NEW`"
    want = attrs.get(INTEGRITY, {}).get("index_crc32c", {}).get(TOKEN_ROTATION)
    try:
        rotation = zarr.open_array(
            Path(path) / TOKEN_ROTATION, mode="r", config={"read_missing_chunks": False}
        )[:]
    except Exception as e:  # noqa: BLE001 - missing, or a chunk whose crc32c fails
        raise StoreError(
            f"{where} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {fix}"
        ) from None
    if want is None or index_crc32c(rotation) != want:
        raise StoreError(f"{where} does not match the checksum recorded when the store was created; {fix}")
    check_rotation(rotation, embed_dim, where)
    return rotation


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
        _create_arrays(group, meta.layout)
        _open_rw(tmp, KEYS)[:] = np.array([r.key for r in refs], dtype=object)
        _open_rw(tmp, SOURCE)[:] = np.array([r.source for r in refs], dtype=object)
        _open_rw(tmp, SOURCE_OFFSET)[:] = np.array([r.offset for r in refs], dtype=np.int64)
        _open_rw(tmp, SOURCE_SIZE)[:] = np.array([r.size for r in refs], dtype=np.int64)
        checked = list(INDEX_ARRAYS)
        if meta.layout.rotated:  # R exists once: created here, before the rename that publishes the store
            _create_rotation(tmp, group, meta)
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


# ---------------------------------------------------------------- temporary files of killed writers
# A writer killed between creating a temporary file and renaming it leaves the file behind: the
# store-init folder (create_store), an image tar or marker (atomic_write_bytes: .NAME.*.tmp) and
# Zarr's chunk and zarr.json writes (NAME.<uuid>.partial). Each is removed where no live writer can
# own it: a shard's by that shard's single writer before it writes, all of them once every shard
# is done, and an init folder once the process that made it is dead.


def _init_prefix(path: Path) -> str:
    # host and pid in the name: a later run can tell a dead creator's folder from a live one's
    return f".{path.name}.init-{socket.gethostname()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_init_dirs(path: Path) -> list[Path]:
    """Remove the store-init folders of `path` left by dead processes on this host; returns them."""
    path = Path(path)
    prefix = f".{path.name}.init-{socket.gethostname()}-"
    removed = []
    for d in path.parent.glob(f".{path.name}.init-*"):
        pid = d.name[len(prefix) :].split("-", 1)[0] if d.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _remove(files: list[Path]) -> list[Path]:
    for f in files:
        f.unlink(missing_ok=True)
    return files


def remove_shard_temporaries(path: Path, shard: int) -> list[Path]:
    """Temporary files of shard `shard` (its image tar, marker and chunk files); only its single
    writer may call this. Returns what was removed."""
    path = Path(path)
    name = shard_name(shard)
    found = [
        *(path / IMAGES_DIR).glob(f".{name}.tar.*.tmp"),
        *(path / MARKERS_DIR).glob(f".{name}.json.*.tmp"),
    ]
    for array in path.glob("*/zarr.json"):
        chunk_dir = array.parent / "c"
        found += chunk_dir.glob(f"{shard}.*.partial")  # 1-D arrays: c/<s>
        if (chunk_dir / str(shard)).is_dir():
            found += (chunk_dir / str(shard)).rglob("*.partial")  # sharded arrays: c/<s>/0/...
    return _remove(found)


def remove_all_temporaries(path: Path, min_age_s: float = 60.0) -> list[Path]:
    """Every temporary file in a store whose shards are all done. zarr.json writes (the
    `complete` flag) may belong to a live process finishing at the same time: only those older
    than `min_age_s` go."""
    path = Path(path)
    found = [
        *(path / IMAGES_DIR).glob(".*.tmp"),
        *(path / MARKERS_DIR).glob(".*.tmp"),
        *path.glob("*/c/**/*.partial"),
    ]
    now = time.time()
    found += [
        f
        for f in (*path.glob("zarr.*.partial"), *path.glob("*/zarr.*.partial"))
        if now - f.stat().st_mtime > min_age_s
    ]
    remove_stale_init_dirs(path)
    return _remove(found)


def _attrs_sha256(attrs: dict[str, Any]) -> str:
    kept = {k: v for k, v in attrs.items() if k not in _UNCHECKED_ATTRS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _array_metadata_files(path: Path) -> list[Path]:
    return sorted(Path(path).glob("*/zarr.json"))


def index_crc32c(values: np.ndarray) -> int:
    """crc32c of an index array's values; strings (keys, sources) as their JSON list."""
    if values.dtype.kind in "OUT":
        return int(google_crc32c.value(json.dumps([str(v) for v in values]).encode()))
    return crc32c_of(values)


def metadata_problems(path: Path, attrs: dict[str, Any]) -> list[str]:
    """What differs between the store's own metadata and the checksums recorded when it was made:
    the attributes and every array's zarr.json (empty for a schema-1 store, which has none)."""
    sums = attrs.get(INTEGRITY)
    if sums is None:
        return [] if attrs.get("schema_version") == 1 else ["zarr.json: the attribute 'integrity' is missing"]
    out = []
    if _attrs_sha256(attrs) != sums.get("attrs_sha256"):
        out.append("zarr.json: the store's attributes changed since it was created")
    recorded = sums.get("array_metadata_sha256", {})
    on_disk = {f.parent.name: f for f in _array_metadata_files(path)}
    for name in sorted(set(recorded) | set(on_disk)):
        if name not in on_disk:
            out.append(f"{name}/zarr.json missing")
        elif name not in recorded:
            out.append(f"{name}/zarr.json is not an array of this store")
        elif sha256_file(on_disk[name]) != recorded[name]:
            out.append(f"{name}/zarr.json changed since the store was created")
    return out


def _with_defaults(teacher: dict[str, Any]) -> dict[str, Any]:
    try:
        return TeacherIdentity.from_attrs(teacher).to_attrs()
    except StoreError:  # malformed: compared as it is (the store's own read names the field)
        return teacher


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two stores' identity attributes."""
    out = []
    for k in IDENTITY_ATTRS:
        a, b = old.get(k), new.get(k)
        if k == "teacher" and isinstance(a, dict) and isinstance(b, dict):
            # The checkpoint's sha256 identifies it; its path may move between machines. Fields
            # added later (input_scale, target_grid) compare with their defaults where absent.
            a, b = ({kk: v for kk, v in _with_defaults(x).items() if kk != "checkpoint"} for x in (a, b))
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{k}.{sub}: store has {a.get(sub)!r}, this run has {b.get(sub)!r}")
        else:
            out.append(f"{k}: store has {a!r}, this run has {b!r}")
    return out


# ---------------------------------------------------------------- shard writing


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


def row_crc32c(stored: np.ndarray) -> str:
    """The crc32c of each (row, view) of a stored feature array (rows, K, ...), as a marker records
    them (`VALUE_CRC32C`): hex of little-endian uint32, row-major (rows, K)."""
    crcs = np.array([[crc32c_of(stored[r, k]) for k in range(stored.shape[1])] for r in range(len(stored))])
    return crcs.astype("<u4").tobytes().hex()


def _write_features(
    path: Path, layout: Layout, data: ShardData, files: list[Path], crcs: dict[str, str]
) -> dict[str, float]:
    """Write a shard's feature arrays (and scales), appending their chunk files to `files` and each
    array's `row_crc32c` to `crcs`; returns the mean relative int8 error of the global and local
    tokens of its cached rows (int8 dtypes)."""
    start, stop = layout.shard_range(data.shard)
    # every writer uses the R stored when the store was created (never one of its own)
    rotation = read_token_rotation(path, _load_attrs(path), layout.embed_dim) if layout.rotated else None
    errors: dict[str, float] = {}
    good = np.flatnonzero(data.valid)
    for name, (storage, _) in layout.feature_arrays().items():
        if name in FEATURES:
            x = np.asarray(data.features[name], dtype=np.float32)
            if rotation is not None and name in ROTATED_FEATURES:
                x = rotate_tokens(x, rotation)
            stored, scale = encode(x, "int8" if rotation is not None else layout.dtype)
            if layout.dtype in INT8_DTYPES and name in ROTATED_FEATURES:  # in R's basis: the same error
                errors[name] = int8_token_error(x, stored, scale, good)
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


def marker_path(path: Path, shard: int) -> Path:
    return Path(path) / MARKERS_DIR / f"{shard_name(shard)}.json"


def done_shards(path: Path) -> set[int]:
    d = Path(path) / MARKERS_DIR
    # only NNNNNN.json: a stray file there is not a marker
    return {int(p.stem) for p in d.glob("*.json") if p.stem.isdigit()} if d.exists() else set()


MARKER_KEYS = ("shard", "start", "stop", "num_cached", "skipped", "files")


def read_marker(path: Path, shard: int) -> dict[str, Any]:
    """Shard `shard`'s marker.

    Raises:
        StoreError: the marker is not valid JSON or not a marker of this shard; the message names
            the file and the shard and says how to rewrite it.
    """
    f = marker_path(path, shard)
    try:
        m = json.loads(f.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        why = f"is not valid JSON ({str(e).splitlines()[0]})"
    else:
        missing = [k for k in MARKER_KEYS if not isinstance(m, dict) or k not in m]
        if not missing and m["shard"] == shard:
            return m
        why = f"lacks {', '.join(missing)}" if missing else f"is the marker of shard {m['shard']}"
    raise StoreError(f"{f}: the marker of shard {shard_name(shard)} {why}; {rewrite_hint(path, [shard])}")


def rewrite_hint(path: Path, shards: list[int]) -> str:
    """What to run to rewrite damaged shards: their markers go, then stage one reruns them."""
    names = ", ".join(marker_path(path, s).as_posix() for s in shards)
    return (
        f"delete {names} and rerun the same `dpal cache-teacher` command to rewrite shard(s) "
        f"{', '.join(shard_name(s) for s in shards)}"
    )


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


# ---------------------------------------------------------------- reading


def layout_of(attrs: dict[str, Any], where: str | Path = "store") -> Layout:
    """The shapes a store's attributes give (checked: `StoreMeta.from_attrs`)."""
    return StoreMeta.from_attrs(attrs, where).layout


def read_meta(path: Path) -> StoreMeta:
    """A store's attributes as a checked `StoreMeta` (`read_attrs`, then `StoreMeta.from_attrs`)."""
    return StoreMeta.from_attrs(read_attrs(path), path)


def read_attrs(path: Path) -> dict[str, Any]:
    """Group attributes of a store as raw JSON, after checking it is one this version reads and
    that its metadata (attributes, every array's zarr.json) is what was recorded when it was made.
    Code that uses the attributes reads `read_meta` (typed and checked) instead."""
    attrs = _load_attrs(path)
    problems = metadata_problems(path, attrs)
    if problems:
        raise StoreError(
            f"{path}: {problems[0]}{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; "
            "the store's metadata is damaged or edited and its data cannot be trusted: restore it "
            "from a copy, or rebuild it with `dpal cache-teacher --out NEW`"
        )
    return attrs


def _load_attrs(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} is not a dpal store (no zarr.json); create one with `dpal cache-teacher`")
    try:
        attrs = zarr.open_group(path, mode="r").attrs.asdict()
    except Exception as e:  # noqa: BLE001 - JSON or Zarr metadata errors: the file is damaged
        raise StoreError(
            f"{path / 'zarr.json'}: the store's attributes cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); they describe every shard: restore the "
            "store from a copy, or rebuild it with `dpal cache-teacher --out NEW`"
        ) from None
    check_header(attrs, path)
    return attrs


@dataclass
class Targets:
    """Teacher targets of one batch, decoded to float32 (in the stored dtype when read raw)."""

    global_: Tensor | None  # (B, D); None: not asked for (read_targets' `targets`), as local, relation
    local: Tensor | None  # (B, P, D)
    relation: Tensor | None  # (B, T, T) row-shifted logits; read raw from a factor store: Z (B, T, r) float16
    params: np.ndarray  # (B, NUM_PARAMS)
    # int8 read raw: float32 (B,), (B, P), (B, T) (None for a factor store's relation, or not read)
    scales: tuple[Tensor | None, Tensor | None, Tensor | None] | None = None
    relation_diag: Tensor | None = None  # a factor store read raw: (B, T) float32


def _feature_of(array: str) -> str:
    """The FEATURES name an array stores: a factor store's relation is two arrays."""
    return RELATION if array in (RELATION_FACTOR, RELATION_DIAG) else array


class StoreReader:
    """Read-only access to a store for stage two, `dpal store info` and `verify`.

    Missing chunks raise (`read_missing_chunks=False`): a lost shard file is never read as zeros.
    Nothing damaged is returned: the per-shard arrays (`valid`, image offsets and sizes, view
    parameters) are checked against the crc32c in each shard's marker, every image's bytes against
    its own crc32c, and a mismatch raises a StoreError that names the shard and what to run.
    """

    def __init__(self, path: str | Path, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        self.attrs = read_attrs(self.path)  # raw JSON; code reads `store_meta`, typed and checked
        self.store_meta = StoreMeta.from_attrs(self.attrs, self.path)
        self.layout = self.store_meta.layout
        if not self.store_meta.complete and not allow_incomplete:
            done = len(done_shards(self.path))
            raise StoreError(
                f"{self.path} is incomplete ({done}/{self.layout.num_shards} shards done); finish it by "
                "rerunning the same `dpal cache-teacher` command, or pass --allow-incomplete"
            )
        if self.store_meta.complete and not allow_incomplete:
            missing = sorted(set(range(self.layout.num_shards)) - done_shards(self.path))
            if missing:  # a marker deleted to rewrite its shard: the rows must not be read meanwhile
                raise StoreError(
                    f"{self.path} is marked complete but shard(s) {', '.join(map(shard_name, missing))} "
                    "have no marker; rerun the same `dpal cache-teacher` command to rewrite them, or "
                    "pass --allow-incomplete"
                )
        self.dtype = self.store_meta.dtype
        # R of an int8-rotated store, read and checked once, on open (None otherwise)
        self.rotation = (
            read_token_rotation(self.path, self.attrs, self.layout.embed_dim) if self.layout.rotated else None
        )
        self._arrays: dict[str, zarr.Array] = {}
        self._meta: dict[str, np.ndarray] = {}
        self._markers: dict[int, dict[str, Any]] | None = None
        self._image_crc: np.ndarray | None = None
        self._params_checked: set[int] = set()
        self._value_crc: dict[tuple[int, str], np.ndarray | None] = {}

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            try:
                self._arrays[name] = zarr.open_array(
                    self.path / name, mode="r", config={"read_missing_chunks": False}
                )
            except Exception as e:  # noqa: BLE001 - a missing or damaged zarr.json
                raise StoreError(
                    f"{self.path / name / 'zarr.json'}: array {name!r} cannot be opened ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}); it holds every shard's rows: restore the store "
                    "from a copy, or rebuild it with `dpal cache-teacher --out NEW`"
                ) from None
        return self._arrays[name]

    def markers(self) -> dict[int, dict[str, Any]]:
        """Every finished shard's marker, read once (the set of finished shards is fixed at the
        first call: shards finished later are not used by this reader)."""
        if self._markers is None:
            done = sorted(done_shards(self.path) & set(range(self.layout.num_shards)))
            self._markers = {s: read_marker(self.path, s) for s in done}
        return self._markers

    def _recorded_crc(self, shard: int, name: str) -> int | None:
        """The crc32c that shard's marker records for array `name`; None in a schema-1 marker."""
        m = self.markers()[shard]
        if "crc32c" not in m:
            if self.store_meta.schema_version >= 2:
                raise StoreError(
                    f"{marker_path(self.path, shard)}: the marker of shard {shard_name(shard)} has "
                    f"no checksums (damaged or edited); {rewrite_hint(self.path, [shard])}"
                )
            return None
        return m["crc32c"][name]

    def _check_rows(self, name: str, shard: int, rows: np.ndarray) -> None:
        want = self._recorded_crc(shard, name)
        if want is not None and crc32c_of(rows) != want:
            raise StoreError(
                f"{self.path}: the {name!r} rows of shard {shard_name(shard)} do not match the checksum "
                f"its marker recorded (damaged or edited after stage one); "
                f"{rewrite_hint(self.path, [shard])}"
            )

    def meta(self, name: str) -> np.ndarray:
        """A whole small per-image array (valid, keys, sources, offsets), cached.

        Rows of unfinished shards read as the fill value (valid = 0, offsets -1), even where a
        killed writer left data; rows of finished shards are checked against their markers.
        """
        if name not in self._meta:
            if self.store_meta.complete:
                arr = self.array(name)
            else:
                arr = zarr.open_array(self.path / name, mode="r", config={"read_missing_chunks": True})
            try:
                values = arr[:]
            except Exception as e:  # noqa: BLE001 - a missing chunk, or a codec failing on damaged bytes
                raise self._unreadable(name, arr, e) from None
            recorded = self.attrs.get(INTEGRITY, {}).get("index_crc32c", {})
            if name in recorded and index_crc32c(values) != recorded[name]:
                raise StoreError(
                    f"{self.path}: the {name!r} array does not match the checksum recorded when the "
                    "store was created (damaged or edited); restore the store from a copy, or rebuild "
                    "it with `dpal cache-teacher --out NEW`"
                )
            if name in CHECKED_SHARD_ARRAYS:
                markers = self.markers()
                for s in range(self.layout.num_shards):
                    a, b = self.layout.shard_range(s)
                    if s in markers:
                        self._check_rows(name, s, values[a:b])
                    else:
                        values[a:b] = self.array(name).fill_value
            self._meta[name] = values
        return self._meta[name]

    def _unreadable(self, name: str, arr: zarr.Array, error: Exception) -> StoreError:
        """The error for a whole-array read that failed: names the shard(s) whose chunk fails."""
        bad = []
        for s in range(self.layout.num_shards):
            a, b = self.layout.shard_range(s)
            try:
                arr[a:b]
            except Exception:  # noqa: BLE001
                bad.append(s)
        fix = (
            rewrite_hint(self.path, bad)
            if bad and name in CHECKED_SHARD_ARRAYS
            else "the index written when the store was created is damaged: restore the store from a copy or "
            "rebuild it with `dpal cache-teacher`"
        )
        where = f"shard(s) {', '.join(map(shard_name, bad))}" if bad else "the store"
        return StoreError(
            f"{self.path}: array {name!r} of {where} cannot be read "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); {fix}"
        )

    def valid_rows(self) -> np.ndarray:
        """Store indices of the cached images of finished shards, checked against their markers."""
        return np.flatnonzero(self.meta(VALID)).astype(np.int64)

    def shard_of(self, index: int) -> int:
        return index // self.layout.shard_size

    def _check_range(self, indices: np.ndarray) -> None:
        """Rows outside the store are the caller's mistake, not damage: say so, and no `verify`."""
        indices = np.asarray(indices)
        n = self.layout.num_images
        outside = sorted({int(i) for i in indices[(indices < 0) | (indices >= n)]})
        if outside:
            raise StoreError(
                f"{self.path}: row(s) {', '.join(map(str, outside[:5]))}"
                f"{' ...' if len(outside) > 5 else ''} are outside this store's {n} images (rows 0 to "
                f"{n - 1}); the rows were chosen for another store"
            )

    def _check_params(self, shards: list[int]) -> None:
        """Check each shard's whole `params` chunk against its marker, once per shard and reader
        (one 0.5 MB read at S = 256, K = 4): per-row checks would cost a whole-shard read per batch."""
        for s in shards:
            if s in self._params_checked:
                continue
            if s in self.markers():
                a, b = self.layout.shard_range(s)
                self._check_rows(PARAMS, s, self.array(PARAMS)[a:b])
            self._params_checked.add(s)

    def read_targets(
        self, indices: np.ndarray, view: int, raw: bool = False, targets: Collection[str] = FEATURES
    ) -> Targets:
        """Targets of view `view` of the images `indices` (one orthogonal selection per array).
        `raw`: in the stored dtype (float16, bfloat16, or int8 with `scales`; int8-rotated's
        global and local targets in R's basis, `rotation`), for a caller that decodes them
        elsewhere (stage two, on the training device). `targets`: the FEATURES to read;
        the others are not read and are None.

        Raises:
            StoreError: a shard's data is missing or damaged; the message names the shard.
        """
        self._check_range(indices)
        order = np.argsort(indices, kind="stable")
        sorted_idx = np.asarray(indices)[order]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        # The view as a one-wide slice, not an integer: with an integer (a dropped axis) Zarr turns
        # the orthogonal selection into per-element coordinates inside every shard, which made the
        # read 9x slower at 32 images (docs/benchmarks.md, loader).
        sel = (sorted_idx, slice(view, view + 1))
        out: dict[str, Tensor] = {}
        arrays = {n: spec for n, spec in self.layout.feature_arrays().items() if _feature_of(n) in targets}
        try:
            for name, (_, scaled) in arrays.items():
                data = self.array(name).oindex[sel][:, 0]
                scale = self.array(name + SCALE_SUFFIX).oindex[sel][:, 0] if scaled else None
                self.check_values(name, sorted_idx, view, data)
                if scale is not None:
                    self.check_values(name + SCALE_SUFFIX, sorted_idx, view, scale)
                if name not in FEATURES:  # the relation factor or diagonal, exactly as stored
                    out[name] = torch.from_numpy(np.ascontiguousarray(data))[inverse]
                elif raw:
                    out[name] = _raw_tensor(data, self.dtype)[inverse]
                    if scale is not None:
                        out[name + SCALE_SUFFIX] = torch.from_numpy(scale)[inverse]
                else:
                    kind = self.layout.feature_dtype(name)
                    out[name] = decode(data, scale, kind, self.rotation)[inverse]
        except (zarr.errors.ChunkNotFoundError, ValueError) as e:
            raise self._read_error(e, sorted_idx, view) from None
        scales = (
            tuple(out.get(n + SCALE_SUFFIX) for n in FEATURES) if raw and self.dtype in INT8_DTYPES else None
        )
        params = self.read_params(indices, view)
        if RELATION_FACTOR not in arrays:
            return Targets(out.get(GLOBAL), out.get(LOCAL), out.get(RELATION), params, scales)
        z, diag = out[RELATION_FACTOR], out[RELATION_DIAG]
        # finite and of the store's shapes, or one StoreError line (the chunks' crc32c caught bytes
        # flipped on disk; this catches a factor that stage one wrote wrong)
        check_relation_code(
            RelationCode(z.numpy(), diag.numpy(), FACTOR_DTYPE),
            self.layout.num_crowd_tokens,
            f"{self.path}: the relation factor of shard(s) "
            f"{', '.join(sorted({shard_name(self.shard_of(int(i))) for i in sorted_idx}))}",
        )
        if raw:
            return Targets(out.get(GLOBAL), out.get(LOCAL), z, params, scales, diag)
        return Targets(out.get(GLOBAL), out.get(LOCAL), rebuild_logits(z.float(), diag), params, scales)

    def _value_crcs(self, shard: int, name: str) -> np.ndarray | None:
        """(rows, K) uint32 crc32c of array `name`'s values in a finished shard (`row_crc32c`);
        None where its marker predates them."""
        key = (shard, name)
        if key not in self._value_crc:
            recorded = (
                self.markers()[shard].get(VALUE_CRC32C, {}).get(name) if shard in self.markers() else None
            )
            a, b = self.layout.shard_range(shard)
            self._value_crc[key] = (
                None
                if recorded is None
                else np.frombuffer(bytes.fromhex(recorded), dtype="<u4").reshape(b - a, self.layout.num_views)
            )
        return self._value_crc[key]

    def check_values(self, name: str, rows: np.ndarray, view: int, data: np.ndarray) -> None:
        """Array `name`'s stored values of view `view` of store rows `rows` (`data`, one row each)
        against the crc32c their markers recorded, and finite (float dtypes); else a StoreError
        that names the array, the row, its image key and its shard."""
        shard_size = self.layout.shard_size
        for i, row in enumerate(np.asarray(rows).tolist()):
            want = self._value_crcs(row // shard_size, name)
            if want is not None and crc32c_of(data[i]) != int(want[row % shard_size, view]):
                raise self._value_error(name, row, view, "do not match the checksum its marker recorded")
        bad = nonfinite_rows(data, self.layout.feature_dtype(_feature_of(name)) if name in FEATURES else "")
        if len(bad):
            raise self._value_error(name, int(np.asarray(rows)[bad[0]]), view, "are not finite (NaN or inf)")

    def _value_error(self, name: str, row: int, view: int, what: str) -> StoreError:
        shard = self.shard_of(row)
        return StoreError(
            f"{self.path}: the {name!r} values of row {row} (image {str(self.meta(KEYS)[row])!r}, view {view}, "
            f"shard {shard_name(shard)}) {what} (damaged, or edited through zarr after stage one); "
            f"`dpal store verify --deep` lists every such row; {rewrite_hint(self.path, [shard])}"
        )

    def _read_error(self, e: Exception, sorted_idx: np.ndarray, view: int) -> StoreError:
        """The one line for a feature read that failed: names the shard(s) and what to run."""
        # A missing shard file, or a chunk whose crc32c does not match: name the shard(s).
        shards = sorted({self.shard_of(int(i)) for i in sorted_idx})
        bad = [s for s in shards if not self._shard_readable(s, sorted_idx, view)] or shards
        found = {s: shard_problems(self.path, s) for s in bad}
        if any(found.values()):  # what `dpal store verify` reports: say so, and how to rewrite
            fix = (
                "`dpal store verify` finds "
                + "; ".join(f"{shard_name(s)}: {', '.join(p)}" for s, p in found.items() if p)
                + "; "
                + rewrite_hint(self.path, [s for s, p in found.items() if p])
            )
        else:
            fix = (
                "the shard's files match the checksums stage one recorded (`dpal store verify` finds "
                "nothing), so this is not damage on disk: please report it with this message"
            )
        return StoreError(
            f"{self.path}: data of shard(s) {', '.join(shard_name(s) for s in bad)} cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); {fix}"
        )

    def read_params(self, indices: np.ndarray, view: int) -> np.ndarray:
        """View parameters (B, NUM_PARAMS) of view `view` of the images `indices`, each shard's
        rows checked against its marker.

        Raises:
            StoreError: a shard's parameters are missing or damaged; the message names that shard.
        """
        indices = np.asarray(indices)
        self._check_range(indices)
        order = np.argsort(indices, kind="stable")
        shards = sorted({self.shard_of(int(i)) for i in indices})
        try:
            self._check_params(shards)
            p = self.array(PARAMS).oindex[indices[order], slice(view, view + 1)][:, 0]
        except (zarr.errors.ChunkNotFoundError, ValueError, RuntimeError) as e:  # zstd raises RuntimeError
            bad = []
            for s in shards:  # the whole chunk of each shard: find the one that fails
                a, b = self.layout.shard_range(s)
                try:
                    self.array(PARAMS)[a:b]
                except (zarr.errors.ChunkNotFoundError, ValueError, RuntimeError):
                    bad.append(s)
            raise StoreError(
                f"{self.path}: view parameters of shard(s) {', '.join(shard_name(s) for s in bad or shards)} cannot "
                f"be read ({type(e).__name__}: {str(e).splitlines()[0]}); {rewrite_hint(self.path, bad or shards)}"
            ) from None
        out = np.empty_like(p)
        out[order] = p
        return out

    def _shard_readable(self, shard: int, indices: np.ndarray, view: int) -> bool:
        rows = [int(i) for i in indices if self.shard_of(int(i)) == shard]
        sel = (rows, slice(view, view + 1))
        try:
            for name, (_, scaled) in self.layout.feature_arrays().items():
                self.array(name).oindex[sel]
                if scaled:
                    self.array(name + SCALE_SUFFIX).oindex[sel]
            self.array(PARAMS).oindex[sel]
        except (zarr.errors.ChunkNotFoundError, ValueError):
            return False
        return True

    def image_crc32c(self, index: int) -> int | None:
        """The crc32c stage one recorded for row `index`'s image bytes; None for a schema-1 marker."""
        if self._image_crc is None:
            crc = np.full(self.layout.num_images, -1, dtype=np.int64)
            for s, m in self.markers().items():
                if "image_crc32c" in m:
                    a, _ = self.layout.shard_range(s)
                    crc[a : a + len(m["image_crc32c"])] = [-1 if c is None else c for c in m["image_crc32c"]]
            self._image_crc = crc
        c = int(self._image_crc[index])
        if c < 0 and self.store_meta.schema_version >= 2 and self.meta(VALID)[index]:
            shard = self.shard_of(index)
            raise StoreError(
                f"{marker_path(self.path, shard)}: no image checksum for row {index} of shard "
                f"{shard_name(shard)} (damaged marker); {rewrite_hint(self.path, [shard])}"
            )
        return None if c < 0 else c

    def image_bytes(self, index: int) -> bytes:
        """The source image bytes of store row `index`: from the embedded tar, else the corpus.

        Raises:
            StoreError: the bytes differ from those stage one cached (a damaged image tar, or a
                corpus file changed since); the message names the shard and the fix.
        """
        self._check_range(np.array([index]))
        shard = self.shard_of(index)
        if self.store_meta.embed_images:
            off, size = int(self.meta(IMAGE_OFFSET)[index]), int(self.meta(IMAGE_SIZE)[index])
            if off < 0:
                raise StoreError(f"{self.path}: row {index} has no embedded image (skipped image?)")
            where = self.path / IMAGES_DIR / f"{shard_name(shard)}.tar"
            blob = read_bytes(str(where), off, size)
            fix = rewrite_hint(self.path, [shard])
        else:
            where = Path(str(self.meta(SOURCE)[index]))
            blob = read_bytes(
                str(where), int(self.meta(SOURCE_OFFSET)[index]), int(self.meta(SOURCE_SIZE)[index])
            )
            fix = "restore the corpus as it was when the store was written, or rebuild the store"
        want = self.image_crc32c(index)
        if want is not None and google_crc32c.value(blob) != want:
            raise StoreError(
                f"{where}: the image of row {index} (shard {shard_name(shard)}) does not match the "
                f"checksum stage one recorded (damaged or changed); {fix}"
            )
        return blob

    def fingerprint(self) -> str:
        """Identity of the store's contents: identity attributes plus every marker's checksums."""
        # relation_codec only where set: logits stores keep the fingerprint they always had
        ident = {k: self.attrs.get(k) for k in IDENTITY_ATTRS if k != "relation_codec" or k in self.attrs}
        h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
        for s in sorted(done_shards(self.path)):
            h.update(json.dumps(read_marker(self.path, s)["files"], sort_keys=True).encode())
        return h.hexdigest()


# ---------------------------------------------------------------- info and verify


def store_info(path: Path) -> dict[str, Any]:
    """What `dpal store info` prints (`--json` prints this dict)."""
    meta = read_meta(path)
    layout = meta.layout
    done = sorted(done_shards(path))
    skipped: list[dict[str, Any]] = []
    cached = 0
    kls = []
    errors: dict[str, list[float]] = {GLOBAL: [], LOCAL: []}
    for s in done:
        m = read_marker(path, s)
        cached += m["num_cached"]
        skipped += m["skipped"]
        if m.get("relation_kl") is not None:
            kls.append(m["relation_kl"])
        for name, e in m.get(TOKEN_ERROR, {}).items():
            errors[name].append(e)
    shapes = {k: list(v) for k, v in layout.feature_shapes().items()}
    return {
        "path": str(path),
        "schema_version": meta.schema_version,
        "dpal_version": meta.dpal_version,
        "complete": meta.complete,
        "num_images": layout.num_images,
        "num_views": layout.num_views,
        "num_cached_images": cached,
        "num_skipped_images": len(skipped),
        "skipped": skipped,
        "shards_done": len(done),
        "num_shards": layout.num_shards,
        "shard_size": layout.shard_size,
        "dtype": layout.dtype,
        "shapes": shapes,
        "token_grid": meta.token_grid.to_attrs(),
        "bytes_per_view": layout.bytes_per_view(),
        "relation_codec": layout.relation_codec,
        "relation_rank": layout.relation_rank or None,
        # mean row KL(softmax(logits) || softmax(rebuilt)) per shard, measured while writing
        "relation_kl_mean": float(np.mean(kls)) if kls else None,
        "relation_kl_max": float(np.max(kls)) if kls else None,
        "token_codec": meta.token_codec_attrs(),
        "rotation_bytes": layout.rotation_bytes(),
        # mean relative int8 token error per shard, measured while writing: mean and worst shard
        TOKEN_ERROR: {
            name: {"mean": float(np.mean(e)), "max": float(np.max(e))} for name, e in errors.items() if e
        }
        or None,
        "embed_images": meta.embed_images,
        "teacher": meta.teacher.to_attrs(),
        "seed": meta.seed,
    }


def shard_problems(path: Path, shard: int) -> list[str]:
    """What `dpal store verify` finds wrong with a finished shard: a damaged marker, or files
    missing or differing from the sha256 its marker recorded."""
    if not marker_path(path, shard).exists():
        return [f"not done ({MARKERS_DIR}/{shard_name(shard)}.json missing)"]
    try:
        files = read_marker(path, shard)["files"]
    except StoreError:
        return [f"{MARKERS_DIR}/{shard_name(shard)}.json is damaged"]
    problems = []
    for rel, digest in files.items():
        f = Path(path) / rel
        if not f.exists():
            problems.append(f"{rel} missing")
        elif sha256_file(f) != digest:
            problems.append(f"{rel} checksum mismatch")
    return problems


def value_problems(reader: StoreReader, shard: int) -> tuple[list[str], bool]:
    """What `dpal store verify --deep` finds in a finished shard's values: (row, view) pairs of a
    target array whose values differ from the crc32c its marker recorded, or that are not finite
    (the first 3 of each array); and whether the marker records value checksums at all."""
    a, b = reader.layout.shard_range(shard)
    problems, recorded = [], True
    for feature, (_, scaled) in reader.layout.feature_arrays().items():
        for name in (feature, feature + SCALE_SUFFIX) if scaled else (feature,):
            try:
                values = reader.array(name)[a:b]  # (rows, K, ...)
            except Exception as e:  # noqa: BLE001 - damaged bytes: the sha256 check names the file
                problems.append(f"{name!r} cannot be read ({type(e).__name__})")
                continue
            want = reader._value_crcs(shard, name)
            recorded &= want is not None
            dtype = reader.layout.feature_dtype(feature) if name in FEATURES else ""
            found = []
            for k in range(values.shape[1]):
                edited = [
                    r for r in range(b - a) if want is not None and crc32c_of(values[r, k]) != want[r, k]
                ]
                found += [f"row {a + r} view {k} differs from its recorded checksum" for r in edited]
                found += [f"row {a + r} view {k} is not finite" for r in nonfinite_rows(values[:, k], dtype)]
            problems += [f"{name!r} {f}" for f in found[:3]] + (
                [f"{name!r}: {len(found) - 3} more"] if len(found) > 3 else []
            )
    return problems, recorded


def verify_store(path: Path, deep: bool = False) -> dict[str, Any]:
    """Check the store's metadata against the checksums recorded when it was made (attributes,
    every array's zarr.json, the index arrays) and every shard's files against its marker; `deep`:
    also every target value against the crc32c of each (row, view) its marker recorded and for
    NaN and inf (`value_problems`: what the read path checks of the rows it reads).

    Returns a dict with `ok` (bool), `metadata` ([problems]), `bad` ({shard: [problems]}),
    `not_done` (shard list) and, deep, `unrecorded` (shards whose markers predate value checksums:
    their values were checked for NaN and inf only).
    """
    attrs = _load_attrs(path)
    metadata = metadata_problems(path, attrs)
    for name, want in attrs.get(INTEGRITY, {}).get("index_crc32c", {}).items():
        try:
            ok = index_crc32c(zarr.open_array(Path(path) / name, mode="r")[:]) == want
        except Exception:  # noqa: BLE001 - any failure to read it is damage too
            ok = False
        if not ok:
            metadata.append(f"index array {name!r} does not match its checksum")
    n = attrs["num_shards"]
    done = done_shards(path)
    bad: dict[str, list[str]] = {}
    reader = StoreReader(path, allow_incomplete=True) if deep and not metadata else None
    unrecorded = []
    for s in sorted(done & set(range(n))):
        problems = shard_problems(path, s)
        if reader is not None and not any("marker" in p or ".json" in p for p in problems):
            found, recorded = value_problems(reader, s)
            problems += found
            unrecorded += [] if recorded else [shard_name(s)]
        if problems:
            bad[shard_name(s)] = problems
    not_done = [shard_name(s) for s in range(n) if s not in done]
    return {
        "ok": not metadata and not bad and not not_done,
        "metadata": metadata,
        "bad": bad,
        "not_done": not_done,
        "num_shards": n,
        "shards_checked": len(done),
    } | ({"unrecorded": unrecorded} if deep else {})
