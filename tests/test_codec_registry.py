"""The codec registry (dpal.store.codecs): a codec declared and registered in this file alone goes
through stage one, `dpal store verify`, the reader and a training step; and every built-in codec
decodes on tensors (stage two's path) to the values numpy's reference gives.

The toy codec stores float32 targets negated, as float64: 8 bytes a value (no built-in codec has
that width) and a sign that shows its encode and decode ran. Its decoded targets are the teacher's
float32 values exactly, so they equal a float32 store's, and so does a training step on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import dpal_tests_stage2_util as u  # registered by conftest.py
import numpy as np
import pytest
import torch
import zarr
from torch import Tensor

from dpal.config import CacheConfig
from dpal.errors import ConfigError
from dpal.store import GLOBAL, LOCAL, RELATION, StoreReader, decode, read_meta, verify_store
from dpal.store.codecs import TargetCodec, dtype_names, register, target_codec, unregister
from dpal.trainer.train import train


class Negated64(TargetCodec):
    name: ClassVar[str] = "test-float64-negated"
    help: ClassVar[str] = "the targets negated, as float64 (a test's codec)"
    storage: ClassVar[str] = "float64"

    def encode(
        self, x: np.ndarray, rotation: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        return -np.asarray(x, dtype=np.float64), None

    def decode(self, data: Tensor, scale: Tensor | None = None, rotation: Tensor | None = None) -> Tensor:
        return (-data).float()


TOY = Negated64()
# the tiny store's shapes (stage2_util): D 192, P = (32 / 16) x (16 / 16) = 2, T = 1 + 2 x 3 = 7
VALUES_PER_VIEW = 192 + 2 * 192 + 7 * 7
PARAM_BYTES = 56 * 8


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A store of the toy codec and a float32 store of the same command (the same teacher values)."""
    register(TOY)
    root = tmp_path_factory.mktemp("registry")
    corpus = u.make_corpus(root / "corpus")
    try:
        yield u.make_store(corpus, root / "toy", dtype=TOY.name), u.make_store(corpus, root / "f32")
    finally:
        unregister(TOY.name)


def test_a_registered_codec_is_a_store_dtype(stores: tuple[Path, Path]) -> None:
    assert dtype_names()[:5] == ("float16", "bfloat16", "int8", "int8-rotated", "float32")
    assert TOY.name in dtype_names() and target_codec(TOY.name) is TOY
    toy, f32 = stores
    meta = read_meta(toy)
    assert (meta.dtype, meta.schema_version, meta.token_codec_attrs()) == (TOY.name, 2, None)
    assert zarr.open_array(toy / LOCAL, mode="r").dtype == np.float64
    # bytes per view as declared: 8 per value against float32's 4, the view parameters alike
    assert meta.layout.bytes_per_view() == PARAM_BYTES + 8 * VALUES_PER_VIEW == 5448
    assert read_meta(f32).layout.bytes_per_view() == PARAM_BYTES + 4 * VALUES_PER_VIEW == 2948
    report = verify_store(toy, deep=True)
    assert (report["ok"], report["bad"], report["unrecorded"]) == (True, {}, [])


def test_the_toy_codec_stores_and_decodes_exactly(stores: tuple[Path, Path]) -> None:
    toy, f32 = stores
    for name in (GLOBAL, LOCAL, RELATION):  # as stored: the float32 values negated, exactly
        stored, want = zarr.open_array(toy / name, mode="r")[:], zarr.open_array(f32 / name, mode="r")[:]
        assert stored.dtype == np.float64 and np.array_equal(stored, -want.astype(np.float64))
    rows = np.arange(u.NUM_IMAGES)
    a, b = StoreReader(toy), StoreReader(f32)
    got, want = a.read_targets(rows, 1), b.read_targets(rows, 1)
    for x, y in ((got.global_, want.global_), (got.local, want.local), (got.relation, want.relation)):
        assert x.dtype == torch.float32 and torch.equal(x, y)
    raw = a.read_targets(rows, 1, raw=True)
    assert raw.local.dtype == torch.float64 and torch.equal(raw.local, -want.local.double())
    assert torch.equal(TOY.decode(raw.local), want.local)


def test_one_training_step_on_the_toy_codec_is_the_float32_step(
    stores: tuple[Path, Path], tmp_path: Path
) -> None:
    toy, f32 = stores
    runs = {}
    for name, store in (("toy", toy), ("f32", f32)):
        train(u.distill_config(store, tmp_path / name, epochs=1, max_steps=1), show_progress=False)
        runs[name] = u.metrics(tmp_path / name)
    first = [m for m in runs["f32"] if m.get("step") == 1]
    assert first and all(
        np.isfinite(first[0][k]) and first[0][k] > 0 for k in ("global", "local", "relation")
    )
    assert runs["toy"] == runs["f32"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8", "float32"])
def test_decode_on_tensors_is_numpys(dtype: str) -> None:
    """Stage two decodes on the training device (codec.decode on tensors); the values are those
    of numpy's decode of the same stored arrays, bit for bit."""
    x = np.random.default_rng(1).normal(size=(3, 5, 8)).astype(np.float32) * 4
    codec = target_codec(dtype)
    data, scale = codec.encode(x)
    if dtype == "int8":
        want = data.astype(np.float32) * scale[..., None]
    elif dtype == "bfloat16":  # the top 16 bits of each float32
        want = (data.astype(np.uint32) << 16).view(np.float32)
    else:
        want = data.astype(np.float32)
    got = codec.decode(codec.to_tensor(data), None if scale is None else torch.from_numpy(scale))
    assert got.dtype == torch.float32 and np.array_equal(got.numpy(), want)
    assert torch.equal(decode(data, scale, dtype), got)
    assert codec.value_bytes(8) == {"float16": 16, "bfloat16": 16, "int8": 12, "float32": 32}[dtype]


def test_an_unknown_dtype_is_one_line_naming_the_codecs() -> None:
    with pytest.raises(
        ConfigError, match="dtype 'int4' is not one of float16, bfloat16, int8, int8-rotated, float32"
    ):
        CacheConfig(corpus="c", out="o", dtype="int4")
