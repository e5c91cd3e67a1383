"""What `dpal store info` and `dpal store verify` report: a store's counts, shapes and codecs
(`store_info`), and its metadata, files and (deep) values against the checksums recorded when it was
written (`verify_store`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dpal.store.integrity import (
    TOKEN_ERROR,
    crc32c_of,
    done_shards,
    index_crc32c,
    metadata_problems,
    nonfinite_rows,
    read_marker,
    shard_name,
    shard_problems,
)
from dpal.store.read import StoreReader, _load_attrs, read_meta
from dpal.store.schema import FEATURES, GLOBAL, INTEGRITY, LOCAL, SCALE_SUFFIX


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
            dtype = reader.layout.codec(feature).nonfinite_kind if name in FEATURES else ""
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
