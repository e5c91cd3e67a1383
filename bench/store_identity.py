"""Write stores with two code trees and compare their bytes: a refactoring of the store must leave
every file of every store as it was.

For each case (each store dtype, and the relation factor with a plain and a rotated dtype) it runs
the same `dpal cache-teacher` command with `PYTHONPATH=BASE` and with `PYTHONPATH=NEW`, on one tiny
corpus, writing to the same path (the resolved config, which the store's attributes record, names
it) and moving the first store aside; then it compares the two store folders file by file. A
marker's `seconds` (wall time) is the one value that may differ: markers are compared with it left
out, every other file byte for byte. Last, NEW's `dpal store verify --deep` reads BASE's store.

    python bench/store_identity.py --base /work/ppbase --new /work/ppA --work /tmp/store_identity

BASE and NEW are folders holding a `dpal` package (a symlink to a checkout). About 4 minutes on 2
cores (a random ViT-Ti teacher, 10 images of 48 x 32, 2 views). Exit status 1 if a store differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CASES = {
    "float16": ["--dtype", "float16"],
    "bfloat16": ["--dtype", "bfloat16"],
    "int8": ["--dtype", "int8"],
    "int8-rotated": ["--dtype", "int8-rotated"],
    "float32": ["--dtype", "float32"],
    "factor-float16": ["--dtype", "float16", "--relation", "factor", "--relation-rank", "3"],
    "factor-int8-rotated": ["--dtype", "int8-rotated", "--relation", "factor", "--relation-rank", "3"],
}
# the view section as the older spelling, which both trees read (the new one with a note)
RECIPE = ["recipe.global_size=[32,16]", "recipe.local_size=[16,16]", "recipe.crowd_size=[32,48]"]


def make_corpus(folder: Path, num_images: int = 10) -> Path:
    """Seeded noise JPEGs of 48 x 32 (tests/stage2_util.py's corpus)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(num_images):
        Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.jpg")
    return folder


def dpal(pythonpath: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dpal.cli", *args], env=env, capture_output=True, text=True)


def cache_teacher(pythonpath: str, corpus: Path, out: Path, extra: list[str]) -> None:
    args = ["cache-teacher", "--corpus", str(corpus), "--out", str(out), "--teacher", "vit_tiny_patch16_224"]
    args += ["--random-init", "--views", "2", "--shard-size", "4", "--batch-size", "8", "--device", "cpu"]
    args += ["--shards", "0:", "--quiet", *extra]
    for s in RECIPE:
        args += ["--set", s]
    r = dpal(pythonpath, *args)
    if r.returncode:
        raise SystemExit(f"{pythonpath}: dpal cache-teacher failed:\n{r.stderr}")


def digest(path: Path) -> str:
    """sha256 of a file; of a marker without its `seconds`."""
    data = path.read_bytes()
    if path.parent.name == "shards" and path.suffix == ".json":
        data = json.dumps({k: v for k, v in json.loads(data).items() if k != "seconds"}).encode()
    return hashlib.sha256(data).hexdigest()


def compare(a: Path, b: Path) -> tuple[int, list[str]]:
    """(files compared, differences) between two store folders."""
    files_a = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    diff = [f"only in {a.name}: {f}" for f in sorted(files_a - files_b)]
    diff += [f"only in {b.name}: {f}" for f in sorted(files_b - files_a)]
    diff += [f"differs: {f}" for f in sorted(files_a & files_b) if digest(a / f) != digest(b / f)]
    return len(files_a | files_b), diff


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="PYTHONPATH of the old code (holds `dpal`)")
    p.add_argument("--new", required=True, help="PYTHONPATH of the new code (holds `dpal`)")
    p.add_argument("--work", type=Path, default=Path("/tmp/dpal_store_identity"))
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    corpus = make_corpus(args.work / "corpus")
    failed = False
    for case in args.cases:
        out, old = args.work / case / "store", args.work / case / "store.base"
        cache_teacher(args.base, corpus, out, CASES[case])
        out.rename(old)
        cache_teacher(args.new, corpus, out, CASES[case])
        n, diff = compare(old, out)
        verify = dpal(args.new, "store", "verify", "--deep", str(old))
        failed |= bool(diff) or verify.returncode != 0
        print(
            f"{case:20s} {n} files, {'identical' if not diff else f'{len(diff)} differ'} "
            f"(markers without `seconds`); new code verifies the old store: exit {verify.returncode}"
        )
        for line in diff[:10]:
            print("    " + line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
