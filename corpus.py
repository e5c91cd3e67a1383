"""Corpus readers: index a person-image corpus, read an image's bytes, decode them to RGB.

Three kinds of corpus are accepted: a folder of images (searched recursively), WebDataset tar
shards (local paths, globs, brace patterns or fsspec URLs), and a text file listing image paths.
Indexing gives each image an `ImageRef`: a stable key (the relative path, or the tar's
`__key__`), where its bytes live (a file, or an offset and size inside an uncompressed tar) so
that both stages can read any image at random. `decode_image` is the one decoder both stages use,
so that the pixels the student sees are those the teacher saw.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEFAULT_MAX_PIXELS = 64_000_000
"""Images whose header declares more pixels than this are skipped as decompression bombs."""


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


def _index_tar(source: str) -> list[ImageRef]:
    if source.endswith((".tar.gz", ".tgz")):
        raise ValueError(f"{source}: compressed tars cannot be read at random; repack as plain .tar")
    refs: list[ImageRef] = []
    with fsspec.open(source, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            if base.startswith(".") or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            if "." + ext.lower() not in IMAGE_EXTS:
                continue
            key = os.path.join(os.path.dirname(m.name), stem)
            refs.append(ImageRef(key, source, m.offset_data, m.size))
    return refs


def index_corpus(corpus: str) -> list[ImageRef]:
    """List every image of a corpus in a stable order.

    Args:
        corpus: a folder, a `.txt` list of image paths (relative to the list's folder), or tar
            shards (path, glob, brace pattern or fsspec URL ending in `.tar`).

    Raises:
        ValueError: the corpus does not exist, is empty, or has duplicate keys.
    """
    path = Path(corpus)
    refs: list[ImageRef]
    if not _is_url(corpus) and path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        refs = [ImageRef(p.relative_to(path).as_posix(), str(p.resolve())) for p in files]
    elif not _is_url(corpus) and path.suffix == ".txt" and path.is_file():
        refs = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line) if Path(line).is_absolute() else path.parent / line
            refs.append(ImageRef(line, str(p.resolve())))
    elif ".tar" in corpus:
        sources = _tar_sources(corpus)
        missing = [s for s in sources if not _is_url(s) and not os.path.exists(s)]
        if not sources or missing:
            raise ValueError(f"corpus tar shards not found: {missing[:3] or corpus}")
        refs = [r for s in sources for r in _index_tar(s)]
    else:
        raise ValueError(
            f"corpus {corpus!r} not found: give a folder of images, a .txt list of image paths, "
            "or WebDataset .tar shards (path, glob, {a..b} pattern or URL)"
        )
    if not refs:
        raise ValueError(f"corpus {corpus!r} holds no images ({', '.join(IMAGE_EXTS)})")
    seen: set[str] = set()
    dups = [r.key for r in refs if r.key in seen or seen.add(r.key)]
    if dups:
        raise ValueError(f"corpus {corpus!r} has duplicate keys, e.g. {dups[:3]}; keys must be unique")
    return refs


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


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
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
