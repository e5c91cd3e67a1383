"""A store's files outside Zarr's own writes: the atomic write of a file (image tars, markers) and
the removal of the temporary files that killed writers leave.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from dpal.store.integrity import shard_name
from dpal.store.schema import IMAGES_DIR, MARKERS_DIR


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
