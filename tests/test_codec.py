"""The relation factor (dpal.store.relation) and the PCA token codec (bench/pca_codec.py, groundwork no
store uses): stored arrays decode bit for bit to
what the in-memory code decodes to, the relation factor's error is the Eckart-Young bound, the
token codec's error is within its int8 step, corrupt bases and factors are refused, and the bytes
per view are the hand-counted ones."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import Crc32cCodec

from dpal.errors import InputError
from dpal.store import StoreError, relation
from dpal.teachers import Teacher

_PCA = Path(__file__).resolve().parent.parent / "bench" / "pca_codec.py"
_spec = importlib.util.spec_from_file_location("dpal_bench_pca_codec", _PCA)
pca_codec = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(pca_codec)


def _tokens(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _through_zarr(root: Path, name: str, a: np.ndarray) -> np.ndarray:
    """Write `a` to a real Zarr v3 array on disk (crc32c per chunk, as the store's features) and read it back."""
    arr = zarr.create_array(
        root / name, shape=a.shape, dtype=a.dtype, chunks=a.shape, compressors=[Crc32cCodec()]
    )
    arr[...] = a
    return zarr.open_array(root / name, mode="r")[...]


# A hand-computable relation: F = Q diag(a), Q (6, 4) = [H4 / 2; 0] with orthonormal columns (H4 the
# 4 x 4 Hadamard matrix), so L = F F^T / sqrt(4) = Q diag(a^2 / 2) Q^T has eigenvalues a^2 / 2.
H4 = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float32)
A = torch.tensor([4.0, 3.0, 2.0, 1.0])
F_HAND = torch.cat([H4 / 2, torch.zeros(2, 4)]) * A  # (T = 6, D = 4)
EIGENVALUES = [8.0, 4.5, 2.0, 0.5, 0.0, 0.0]


def test_best_rank_r_error_is_the_dropped_eigenvalues() -> None:
    factor = relation.relation_factor(F_HAND, rank=2)
    assert factor.eigenvalues.tolist() == pytest.approx(EIGENVALUES, abs=1e-5)
    residual = relation.relation_logits(F_HAND).double() - (factor.z @ factor.z.T).double()
    # the residual is PSD: its trace (nuclear norm) is the sum of the dropped eigenvalues, 2 + 0.5,
    # its Frobenius norm squared the sum of their squares, 4 + 0.25
    assert float(residual.trace()) == pytest.approx(2.5, abs=1e-5)
    assert float(residual.square().sum()) == pytest.approx(4.25, abs=1e-5)
    assert float(relation.truncation_error(factor.eigenvalues, 2)) == pytest.approx(math.sqrt(4.25), abs=1e-5)
    # the stored diagonal is L's own: diag(L)_i = sum_k F_ik^2 / 2 = (16 + 9 + 4 + 1) / 8 for the 4 rows
    assert factor.diag.tolist() == pytest.approx([3.75] * 4 + [0.0, 0.0], abs=1e-6)


def test_full_rank_factor_rebuilds_the_logits() -> None:
    f = _tokens(0, 3, 12, 20)  # T = 12 <= D: rank T is exact
    true = relation.relation_logits(f)
    got = relation.rebuild_logits(
        relation.relation_factor(f, 12).z, relation.relation_logits(f).diagonal(dim1=-2, dim2=-1), shift=False
    )
    assert torch.allclose(got, true, atol=1e-5 * float(true.abs().max()))
    narrow = _tokens(1, 12, 5)  # D = 5 < T: rank 5 is already exact
    assert torch.allclose(
        relation.rebuild_logits(
            relation.relation_factor(narrow, 5).z, torch.zeros(12), shift=False
        ).fill_diagonal_(0),
        relation.relation_logits(narrow).fill_diagonal_(0),
        atol=1e-5,
    )


def test_relation_logits_are_the_teachers(teacher: Teacher) -> None:
    ic = _tokens(2, 2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(relation.relation_logits(teacher.encode_crowd(ic)), teacher.relation_logits(ic))
        f = teacher.encode_crowd(ic)
        t = f.shape[1]
        rebuilt = relation.decode_relation(
            relation.encode_relation(relation.relation_factor(f, t), "float32")
        )
        true = torch.from_numpy(relation.relation_logits(f).numpy()) - teacher.relation_logits(ic).amax(
            -1, keepdim=True
        )
    assert float(relation.row_kl(true, rebuilt).max()) < 1e-9


@pytest.mark.parametrize("dtype", relation.RELATION_DTYPES)
def test_stored_relation_decodes_bit_for_bit(tmp_path: Path, dtype: str) -> None:
    factor = relation.relation_factor(_tokens(3, 2, 10, 16), rank=4)
    code = relation.encode_relation(factor, dtype)
    stored = relation.RelationCode(
        _through_zarr(tmp_path, "z", code.z),
        _through_zarr(tmp_path, "diag", code.diag),
        dtype,
        None if code.z_scale is None else _through_zarr(tmp_path, "zs", code.z_scale),
    )
    relation.check_relation_code(stored, num_tokens=10)
    assert stored.z.dtype == np.dtype(dtype)
    assert torch.equal(relation.decode_relation(stored), relation.decode_relation(code))
    if dtype == "float32":  # nothing rounded: the in-memory factor itself
        assert torch.equal(relation.decode_relation(stored), relation.rebuild_logits(factor.z, factor.diag))


def test_stored_tokens_decode_bit_for_bit(tmp_path: Path) -> None:
    x = _tokens(4, 2, 7, 24)
    basis = pca_codec.fit_token_basis(x, 8)
    code = pca_codec.encode_tokens(x, basis)
    assert code.q.dtype == np.int8 and code.q.shape == (2, 7, 8) and code.scale.shape == (2, 7)
    read = pca_codec.TokenBasis(
        *(_through_zarr(tmp_path, n, getattr(basis, n)) for n in ("mean", "components", "component_scale"))
    )
    pca_codec.check_basis(read, embed_dim=24)
    got = pca_codec.decode_tokens(
        pca_codec.TokenCode(_through_zarr(tmp_path, "q", code.q), _through_zarr(tmp_path, "s", code.scale)),
        read,
    )
    assert torch.equal(got, pca_codec.decode_tokens(code, basis))


@pytest.mark.parametrize("scales", pca_codec.TOKEN_SCALES)
def test_all_components_round_trip_within_the_int8_step(scales: str) -> None:
    """With all D components (float32) the only error is int8 rounding: each coefficient is off by
    at most half its step, so ||x - x^|| <= step / 2 * ||component scales|| per token."""
    x = _tokens(5, 300, 16) * torch.linspace(0.1, 3, 16) + 2.0
    basis = pca_codec.fit_token_basis(x, 16, scales=scales, dtype="float32")
    code = pca_codec.encode_tokens(x, basis)
    err = (pca_codec.decode_tokens(code, basis) - x).norm(dim=-1)
    bound = torch.from_numpy(code.scale) / 2 * float(np.linalg.norm(basis.component_scale))
    assert bool((err <= bound * (1 + 1e-4) + 1e-5).all())
    assert float(err.max()) > 0  # it is a lossy code: the bound is not vacuous
    assert np.abs(code.q).max() == 127  # each token's largest coefficient uses the whole range


def test_corrupt_basis_is_refused() -> None:
    basis = pca_codec.fit_token_basis(_tokens(6, 50, 12), 4)
    pca_codec.check_basis(basis, embed_dim=12)
    bad = pca_codec.TokenBasis(basis.mean, basis.components.copy(), basis.component_scale)
    bad.components[1, 3] = np.nan
    with pytest.raises(StoreError, match="token basis is corrupt: its components hold NaN") as e:
        pca_codec.check_basis(bad, embed_dim=12)
    assert "\n" not in str(e.value) and "rerun" in str(e.value)
    with pytest.raises(StoreError, match=r"components \(4, 12\).*do not fit D = 13"):
        pca_codec.check_basis(basis, embed_dim=13)
    with pytest.raises(StoreError, match="dtypes"):
        pca_codec.check_basis(
            pca_codec.TokenBasis(basis.mean.astype(np.float64), basis.components, basis.component_scale), 12
        )


def test_corrupt_relation_factor_is_refused() -> None:
    code = relation.encode_relation(relation.relation_factor(_tokens(7, 9, 8), 3), "int8")
    relation.check_relation_code(code, num_tokens=9)
    with pytest.raises(StoreError, match="do not fit T = 10"):
        relation.check_relation_code(code, num_tokens=10)
    code.diag[2] = np.inf
    with pytest.raises(StoreError, match="diagonal holds NaN or infinite"):
        relation.check_relation_code(code, num_tokens=9)
    with pytest.raises(InputError, match="between 1 and T = 9"):
        relation.relation_factor(_tokens(7, 9, 8), 10)


def test_bytes_per_view_hand_counted() -> None:
    """Paper shapes (D 768, P 128, T 257), r 32 float16, r_pca 256, one basis per 1024 views."""
    size = pca_codec.bytes_per_view(
        pca_codec.CodecConfig(relation_rank=32, token_codec="pca", token_components=256), 768, 128, 257, 1024
    )
    basis = (768 * 4 + 256 * 768 * 2 + 256 * 4) / 1024  # 388 exactly
    assert size == {
        "global": 768 * 2,
        "local": 128 * (256 + 4),
        "relation": 257 * 32 * 2 + 257 * 4,
        "params": 56 * 8,
        "basis": basis,
        "total": 1536 + 33280 + 17476 + 448 + 388,
    }
    # today's int8 tokens with the factor: no basis
    int8 = pca_codec.bytes_per_view(
        pca_codec.CodecConfig(relation_rank=32, token_codec="int8"), 768, 128, 257, 1024
    )
    assert (int8["local"], int8["basis"], int8["total"]) == (128 * 772, 0, 1536 + 98816 + 17476 + 448)
    # the defaults: r = 64 capped at T, float16 tokens, as today's float16 store but the relation
    assert (
        pca_codec.bytes_per_view(pca_codec.CodecConfig(), 768, 128, 257)["total"]
        == 1536 + 196608 + 257 * 132 + 448
    )
    assert [relation.default_relation_rank(t) for t in (257, 65, 3)] == [64, 16, 1]
    via_tokens = pca_codec.CodecConfig(relation_source="tokens", token_codec="pca", token_components=64)
    assert pca_codec.bytes_per_view(via_tokens, 768, 128, 257)["relation"] == 257 * 68
    with pytest.raises(InputError, match="relation_dtype 'bf16' is unknown"):
        pca_codec.CodecConfig(relation_dtype="bf16")
