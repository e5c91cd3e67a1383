"""The store's typed attributes (store.meta.StoreMeta): exact round trips, the attributes stage one
writes, one line for a missing or malformed attribute, schema-1 stores, the teacher rebuilt from a
store; and dpal.common's device resolver."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr

from dpal.common import IMAGENET_MEAN, resolve_device
from dpal.config import CacheConfig
from dpal.corpus import index_corpus
from dpal.pipeline.cache import teacher_spec
from dpal.pipeline.prepare import store_meta
from dpal.store import (
    INTEGRITY,
    Layout,
    StoreError,
    StoreMeta,
    StoreReader,
    TokenGrid,
    corpus_fingerprint,
    marker_path,
    read_marker,
    read_meta,
)
from dpal.teachers import Teacher, load_teacher
from dpal.views import ViewRecipe

REBUILD = (
    "the store was written by another dpal or edited: use the dpal that wrote it, or rebuild it with "
    "`dpal cache-teacher --out NEW`"
)


def _attrs(store: Path) -> dict[str, Any]:
    """The group attributes exactly as zarr.json holds them."""
    return json.loads((store / "zarr.json").read_text())["attributes"]


def _error(attrs: dict[str, Any]) -> str:
    with pytest.raises(StoreError) as e:
        StoreMeta.from_attrs(attrs, "S")
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_token_grid_and_layout_at_the_papers_sizes() -> None:
    grid = TokenGrid.of(ViewRecipe(global_size=(256, 128), crowd_size=(256, 256)), 16)
    assert (grid.global_grid, grid.crowd_grid, grid.num_patches, grid.num_crowd_tokens) == (
        (16, 8),
        (16, 16),
        128,
        257,
    )
    # docs/store.md's size calculator: PATH-B (D = 768), float16 and int8
    assert (
        Layout(1, 1, 1, 768, grid.num_patches, grid.num_crowd_tokens, "float16").bytes_per_view() == 330_690
    )
    assert Layout(1, 1, 1, 768, grid.num_patches, grid.num_crowd_tokens, "int8").bytes_per_view() == 167_113


def test_round_trip_is_exact(ref_store: Path) -> None:
    meta = StoreReader(ref_store).store_meta
    assert StoreMeta.from_attrs(meta.to_attrs()) == meta
    assert StoreMeta.from_attrs(json.loads(json.dumps(meta.to_attrs()))) == meta  # through JSON, as on disk
    # to_attrs is zarr.json's attributes but the integrity checksums, key for key and in order
    on_disk = _attrs(ref_store)
    del on_disk[INTEGRITY]
    assert list(meta.to_attrs().items()) == list(on_disk.items())


def test_conftest_store_meta_has_the_tiny_recipes_numbers(ref_store: Path) -> None:
    meta = read_meta(ref_store)
    # v0 32 x 16 and Ic 32 x 48 at patch 16; vit_tiny: D = 192; 13 images, 2 views, shards of 3
    assert (meta.token_grid.global_grid, meta.token_grid.crowd_grid) == ((2, 1), (2, 3))
    assert meta.layout == Layout(13, 2, 3, 192, 2, 7, "float32")
    assert (meta.num_shards, meta.schema_version, meta.complete) == (5, 2, True)
    assert meta.teacher.name == "vit_tiny_patch16_224" and meta.teacher.global_token == "cls"
    assert meta.preprocessing.mean == IMAGENET_MEAN and meta.corpus_problems == []


def test_stage_one_builds_what_the_store_holds(
    ref_store: Path, make_config: Callable[..., CacheConfig], corpus_dir: Path, teacher: Teacher
) -> None:
    """`pipeline.prepare.store_meta`, rebuilt for the same command, is the store's attributes."""
    cfg = make_config(corpus_dir, _attrs(ref_store)["config"]["out"])
    refs = index_corpus(str(corpus_dir))
    built = store_meta(cfg, teacher, corpus_fingerprint(refs), len(refs), [])
    on_disk = _attrs(ref_store)
    del on_disk[INTEGRITY]
    assert built.to_attrs() | {"complete": True} == on_disk


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda a: a["teacher"].pop("embed_dim"), "teacher.embed_dim is missing"),
        (lambda a: a.pop("recipe"), "recipe is missing"),
        (lambda a: a.update(num_views="2"), "num_views should be a positive integer, got '2'"),
        (lambda a: a.update(seed=True), "seed should be an integer, got True"),
        (
            lambda a: a.update(dtype="float64"),
            "dtype should be one of float16, bfloat16, int8, int8-rotated, float32, got 'float64'",
        ),
        (
            lambda a: a["token_grid"].update({"global": [2]}),
            "token_grid.global should be two positive integers, got [2]",
        ),
        (
            lambda a: a["token_grid"].update(num_patches=3),
            "token_grid.num_patches is 3, but the grids give 2",
        ),
        (lambda a: a.update(num_shards=4), "num_shards is 4, but 13 images in shards of 3 make 5"),
        (lambda a: a["teacher"].update(embed_dim=768), "teacher.embed_dim is 768, but embed_dim is 192"),
        (
            lambda a: a["preprocessing"].update(mean=[0.5, 0.5]),
            "preprocessing.mean should be three numbers, got [0.5, 0.5]",
        ),
        (lambda a: a.update(teacher="vit"), "teacher should be an object, got 'vit'"),
        (
            lambda a: a["recipe"].update(global_size=[48, 16]),
            "token_grid has grids (2, 1) and (2, 3), but the recipe's sizes give (3, 1) and (2, 3)",
        ),
    ],
)
def test_a_missing_or_malformed_attribute_is_one_line(ref_store: Path, edit: Callable, problem: str) -> None:
    attrs = _attrs(ref_store)
    edit(attrs)
    assert _error(attrs) == f"S: store attribute {problem}; {REBUILD}"


def test_unknown_recipe_key_and_other_stores_are_one_line(ref_store: Path) -> None:
    attrs = _attrs(ref_store)
    attrs["recipe"]["zoom"] = 2
    assert _error(attrs).startswith(
        "S: store attribute recipe is not a view recipe of this dpal (unknown view keys "
    )
    assert _error({**_attrs(ref_store), "format": "x"}) == "S is a Zarr group but not a dpal teacher store"
    assert _error({**_attrs(ref_store), "schema_version": 5}).startswith("S has store schema 5, this dpal")


def test_schema_1_attributes_still_read(ref_store: Path) -> None:
    """A schema-1 store (dpal's first store): no integrity, value_settings or corpus_problems."""
    attrs = _attrs(ref_store)
    for key in (INTEGRITY, "value_settings", "corpus_problems"):
        del attrs[key]
    attrs["schema_version"] = 1
    meta = StoreMeta.from_attrs(copy.deepcopy(attrs))
    assert (meta.schema_version, meta.value_settings, meta.corpus_problems) == (1, None, None)
    assert meta.to_attrs() == attrs and StoreMeta.from_attrs(meta.to_attrs()) == meta
    assert meta.layout == read_meta(ref_store).layout


def test_schema_1_store_on_disk_reads_its_meta(store_copy: Path, ref_store: Path) -> None:
    group = zarr.open_group(store_copy, mode="r+")
    group.attrs["schema_version"] = 1
    for key in (INTEGRITY, "value_settings", "corpus_problems"):
        del group.attrs[key]
    for s in range(5):
        m = read_marker(store_copy, s)
        del m["crc32c"], m["image_crc32c"]
        marker_path(store_copy, s).write_text(json.dumps(m))
    old, ref = StoreReader(store_copy), StoreReader(ref_store)
    assert old.store_meta.schema_version == 1 and old.store_meta.value_settings is None
    assert old.store_meta.teacher == ref.store_meta.teacher and old.layout == ref.layout
    idx = np.array([12, 0, 4])
    assert torch.equal(old.read_targets(idx, 1).local, ref.read_targets(idx, 1).local)
    # unchecked, so an edited attribute is caught by the schema: one line, naming the store
    del group.attrs["embed_dim"]
    with pytest.raises(StoreError, match=f"^{store_copy}: store attribute embed_dim is missing; "):
        StoreReader(store_copy)


def test_teacher_spec_rebuilds_the_teacher_that_wrote_the_store(
    ref_store: Path, make_config: Callable[..., CacheConfig], teacher: Teacher
) -> None:
    meta = read_meta(ref_store)
    # the spec names the input scale the store's teacher used (automatic resolved: 1 for a ViT/16)
    assert meta.teacher_spec() == dataclasses.replace(
        teacher_spec(make_config("unused", "unused")), input_scale=1
    )
    rebuilt = load_teacher(meta.teacher_spec())
    assert rebuilt.identity() == meta.teacher.to_attrs()
    meta.check_teacher(rebuilt.identity())
    x = torch.rand(2, 3, 32, 16)
    assert torch.equal(rebuilt.encode_global(x)[1], teacher.encode_global(x)[1])
    with pytest.raises(
        StoreError, match=r"^the teacher checkpoint differs from the one that wrote the store \(sha256\)$"
    ):
        meta.check_teacher({**rebuilt.identity(), "checkpoint_sha256": "0" * 64})


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 0)  # torchrun: one GPU per rank
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"^device 'gpu' is not one of auto, cpu or cuda\[:i\]$"):
        resolve_device("gpu")


def test_cli_prints_one_line_for_a_malformed_attribute(store_copy: Path) -> None:
    from typer.testing import CliRunner

    from dpal.cli import app

    group = zarr.open_group(store_copy, mode="r+")
    group.attrs["schema_version"] = 1  # schema 1: no integrity checksum stops the edit first
    del group.attrs[INTEGRITY]
    group.attrs["token_grid"] = {**group.attrs["token_grid"], "num_crowd_tokens": 8}
    result = CliRunner().invoke(app, ["store", "info", str(store_copy)])
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        f"error: {store_copy}: store attribute token_grid.num_crowd_tokens is 8, but the grids give 7; {REBUILD}"
    ]


def test_teacher_identity_of_stores_before_input_scaling() -> None:
    """Stores written before `input_scale` and `target_grid` existed read with what they did: the
    view as it was (scale 1), and for a CNN teacher targets interpolated from its coarser map; such
    a store's identity equals a new one's that spells those values out (a resume is not refused)."""
    from dpal.store import TeacherIdentity, identity_diff

    old = {
        "name": "efficientnet-lite2",
        "arch": "tf_efficientnet_lite2",
        "checkpoint": None,
        "checkpoint_sha256": "ab" * 32,
        "random_init": False,
        "random_init_seed": 0,
        "layer": None,
        "kind": "cnn",
        "embed_dim": 1280,
        "global_token": "pool",
    }
    t = TeacherIdentity.from_attrs(old)
    assert (t.input_scale, t.target_grid) == (1, "interpolated")
    vit = TeacherIdentity.from_attrs({**old, "kind": "vit", "global_token": "cls"})
    assert (vit.input_scale, vit.target_grid) == (1, "native")
    assert identity_diff({"teacher": old}, {"teacher": t.to_attrs()}) == []
    new = {**old, "input_scale": 2, "target_grid": "native"}
    assert identity_diff({"teacher": old}, {"teacher": new}) == [
        "teacher.input_scale: store has 1, this run has 2",
        "teacher.target_grid: store has 'interpolated', this run has 'native'",
    ]
    with pytest.raises(
        StoreError, match="store attribute target_grid should be one of native, interpolated, got .blurred."
    ):
        TeacherIdentity.from_attrs({**old, "target_grid": "blurred"})
