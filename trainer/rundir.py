"""The run directory of `dpal distill`: who owns it, starting over in it, and what a crash leaves there.

A run directory (`--out`) holds one run: `checkpoints/`, `metrics.jsonl`, `config.yaml` (and `tb/`,
`loggers.json`, `wandb/` with --logger).
- Ownership. The process that trains into it (rank 0 under torchrun) holds an exclusive `flock`
  on `RUN_DIR/.lock` for the whole run and writes its host, pid and start time into it; a second
  run into the same directory is refused with one line naming that holder. The kernel drops the
  lock when the holder dies, however it dies, so a crashed run never leaves the directory stuck
  (the file's stale text is only read to name a live holder).
- Starting over. `--resume none` where a run exists would mix two runs (some checkpoints
  overwritten, later ones kept, the metrics cut), so it is refused; `--fresh` moves the whole old
  run aside to a sibling folder in one rename and starts in an empty directory.
- Leftovers. A checkpoint's temporary file (`checkpoints/.step-*.pt.*.tmp`) left by a kill during
  the write is deleted when the next run takes the lock.
- Disk full. A failed checkpoint or metrics write on a full filesystem becomes one line naming the
  path and saying that a rerun resumes (the previous checkpoints stay: writes are atomic).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from dpal.errors import UserError

LOCK_NAME = ".lock"
CHECKPOINT_DIR = "checkpoints"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class RunDirError(UserError, RuntimeError):
    """The run directory cannot be used as asked (in use, holds another run, or its disk is full)."""


class RunLock:
    """An exclusive, non-blocking `flock` on `RUN_DIR/.lock`, held until `release` or process exit."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, creating the run directory; refuse with `RunDirError` naming the holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirError(
                f"run directory {self.run_dir} is in use by another dpal distill ({holder(self.path)}); wait for it "
                "to finish, stop it (SIGTERM checkpoints it), or use another --out"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but its lock file (a run refused at its start),
    once the lock is released; a directory with anything else in it stays as it is."""
    run_dir = Path(run_dir)
    try:
        if {p.name for p in run_dir.iterdir()} <= {LOCK_NAME}:
            (run_dir / LOCK_NAME).unlink(missing_ok=True)
            run_dir.rmdir()
    except OSError:  # gone already, or another process wrote into it meanwhile
        pass


def holder(lock_path: Path) -> str:
    """What the lock's holder wrote: `host H, pid P, started T` (or a note when it has not yet)."""
    try:
        text = Path(lock_path).read_text().strip()
    except OSError:
        text = ""
    return text or "its host and pid are not written yet"


def existing_run(run_dir: Path) -> str | None:
    """A short description of the run in `run_dir` (`checkpoints up to step N`, `metrics up to step
    N`), or None when it holds none."""
    run_dir = Path(run_dir)
    steps = sorted(
        int(p.name[5:13]) for p in (run_dir / CHECKPOINT_DIR).glob("step-*.pt") if p.name[5:13].isdigit()
    )
    if steps:
        return f"checkpoints up to step {steps[-1]}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        return "metrics of an earlier run"
    return None


def refuse_mixing(run_dir: Path, what: str) -> None:
    raise RunDirError(
        f"{run_dir} already holds a run ({what}); --resume none would mix a new run into it. Rerun without "
        "--resume none to continue it, add --fresh to move it aside and start over, or use another --out"
    )


def aside_name(run_dir: Path) -> Path:
    """A sibling folder name for an old run that is not taken: RUN_DIR.old-YYYYmmdd-HHMMSS[-n]."""
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    candidate = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while candidate.exists():
        candidate = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
        n += 1
    return candidate


def move_aside(lock: RunLock) -> tuple[RunLock, Path]:
    """Move the locked run directory aside whole (one rename) and lock a new, empty one in its place.

    The old lock stays held until the new one is taken, so no other run can slip in between
    unseen: one that creates the new directory first makes this refuse instead.
    """
    aside = aside_name(lock.run_dir)
    os.rename(lock.run_dir, aside)
    try:
        new = RunLock(lock.run_dir).acquire()
    finally:
        lock.release()
    return new, aside


def clean_temporary_files(run_dir: Path) -> list[Path]:
    """Delete the temporary checkpoint files a killed write left (only the lock holder may)."""
    removed = []
    for p in (Path(run_dir) / CHECKPOINT_DIR).glob(".step-*.tmp"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def disk_full_error(err: OSError, path: Path, resumes_from: str) -> RunDirError | None:
    """The one-line error for a write of `path` that failed on a full disk (or quota), else None."""
    if err.errno not in DISK_FULL_ERRNOS:
        return None
    return RunDirError(
        f"no space left on the device of {Path(path).parent} (writing {path}: {os.strerror(err.errno)}); free space "
        f"there and rerun the same command: it resumes from {resumes_from}"
    )
