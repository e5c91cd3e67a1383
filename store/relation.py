"""The relation target's codecs: Ic's T x T affinity logits, stored row-shifted (`logits`) or as a
low-rank factor with the exact diagonal (`factor`, store schema 3).

Ic's tokens F (T, D) give the logits L = F F^T / sqrt(D), a PSD matrix of rank <= min(T, D). Its
eigendecomposition L = U diag(w) U^T gives Z = U_r sqrt(w_r) (T, r), and Z Z^T is the best rank-r
approximation of L (Eckart-Young: the Frobenius error squared is the sum of the dropped w_i^2). The
exact diagonal (T,) is kept too: the self-affinity is usually each row's largest logit, to which the
softmax is most sensitive (keeping it cuts the row KL about 15x, docs/benchmarks.md). Decoding is
one batched matmul Z Z^T, the diagonal put back, rows shifted by their max (as the logits are
stored; softmax rows are unchanged). Stage one encodes with `relation_code`, stage two decodes with
`rebuild_logits`, on any device.

A factor that is corrupt (NaN, infinite, wrong shape or dtype) is refused with one StoreError line
(`check_relation_code`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dpal.errors import InputError
from dpal.store.codecs import INT8_MAX
from dpal.store.schema import FACTOR_DTYPE, RELATION_DIAG, RELATION_FACTOR, StoreError

RELATION_DTYPES = ("float16", "float32", "int8")  # the factor Z's dtypes (FACTOR_DTYPE is a store's)
RELATION_KL = "relation_kl"  # (B,) in a factor batch: each view's mean row KL of the stored factor


def shift_rows(logits: np.ndarray) -> np.ndarray:
    """Subtract each row's max. softmax_row is unchanged; values become <= 0, which keeps the
    largest (most probable) logits precise in float16 and int8."""
    return logits - logits.max(axis=-1, keepdims=True)


def relation_logits(tokens: Tensor) -> Tensor:
    """F F^T / sqrt(D) in float32, symmetrised, exactly as `Teacher.relation_logits` computes it.

    Args:
        tokens: (..., T, D) Ic's tokens.

    Returns:
        (..., T, T) float32 logits (not row-shifted).
    """
    f = tokens.float()
    logits = f @ f.transpose(-1, -2) / math.sqrt(f.shape[-1])
    return (logits + logits.transpose(-1, -2)) / 2


@dataclass
class RelationFactor:
    """Low-rank relation of a batch of views, float32: logits ~= z z^T off the diagonal, `diag`
    on it. `eigenvalues` (..., T) are all of L's, descending (for the error bound; not stored)."""

    z: Tensor  # (..., T, r)
    diag: Tensor  # (..., T)
    eigenvalues: Tensor  # (..., T)


def relation_factor(tokens: Tensor, rank: int) -> RelationFactor:
    """The best rank-`rank` factor of Ic's relation logits, and their exact diagonal.

    The eigendecomposition runs in float64 on the float32 logits that the teacher computes, so the
    factor approximates exactly what the float16 store holds today (before its row shift).

    Args:
        tokens: (..., T, D) Ic's tokens.
        rank: r, 1 <= r <= T.
    """
    t = tokens.shape[-2]
    if not 1 <= rank <= t:
        raise InputError(
            f"relation rank {rank} must be between 1 and T = {t}; set relation_rank in that range"
        )
    logits = relation_logits(tokens)
    w, u = torch.linalg.eigh(logits.double())  # ascending
    w, u = w.flip(-1), u.flip(-1)
    # L is PSD; rounding can leave tiny negative eigenvalues, which carry no energy worth keeping
    z = u[..., :rank] * w[..., :rank].clamp_min(0).sqrt().unsqueeze(-2)
    return RelationFactor(z.float(), logits.diagonal(dim1=-2, dim2=-1).clone(), w.float())


def truncation_error(eigenvalues: Tensor, rank: int) -> Tensor:
    """||L - Z Z^T||_F of the best rank-r approximation: sqrt of the dropped eigenvalues squared."""
    return eigenvalues[..., rank:].double().square().sum(-1).sqrt()


@dataclass
class RelationCode:
    """What a view stores for its relation: the factor in `dtype` and the exact diagonal.

    z (..., T, r) float16/float32, or int8 with `z_scale` (..., r) float32 (one step per column);
    diag (..., T) float32.
    """

    z: np.ndarray
    diag: np.ndarray
    dtype: str
    z_scale: np.ndarray | None = None


def encode_relation(factor: RelationFactor, dtype: str = "float16") -> RelationCode:
    """RelationFactor -> stored arrays (numpy, on the CPU)."""
    if dtype not in RELATION_DTYPES:
        raise InputError(f"relation dtype {dtype!r} is unknown; choose one of {RELATION_DTYPES}")
    z = factor.z.detach().float().cpu()
    diag = factor.diag.detach().float().cpu().numpy()
    if dtype == "int8":
        # one step per column: the columns are eigen-directions whose sizes differ by orders
        amax = z.abs().amax(dim=-2)  # (..., r)
        scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
        q = torch.round(z / scale.unsqueeze(-2)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return RelationCode(q.numpy(), diag, dtype, scale.numpy())
    return RelationCode(z.to(getattr(torch, dtype)).numpy(), diag, dtype)


def check_relation_code(code: RelationCode, num_tokens: int, where: str = "the relation factor") -> None:
    """StoreError unless `code` is a finite factor of T = num_tokens rows."""
    fix = "delete the shard's marker and rerun the same dpal cache-teacher command"
    z, diag = code.z, code.diag
    if code.dtype not in RELATION_DTYPES or z.dtype != np.dtype(code.dtype):
        raise StoreError(f"{where} is corrupt: stored as {z.dtype}, expected {code.dtype}; {fix}")
    if z.ndim < 2 or z.shape[-2] != num_tokens or diag.shape != z.shape[:-1]:
        raise StoreError(
            f"{where} is corrupt: factor {z.shape} and diagonal {diag.shape} do not fit "
            f"T = {num_tokens}; {fix}"
        )
    parts = [("factor", z), ("diagonal", diag)]
    if code.dtype == "int8":
        if code.z_scale is None or code.z_scale.shape != z.shape[:-2] + z.shape[-1:]:
            raise StoreError(f"{where} is corrupt: its int8 column scales are missing or misshapen; {fix}")
        parts.append(("column scales", code.z_scale))
    for name, a in parts:
        if not np.isfinite(a.astype(np.float32)).all():
            raise StoreError(f"{where} is corrupt: its {name} holds NaN or infinite values; {fix}")


def decode_relation(code: RelationCode, device: torch.device | str = "cpu", shift: bool = True) -> Tensor:
    """Stored relation -> (..., T, T) float32 logits on `device`: z z^T with the exact diagonal,
    each row minus its max when `shift` (as `store.shift_rows`)."""
    z = torch.from_numpy(np.ascontiguousarray(code.z)).to(device).float()
    if code.z_scale is not None:
        z = z * torch.from_numpy(code.z_scale).to(device).unsqueeze(-2)
    diag = torch.from_numpy(np.ascontiguousarray(code.diag)).to(device)
    return rebuild_logits(z, diag, shift)


def rebuild_logits(z: Tensor, diag: Tensor, shift: bool = True) -> Tensor:
    """(..., T, r) factor and (..., T) diagonal -> (..., T, T) float32 logits (one batched matmul).

    The factor is made contiguous first: the matmul's summation order follows the memory layout on
    some CPUs, and the rebuilt logits must not depend on whether Z came from the eigendecomposition
    (strided) or from the store (contiguous)."""
    z = z.contiguous()
    logits = z @ z.transpose(-1, -2)
    logits.diagonal(dim1=-2, dim2=-1).copy_(diag)
    if shift:
        logits = logits - logits.amax(dim=-1, keepdim=True)
    return logits


def row_kl(true_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(softmax(true) || softmax(rebuilt)) of each row, float64: (..., T)."""
    p = torch.log_softmax(true_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return (p.exp() * (p - q)).sum(-1)


def default_relation_rank(num_crowd_tokens: int) -> int:
    """r = min(64, T // 4), at least 1: 64 at the paper's T = 257 (mean row KL 1.2e-4 on a random
    ViT-B), 16 at the demo's T = 65 (exact for EfficientNet-Lite2); the cap keeps the factor at
    most a quarter of float16 logits' bytes (docs/benchmarks.md, "Compact store")."""
    return max(1, min(64, num_crowd_tokens // 4))


def relation_rank(relation: str, rank: int | None, num_crowd_tokens: int) -> int:
    """r of the relation factor that `--relation` and `--relation-rank` ask for at T = num_crowd_tokens;
    0 for `--relation logits`."""
    if relation != "factor":
        if rank is not None:  # checked here, not in CacheConfig: a config sets fields one by one
            raise InputError(
                f"relation_rank {rank} is set but the relation is stored as logits; add "
                "--relation factor, or drop --relation-rank"
            )
        return 0
    rank = default_relation_rank(num_crowd_tokens) if rank is None else rank
    if not 1 <= rank <= num_crowd_tokens:
        raise InputError(
            f"relation_rank {rank} must be between 1 and T = {num_crowd_tokens} (Ic's tokens); "
            "set --relation-rank in that range"
        )
    return rank


def relation_code(tokens: Tensor, rank: int) -> dict[str, np.ndarray]:
    """Ic's tokens (B, T, D) -> what a factor store holds, factored on the tokens' device.

    Returns:
        RELATION_FACTOR (B, T, r) float16 Z, RELATION_DIAG (B, T) float32 exact diagonal, and
        RELATION_KL (B,) float64: each view's mean row KL(softmax(logits) || softmax(rebuilt)),
        the logits rebuilt from the float16 Z as stage two rebuilds them.
    """
    with torch.autocast(tokens.device.type, enabled=False):  # float32 logits, float64 eigh
        factor = relation_factor(tokens, rank)
        z = factor.z.to(getattr(torch, FACTOR_DTYPE))
        kl = row_kl(relation_logits(tokens), rebuild_logits(z.float(), factor.diag, shift=False)).mean(-1)
    return {
        RELATION_FACTOR: z.cpu().numpy(),
        RELATION_DIAG: factor.diag.float().cpu().numpy(),
        RELATION_KL: kl.cpu().numpy(),
    }
