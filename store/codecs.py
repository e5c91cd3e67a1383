"""The codec registry: how a store keeps each teacher target, each codec stated in one place.

A target codec is one `--dtype`: how v0's global and local tokens (and the relation logits, unless
the codec names another for them) are stored. It declares its name and --help line, the Zarr dtype
it stores, whether a float32 scale per token goes beside (`<array>_scale`), the schema version a
store of it needs, what it adds to the store's attributes (and so to its identity), its encode
(numpy, stage one) and its decode (torch, on any device: stage two's loader worker on the CPU and
the training device), and from these its bytes per view. A relation codec (`logits`, `factor`) is
how Ic's T x T relation target is stored; the two are `RELATION_CODECS`.

Adding a target codec is one subclass of `TargetCodec` and one `register` call (docs/store.md,
"Adding a codec"): here, where the built-in ones are registered, for `--dtype` and its help to list
it; or in any module imported before the codec is used, for the config to accept it. Stage one
writes it, `dpal store verify` checks it and stage two decodes it. Nothing else spells a dtype.

This module imports no torch (`dpal --help` lists the codecs): encode and decode import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dpal.errors import ConfigError
from dpal.store.schema import (
    FACTOR_DTYPE,
    FACTOR_SCHEMA,
    RELATION,
    RELATION_DIAG,
    RELATION_FACTOR,
    ROTATED_SCHEMA,
    SCHEMA_VERSION,
    TOKEN_ROTATION,
)

if TYPE_CHECKING:
    from torch import Tensor

INT8_MAX = 127.0
Encoded = tuple[np.ndarray, np.ndarray | None]  # the stored array, and its scale if the codec has one
ROTATION_RULE = (  # the attribute's text, as every int8-rotated store holds it (keep the bytes)
    "Q of the float64 QR of a D x D standard normal matrix drawn by numpy default_rng([0x524f54, seed]), "
    "each column signed so that the triangular factor's diagonal is positive, as float32 "
    "(codec.token_rotation)"
)


class TargetCodec:
    """One store dtype (`--dtype`): how a (..., C) float32 target is stored and read back.

    Subclasses set the class attributes and override `encode` and `decode`; `register` an instance.
    """

    name: ClassVar[str]
    """The `--dtype` value and the store's `dtype` attribute (part of its identity)."""
    help: ClassVar[str]
    """What `--dtype NAME` stores, for its help (after "NAME: ")."""
    storage: ClassVar[str]
    """The Zarr dtype of the stored array."""
    scaled: ClassVar[bool] = False
    """A float32 scale per token is stored beside it (`<array>_scale`, shape (..., ) of the tokens)."""
    schema: ClassVar[int] = SCHEMA_VERSION
    """The lowest store schema that holds it (docs/store.md, "Changelog")."""
    relation: ClassVar[str | None] = None
    """The codec of the T x T relation logits when not this one (a rotation is D x D)."""
    rotated: ClassVar[bool] = False
    """The store holds a rotation R (`TOKEN_ROTATION`), made once when the store is created and
    passed to encode and decode of v0's global and local targets."""
    nonfinite_kind: ClassVar[str] = ""
    """The float format of the stored bits when Zarr's dtype does not say it (bfloat16 as uint16),
    for the NaN and inf check (`integrity.nonfinite_rows`)."""

    def encode(self, x: np.ndarray, rotation: np.ndarray | None = None) -> Encoded:
        """float32 (..., C) -> the stored array (..., C), and the scale (...,) if `scaled`."""
        raise NotImplementedError

    def decode(self, data: Tensor, scale: Tensor | None = None, rotation: Tensor | None = None) -> Tensor:
        """Stored values as a tensor (`to_tensor`), on any device -> float32 (..., C) there.
        `rotation`: R (C, C) float32 on the same device; None leaves a rotated codec's values in
        R's basis."""
        raise NotImplementedError

    def to_tensor(self, data: np.ndarray) -> Tensor:
        """A stored array as a tensor of the stored dtype (what a loader worker ships)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(data))

    def value_bytes(self, width: int) -> int:
        """Bytes of one stored token of `width` channels, its scale included."""
        return np.dtype(self.storage).itemsize * width + (4 if self.scaled else 0)

    def attrs(self) -> dict[str, Any] | None:
        """The store attribute `token_codec` this codec adds, or None."""
        return None

    def token_error(
        self,
        x: np.ndarray,
        stored: np.ndarray,
        scale: np.ndarray | None,
        rows: np.ndarray,
        rotation: np.ndarray | None,
    ) -> float | None:
        """The mean relative error of the tokens of `rows` that a shard's marker records, or None."""
        return None


def _tensor(a: np.ndarray | None) -> Tensor | None:
    import torch

    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


class Float32(TargetCodec):
    name, storage = "float32", "float32"
    help = "as the teacher computed them"

    def encode(self, x: np.ndarray, rotation: np.ndarray | None = None) -> Encoded:
        return np.asarray(x, dtype=np.float32), None

    def decode(self, data: Tensor, scale: Tensor | None = None, rotation: Tensor | None = None) -> Tensor:
        return data.float()


class Float16(Float32):
    name, storage = "float16", "float16"
    help = "half precision, the default"

    def encode(self, x: np.ndarray, rotation: np.ndarray | None = None) -> Encoded:
        return np.asarray(x, dtype=np.float32).astype(np.float16), None


class BFloat16(Float32):
    name, storage, nonfinite_kind = "bfloat16", "uint16", "bfloat16"
    help = "its bits stored as uint16 (Zarr has no bfloat16)"

    def encode(self, x: np.ndarray, rotation: np.ndarray | None = None) -> Encoded:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16), None

    def to_tensor(self, data: np.ndarray) -> Tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16)


class Int8(TargetCodec):
    name, storage, scaled = "int8", "int8", True
    help = "with a float32 scale per token (its largest |value| / 127)"

    def tokens(self, x: np.ndarray, rotation: np.ndarray | None) -> np.ndarray:
        """The float32 tokens that are quantised (and whose error a marker records)."""
        return np.asarray(x, dtype=np.float32)

    def encode(self, x: np.ndarray, rotation: np.ndarray | None = None) -> Encoded:
        x = self.tokens(x, rotation)
        amax = np.abs(x).max(axis=-1)
        scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
        q = np.clip(np.rint(x / scale[..., None]), -INT8_MAX, INT8_MAX).astype(np.int8)
        return q, scale

    def decode(self, data: Tensor, scale: Tensor | None = None, rotation: Tensor | None = None) -> Tensor:
        return data.float() * scale[..., None]  # one float32 product per value, as numpy's

    def token_error(
        self,
        x: np.ndarray,
        stored: np.ndarray,
        scale: np.ndarray | None,
        rows: np.ndarray,
        rotation: np.ndarray | None,
    ) -> float | None:
        from dpal.store.rotation import int8_token_error

        # a rotated codec's in R's basis: R is orthogonal, so it is the rebuilt token's error too
        return int8_token_error(self.tokens(x, rotation), stored, scale, rows)


class Int8Rotated(Int8):
    name, schema, relation, rotated = "int8-rotated", ROTATED_SCHEMA, "int8", True
    help = (
        "int8 of the tokens times one random rotation R kept in the store (store schema 4), the "
        "relation logits plain int8"
    )

    def tokens(self, x: np.ndarray, rotation: np.ndarray | None) -> np.ndarray:
        from dpal.store.rotation import rotate_tokens

        if rotation is None:
            raise ValueError("int8-rotated needs the store's rotation R")
        return rotate_tokens(np.asarray(x, dtype=np.float32), rotation)

    def decode(self, data: Tensor, scale: Tensor | None = None, rotation: Tensor | None = None) -> Tensor:
        out = super().decode(data, scale)
        return out @ rotation.T if rotation is not None else out  # (q * scale) @ R^T

    def attrs(self) -> dict[str, Any] | None:
        return {
            "codec": self.name,
            "rotation": TOKEN_ROTATION,
            "rotation_rule": ROTATION_RULE,
            "arrays": ["global", "local"],
            "decode": "(q * scale) @ R^T",
        }


_TARGET_CODECS: dict[str, TargetCodec] = {}


def register(codec: TargetCodec) -> TargetCodec:
    """Make `codec` a store dtype (`--dtype`, the store's `dtype` attribute); returns it."""
    if codec.name in _TARGET_CODECS and type(_TARGET_CODECS[codec.name]) is not type(codec):
        raise ValueError(f"a store codec named {codec.name!r} is registered already")
    _TARGET_CODECS[codec.name] = codec
    return codec


for _codec in (Float16(), BFloat16(), Int8(), Int8Rotated(), Float32()):
    register(_codec)

ROTATED_DTYPE = Int8Rotated.name
DTYPES = tuple(_TARGET_CODECS)  # the built-in dtypes, in --help's order


def unregister(name: str) -> None:
    """Forget a registered codec (a test's own)."""
    _TARGET_CODECS.pop(name, None)


def dtype_names() -> tuple[str, ...]:
    """Every registered store dtype, built-in first."""
    return tuple(_TARGET_CODECS)


def target_codec(name: str) -> TargetCodec:
    """The registered codec of store dtype `name`.

    Raises:
        ConfigError: no codec has that name; the line lists them.
    """
    if name not in _TARGET_CODECS:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(_TARGET_CODECS)}")
    return _TARGET_CODECS[name]


def dtype_help() -> str:
    """`--dtype`'s help: each registered codec's line."""
    return "Stored feature dtype. " + "; ".join(f"{c.name}: {c.help}" for c in _TARGET_CODECS.values()) + "."


def encode(x: np.ndarray, dtype: str, rotation: np.ndarray | None = None) -> Encoded:
    """float32 (..., C) -> the stored array of codec `dtype` (and its scale (...,) if scaled).
    A rotated codec takes the store's R (D, D) as `rotation`."""
    return target_codec(dtype).encode(x, rotation)


def decode(
    data: np.ndarray, scale: np.ndarray | None, dtype: str, rotation: np.ndarray | None = None
) -> Tensor:
    """A stored array -> float32 tensor on the CPU (the inverse of `encode`)."""
    codec = target_codec(dtype)
    if codec.rotated and rotation is None:
        raise ValueError(f"{dtype} needs the store's rotation R")
    return codec.decode(codec.to_tensor(data), _tensor(scale), _tensor(rotation))


# ---------------------------------------------------------------- the relation target


class RelationCodec:
    """How Ic's relation target is stored (`--relation`): its arrays, schema and attribute."""

    name: ClassVar[str]
    schema: ClassVar[int] = SCHEMA_VERSION

    def arrays(self, num_tokens: int, rank: int, dtype: str) -> dict[str, tuple[tuple[int, ...], str, bool]]:
        """{array: (shape of one view, storage dtype, scaled)} in a store of target codec `dtype`."""
        raise NotImplementedError

    def attrs(self, rank: int) -> dict[str, Any] | None:
        """The store attribute `relation_codec` (part of the identity), or None."""
        return None

    def decode(
        self, target: TargetCodec, data: Tensor, scale: Tensor | None = None, diag: Tensor | None = None
    ) -> Tensor:
        """The stored relation of a batch, on any device -> (B, T, T) float32 row-shifted logits
        there. `target`: the codec of the logits (`Layout.codec(RELATION)`); `diag`: the factor's."""
        raise NotImplementedError


class Logits(RelationCodec):
    """The row-shifted T x T logits, in the store's target codec (or the one it names)."""

    name = "logits"

    def arrays(self, num_tokens: int, rank: int, dtype: str) -> dict[str, tuple[tuple[int, ...], str, bool]]:
        codec = target_codec(dtype)
        codec = target_codec(codec.relation) if codec.relation else codec
        return {RELATION: ((num_tokens, num_tokens), codec.storage, codec.scaled)}

    def decode(
        self, target: TargetCodec, data: Tensor, scale: Tensor | None = None, diag: Tensor | None = None
    ) -> Tensor:
        return target.decode(data, scale)  # never rotated: R is D x D


class Factor(RelationCodec):
    """A rank-r float16 factor Z (T, r) and the exact float32 diagonal (store schema 3): the logits
    are Z Z^T off the diagonal (`relation.relation_code` encodes, `relation.rebuild_logits`
    decodes)."""

    name, schema = "factor", FACTOR_SCHEMA

    def arrays(self, num_tokens: int, rank: int, dtype: str) -> dict[str, tuple[tuple[int, ...], str, bool]]:
        return {
            RELATION_FACTOR: ((num_tokens, rank), FACTOR_DTYPE, False),
            RELATION_DIAG: ((num_tokens,), "float32", False),
        }

    def attrs(self, rank: int) -> dict[str, Any] | None:
        return {
            "codec": self.name,
            "rank": rank,
            "arrays": {RELATION_FACTOR: FACTOR_DTYPE, RELATION_DIAG: "float32"},
            # the attribute's text, as every factor store holds it (keep the bytes)
            "target": "row-shifted logits rebuilt as Z Z^T with the exact diagonal (codec.rebuild_logits)",
        }

    def decode(
        self, target: TargetCodec, data: Tensor, scale: Tensor | None = None, diag: Tensor | None = None
    ) -> Tensor:
        from dpal.store.relation import rebuild_logits

        return rebuild_logits(data.float(), diag)  # one batched matmul Z Z^T, on data's device


RELATION_CODECS: dict[str, RelationCodec] = {c.name: c for c in (Logits(), Factor())}


def relation_codec(rank: int) -> RelationCodec:
    """The relation codec of a store whose factor rank is `rank` (0: the logits)."""
    return RELATION_CODECS["factor" if rank else "logits"]


def schema_for(dtype: str, rank: int) -> int:
    """The schema a new store is written in: the highest its codecs need (2 for the logits in a
    dtype of schema 2, 3 for a relation factor, 4 for int8-rotated with either)."""
    return max(target_codec(dtype).schema, relation_codec(rank).schema)
