"""Reading a weights file safely, and one line saying what a file that is not one is.

`torch_load` loads with `weights_only=True` only: dpal never runs code from a file. When torch
refuses a file, `not_a_checkpoint` judges it from its bytes (empty, a zip cut short, a zip without
data.pkl, a pickle that would call code, a plain pickle, text such as a saved error page, or other
bytes) and says what to do, where torch's own message describes the loader. `code_in_pickle` and
`torch_reason` serve the checkpoints of stage two too (trainer/checkpoint.py).
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from typing import Any

import torch

from dpal.errors import InputError


def not_a_checkpoint(path: str, error: BaseException) -> str:
    """One line saying what a file that `torch.load` refused is, judged from its bytes.

    torch's own errors (an empty file raises a bare EOFError; text and random bytes both read as
    "weights only load failed") describe the loader, not the file, and never say to fetch it again.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512)
    fix = "download or save it again"
    if size == 0:
        return f"{path} is empty (0 bytes), not a torch checkpoint: {fix}"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return (
                f"{path} is a zip archive cut short ({size} bytes, no central directory; an "
                f"interrupted download?), not a whole torch checkpoint: {fix}"
            )
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if not any(n.endswith("data.pkl") for n in names):
            return (
                f"{path} is a zip archive but not a torch checkpoint (no data.pkl inside; it holds "
                f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            )
        if code_in_pickle(path, error, False) is None and isinstance(error, pickle.UnpicklingError):
            return (
                f"refused: {path} is a torch.save archive that torch's safe loader refuses ({torch_reason(error)}); "
                "dpal never loads a file that may need code execution"
            )
    is_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    code = code_in_pickle(path, error, is_pickle)
    if code is not None:
        return (
            f"refused: {path} needs code execution to load (its pickle calls {code}, as a __reduce__ or an "
            "object other than tensors does); dpal never loads such files"
        )
    if is_pickle and isinstance(error, pickle.UnpicklingError) and _pickle_is_whole(path):
        return (
            f"{path} is a plain pickle (protocol {head[1]}) that torch's safe loader cannot read, not a torch "
            "checkpoint: save the weights with torch.save"
        )
    if isinstance(error, EOFError) or (is_pickle and isinstance(error, pickle.UnpicklingError)):
        return f"{path} is a torch checkpoint cut short ({size} bytes; an interrupted download?): {fix}"
    text = _as_text(head)
    if text is not None:
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return (
            f"{path} is a text file, not a torch checkpoint (it starts with {first!r}; a failed "
            f"download often saves an error page): {fix}"
        )
    return (
        f"{path} is not a torch checkpoint (neither a torch zip archive nor a pickle; it starts with "
        f"bytes {head[:8].hex(' ')}): {fix}"
    )


# pickle opcodes that call what a GLOBAL pushed: what a __reduce__ (or any object but tensors) needs
_CALLS = ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD")
_PICKLE_SCAN_BYTES = 64 << 20  # how much of a plain pickle is scanned for the globals it would call


def code_in_pickle(path: str | os.PathLike, error: BaseException, is_pickle: bool) -> str | None:
    """What a file that `torch.load(weights_only=True)` refused would call to load (`posix.system`,
    `argparse.Namespace`), or None when it was refused for another reason. From torch's message
    (`GLOBAL posix.system`) or, for a plain pickle torch's loader does not parse, from its opcodes,
    read with `pickletools` (which runs nothing)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if isinstance(error, pickle.UnpicklingError) and found:
        return found.group(1)
    if not is_pickle:
        return None
    import pickletools

    with open(path, "rb") as f:
        data = f.read(_PICKLE_SCAN_BYTES)
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL":
                return ".".join(strings[-2:])
            if op.name in _CALLS:
                return "a function"
            if isinstance(arg, str):
                strings.append(arg)
    except ValueError:  # cut short, or not a pickle after all
        return None
    return None


def torch_reason(error: BaseException) -> str:
    """The line of torch's error that says what failed, without its advice to load with
    weights_only=False (which would run whatever the file holds)."""
    advice = ("weights_only", "weights only", "please file an issue", "check the documentation", "in pytorch")
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not any(a in ln.lower() for a in advice)]
    return (useful or lines or [type(error).__name__])[0].removeprefix("WeightsUnpickler error: ")


def _pickle_is_whole(path: str | os.PathLike) -> bool:
    """Whether a file's pickle reads to its STOP opcode (read with `pickletools`, nothing run)."""
    import pickletools

    with open(path, "rb") as f:
        data = f.read(_PICKLE_SCAN_BYTES)
    try:
        return any(op.name == "STOP" for op, _, _ in pickletools.genops(data))
    except ValueError:
        return False


def _as_text(head: bytes) -> str | None:
    """`head` as text if it is printable UTF-8 (a multi-byte character cut at the end is allowed)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3:
            return None
        text = head[: e.start].decode("utf-8")
    return text if all(c.isprintable() or c.isspace() for c in text) else None


def torch_load(path: str) -> Any:
    """`torch.load(path, weights_only=True)`; a file that is not a checkpoint is one ValueError line."""
    try:
        with (
            warnings.catch_warnings()
        ):  # torch's note on pickle protocols: the error below says what the file is
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except Exception as e:  # torch raises EOFError, RuntimeError, UnpicklingError, ... by file kind
        raise InputError(not_a_checkpoint(path, e)) from None
