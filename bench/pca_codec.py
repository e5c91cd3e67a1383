"""The PCA token codec and the compact store's size calculator: groundwork that no store uses,
measured by bench/bench_codec.py and bench/codec_losses.py (docs/benchmarks.md, "Compact store").

- A token codec: a PCA basis (mean (D,), r components (r, D), per-component scales (r,)) fitted on
  a sample of tokens, and per token r int8 coefficients plus one float32 scale. Decoding is one
  matmul (..., r) @ (r, D) plus the mean.
- `bytes_per_view`: the bytes of one cached view (v0's global and local targets, Ic's relation,
  the 56 float64 view parameters and the basis amortised over the views that share it) for a
  `CodecConfig`.

A basis that is corrupt (NaN, infinite, wrong shape or dtype) is refused with one StoreError line
(`check_basis`). The store's own codecs are dpal.store.codecs (the registry) and dpal.store.relation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dpal.errors import InputError
from dpal.store.relation import RELATION_DTYPES
from dpal.store.schema import StoreError
from dpal.views import NUM_PARAMS

BASIS_DTYPES = ("float16", "float32")  # the stored PCA components
TOKEN_SCALES = ("token", "token_component")  # int8 step: per token, or per token x component std
RELATION_SOURCES = ("factor", "tokens")  # Ic's relation as Z Z^T, or rebuilt from Ic's coded tokens
TOKEN_CODECS = ("pca", "int8", "float16")  # PCA + int8 coefficients, or today's per-token int8 / float16
INT8_MAX = 127.0


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


def relative_error(x: Tensor, y: Tensor) -> Tensor:
    """||x - y|| / ||x|| per token (last axis), float64."""
    x, y = x.double(), y.double()
    return (x - y).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)


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
