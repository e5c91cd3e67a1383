"""A store's checksums and shard markers: what stage one records while writing and every reader and
`dpal store verify` compares against.

When a store is created, the group attribute `integrity` records the sha256 of the other attributes
and of every array's zarr.json and the crc32c of the index arrays' values (`metadata_problems` checks
them). Each shard's marker (`shards/NNNNNN.json`, written last and atomically) records the sha256 of
the shard's files, the crc32c of its per-shard arrays, of each cached image and of each (row, view)
of every target array (`row_crc32c`); `shard_problems` compares the files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from dpal.corpus import ImageRef, sha256_file
from dpal.store.meta import TeacherIdentity
from dpal.store.schema import IDENTITY_ATTRS, INTEGRITY, MARKERS_DIR, StoreError

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


# the exponent bits that are all ones in a NaN or an infinity, by stored dtype: a test of the bits
# is 4.5x faster than np.isfinite on float16, which converts every value first (docs/benchmarks.md)
_NONFINITE_BITS = {
    "float16": (np.uint16, 0x7C00),
    "bfloat16": (np.uint16, 0x7F80),
    "float32": (np.uint32, 0x7F800000),
    "float64": (np.uint64, 0x7FF0000000000000),
}


def nonfinite_rows(data: np.ndarray, dtype: str = "") -> np.ndarray:
    """Indices of the rows (first axis) of a stored array that hold a NaN or an infinity: float16
    and float32 arrays, and bfloat16's uint16 bits (`dtype` "bfloat16"), by their exponent bits;
    int8 has none."""
    kind = dtype if dtype in _NONFINITE_BITS else str(data.dtype)
    if kind not in _NONFINITE_BITS:
        return np.empty(0, dtype=np.int64)
    bits, mask = _NONFINITE_BITS[kind]
    flat = np.ascontiguousarray(data).view(bits).reshape(len(data), -1)
    return np.flatnonzero(((flat & bits(mask)) == bits(mask)).any(axis=1))


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


# The attribute's name as a user sets it: the view sizes are stored under `recipe` (every store
# has that attribute) and set as `--set views.<field>`.
SETTING_NAMES = {"recipe": "views"}


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two stores' identity attributes, each named as a user
    sets it."""
    out = []
    for k in IDENTITY_ATTRS:
        a, b = old.get(k), new.get(k)
        if k == "teacher" and isinstance(a, dict) and isinstance(b, dict):
            # The checkpoint's sha256 identifies it; its path may move between machines. Fields
            # added later (input_scale, target_grid) compare with their defaults where absent.
            a, b = ({kk: v for kk, v in _with_defaults(x).items() if kk != "checkpoint"} for x in (a, b))
        if a == b:
            continue
        name = SETTING_NAMES.get(k, k)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{name}.{sub}: store has {a.get(sub)!r}, this run has {b.get(sub)!r}")
        else:
            out.append(f"{name}: store has {a!r}, this run has {b!r}")
    return out


def row_crc32c(stored: np.ndarray) -> str:
    """The crc32c of each (row, view) of a stored feature array (rows, K, ...), as a marker records
    them (`VALUE_CRC32C`): hex of little-endian uint32, row-major (rows, K)."""
    crcs = np.array([[crc32c_of(stored[r, k]) for k in range(stored.shape[1])] for r in range(len(stored))])
    return crcs.astype("<u4").tobytes().hex()


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
