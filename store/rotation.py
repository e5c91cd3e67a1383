"""The token rotation of the `int8-rotated` codec (store schema 4): a fixed random rotation R (D, D),
applied before the per-token int8 (`codecs.Int8Rotated`). It spreads the few outlier channels of a
token over all D, which shrinks the int8 step. R is made once per store (`token_rotation`), stored,
and checked on every read (`check_rotation`): stage two must never train on a damaged R.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec

from dpal.store.integrity import index_crc32c
from dpal.store.layout import _open_rw
from dpal.store.schema import INTEGRITY, TOKEN_ROTATION, StoreError

ROTATION_STREAM = 0x524F54  # "ROT": R's generator is its own, never the views' (seed, key, k)
ROTATION_TOLERANCE = 1e-4  # max |R^T R v - v| / |v| of a stored float32 R (rounding: ~1e-7)


def token_rotation(dim: int, seed: int) -> np.ndarray:
    """R (D, D) float32, orthogonal: Q of the float64 QR of a standard normal matrix, each column
    signed so that the triangular factor's diagonal is positive (which makes Q unique, and Haar
    distributed). A fixed random rotation spreads a token's few large channels over all D, so one
    int8 step per token fits the rotated token far better (incoherence processing, as QuIP# and
    QuaRot do for weights; docs/store.md, "Token codec").

    Computed once, by whoever creates the store; every writer and reader uses the stored bytes.
    """
    g = np.random.default_rng([ROTATION_STREAM, seed]).standard_normal((dim, dim))
    q, r = np.linalg.qr(g)
    q *= np.where(np.diagonal(r) < 0, -1.0, 1.0)  # column j times sign(r_jj)
    return q.astype(np.float32)


def check_rotation(rotation: np.ndarray, dim: int, where: str = "the token rotation") -> None:
    """StoreError unless `rotation` is a finite float32 (D, D) orthogonal matrix (checked on a
    fixed probe of 4 vectors: O(D^2), not a full R^T R)."""
    fix = "the store's rotation is damaged: restore the store from a copy, or rebuild it with `dpal cache-teacher --out NEW`"
    if rotation.dtype != np.float32 or rotation.shape != (dim, dim):
        raise StoreError(
            f"{where} is corrupt: {rotation.dtype} {rotation.shape}, expected float32 ({dim}, {dim}); {fix}"
        )
    if not np.isfinite(rotation).all():
        raise StoreError(f"{where} is corrupt: it holds NaN or infinite values; {fix}")
    probe = np.random.default_rng(0).standard_normal((dim, 4))
    r = rotation.astype(np.float64)
    err = np.linalg.norm(r.T @ (r @ probe) - probe, axis=0) / np.linalg.norm(probe, axis=0)
    if err.max() > ROTATION_TOLERANCE:
        raise StoreError(
            f"{where} is corrupt: it is not orthogonal (|R^T R v - v| / |v| = {err.max():.2g}); {fix}"
        )


def rotate_tokens(x: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    """(..., D) float32 tokens -> x @ R (..., D) float32 (one torch matmul, on the CPU's threads)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return (t @ torch.from_numpy(rotation)).numpy()


def int8_token_error(x: np.ndarray, q: np.ndarray, scale: np.ndarray, rows: np.ndarray) -> float:
    """Mean relative error ||x - q * scale|| / ||x|| over the tokens of `rows` (first axis), in the
    basis x is in: R is orthogonal, so in R's basis it is the rebuilt token's error too."""
    x, q, scale = x[rows], q[rows], scale[rows]
    if x.size == 0:
        return 0.0
    err = np.linalg.norm(x - q.astype(np.float32) * scale[..., None], axis=-1)
    den = np.linalg.norm(x, axis=-1)
    return float(np.mean(err / np.maximum(den, 1e-30)))


# ---------------------------------------------------------------- R in the store


def create_rotation(root: Path, group: zarr.Group, embed_dim: int, seed: int) -> None:
    """R of an int8-rotated store (`token_rotation` of D and the store's seed), one chunk
    with a crc32c; its values' crc32c goes into `integrity` with the index arrays'."""
    d = embed_dim
    group.create_array(
        TOKEN_ROTATION,
        shape=(d, d),
        dtype="float32",
        chunks=(d, d),
        compressors=[Crc32cCodec()],
        fill_value=0,
    )
    _open_rw(root, TOKEN_ROTATION)[:] = token_rotation(d, seed)


def read_token_rotation(path: Path, attrs: dict[str, Any], embed_dim: int) -> np.ndarray:
    """An int8-rotated store's R (D, D) float32, checked: its crc32c against the one recorded when
    the store was created, and finite and orthogonal (`check_rotation`).

    Raises:
        StoreError: R is missing, unreadable or damaged; one line.
    """
    where = f"{path}: the token rotation ({TOKEN_ROTATION})"
    fix = "restore the store from a copy, or rebuild it with `dpal cache-teacher --out NEW`"
    want = attrs.get(INTEGRITY, {}).get("index_crc32c", {}).get(TOKEN_ROTATION)
    try:
        rotation = zarr.open_array(
            Path(path) / TOKEN_ROTATION, mode="r", config={"read_missing_chunks": False}
        )[:]
    except Exception as e:  # noqa: BLE001 - missing, or a chunk whose crc32c fails
        raise StoreError(
            f"{where} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {fix}"
        ) from None
    if want is None or index_crc32c(rotation) != want:
        raise StoreError(f"{where} does not match the checksum recorded when the store was created; {fix}")
    check_rotation(rotation, embed_dim, where)
    return rotation
