"""A store's group attributes as one typed, validated object (`StoreMeta`) and its parts
(`TokenGrid`, `TeacherIdentity`, `Preprocessing`).

Stage one builds a `StoreMeta` (`pipeline.prepare.store_meta`) and stage two reads one
(`StoreReader.store_meta`). `StoreMeta.to_attrs()` is exactly what a store's zarr.json holds (same
keys, same order, so the bytes and the integrity checksum are those of the dict this replaced);
`StoreMeta.from_attrs` reads schemas 1 to 4 and names the first missing or malformed attribute in one
StoreError line. What the codecs add (`relation_codec`, `token_codec`) comes from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpal import __version__
from dpal.common import IMAGENET_MEAN, IMAGENET_STD
from dpal.store.codecs import ROTATED_DTYPE, dtype_names, relation_codec, target_codec
from dpal.store.layout import Layout
from dpal.store.schema import (
    BOOL,
    COUNT,
    DECODE_RULE,
    DICT,
    FACTOR_SCHEMA,
    FORMAT,
    GLOBAL_TARGETS,
    GRID,
    INT,
    NAMES,
    OPTIONAL_DICT,
    OPTIONAL_INT,
    OPTIONAL_LIST,
    OPTIONAL_STR,
    POSITIVE,
    REBUILD,
    RELATION_TARGET,
    RGB,
    ROTATED_SCHEMA,
    SCHEMA_VERSION,
    STR,
    TARGET_GRIDS,
    TEACHER_KINDS,
    StoreError,
    _Fields,
    _one_of,
    attribute_error,
    check_header,
)
from dpal.views import NUM_PARAMS, PARAM_FIELDS, ViewRecipe

if TYPE_CHECKING:
    from dpal.teachers import TeacherSpec


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

    Stage one builds it (`pipeline.prepare.store_meta`), `write.create_store` writes
    `to_attrs()`, and every reader gets it from `from_attrs` (`StoreReader.store_meta`). The
    attribute `complete` flips once, when the last shard is done; `integrity` is
    `integrity.py`'s.
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
    """Run settings that change stored values (`pipeline.prepare.value_settings`), compared on
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
        return relation_codec(self.relation_rank).attrs(self.relation_rank)

    def token_codec_attrs(self) -> dict[str, Any] | None:
        """The attribute `token_codec` (schema 4) of the store's target codec, None for most."""
        return target_codec(self.dtype).attrs()

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
        if (relation := self.relation_codec_attrs()) is not None:
            attrs["relation_codec"] = relation
        if (token := self.token_codec_attrs()) is not None:
            attrs["token_codec"] = token
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
            dtype=f("dtype", _one_of(dtype_names())),
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
        """A dtype of schema 4 (int8-rotated) and schema 4 go together, and such a store names its
        token codec as the codec's `attrs` do."""
        codec = target_codec(self.dtype)
        rotated = codec.schema >= ROTATED_SCHEMA
        if rotated != (self.schema_version >= ROTATED_SCHEMA):
            raise attribute_error(
                f.where,
                "dtype",
                f"is {self.dtype}, but schema {self.schema_version} stores "
                f"{'are' if self.schema_version >= ROTATED_SCHEMA else 'are not'} {ROTATED_DTYPE}",
            )
        want = codec.attrs()
        if want is None:
            if "token_codec" in f.attrs:
                raise attribute_error(f.where, "token_codec", f"is set, but the dtype is {self.dtype}")
            return
        sub = f.sub("token_codec")
        sub("codec", _one_of((want["codec"],)))
        sub("rotation", _one_of((want["rotation"],)))

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
