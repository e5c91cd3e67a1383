"""The store's schema: its version, array names, the attributes that fix its identity, the error
it raises, and the checked reading of its group attributes (`_Fields`).

This is the one place that spells them; the rest of the package (and everything outside it, through
`dpal.store`) imports them from here. How each target is encoded (its dtype, bytes, schema version)
is the codec registry's (`store/codecs.py`); the typed attributes are `store/meta.py`'s.
docs/store.md documents every attribute and keeps the changelog.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpal import __version__
from dpal.errors import UserError

SCHEMA_VERSION = 2  # stores whose relation target is the logits (the default)
FACTOR_SCHEMA = 3  # stores whose relation target is a low-rank factor (attribute `relation_codec`)
ROTATED_SCHEMA = 4  # stores of dtype int8-rotated (attribute `token_codec`), either relation codec
READABLE_SCHEMAS = (1, 2, 3, 4)  # schema 1 lacks the checksums of schema 2; its stores read unchecked
FORMAT = "dpal-teacher-store"

# N images, K views per image, P patch tokens of v0, T tokens of Ic (1 + grid), D teacher width
GLOBAL = "global"  # (N, K, D)     teacher CLS (or mean patch token) on v0
LOCAL = "local"  # (N, K, P, D)  teacher patch tokens on v0
RELATION = "relation"  # (N, K, T, T) teacher affinity logits F F^T / sqrt(D) on Ic, each row minus its max
# schema 3, relation codec `factor`, instead of RELATION (codec.relation_factor):
RELATION_FACTOR = "relation_factor"  # (N, K, T, r) float16 Z, logits ~= Z Z^T off the diagonal
RELATION_DIAG = "relation_diag"  # (N, K, T) float32, the logits' exact diagonal
RELATION_CODECS = ("logits", "factor")
FACTOR_DTYPE = "float16"  # Z's stored dtype, whatever the store's `dtype` (which sets v0's targets)
SCALE_SUFFIX = "_scale"  # int8 only: per-token float32 scale, (N, K), (N, K, P), (N, K, T)
# schema 4, dtype int8-rotated: GLOBAL and LOCAL hold int8(x @ R) with their scales; the relation
# logits (if stored as logits) are plain int8. R is written once, when the store is created.
TOKEN_ROTATION = "token_rotation"  # (D, D) float32 R, orthogonal (codec.token_rotation)
PARAMS = "params"  # (N, K, NUM_PARAMS) float64 view parameters, laid out as views.PARAM_FIELDS
VALID = "valid"  # (N,) uint8: 1 cached, 0 skipped (bad image)
KEYS = "keys"  # (N,) str     image keys
SOURCE = "source"  # (N,) str    where the corpus image lives (file, or tar)
SOURCE_OFFSET = "source_offset"  # (N,) int64 byte offset in the source tar, -1 for a file
SOURCE_SIZE = "source_size"  # (N,) int64
IMAGE_OFFSET = "image_offset"  # (N,) int64 byte offset of the image in images/<shard>.tar, -1 if none
IMAGE_SIZE = "image_size"  # (N,) int64
FEATURES = (GLOBAL, LOCAL, RELATION)
INDEX_ARRAYS = (KEYS, SOURCE, SOURCE_OFFSET, SOURCE_SIZE)  # written once, when the store is created
# (and TOKEN_ROTATION in an int8-rotated store: its crc32c sits beside theirs in `integrity`)
SHARD_ARRAYS = (PARAMS, VALID, IMAGE_OFFSET, IMAGE_SIZE)  # written by each shard's writer
IMAGES_DIR = "images"
MARKERS_DIR = "shards"
# Per-shard arrays whose rows' crc32c each marker records (schema 2): the readers check them
# before trusting which rows are valid, where their images are, and their view parameters.
CHECKED_SHARD_ARRAYS = (VALID, IMAGE_OFFSET, IMAGE_SIZE, PARAMS)

# Group attribute holding the checksums of the store's own metadata (schema 2), recorded when the
# store is created: the other attributes (all but `complete`, which flips once at the end), every
# array's zarr.json (dtype, shape, codecs) and the values of the index arrays. Not part of
# StoreMeta: write.py computes it, integrity.py checks it.
INTEGRITY = "integrity"

# Attributes that fix what a store means: a rerun that differs in any of them is refused.
IDENTITY_ATTRS = (
    "teacher",
    "recipe",
    "seed",
    "num_views",
    "dtype",
    "shard_size",
    "corpus_fingerprint",
    "num_images",
    "embed_images",
    "token_grid",
    "relation_codec",  # absent (None) in logits stores
)

RELATION_TARGET = "row-shifted logits F F^T / sqrt(D)"
ROTATION_RULE = (
    "Q of the float64 QR of a D x D standard normal matrix drawn by numpy default_rng([0x524f54, seed]), "
    "each column signed so that the triangular factor's diagonal is positive, as float32 "
    "(codec.token_rotation)"
)
DECODE_RULE = "PIL, EXIF transpose, to RGB (dpal.corpus.decode_image)"
TEACHER_KINDS = ("vit", "cnn")
GLOBAL_TARGETS = ("cls", "mean", "pool")  # the CLS token, the mean patch token, a CNN's pooled map
TARGET_GRIDS = ("native", "interpolated")  # one teacher feature per student token, or resampled
REBUILD = "rebuild it with `dpal cache-teacher --out NEW`"


class StoreError(UserError):
    """A store that cannot be used as asked; the message says what to run (the CLI prints it as one
    line)."""


# ---------------------------------------------------------------- reading attributes, checked


@dataclass(frozen=True)
class _Kind:
    """What one attribute must be: `what` names it in the error, `ok` tests it, `convert` turns the
    JSON value into the field's value (lists into tuples)."""

    what: str
    ok: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda v: v


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _one_of(choices: tuple[str, ...]) -> _Kind:
    return _Kind(f"one of {', '.join(choices)}", lambda v: v in choices)


INT = _Kind("an integer", _is_int)
COUNT = _Kind("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE = _Kind("a positive integer", lambda v: _is_int(v) and v > 0)
OPTIONAL_INT = _Kind("an integer or null", lambda v: v is None or _is_int(v))
BOOL = _Kind("true or false", lambda v: isinstance(v, bool))
STR = _Kind("a string", lambda v: isinstance(v, str))
OPTIONAL_STR = _Kind("a string or null", lambda v: v is None or isinstance(v, str))
DICT = _Kind("an object", lambda v: isinstance(v, dict))
OPTIONAL_DICT = _Kind("an object or null", lambda v: v is None or isinstance(v, dict))
OPTIONAL_LIST = _Kind("a list or null", lambda v: v is None or isinstance(v, list))
GRID = _Kind(
    "two positive integers",
    lambda v: isinstance(v, list | tuple) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v),
    tuple,
)
RGB = _Kind(
    "three numbers",
    lambda v: isinstance(v, list | tuple) and len(v) == 3 and all(map(_is_number, v)),
    lambda v: tuple(float(x) for x in v),
)
NAMES = _Kind(
    "a list of strings", lambda v: isinstance(v, list | tuple) and all(isinstance(x, str) for x in v), tuple
)

_REQUIRED = object()


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def attribute_error(where: str | Path, name: str, problem: str) -> StoreError:
    """The one line for an attribute that is missing, malformed or inconsistent."""
    return StoreError(
        f"{where}: store attribute {name} {problem}; the store was written by another dpal or "
        f"edited: use the dpal that wrote it, or {REBUILD}"
    )


class _Fields:
    """One attribute object of a store, read field by field; errors name the field's full path
    (`teacher.embed_dim`) and the store."""

    def __init__(self, attrs: dict[str, Any], where: str | Path, prefix: str = "") -> None:
        self.attrs, self.where, self.prefix = attrs, where, prefix

    def __call__(self, key: str, kind: _Kind, default: Any = _REQUIRED) -> Any:
        name = self.prefix + key
        if key not in self.attrs:
            if default is not _REQUIRED:
                return default
            raise attribute_error(self.where, name, "is missing")
        value = self.attrs[key]
        if not kind.ok(value):
            raise attribute_error(self.where, name, f"should be {kind.what}, got {_short(value)}")
        return kind.convert(value)

    def sub(self, key: str) -> _Fields:
        return _Fields(self(key, DICT), self.where, f"{self.prefix}{key}.")


def check_header(attrs: dict[str, Any], where: str | Path) -> None:
    """Refuse what is not a dpal store, or a schema this dpal does not read."""
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{where} is a Zarr group but not a dpal teacher store")
    if attrs.get("schema_version") not in READABLE_SCHEMAS:
        raise StoreError(
            f"{where} has store schema {attrs.get('schema_version')}, this dpal ({__version__}) reads "
            f"schema {', '.join(map(str, READABLE_SCHEMAS))}; rebuild it with `dpal cache-teacher` or use a "
            "matching dpal"
        )
