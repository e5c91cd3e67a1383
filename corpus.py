"""Corpus readers: index a person-image corpus, read an image's bytes, decode them to RGB.

Three kinds of corpus are accepted: a folder of images (searched recursively), WebDataset tar
shards (local paths, globs, brace patterns or fsspec URLs), and a text file listing image paths.
Indexing gives each image an `ImageRef`: a stable key (the relative path, or the tar's
`__key__`), where its bytes live (a file, or an offset and size inside an uncompressed tar) so
that both stages can read any image at random. `scan_corpus` also returns what could not be
indexed (a damaged tar, a FIFO, a broken link, a non-UTF-8 name), never dropping it silently.
`decode_image` is the one decoder both stages use, so that the pixels the student sees are those
the teacher saw.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import os
import stat
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image, ImageOps, UnidentifiedImageError

from dpal.common import MAX_PIXELS
from dpal.errors import InputError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
UNSUPPORTED_IMAGE_EXTS = (".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".apng")
"""Image formats that are recorded as corpus problems, not silently ignored like other files."""


class BadImage(Exception):
    """An image that cannot be used; `reason` is recorded in the store."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageRef:
    """Where one corpus image lives.

    Attributes:
        key: stable key (relative path for folders and lists, `__key__` for tars).
        source: file path or URL of the image, or of the tar holding it.
        offset: byte offset of the image inside the tar, or -1 for a whole file.
        size: byte size inside the tar, or -1 for a whole file.
    """

    key: str
    source: str
    offset: int = -1
    size: int = -1


def _is_url(s: str) -> bool:
    return "://" in s


def _tar_sources(spec: str) -> list[str]:
    out: list[str] = []
    for pattern in braceexpand(spec):
        if _is_url(pattern) and not pattern.startswith("file://"):
            out.append(pattern)
            continue
        pattern = pattern.removeprefix("file://")
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        out.extend(matches)
    return out


def _problem(entry: str, reason: str) -> dict[str, str]:
    """A corpus entry that could not be indexed; recorded in the store's `corpus_problems`."""
    return {"entry": entry, "reason": reason}


def _printable(name: str) -> str:
    """A file name as text even when its bytes are not UTF-8 (bad bytes as \\xNN escapes)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _utf8_problem(name: str, where: str) -> dict[str, str] | None:
    """A problem if `name` (decoded with surrogateescape) is not UTF-8: keys are stored as UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return _problem(where, "file name is not valid UTF-8 (store keys are UTF-8); rename it")
    return None


def _ext_problem(name: str, where: str) -> dict[str, str] | None:
    ext = os.path.splitext(name)[1].lower()
    if ext in UNSUPPORTED_IMAGE_EXTS:
        return _problem(
            where,
            f"{ext} images are not read (animated or multi-page formats); convert to {', '.join(IMAGE_EXTS)}",
        )
    return None


def _blocks(size: int) -> int:
    """Bytes that `size` data bytes take in a tar (whole 512-byte blocks)."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _has_data(f: Any, start: int, stop: int) -> bool:
    """Whether bytes [start, stop) of `f` hold anything but zeros (tar padding and end blocks)."""
    f.seek(start)
    while start < stop:
        block = f.read(min(stop - start, 1 << 20))
        if not block:
            return False
        if block.strip(b"\0"):
            return True
        start += len(block)
    return False


def _index_tar(source: str, problems: list[dict[str, str]]) -> list[ImageRef]:
    """Index one tar. Damage is appended to `problems`, never dropped: a corrupt header (tarfile
    would end the archive there and lose every member after it; `ignore_zeros` reads on to the next
    valid header, and the skipped bytes are recorded), a tar cut short (the cut member is named), and
    image members that are not files or whose names are not UTF-8.

    Raises:
        ValueError: a compressed tar, or a file that is not a tar at all.
    """
    if source.endswith((".tar.gz", ".tgz")):
        raise InputError(f"{source}: compressed tars cannot be read at random; repack as plain .tar")
    refs: list[ImageRef] = []
    members: list[tarfile.TarInfo] = []
    error = None
    with fsspec.open(source, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        try:
            tf = tarfile.open(fileobj=f, mode="r:", ignore_zeros=True)
        except tarfile.ReadError as e:
            raise InputError(f"corpus tar {source} is not a tar archive ({e})") from None
        with tf:
            try:
                members.extend(tf)
            except tarfile.ReadError as e:  # e.g. "unexpected end of data": the tar is cut short
                error = str(e)
        expected = 0  # where the next header starts if nothing is damaged
        for m in members:
            if m.offset > expected and _has_data(f, expected, m.offset):
                problems.append(
                    _problem(
                        f"{source} at byte {expected}",
                        (
                            f"corrupt tar header: {m.offset - expected} bytes up to the next valid header "
                            f"({_printable(m.name)}) were skipped; the member(s) there are lost"
                        ),
                    )
                )
            expected = m.offset_data + _blocks(m.size)
            if m.offset_data + m.size > size:
                problems.append(
                    _problem(
                        f"{source}:{_printable(m.name)}",
                        (
                            f"the tar is cut short at byte {size} inside this member (an interrupted copy or "
                            "download?); the member is lost"
                        ),
                    )
                )
                error = None  # the cut is named by its member
                break
            refs.extend(_tar_ref(source, m, problems))
        if not members and _has_data(f, 0, size):
            raise InputError(f"corpus tar {source} is not a tar archive (no valid header in {size} bytes)")
        _tar_tail(f, source, size, expected, error, bool(members), problems)
    return refs


def _tar_tail(
    f: Any,
    source: str,
    size: int,
    expected: int,
    error: str | None,
    has_members: bool,
    problems: list[dict[str, str]],
) -> None:
    """Record what follows the last member read: an unreadable stretch (`error`), or bytes up to
    the end of the file (from `expected`) that hold no valid header."""
    if error is not None:
        problems.append(_problem(f"{source} at byte {expected}", f"unreadable tar from here: {error}"))
    elif has_members and expected < size and _has_data(f, expected, size):
        what = (
            f"the tar is cut short at byte {size}, inside a header (an interrupted copy or download?)"
            if size % tarfile.BLOCKSIZE
            else "corrupt tar header"
        )
        problems.append(
            _problem(
                f"{source} at byte {expected}",
                (
                    f"{what}: the {size - expected} bytes from here to the end hold no valid header; the "
                    "member(s) there are lost"
                ),
            )
        )


def _tar_ref(source: str, m: tarfile.TarInfo, problems: list[dict[str, str]]) -> list[ImageRef]:
    """The member's ref if it is an image file, else nothing (a problem if it looked like an image)."""
    base = os.path.basename(m.name)
    if base.startswith(".") or "." not in base:
        return []
    where = f"{source}:{_printable(m.name)}"
    stem, ext = base.split(".", 1)
    if "." + ext.lower() not in IMAGE_EXTS:
        bad = _ext_problem(base, where)
        return [] if bad is None else problems.append(bad) or []
    if not m.isfile():
        problems.append(_problem(where, "not a regular file inside the tar (a link or a device)"))
        return []
    bad = _utf8_problem(m.name, where)
    if bad is not None:
        problems.append(bad)
        return []
    return [ImageRef(os.path.join(os.path.dirname(m.name), stem), source, m.offset_data, m.size)]


def _folder_entry(root: Path, p: Path, problems: list[dict[str, str]]) -> ImageRef | None:
    """The ref of one folder entry, or None; an image-named entry that cannot be read is recorded."""
    where = _printable(str(p))
    ext = p.suffix.lower()
    if ext not in IMAGE_EXTS:
        bad = _ext_problem(p.name, where) if not p.is_dir() else None
        if bad is not None:
            problems.append(bad)
        return None
    try:
        st = p.stat()
    except OSError as e:  # broken link (ENOENT) or a link loop (ELOOP)
        kind = (
            "symlink loop" if e.errno == errno.ELOOP else "broken symlink" if p.is_symlink() else "unreadable"
        )
        target = f" to {_printable(os.readlink(p))}" if p.is_symlink() else ""
        problems.append(_problem(where, f"{kind}{target}: {e.strerror}"))
        return None
    if stat.S_ISDIR(st.st_mode):
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket or device"
        problems.append(_problem(where, f"{kind}, not a regular file"))
        return None
    key = p.relative_to(root).as_posix()
    bad = _utf8_problem(key, where)
    if bad is not None:
        problems.append(bad)
        return None
    return ImageRef(key, str(p.resolve()))


def _read_list(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise InputError(f"corpus list {path} is not UTF-8 text (line {line}); save it as UTF-8") from None


@dataclass
class Corpus:
    """An indexed corpus: its images, and the entries that could not be indexed, with reasons."""

    refs: list[ImageRef]
    problems: list[dict[str, str]]


def scan_corpus(corpus: str) -> Corpus:
    """Index every image of a corpus in a stable order, and record what could not be indexed.

    Args:
        corpus: a folder, a `.txt` list of image paths (relative to the list's folder), or tar
            shards (path, glob, brace pattern or fsspec URL ending in `.tar`).

    Returns:
        The refs, and `problems`: one {"entry", "reason"} per image-named entry that is not a
        readable file (FIFO, broken or looping symlink, name not UTF-8, unsupported format such as
        an animated GIF) and per damaged place in a tar (corrupt header, cut short).

    Raises:
        ValueError: the corpus does not exist, is empty, is not a tar, or has duplicate keys.
    """
    path = Path(corpus)
    refs: list[ImageRef] = []
    problems: list[dict[str, str]] = []
    if not _is_url(corpus) and path.is_dir():
        for p in sorted(path.rglob("*")):
            ref = _folder_entry(path, p, problems)
            if ref is not None:
                refs.append(ref)
    elif not _is_url(corpus) and path.suffix == ".txt" and path.is_file():
        for line in _read_list(path):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line) if Path(line).is_absolute() else path.parent / line
            refs.append(ImageRef(line, str(p.resolve())))
    elif ".tar" in corpus:
        sources = _tar_sources(corpus)
        missing = [s for s in sources if not _is_url(s) and not os.path.exists(s)]
        if not sources or missing:
            raise InputError(f"corpus tar shards not found: {missing[:3] or corpus}")
        refs = [r for s in sources for r in _index_tar(s, problems)]
    else:
        raise InputError(
            f"corpus {corpus!r} not found: give a folder of images, a .txt list of image paths, "
            "or WebDataset .tar shards (path, glob, {a..b} pattern or URL)"
        )
    if not refs:
        lost = (
            f"; {len(problems)} entries unreadable, e.g. {problems[0]['entry']}: {problems[0]['reason']}"
            if problems
            else ""
        )
        raise InputError(f"corpus {corpus!r} holds no images ({', '.join(IMAGE_EXTS)}){lost}")
    seen: set[str] = set()
    dups = [r.key for r in refs if r.key in seen or seen.add(r.key)]
    if dups:
        raise InputError(f"corpus {corpus!r} has duplicate keys, e.g. {dups[:3]}; keys must be unique")
    return Corpus(refs, problems)


def index_corpus(corpus: str) -> list[ImageRef]:
    """The images of a corpus, in a stable order (`scan_corpus` without the problems)."""
    return scan_corpus(corpus).refs


def read_bytes(source: str, offset: int = -1, size: int = -1) -> bytes:
    """Read a whole file, or `size` bytes at `offset` of a tar (local path or fsspec URL)."""
    if offset < 0:
        with fsspec.open(source, "rb") as f:
            return f.read()
    with fsspec.open(source, "rb") as f:
        f.seek(offset)
        return f.read(size)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MB chunks (checkpoints and shard files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit (or wider) grayscale: keep the top 8 bits of the 16-bit range.
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(arr / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB PIL image with EXIF orientation applied.

    Raises:
        BadImage: empty, not an image, truncated or corrupt, or larger than `max_pixels`.
    """
    if not data:
        raise BadImage("empty file")
    # PIL warns at open for headers above its own limit; `max_pixels` below is the policy here, and
    # a warning per bomb would clutter the run's output.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise BadImage("not an image") from None
        except Image.DecompressionBombError as e:
            raise BadImage(f"decompression bomb: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:  # e.g. a JPEG cut inside its header segments
            raise BadImage(f"truncated or corrupt: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    if w < 1 or h < 1:
        raise BadImage(f"degenerate size {w}x{h}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"truncated or corrupt: {e}") from None
