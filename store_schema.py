"""The teacher store's schema: its version, array names, feature dtypes, shapes (`Layout`) and its
group attributes as one typed, validated object (`StoreMeta`).

This is the one place that spells them; `store.py` writes and reads stores with them (and
re-exports every name here, so `from dpal.store import StoreMeta` works), stage one builds a
`StoreMeta` (`pipeline.engine.store_meta`) and stage two reads one (`StoreReader.store_meta`).
`StoreMeta.to_attrs()` is exactly what a store's zarr.json holds (same keys, same order, so the
bytes and the integrity checksum are those of the dict this replaced); `StoreMeta.from_attrs`
reads schemas 1 to 4 and names the first missing or malformed attribute in one StoreError line.
docs/store.md documents every attribute and keeps the changelog.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dpal import __version__
from dpal.common import IMAGENET_MEAN, IMAGENET_STD, STORE_DTYPES
from dpal.errors import UserError
from dpal.views import NUM_PARAMS, PARAM_FIELDS, ViewRecipe

if TYPE_CHECKING:
    from dpal.teachers import TeacherSpec

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
ROTATED_DTYPE = "int8-rotated"
ROTATED_FEATURES = (GLOBAL, LOCAL)  # the D-wide targets that go through R
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

DTYPES = STORE_DTYPES  # feature dtypes (`--dtype`); Zarr has no bfloat16, so its bits go as uint16
STORAGE_DTYPE = {
    "float16": "float16",
    "bfloat16": "uint16",
    "int8": "int8",
    ROTATED_DTYPE: "int8",
    "float32": "float32",
}
INT8_DTYPES = ("int8", ROTATED_DTYPE)  # dtypes stored as int8 with a per-token float32 scale

# Group attribute holding the checksums of the store's own metadata (schema 2), recorded when the
# store is created: the other attributes (all but `complete`, which flips once at the end), every
# array's zarr.json (dtype, shape, codecs) and the values of the index arrays. Not part of
# StoreMeta: store.py computes and checks it.
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


# ---------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Shapes of one store. P patches and T crowd tokens follow the student's patch grid."""

    num_images: int
    num_views: int
    shard_size: int
    embed_dim: int
    num_patches: int
    num_crowd_tokens: int
    dtype: str
    relation_rank: int = 0
    """r of the relation factor; 0: the relation is stored as T x T logits (schema 1, 2)."""

    @property
    def relation_codec(self) -> str:
        return "factor" if self.relation_rank else "logits"

    def feature_arrays(self) -> dict[str, tuple[str, bool]]:
        """Each feature array's storage dtype, and whether it has a float32 `_scale` array (int8)."""
        storage = STORAGE_DTYPE[self.dtype]
        scaled = self.dtype in INT8_DTYPES
        out = {name: (storage, scaled) for name in (GLOBAL, LOCAL)}
        if self.relation_rank:
            return out | {RELATION_FACTOR: (FACTOR_DTYPE, False), RELATION_DIAG: ("float32", False)}
        return out | {RELATION: (storage, scaled)}

    @property
    def rotated(self) -> bool:
        """Whether GLOBAL and LOCAL are stored as int8(x @ R) (dtype int8-rotated, schema 4)."""
        return self.dtype == ROTATED_DTYPE

    def feature_dtype(self, name: str) -> str:
        """How feature array `name` is encoded (`store.encode`): the relation logits of an
        int8-rotated store are plain int8 (R is D x D; the logits are T x T)."""
        return "int8" if self.rotated and name not in ROTATED_FEATURES else self.dtype

    def rotation_bytes(self) -> int:
        """Bytes of R, stored once per store (0 unless int8-rotated); not in `bytes_per_view`."""
        return self.embed_dim * self.embed_dim * 4 if self.rotated else 0

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        n, k, d, p, t = (
            self.num_images,
            self.num_views,
            self.embed_dim,
            self.num_patches,
            self.num_crowd_tokens,
        )
        shapes = {GLOBAL: (n, k, d), LOCAL: (n, k, p, d)}
        if self.relation_rank:
            return shapes | {RELATION_FACTOR: (n, k, t, self.relation_rank), RELATION_DIAG: (n, k, t)}
        return shapes | {RELATION: (n, k, t, t)}

    def bytes_per_view(self) -> int:
        """Bytes of targets per cached view, scales and parameters included."""
        n = NUM_PARAMS * 8
        for name, shape in self.feature_shapes().items():
            dtype, scaled = self.feature_arrays()[name]
            n += int(np.prod(shape[2:])) * np.dtype(dtype).itemsize + (
                int(np.prod(shape[2:-1])) * 4 if scaled else 0
            )
        return n


# ---------------------------------------------------------------- the group attributes


@dataclass(frozen=True)
class TokenGrid:
    """The patch grids of v0 and Ic at the student's patch size (attribute `token_grid`)."""

    patch_size: int
    global_grid: tuple[int, int]
    """(Hg / patch, Wg / patch): v0's P patch tokens, row-major."""
    crowd_grid: tuple[int, int]
    """(Hc / patch, Wc / patch): Ic's tokens after its first (global) token."""
    relation: str = RELATION_TARGET

    @classmethod
    def of(cls, recipe: ViewRecipe, patch_size: int) -> TokenGrid:
        g, c = recipe.global_size, recipe.crowd_size
        return cls(
            patch_size, (g[0] // patch_size, g[1] // patch_size), (c[0] // patch_size, c[1] // patch_size)
        )

    @property
    def num_patches(self) -> int:
        return self.global_grid[0] * self.global_grid[1]

    @property
    def num_crowd_tokens(self) -> int:
        return 1 + self.crowd_grid[0] * self.crowd_grid[1]

    def to_attrs(self) -> dict[str, Any]:
        return {
            "patch_size": self.patch_size,
            "global": list(self.global_grid),
            "crowd": list(self.crowd_grid),
            "num_patches": self.num_patches,
            "num_crowd_tokens": self.num_crowd_tokens,
            "relation": self.relation,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str | Path = "store") -> TokenGrid:
        """Read and check the attribute's object; a StoreError names the first bad field."""
        return cls._read(_Fields(attrs, where))

    @classmethod
    def _read(cls, f: _Fields) -> TokenGrid:
        grid = cls(f("patch_size", POSITIVE), f("global", GRID), f("crowd", GRID), f("relation", STR))
        for key, derived in (("num_patches", grid.num_patches), ("num_crowd_tokens", grid.num_crowd_tokens)):
            if f(key, INT) != derived:  # the shapes of every feature array follow from them
                raise attribute_error(
                    f.where, f.prefix + key, f"is {f(key, INT)}, but the grids give {derived}"
                )
        return grid


@dataclass(frozen=True)
class TeacherIdentity:
    """What produced the targets (`teachers.Teacher.identity()`, attribute `teacher`). The sha256
    identifies the weights; the checkpoint's path may move between machines."""

    name: str
    arch: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    random_init: bool
    random_init_seed: int
    layer: int | None
    kind: str
    embed_dim: int
    global_token: str
    input_scale: int = 1
    """The factor each view was upsampled by before the teacher (absent in stores written before
    it existed: 1)."""
    target_grid: str = "native"
    """`native`: one teacher feature per student token; `interpolated`: a coarser teacher map
    resampled onto the student's grid (absent: interpolated for CNN teachers, whose stride-32 map
    every earlier store resampled)."""

    def to_attrs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str | Path = "store") -> TeacherIdentity:
        """Read and check the attribute's object; a StoreError names the first bad field."""
        return cls._read(_Fields(attrs, where))

    @classmethod
    def _read(cls, f: _Fields) -> TeacherIdentity:
        kind = f("kind", _one_of(TEACHER_KINDS))
        return cls(
            name=f("name", STR),
            arch=f("arch", STR),
            checkpoint=f("checkpoint", OPTIONAL_STR),
            checkpoint_sha256=f("checkpoint_sha256", OPTIONAL_STR),
            random_init=f("random_init", BOOL),
            random_init_seed=f("random_init_seed", INT),
            layer=f("layer", OPTIONAL_INT),
            kind=kind,
            embed_dim=f("embed_dim", POSITIVE),
            global_token=f("global_token", _one_of(GLOBAL_TARGETS)),
            input_scale=f("input_scale", POSITIVE, 1),
            target_grid=f(
                "target_grid", _one_of(TARGET_GRIDS), "interpolated" if kind == "cnn" else "native"
            ),
        )


@dataclass(frozen=True)
class Preprocessing:
    """How pixels reached the teacher (attribute `preprocessing`): stage two must normalise alike."""

    input_range: str = "RGB in [0, 1]"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    decode: str = DECODE_RULE

    def to_attrs(self) -> dict[str, Any]:
        return {
            "input": self.input_range,
            "mean": list(self.mean),
            "std": list(self.std),
            "decode": self.decode,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str | Path = "store") -> Preprocessing:
        """Read and check the attribute's object; a StoreError names the first bad field."""
        return cls._read(_Fields(attrs, where))

    @classmethod
    def _read(cls, f: _Fields) -> Preprocessing:
        return cls(f("input", STR), f("mean", RGB), f("std", RGB), f("decode", STR))


@dataclass(frozen=True)
class StoreMeta:
    """Everything a store's group attributes say, typed (docs/store.md, "Group attributes").

    Stage one builds it (`pipeline.engine.store_meta`), `store.create_store` writes
    `to_attrs()`, and every reader gets it from `from_attrs` (`StoreReader.store_meta`). The
    attribute `complete` flips once, when the last shard is done; `integrity` is store.py's.
    """

    teacher: TeacherIdentity
    recipe: ViewRecipe
    token_grid: TokenGrid
    seed: int
    num_views: int
    num_images: int
    shard_size: int
    dtype: str
    embed_dim: int
    corpus: str
    corpus_fingerprint: str
    embed_images: bool
    preprocessing: Preprocessing = Preprocessing()
    value_settings: dict[str, Any] | None = None
    """Run settings that change stored values (`pipeline.engine.value_settings`), compared on
    resume; None in stores made before the attribute existed."""
    config: dict[str, Any] | None = None
    """The resolved `dpal cache-teacher` config, as a record."""
    corpus_problems: list[dict[str, Any]] | None = None
    """Corpus entries that could not be indexed, [{"entry", "reason"}]; None in older stores."""
    schema_version: int = SCHEMA_VERSION
    dpal_version: str = __version__
    complete: bool = False
    param_fields: tuple[str, ...] = PARAM_FIELDS
    relation_rank: int = 0
    """r of the relation factor (schema 3, attribute `relation_codec`); 0: T x T logits."""

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    @property
    def layout(self) -> Layout:
        return Layout(
            self.num_images,
            self.num_views,
            self.shard_size,
            self.embed_dim,
            self.token_grid.num_patches,
            self.token_grid.num_crowd_tokens,
            self.dtype,
            self.relation_rank,
        )

    def relation_codec_attrs(self) -> dict[str, Any] | None:
        """The attribute `relation_codec` (schema 3), None for a logits store."""
        if not self.relation_rank:
            return None
        return {
            "codec": "factor",
            "rank": self.relation_rank,
            "arrays": {RELATION_FACTOR: FACTOR_DTYPE, RELATION_DIAG: "float32"},
            "target": "row-shifted logits rebuilt as Z Z^T with the exact diagonal (codec.rebuild_logits)",
        }

    def token_codec_attrs(self) -> dict[str, Any] | None:
        """The attribute `token_codec` (schema 4), None unless the dtype is int8-rotated."""
        if self.dtype != ROTATED_DTYPE:
            return None
        return {
            "codec": ROTATED_DTYPE,
            "rotation": TOKEN_ROTATION,
            "rotation_rule": ROTATION_RULE,
            "arrays": list(ROTATED_FEATURES),
            "decode": "(q * scale) @ R^T",
        }

    def to_attrs(self) -> dict[str, Any]:
        """The group attributes, in the order stores have always been written (zarr.json's bytes
        follow it; the integrity checksum sorts the keys)."""
        attrs = {
            "format": FORMAT,
            "schema_version": self.schema_version,
            "dpal_version": self.dpal_version,
            "complete": self.complete,
            "num_shards": self.num_shards,
            "embed_dim": self.embed_dim,
            "param_fields": list(self.param_fields),
            "teacher": self.teacher.to_attrs(),
            "preprocessing": self.preprocessing.to_attrs(),
            "recipe": self.recipe.to_dict(),
            "seed": self.seed,
            "num_views": self.num_views,
            "num_images": self.num_images,
            "dtype": self.dtype,
            "shard_size": self.shard_size,
            "token_grid": self.token_grid.to_attrs(),
            "corpus": self.corpus,
            "corpus_fingerprint": self.corpus_fingerprint,
            "embed_images": self.embed_images,
        }
        if self.relation_rank:
            attrs["relation_codec"] = self.relation_codec_attrs()
        if self.dtype == ROTATED_DTYPE:
            attrs["token_codec"] = self.token_codec_attrs()
        optional = {
            "value_settings": self.value_settings,
            "config": self.config,
            "corpus_problems": self.corpus_problems,
        }
        return attrs | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str | Path = "store") -> StoreMeta:
        """Read and check a store's group attributes (schema 1 to 4); unknown attributes are
        ignored, as additive ones always were.

        Raises:
            StoreError: not a dpal store, an unread schema, or the first attribute that is missing,
                of the wrong type or inconsistent with the others; one line naming it.
        """
        if not isinstance(attrs, dict):
            raise StoreError(f"{where}: the store's attributes are not a JSON object; {REBUILD}")
        check_header(attrs, where)
        f = _Fields(attrs, where)
        meta = cls(
            teacher=TeacherIdentity._read(f.sub("teacher")),
            recipe=_recipe(f),
            token_grid=TokenGrid._read(f.sub("token_grid")),
            seed=f("seed", INT),
            num_views=f("num_views", POSITIVE),
            num_images=f("num_images", COUNT),
            shard_size=f("shard_size", POSITIVE),
            dtype=f("dtype", _one_of(DTYPES)),
            embed_dim=f("embed_dim", POSITIVE),
            corpus=f("corpus", STR),
            corpus_fingerprint=f("corpus_fingerprint", STR),
            embed_images=f("embed_images", BOOL),
            preprocessing=Preprocessing._read(f.sub("preprocessing")),
            value_settings=f("value_settings", OPTIONAL_DICT, None),
            config=f("config", OPTIONAL_DICT, None),
            corpus_problems=f("corpus_problems", OPTIONAL_LIST, None),
            schema_version=attrs["schema_version"],
            dpal_version=f("dpal_version", STR),
            complete=f("complete", BOOL),
            param_fields=f("param_fields", NAMES),
            relation_rank=_relation_rank(f, attrs["schema_version"]),
        )
        meta._check_consistent(f)
        meta._check_token_codec(f)
        return meta

    def _check_token_codec(self, f: _Fields) -> None:
        """Schema 4 and dtype int8-rotated go together, and such a store names its rotation."""
        rotated = self.dtype == ROTATED_DTYPE
        if rotated != (self.schema_version >= ROTATED_SCHEMA):
            raise attribute_error(
                f.where,
                "dtype",
                f"is {self.dtype}, but schema {self.schema_version} stores "
                f"{'are' if self.schema_version >= ROTATED_SCHEMA else 'are not'} {ROTATED_DTYPE}",
            )
        if not rotated:
            if "token_codec" in f.attrs:
                raise attribute_error(f.where, "token_codec", f"is set, but the dtype is {self.dtype}")
            return
        codec = f.sub("token_codec")
        codec("codec", _one_of((ROTATED_DTYPE,)))
        codec("rotation", _one_of((TOKEN_ROTATION,)))

    def _check_consistent(self, f: _Fields) -> None:
        """Attributes that restate each other must agree: each restates a shape readers rely on."""
        if f("num_shards", INT) != self.num_shards:
            raise attribute_error(
                f.where,
                "num_shards",
                f"is {f('num_shards', INT)}, but {self.num_images} "
                f"images in shards of {self.shard_size} make {self.num_shards}",
            )
        if self.teacher.embed_dim != self.embed_dim:
            raise attribute_error(
                f.where,
                "teacher.embed_dim",
                f"is {self.teacher.embed_dim}, but embed_dim is {self.embed_dim}",
            )
        if self.param_fields != PARAM_FIELDS:
            raise attribute_error(
                f.where,
                "param_fields",
                f"differs from this dpal's {NUM_PARAMS} view parameters "
                "(views.PARAM_FIELDS), so the stored views would replay wrongly",
            )
        if self.relation_rank > self.token_grid.num_crowd_tokens:
            raise attribute_error(
                f.where,
                "relation_codec.rank",
                f"is {self.relation_rank}, above T = {self.token_grid.num_crowd_tokens} crowd tokens",
            )
        want = TokenGrid.of(self.recipe, self.token_grid.patch_size)
        if (want.global_grid, want.crowd_grid) != (self.token_grid.global_grid, self.token_grid.crowd_grid):
            raise attribute_error(
                f.where,
                "token_grid",
                f"has grids {self.token_grid.global_grid} and "
                f"{self.token_grid.crowd_grid}, but the recipe's sizes give {want.global_grid} "
                f"and {want.crowd_grid}",
            )

    def teacher_spec(self) -> TeacherSpec:
        """The spec that rebuilds the teacher that wrote the store (`--online-teacher`). Load it,
        then `check_teacher(teacher.identity())`: only the sha256 proves the same weights."""
        from dpal.teachers import EFFICIENTNET_LITE2, PRESETS, TeacherSpec  # timm: only when asked

        t = self.teacher
        packaged = t.name == EFFICIENTNET_LITE2  # weights come from its package, not a file
        return TeacherSpec(
            name=t.name,
            checkpoint=None if packaged or t.random_init else t.checkpoint,
            random_init=t.random_init,
            random_init_seed=t.random_init_seed,
            layer=t.layer,
            arch=t.arch if t.name in PRESETS else None,
            input_scale=t.input_scale,
            global_size=self.recipe.global_size,
            crowd_size=self.recipe.crowd_size,
            patch_size=self.token_grid.patch_size,
            global_token="mean" if t.global_token == "mean" else "auto",
        )

    def check_teacher(self, identity: dict[str, Any]) -> None:
        """Refuse a loaded teacher (`Teacher.identity()`) whose weights are not the store's."""
        if identity.get("checkpoint_sha256") != self.teacher.checkpoint_sha256:
            raise StoreError("the teacher checkpoint differs from the one that wrote the store (sha256)")


def _relation_rank(f: _Fields, schema: int) -> int:
    """r from the attribute `relation_codec`: required in schema 3, absent before (0: logits),
    optional in schema 4 (either relation codec)."""
    if schema == ROTATED_SCHEMA and "relation_codec" not in f.attrs:
        return 0
    if schema < FACTOR_SCHEMA:
        if "relation_codec" in f.attrs:
            raise attribute_error(
                f.where, "relation_codec", f"is set, but schema {schema} stores hold logits"
            )
        return 0
    codec = f.sub("relation_codec")
    codec("codec", _one_of(("factor",)))  # the one codec of schema 3
    return codec("rank", POSITIVE)


def _recipe(f: _Fields) -> ViewRecipe:
    d = f("recipe", DICT)
    try:
        return ViewRecipe.from_dict(d)
    except (ValueError, TypeError) as e:
        raise attribute_error(
            f.where, "recipe", f"is not a view recipe of this dpal ({str(e).splitlines()[0]})"
        ) from None
