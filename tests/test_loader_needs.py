"""The loader builds only what the run's recipe reads (trainer/recipes.py `batch_needs`, data.py
`BatchDataset(needs=...)`): the needs of each recipe and ablation, the keys a shed batch holds, its
tensors equal to the full batch's bit for bit (0 and 2 workers; float16, int8, int8-rotated and
factor stores), and proteus / feature-kd runs with the shed loader train and resume exactly as with
the full loader.

The tiny store and run of tests/stage2_util.py (10 images, batch 4, 2 steps per epoch).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dpal_tests_stage2_util as u  # registered by conftest.py
import numpy as np
import pytest
import torch

from dpal.config import CacheConfig, DistillConfig
from dpal.pipeline.engine import run_cache
from dpal.store import StoreError, StoreReader
from dpal.trainer.data import BatchDataset, EpochSampler, collate_requests, valid_rows
from dpal.trainer.recipes import EVERYTHING, Needs, batch_needs
from dpal.trainer.train import train

CPU = torch.device("cpu")
G, L, R = "global", "local", "relation"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    yield from u.one_torch_thread()


def _cfg(**kw: Any) -> DistillConfig:
    return DistillConfig(store="s", out="o", **kw)


# (config keys, local_crops, ic, targets), written out by hand from Distiller.forward, ProteusDistiller
# and FeatureKD: dpal's global term reads v1, v2; its relation term Ic; the baselines v0 alone.
NEEDS_TABLE: list[tuple[dict[str, Any], bool, bool, tuple[str, ...]]] = [
    ({}, True, True, (G, L, R)),
    ({"projector": "linear"}, True, True, (G, L, R)),
    ({"relation_weight": 0.0}, True, False, (G, L)),
    ({"local_weight": 0.0}, True, True, (G, R)),
    ({"global_weight": 0.0}, False, True, (L, R)),
    ({"global_weight": 0.0, "local_weight": 0.0}, False, True, (R,)),
    ({"local_weight": 0.0, "relation_weight": 0.0}, True, False, (G,)),
    ({"global_weight": 0.0, "relation_weight": 0.0}, False, False, (L,)),
    ({"recipe": "proteus"}, False, False, (G, L)),
    ({"recipe": "feature-kd"}, False, False, (G, L)),
    ({"recipe": "feature-kd", "local_weight": 0.0}, False, False, (G,)),
    ({"recipe": "feature-kd", "global_weight": 0.0}, False, False, (L,)),
    # the teacher computes every target in the step, from v0 and Ic: none is read
    ({"online_teacher": True}, True, True, ()),
    ({"online_teacher": True, "recipe": "proteus"}, False, True, ()),
]


@pytest.mark.parametrize(("kw", "local_crops", "ic", "targets"), NEEDS_TABLE)
def test_needs_of_each_recipe_and_ablation(
    kw: dict[str, Any], local_crops: bool, ic: bool, targets: tuple[str, ...]
) -> None:
    assert batch_needs(_cfg(**kw)) == Needs(local_crops=local_crops, ic=ic, targets=targets)


def test_default_dpal_needs_everything() -> None:
    assert batch_needs(_cfg()) == EVERYTHING == Needs(True, True, (G, L, R))


# ---------------------------------------------------------------- shed batches


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("needs")
    corpus = u.make_corpus(root / "corpus")
    out = {
        dtype: u.make_store(corpus, root / dtype, dtype=dtype)
        for dtype in ("float16", "int8", "int8-rotated")
    }
    # make_store's config, the relation as a factor (schema 3): Z and the diagonal, two arrays
    run_cache(
        CacheConfig(
            corpus=str(corpus),
            out=str(root / "factor"),
            teacher=u.STUDENT,
            random_init=True,
            num_views=2,
            dtype="float16",
            relation="factor",
            shard_size=u.SHARD_SIZE,
            batch_size=8,
            device="cpu",
            views=u.RECIPE,
        ),
        show_progress=False,
    )
    out["factor"] = root / "factor"
    return out


def _batches(store: Path, needs: Needs, workers: int = 0) -> tuple[list[dict], list[dict]]:
    """Every batch of two epochs through a DataLoader as `train` builds it (finished in the main
    process, a GPU run's path): the batches as shipped, and the model's inputs."""
    reader = StoreReader(store)
    sampler = EpochSampler(valid_rows(reader), 4, 1, 0, seed=5)
    ds = BatchDataset(
        store,
        sampler,
        reader.store_meta.recipe,
        5,
        mask_fix_sign=True if L in needs.targets else None,
        needs=needs,
    )
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        sampler=collate_requests(sampler, 0, 0, 2, None, 1),
        num_workers=workers,
        multiprocessing_context="forkserver" if workers > 0 else None,
    )
    shipped = list(loader)
    return shipped, [ds.model_inputs(b, CPU) for b in shipped]


VIEW_PARTS = {"v0_u8"}
LOCAL_PARTS = {"src_u8", "src_hw", "local_aug"}
IC_PARTS = {"bg_u8", "pa_u8", "pb_u8", "paste"}
TARGET_KEYS = {G: "g_t", L: "local_t", R: "rel_t"}


def _expected(needs: Needs, dtype: str) -> tuple[set[str], set[str]]:
    """The keys of a shipped batch and of the model's inputs."""
    shipped = (
        {"index"}
        | VIEW_PARTS
        | (LOCAL_PARTS if needs.local_crops else set())
        | (IC_PARTS if needs.ic else set())
    )
    inputs = (
        {"index", "v0"} | ({"v1", "v2"} if needs.local_crops else set()) | ({"ic"} if needs.ic else set())
    )
    for name in needs.targets:
        shipped.add(TARGET_KEYS[name])
        inputs.add(TARGET_KEYS[name])
        if dtype in ("int8", "int8-rotated"):
            shipped.add(TARGET_KEYS[name] + "_scale")
        if dtype == "factor" and name == R:
            shipped.add("rel_t_diag")
    if L in needs.targets:
        shipped.add("mask")
        inputs.add("mask")
    return shipped, inputs


SHED = {  # a run's needs: name -> config keys
    "proteus": {"recipe": "proteus"},
    "feature-kd-global": {"recipe": "feature-kd", "local_weight": 0.0},
    "dpal-no-relation": {"relation_weight": 0.0},
    "dpal-no-global": {"global_weight": 0.0},
    "dpal-relation-only": {"global_weight": 0.0, "local_weight": 0.0},
}


@pytest.mark.subprocess
@pytest.mark.parametrize("dtype", ["float16", "int8", "int8-rotated", "factor"])
def test_a_shed_batch_holds_the_needed_keys_equal_to_the_full_batch(
    stores: dict[str, Path], dtype: str
) -> None:
    store = stores[dtype]
    full_shipped, full = _batches(store, EVERYTHING)
    assert len(full) == 4
    for kw in SHED.values():
        needs = batch_needs(_cfg(**kw))
        shipped, inputs = _batches(store, needs)
        want_shipped, want_inputs = _expected(needs, dtype)
        for s, x, fs, f in zip(shipped, inputs, full_shipped, full, strict=True):
            assert set(s) == want_shipped, (kw, set(s) ^ want_shipped)
            assert set(x) == want_inputs, (kw, set(x) ^ want_inputs)
            assert all(torch.equal(s[k], fs[k]) for k in s), (
                kw,
                [k for k in s if not torch.equal(s[k], fs[k])],
            )
            assert all(torch.equal(x[k], f[k]) for k in x), (
                kw,
                [k for k in x if not torch.equal(x[k], f[k])],
            )


@pytest.mark.subprocess
@pytest.mark.parametrize("dtype", ["float16", "int8-rotated"])
def test_shed_batches_are_the_same_with_two_workers(stores: dict[str, Path], dtype: str) -> None:
    store = stores[dtype]  # int8-rotated: the workers rotate the local targets back for the mask
    for needs in (EVERYTHING, batch_needs(_cfg(recipe="proteus"))):
        _, zero = _batches(store, needs, 0)
        _, two = _batches(store, needs, 2)
        for a, b in zip(zero, two, strict=True):
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- runs


class _Full(BatchDataset):
    """The loader as before shedding: everything built whatever the recipe."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        kw["needs"] = EVERYTHING
        super().__init__(*args, **kw)


class _Seen(BatchDataset):
    """The run's own loader; records the keys of each batch it ships (num_workers 0: in this process)."""

    keys: list[set[str]] = []

    def build(self, *args: Any, **kw: Any) -> dict[str, torch.Tensor]:
        out = super().build(*args, **kw)
        _Seen.keys.append(set(out))
        return out


@pytest.mark.parametrize(
    "kw",
    [{"recipe": "proteus"}, {"recipe": "feature-kd", "local_weight": 0.5}],
    ids=["proteus", "feature-kd"],
)
@pytest.mark.subprocess
def test_a_shed_run_trains_as_the_full_loader_and_resumes_bit_for_bit(
    tmp_path: Path, stores: dict[str, Path], kw: dict[str, Any]
) -> None:
    store = stores["float16"]
    shed, full, split = tmp_path / "shed", tmp_path / "full", tmp_path / "split"
    _Seen.keys.clear()
    train(u.distill_config(store, shed, max_steps=2, **kw), show_progress=False, dataset_class=_Seen)
    assert _Seen.keys == [{"index", "v0_u8", "g_t", "local_t"}] * 2  # no v1, v2, Ic, relation, mask
    train(u.distill_config(store, full, max_steps=2, **kw), show_progress=False, dataset_class=_Full)
    train(u.distill_config(store, split, max_steps=1, **kw), show_progress=False)
    assert train(u.distill_config(store, split, max_steps=2, **kw), show_progress=False).step == 2
    a = u.load_last(shed)
    for other in (full, split):
        u.assert_same_training_state(a, u.load_last(other))
        assert u.metrics(shed) == u.metrics(other)


# ---------------------------------------------------------------- the store's reads


@pytest.mark.subprocess
def test_an_unread_target_is_not_touched_and_a_read_one_is_still_checked(
    tmp_path: Path, stores: dict[str, Path]
) -> None:
    """A relation array lost from shard 0 fails dpal's read but not proteus's (it is never opened); a
    byte flipped in the global array still fails proteus's read, naming the shard."""
    store = tmp_path / "store"
    shutil.copytree(stores["float16"], store)
    rows = np.array([2, 0, 1])  # shard 0 (4 images per shard)
    intact = StoreReader(stores["float16"]).read_targets(rows, 1, raw=True)
    (store / "relation" / "c" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreError, match="00000"):
        StoreReader(store).read_targets(rows, 1, raw=True)
    t = StoreReader(store).read_targets(rows, 1, raw=True, targets=(G, L))
    assert t.relation is None and t.scales is None
    assert torch.equal(t.global_, intact.global_) and torch.equal(t.local, intact.local)
    assert np.array_equal(t.params, intact.params)
    chunk = store / "global" / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    for i in range(0, len(data) * 3 // 4, 64):  # the inner chunks, not the shard's index at the end
        data[i] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="00000"):
        StoreReader(store).read_targets(rows, 1, raw=True, targets=(G, L))
