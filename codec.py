"""The compact store's codecs (issue 12): what a cached view would hold instead of float16 tokens
and T x T logits. The relation factor is wired in (`--relation factor`, store schema 3: stage one
writes `relation_factor` and `relation_diag` with `relation_factor`, stage two rebuilds the logits
with `rebuild_logits`), and so is the token rotation (`--dtype int8-rotated`, store schema 4:
`token_rotation` makes R once per store, `rotate_tokens` before the int8 of `store.encode`, stage two
rotates back). The PCA token codec is groundwork, used by no store array yet (docs/store.md,
"Compact store").

Three codecs and a size calculator, pure functions over batched torch tensors on any device:

- The relation target as a low-rank factor. Ic's tokens F (T, D) give the logits
  L = F F^T / sqrt(D), a PSD matrix of rank <= min(T, D). Its eigendecomposition L = U diag(w) U^T
  gives Z = U_r sqrt(w_r) (T, r), and Z Z^T is the best rank-r approximation of L (Eckart-Young:
  the Frobenius error squared is the sum of the dropped w_i^2). The exact diagonal (T,) is kept
  too: the self-affinity is usually each row's largest logit, to which the softmax is most
  sensitive (keeping it cuts the row KL about 15x, docs/benchmarks.md).
  Decoding is one batched matmul Z Z^T, the diagonal put back, rows shifted by their max (as the
  float16 store holds them; softmax rows are unchanged).
- A token codec: a PCA basis (mean (D,), r components (r, D), per-component scales (r,)) fitted on
  a sample of tokens, and per token r int8 coefficients plus one float32 scale. Decoding is one
  matmul (..., r) @ (r, D) plus the mean.
- A fixed random rotation R (D, D) (`token_rotation`), applied before today's per-token int8: it
  spreads the few outlier channels of a token over all D, which shrinks the int8 step.
- `bytes_per_view`: the bytes of one cached view (v0's global and local targets, Ic's relation,
  the 56 float64 view parameters and the basis amortised over the views that share it) for a
  `CodecConfig`, for `--dry-run` and `dpal store info` once the store uses the codec.

A basis or factor that is corrupt (NaN, infinite, wrong shape or dtype) is refused with one
StoreError line (`check_basis`, `check_relation_code`, `check_rotation`): stage two must never train
on garbage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dpal.errors import InputError
from dpal.store_schema import StoreError
from dpal.views import NUM_PARAMS

RELATION_DTYPES = ("float16", "float32", "int8")  # the stored factor Z
BASIS_DTYPES = ("float16", "float32")  # the stored PCA components
TOKEN_SCALES = ("token", "token_component")  # int8 step: per token, or per token x component std
RELATION_SOURCES = ("factor", "tokens")  # Ic's relation as Z Z^T, or rebuilt from Ic's coded tokens
TOKEN_CODECS = ("pca", "int8", "float16")  # PCA + int8 coefficients, or today's per-token int8 / float16
INT8_MAX = 127.0


# ---------------------------------------------------------------- relation as a low-rank factor


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


# ---------------------------------------------------------------- token codec: PCA + int8


@dataclass
class TokenBasis:
    """A PCA basis of teacher tokens: mean (D,) float32, components (r, D) in `dtype` (orthonormal
    rows before rounding), component_scale (r,) float32 (the std of each coefficient for
    `token_component` scales, else ones)."""

    mean: np.ndarray
    components: np.ndarray
    component_scale: np.ndarray

    @property
    def num_components(self) -> int:
        return int(self.components.shape[0])

    def tensors(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
        """(mean (D,), components (r, D), scaled components (r, D)) as float32 on `device`; the
        scaled ones are the decoder's matrix (the coefficient scale folded in)."""
        mean = torch.from_numpy(self.mean).to(device)
        comp = torch.from_numpy(np.ascontiguousarray(self.components)).to(device).float()
        return mean, comp, comp * torch.from_numpy(self.component_scale).to(device).unsqueeze(-1)


def fit_token_basis(
    tokens: Tensor, components: int, scales: str = "token_component", dtype: str = "float16"
) -> TokenBasis:
    """PCA of a sample of tokens (N, D): the mean and the top `components` directions.

    The covariance (D, D) is eigendecomposed in float64. `token_component` scales are each
    coefficient's std, floored at 1/128 of the largest (a zero scale would divide by zero).
    """
    if scales not in TOKEN_SCALES:
        raise InputError(f"token scales {scales!r} are unknown; choose one of {TOKEN_SCALES}")
    if dtype not in BASIS_DTYPES:
        raise InputError(f"basis dtype {dtype!r} is unknown; choose one of {BASIS_DTYPES}")
    x = tokens.reshape(-1, tokens.shape[-1]).double()
    n, d = x.shape
    if not 1 <= components <= d:
        raise InputError(f"token components {components} must be between 1 and D = {d}")
    mean = x.mean(0)
    xc = x - mean
    w, v = torch.linalg.eigh(xc.T @ xc / max(n, 1))  # ascending
    w, v = w.flip(0)[:components].clamp_min(0), v.flip(1)[:, :components]
    if scales == "token_component":
        # Floor at 1/128 of the largest std: a direction with (almost) no variance in the sample
        # but some in a token being coded would otherwise set that token's int8 step alone.
        std = w.sqrt()
        std = std.clamp_min(float(std[0]) / 128 if float(std[0]) > 0 else 1.0)
    else:
        std = torch.ones_like(w)
    comp = v.T.float().to(getattr(torch, dtype))
    return TokenBasis(mean.float().cpu().numpy(), comp.cpu().numpy(), std.float().cpu().numpy())


def check_basis(basis: TokenBasis, embed_dim: int, where: str = "the token basis") -> None:
    """StoreError unless `basis` is finite, float16/float32, of width D = embed_dim, with one positive
    scale per component."""
    fix = "delete the shard's marker and rerun the same dpal cache-teacher command"
    mean, comp, scale = basis.mean, basis.components, basis.component_scale
    if comp.dtype.name not in BASIS_DTYPES or mean.dtype != np.float32 or scale.dtype != np.float32:
        raise StoreError(f"{where} is corrupt: dtypes {mean.dtype}, {comp.dtype}, {scale.dtype}; {fix}")
    r = comp.shape[0] if comp.ndim == 2 else -1
    if mean.shape != (embed_dim,) or comp.shape != (r, embed_dim) or scale.shape != (r,) or r < 1:
        raise StoreError(
            f"{where} is corrupt: mean {mean.shape}, components {comp.shape}, scales "
            f"{scale.shape} do not fit D = {embed_dim}; {fix}"
        )
    for name, a in (("mean", mean), ("components", comp), ("scales", scale)):
        if not np.isfinite(a.astype(np.float32)).all():
            raise StoreError(f"{where} is corrupt: its {name} hold NaN or infinite values; {fix}")
    if not (scale > 0).all():
        raise StoreError(f"{where} is corrupt: a component scale is not positive; {fix}")


@dataclass
class TokenCode:
    """Coded tokens: q (..., r) int8 coefficients, scale (...,) float32 (one step per token)."""

    q: np.ndarray
    scale: np.ndarray


def encode_tokens(tokens: Tensor, basis: TokenBasis) -> TokenCode:
    """(..., D) float32 tokens -> int8 coefficients in `basis` and one scale per token.

    The coefficients are projections onto the stored (rounded) components, divided by each
    component's scale; the int8 step is the largest of them over 127.
    """
    mean, comp, _ = basis.tensors(tokens.device)
    c = (tokens.float() - mean) @ comp.T / torch.from_numpy(basis.component_scale).to(tokens.device)
    amax = c.abs().amax(dim=-1)
    step = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(c / step.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return TokenCode(q.cpu().numpy(), step.cpu().numpy())


def decode_tokens(code: TokenCode, basis: TokenBasis, device: torch.device | str = "cpu") -> Tensor:
    """TokenCode -> (..., D) float32 tokens on `device`: one matmul with the scaled components."""
    mean, _, scaled = basis.tensors(device)
    q = torch.from_numpy(np.ascontiguousarray(code.q)).to(device).float()
    step = torch.from_numpy(np.ascontiguousarray(code.scale)).to(device).unsqueeze(-1)
    return (q * step) @ scaled + mean


# ---------------------------------------------------------------- token codec: a random rotation + int8

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


def unrotate_tokens(y: Tensor, rotation: Tensor) -> Tensor:
    """(..., D) tokens in R's basis -> y @ R^T, float32, on `y`'s device (R there already)."""
    return y.float() @ rotation.T


def int8_token_error(x: np.ndarray, q: np.ndarray, scale: np.ndarray, rows: np.ndarray) -> float:
    """Mean relative error ||x - q * scale|| / ||x|| over the tokens of `rows` (first axis), in the
    basis x is in: R is orthogonal, so in R's basis it is the rebuilt token's error too."""
    x, q, scale = x[rows], q[rows], scale[rows]
    if x.size == 0:
        return 0.0
    err = np.linalg.norm(x - q.astype(np.float32) * scale[..., None], axis=-1)
    den = np.linalg.norm(x, axis=-1)
    return float(np.mean(err / np.maximum(den, 1e-30)))


def relative_error(x: Tensor, y: Tensor) -> Tensor:
    """||x - y|| / ||x|| per token (last axis), float64."""
    x, y = x.double(), y.double()
    return (x - y).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)


# ---------------------------------------------------------------- bytes per view


def default_relation_rank(num_crowd_tokens: int) -> int:
    """r = min(64, T // 4), at least 1: 64 at the paper's T = 257 (mean row KL 1.2e-4 on a random
    ViT-B), 16 at the demo's T = 65 (exact for EfficientNet-Lite2); the cap keeps the factor at
    most a quarter of float16 logits' bytes (docs/benchmarks.md, "Compact store")."""
    return max(1, min(64, num_crowd_tokens // 4))


@dataclass(frozen=True)
class CodecConfig:
    """One compact-store configuration (all the choices that change the bytes)."""

    relation_rank: int = 64
    """r of the relation factor (relation_source `factor`); see `default_relation_rank`."""
    relation_dtype: str = "float16"
    token_codec: str = "float16"
    """How v0's patch tokens (and Ic's, for relation_source `tokens`) are stored: `pca` (r_pca int8
    coefficients + a float32 step), or as today's store does, `int8` (D int8 + a float32 step) or
    `float16`."""
    token_components: int = 256
    """r_pca of the `pca` token codec."""
    basis_dtype: str = "float16"
    relation_source: str = "factor"
    global_dtype: str = "float16"
    """v0's global token is one token: it stays float16 (int8-coded it would save ~1 KB)."""

    def __post_init__(self) -> None:
        for name, value, known in (
            ("relation_dtype", self.relation_dtype, RELATION_DTYPES),
            ("basis_dtype", self.basis_dtype, BASIS_DTYPES),
            ("relation_source", self.relation_source, RELATION_SOURCES),
            ("token_codec", self.token_codec, TOKEN_CODECS),
            ("global_dtype", self.global_dtype, ("float16", "float32")),
        ):
            if value not in known:
                raise InputError(f"codec {name} {value!r} is unknown; choose one of {known}")
        if self.relation_rank < 1 or self.token_components < 1:
            raise InputError("codec relation_rank and token_components must be at least 1")


def bytes_per_view(
    cfg: CodecConfig,
    embed_dim: int,
    num_patches: int,
    num_crowd_tokens: int,
    views_per_basis: int | None = None,
) -> dict[str, int]:
    """Bytes of one cached view, by part, and their `total`.

    `basis` is one basis (mean float32, components, scales float32) shared by `views_per_basis`
    views (a store shard's S x K), rounded up; 0 when None or without the `pca` token codec.
    Relation ranks above T count as T.
    """
    d, p, t = embed_dim, num_patches, num_crowd_tokens
    r_pca = min(cfg.token_components, d)
    # per token: int8 coefficients (or channels) + a float32 step, or float16 channels
    token_bytes = {"pca": r_pca + 4, "int8": d + 4, "float16": 2 * d}[cfg.token_codec]
    out = {"global": d * np.dtype(cfg.global_dtype).itemsize, "local": p * token_bytes}
    if cfg.relation_source == "tokens":
        out["relation"] = t * token_bytes
    else:
        r = min(cfg.relation_rank, t)
        z = t * r * np.dtype(cfg.relation_dtype).itemsize + (4 * r if cfg.relation_dtype == "int8" else 0)
        out["relation"] = z + 4 * t  # + the float32 diagonal
    out["params"] = NUM_PARAMS * 8
    basis = 4 * d + r_pca * d * np.dtype(cfg.basis_dtype).itemsize + 4 * r_pca
    out["basis"] = -(-basis // views_per_basis) if views_per_basis and cfg.token_codec == "pca" else 0
    out["total"] = sum(out.values())
    return out
