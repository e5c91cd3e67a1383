"""What stage two's integrity checks cost (docs/store.md, "Shards, markers and integrity").

Two figures: the crc32c of one embedded image (`StoreReader.image_bytes` checks one per read), and
what a reader does once, at its first whole read of a large store: read every marker, check the
rows of `valid` and `image_offset` against them, and build the table of image checksums. The
markers are those of a 1M-image store at S = 256 (3,907 shards, each a real marker written as
`store.write_shard` writes it, 256 image checksums), in a temporary folder; a few seconds.

    .venv/bin/python bench/bench_store_checks.py [--images 1000000] [--shard-size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import google_crc32c
import numpy as np

from dpal.store import MARKERS_DIR, crc32c_of, marker_path, read_marker


def image_crc_us(size: int = 3000, reps: int = 20000) -> float:
    blob = os.urandom(size)
    t0 = time.perf_counter()
    for _ in range(reps):
        google_crc32c.value(blob)
    return (time.perf_counter() - t0) / reps * 1e6


def first_read_s(root: Path, num_images: int, shard_size: int) -> dict[str, float]:
    shards = -(-num_images // shard_size)
    (root / MARKERS_DIR).mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {
        f"{a}/c/0/0/0": "0" * 64
        for a in ("global", "local", "relation", "params", "valid", "image_offset", "image_size")
    }
    for s in range(shards):
        m = {
            "shard": s,
            "start": s * shard_size,
            "stop": (s + 1) * shard_size,
            "num_cached": shard_size,
            "skipped": [],
            "seconds": 41.2,
            "files": {**files, f"images/{s:06d}.tar": "0" * 64},
            "crc32c": {"params": 1, "valid": 2, "image_offset": 3, "image_size": 4},
            "image_crc32c": [int(c) for c in rng.integers(0, 2**32, shard_size)],
        }
        marker_path(root, s).write_text(json.dumps(m, indent=1))
    t0 = time.perf_counter()
    markers = {s: read_marker(root, s) for s in range(shards)}
    t_read = time.perf_counter() - t0
    valid, offsets = np.ones(shards * shard_size, np.uint8), np.arange(shards * shard_size, dtype=np.int64)
    t0 = time.perf_counter()
    for s in range(shards):
        rows = slice(s * shard_size, (s + 1) * shard_size)
        crc32c_of(valid[rows]), crc32c_of(offsets[rows])
    t_rows = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = np.full(shards * shard_size, -1, dtype=np.int64)
    for s, m in markers.items():
        table[s * shard_size : (s + 1) * shard_size] = [-1 if c is None else c for c in m["image_crc32c"]]
    t_table = time.perf_counter() - t0
    return {"shards": shards, "read_markers_s": t_read, "check_rows_s": t_rows, "image_table_s": t_table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=256)
    args = ap.parse_args()
    print(f"crc32c of a 3 KB image: {image_crc_us():.2f} us")
    with tempfile.TemporaryDirectory() as tmp:
        r = first_read_s(Path(tmp) / "store", args.images, args.shard_size)
    print(
        f"first whole read of {args.images} images ({r['shards']} markers): read markers {r['read_markers_s']:.2f} s, "
        f"check valid and image_offset rows {r['check_rows_s']:.3f} s, image checksum table "
        f"{r['image_table_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
