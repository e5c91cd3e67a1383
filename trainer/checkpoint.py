"""Stage two's checkpoint files: their format, atomic writes, what is kept, and finding the newest.

A checkpoint is a plain dict that loads with `torch.load(weights_only=True)` (tensors, numbers,
strings, lists, dicts), written through a temporary file and a rename (`store.atomic_write_bytes`),
as `RUN/checkpoints/step-NNNNNNNN.pt`. `Trainer.state_dict` (train.py) says what it holds; every
entry is read back by a resume, by `build_student_from_checkpoint` (export, eval) or by the format
check here. `format_version` is the layout's version: a file of another version is refused with one
line, never half read. The last `keep_last` checkpoints stay whole; of the older ones the newest
`keep_weights_only_older` stay as student weights only (`step-N.student.pt`), for export and eval.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpal import __version__
from dpal.errors import InputError
from dpal.store import atomic_write_bytes
from dpal.teachers import code_in_pickle, torch_reason
from dpal.trainer.rundir import CHECKPOINT_DIR, disk_full_error
from dpal.trainer.student import create_student

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
WEIGHTS_ONLY_SUFFIX = ".student.pt"
_CKPT_RE = re.compile(r"step-(\d+)\.pt$")
# what a reduced older checkpoint keeps: the student, how to build it, the config
WEIGHTS_ONLY_KEYS = (
    "format_version",
    "dpal_version",
    "step",
    "model",
    "config",
    "store_fingerprint",
    "student_name",
    "img_size",
    "student_kwargs",
)


class CheckpointFormatError(InputError):
    """A dpal checkpoint of a format this dpal does not read (written by another version)."""


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """The whole checkpoints of a run directory, oldest first."""
    d = Path(run_dir) / CHECKPOINT_DIR
    if not d.exists():
        return []
    found = [(int(m.group(1)), p) for p in d.glob("step-*.pt") if (m := _CKPT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's dict, on the CPU; InputError for a file that is not one, CheckpointFormatError
    (one line) for a dpal checkpoint of another format version."""
    try:
        with (
            warnings.catch_warnings()
        ):  # torch's note on pickle protocols: the error below says what the file is
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise InputError(_unreadable(path, e)) from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise InputError(f"{path} is not a dpal checkpoint of format {CHECKPOINT_VERSION}")
    if ckpt["format_version"] != CHECKPOINT_VERSION:
        raise CheckpointFormatError(
            f"{path} is a dpal checkpoint of format {ckpt['format_version']!r} (written by dpal "
            f"{ckpt.get('dpal_version', '?')}); this dpal ({__version__}) reads format {CHECKPOINT_VERSION}: use "
            "the dpal version that wrote it, or a new --out"
        )
    return ckpt


def _unreadable(path: Path, error: BaseException) -> str:
    """One line for a checkpoint torch.load(weights_only=True) refused: a file that would run code
    to load is refused in dpal's words (never torch's advice to load it with weights_only=False)."""
    with open(path, "rb") as f:
        head = f.read(2)
    is_pickle = head in tuple(b"\x80" + bytes([p]) for p in range(2, 6))
    code = code_in_pickle(path, error, is_pickle)
    if code is not None:
        return (
            f"refused: {path} needs code execution to load (its pickle calls {code}, as a __reduce__ or an "
            "object other than tensors does); dpal never loads such files"
        )
    return f"cannot read checkpoint {path}: {torch_reason(error)}"


def find_resume(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the newest checkpoint that loads (a torn one is skipped; one of another format version
    stops the run, so that training never starts over beside it); `none`: start fresh; else a path."""
    if resume == "none":
        return None
    if resume != "auto":
        p = Path(resume)
        if not p.is_file():
            raise InputError(f"--resume {resume}: no such checkpoint")
        return p
    for p in reversed(checkpoint_paths(run_dir)):
        try:
            load_checkpoint(p)
            return p
        except CheckpointFormatError:
            raise
        except InputError:
            logger.warning("skipping unreadable checkpoint %s", p)
    return None


def weights_only_paths(run_dir: Path) -> list[Path]:
    """The reduced older checkpoints (`step-N.student.pt`: student weights only), oldest first."""
    found = [
        (int(p.name[5 : -len(WEIGHTS_ONLY_SUFFIX)]), p)
        for p in (Path(run_dir) / CHECKPOINT_DIR).glob(f"step-*{WEIGHTS_ONLY_SUFFIX}")
        if p.name[5 : -len(WEIGHTS_ONLY_SUFFIX)].isdigit()
    ]
    return [p for _, p in sorted(found)]


def weights_only(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint reduced to what export and evaluation need: the student, its build and the config
    (not resumable: no D-PaDe, optimizer, RNG)."""
    return {**{k: ckpt[k] for k in WEIGHTS_ONLY_KEYS if k in ckpt}, "weights_only": True}


def write_run_file(path: Path, data: bytes, run_dir: Path) -> None:
    """`atomic_write_bytes`, with a full disk as one line (the previous checkpoints stay intact)."""
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        previous = checkpoint_paths(run_dir)
        err = disk_full_error(e, path, f"{previous[-1]}" if previous else "step 0 (no checkpoint yet)")
        if err is None:
            raise
        raise err from None


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_checkpoint(run_dir: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` as checkpoints/step-N.pt; keep the last `keep_last` whole and, of the older ones,
    the newest `keep_weights_only_older` (a config key) as student weights only."""
    path = Path(run_dir) / CHECKPOINT_DIR / f"step-{state['step']:08d}.pt"
    write_run_file(path, _torch_bytes(state), run_dir)
    keep_weights = int(state.get("config", {}).get("keep_weights_only_older", 0))
    for old in checkpoint_paths(run_dir)[:-keep_last]:
        if keep_weights > 0:
            reduced = weights_only(torch.load(old, map_location="cpu", weights_only=True, mmap=True))
            write_run_file(
                old.with_name(old.name[: -len(".pt")] + WEIGHTS_ONLY_SUFFIX), _torch_bytes(reduced), run_dir
            )
        old.unlink(missing_ok=True)
    for old in weights_only_paths(run_dir)[: -keep_weights or None]:
        old.unlink(missing_ok=True)
    return path


def rng_state() -> dict[str, Any]:
    """The global RNG states a step draws from (drop path): the CPU's and every CUDA device's."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_student_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The student of a run directory's newest checkpoint (or of a checkpoint file), on CPU."""
    path = Path(path)
    if path.is_dir():
        found = find_resume(path, "auto")
        if found is None:
            raise InputError(f"{path} holds no dpal checkpoint (expected {path}/{CHECKPOINT_DIR}/step-*.pt)")
        path = found
    elif not path.is_file():
        raise InputError(f"{path}: no such run directory or checkpoint")
    ckpt = load_checkpoint(path)
    student = create_student(
        ckpt["student_name"], img_size=tuple(ckpt["img_size"]), **ckpt.get("student_kwargs", {})
    )
    student.load_state_dict(ckpt["model"])
    return student.eval(), ckpt
