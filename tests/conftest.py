"""Shared stage-one fixtures: a tiny view recipe, a tiny random teacher, small corpora of real image
files written with PIL (good ones, and one of every kind of bad file), and a reference store.

Sizes are chosen so that the whole stage-one suite runs in about a minute on two CPU cores: v0 is
32 x 16 (2 patches), Ic is 32 x 48 (1 + 6 tokens), the teacher is a random ViT-Ti/16 (D = 192).
"""

from __future__ import annotations

import importlib.util
import io
import json
import multiprocessing.process
import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from dpal.config import CacheConfig
from dpal.pipeline.cache import teacher_spec
from dpal.pipeline.engine import run_cache
from dpal.store import IMAGES_DIR, MARKERS_DIR
from dpal.teachers import Teacher, load_teacher
from dpal.views import ViewRecipe

STAGE2_UTIL = "dpal_tests_stage2_util"


def _register_stage2_util() -> None:
    """Make tests/stage2_util.py importable as `dpal_tests_stage2_util`. pytest's importlib mode
    gives test files no package to import siblings from, and pytest imports this conftest before
    the test modules of its folder."""
    if STAGE2_UTIL in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(STAGE2_UTIL, Path(__file__).with_name("stage2_util.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[STAGE2_UTIL] = mod
    spec.loader.exec_module(mod)


_register_stage2_util()


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The cluster tier (tests/cluster/, real SLURM jobs) is collected only when named on the
    command line (`make test-cluster`, `pytest tests/cluster`); a plain `pytest` is the unit tier."""
    cluster = Path(__file__).parent / "cluster"
    if collection_path != cluster:
        return None
    base = config.invocation_params.dir
    asked = [(base / a.split("::")[0]).resolve() for a in config.args]
    return not any(p == cluster or cluster in p.parents for p in asked)


# ---------------------------------------------------------------- test tiers

PROCESS_MARK = "subprocess"  # pyproject.toml registers it; `make test-fast` leaves these tests out
NOT_MARKED = (
    f"this test starts a process but is not marked @pytest.mark.{PROCESS_MARK} "
    "(`make test-fast` must leave it out; see README.md, Development)"
)


def _refuse_process(*args: object, **kwargs: object) -> None:
    raise RuntimeError(NOT_MARKED)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[object]:
    """A test that is not marked `subprocess` cannot start a process, so the mark stays true: from
    its fixtures' set-up to their teardown, the three ways a process starts fail with NOT_MARKED
    (subprocess, which torchrun and the CLI tests use; multiprocessing, which DataLoader workers
    and dask's worker processes use; os.fork)."""
    if item.get_closest_marker(PROCESS_MARK) is not None:
        return (yield)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subprocess.Popen, "_execute_child", _refuse_process)
        mp.setattr(multiprocessing.process.BaseProcess, "start", _refuse_process)
        mp.setattr(os, "fork", _refuse_process)
        return (yield)


TEACHER = "vit_tiny_patch16_224"
GLOBAL_SIZE, LOCAL_SIZE, CROWD_SIZE = (32, 16), (16, 16), (32, 48)
RECIPE_SETS = [
    f"views.global_size=[{GLOBAL_SIZE[0]},{GLOBAL_SIZE[1]}]",
    f"views.local_size=[{LOCAL_SIZE[0]},{LOCAL_SIZE[1]}]",
    f"views.crowd_size=[{CROWD_SIZE[0]},{CROWD_SIZE[1]}]",
]
NUM_GOOD = 13  # with SHARD_SIZE 3: five shards, the last holding one image (its own background)
SHARD_SIZE = 3
NUM_VIEWS = 2


def image_array(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w, 3) uint8 picture: smooth gradients plus noise, so crops and blurs change pixels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([255 * yy / h, 255 * xx / w, 128 + 100 * np.sin((xx + yy) / 5)], axis=-1)
    noise = rng.normal(0, 25, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, fmt)
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A valid PNG (IHDR with correct CRC, a small IDAT, IEND) that declares width x height RGB:
    a decompression bomb's header, 69 bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def good_files(seed: int = 0, num: int = NUM_GOOD) -> dict[str, bytes]:
    """Relative path -> bytes of `num` person-shaped JPEG and PNG images of varied sizes."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(num):
        h, w = int(rng.integers(40, 80)), int(rng.integers(20, 50))
        arr = image_array(rng, h, w)
        folder = "sub/" if i % 4 == 3 else ""
        name = f"{folder}p{i:02d}.{'png' if i % 3 == 2 else 'jpg'}"
        out[name] = encode(arr, "PNG" if name.endswith("png") else "JPEG")
    return out


def bad_files() -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, expected outcome): a reason fragment for skipped files, "rgb" for
    files that are cached after conversion to RGB."""
    rng = np.random.default_rng(7)
    arr = image_array(rng, 48, 24)
    jpg = encode(arr, "JPEG")
    gray16 = (rng.integers(0, 65536, (48, 24))).astype(np.uint16)
    rgba = np.concatenate([arr, rng.integers(0, 256, (48, 24, 1), dtype=np.uint8)], axis=-1)
    return {
        "bad_truncated_header.jpg": (jpg[: len(jpg) // 2], "truncated"),  # cut before the scan (SOS)
        "bad_truncated_scan.jpg": (jpg[: len(jpg) - 200], "truncated"),  # cut inside the entropy-coded data
        "bad_empty.jpg": (b"", "empty file"),
        "bad_text.jpg": (b"this is a text file, not a JPEG\n", "not an image"),
        "bad_bomb.png": (png_header(20000, 20000), "decompression bomb"),
        "conv_cmyk.jpg": (_cmyk_jpeg(arr), "rgb"),
        "conv_gray16.png": (encode(gray16, "PNG"), "rgb"),
        "conv_rgba.png": (encode(rgba, "PNG", "RGBA"), "rgb"),
    }


def _cmyk_jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert("CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_files(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def array_names(store: Path) -> list[str]:
    """Every Zarr array of a store (listed from disk, so that a new array is compared too)."""
    return sorted(p.parent.name for p in Path(store).glob("*/zarr.json"))


def assert_same_store(a: Path, b: Path) -> None:
    """Every array, every embedded image tar and every marker's checksums are identical."""
    names = array_names(a)
    assert names == array_names(b) and len(names) >= 11
    for name in names:
        x, y = zarr.open_array(Path(a) / name, mode="r")[:], zarr.open_array(Path(b) / name, mode="r")[:]
        assert x.dtype == y.dtype and np.array_equal(x, y), f"array {name!r} differs"
    tars = sorted(p.name for p in (Path(a) / IMAGES_DIR).glob("*.tar"))
    assert tars == sorted(p.name for p in (Path(b) / IMAGES_DIR).glob("*.tar")) and tars
    for t in tars:
        assert (Path(a) / IMAGES_DIR / t).read_bytes() == (Path(b) / IMAGES_DIR / t).read_bytes(), t
    for m in sorted((Path(a) / MARKERS_DIR).glob("*.json")):
        ma, mb = json.loads(m.read_text()), json.loads((Path(b) / MARKERS_DIR / m.name).read_text())
        assert {k: v for k, v in ma.items() if k != "seconds"} == {
            k: v for k, v in mb.items() if k != "seconds"
        }


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Torch runs on one thread in this process, and `child_env` gives subprocesses one thread too.

    Two reasons: these tensors are tiny, and on a shared two-core machine OpenMP's spinning
    threads made the teacher 15x slower with two threads than with one; and on CPU, MKL splits a
    GEMM of a few rows differently for one and two threads, which changes the last bit, so stores
    compared bit for bit must come from processes with the same thread count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    """Environment for subprocesses: one torch thread, as in this process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def recipe() -> ViewRecipe:
    return ViewRecipe(global_size=GLOBAL_SIZE, local_size=LOCAL_SIZE, crowd_size=CROWD_SIZE)


@pytest.fixture(scope="session")
def make_config(recipe: ViewRecipe) -> Callable[..., CacheConfig]:
    """CacheConfig factory with the tiny recipe and random teacher; runs in-process (--shards 0:)."""

    def make(corpus: str | Path, out: str | Path, **overrides) -> CacheConfig:
        kw = dict(
            teacher=TEACHER,
            random_init=True,
            num_views=NUM_VIEWS,
            shard_size=SHARD_SIZE,
            dtype="float32",
            views=recipe,
            shards="0:",
            device="cpu",
        )
        kw.update(overrides)
        return CacheConfig(corpus=str(corpus), out=str(out), **kw)

    return make


@pytest.fixture(scope="session")
def cli_args() -> Callable[..., list[str]]:
    """`dpal cache-teacher` arguments equal to `make_config`'s settings."""

    def args(corpus: str | Path, out: str | Path, *extra: str) -> list[str]:
        out_args = [
            "cache-teacher",
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--teacher",
            TEACHER,
            "--random-init",
            "--views",
            str(NUM_VIEWS),
            "--shard-size",
            str(SHARD_SIZE),
            "--dtype",
            "float32",
            "--device",
            "cpu",
        ]
        for s in RECIPE_SETS:
            out_args += ["--set", s]
        return out_args + list(extra)

    return args


@pytest.fixture(scope="session")
def teacher(make_config: Callable[..., CacheConfig]) -> Teacher:
    return load_teacher(teacher_spec(make_config("unused", "unused")), device="cpu")


@pytest.fixture(scope="session")
def corpus_files() -> dict[str, bytes]:
    return good_files()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory, corpus_files: dict[str, bytes]) -> Path:
    """A folder of 13 good JPEG/PNG images, three of them in a subfolder."""
    return write_files(tmp_path_factory.mktemp("corpus"), corpus_files)


@pytest.fixture(scope="session")
def big_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 small images: with two per shard, a run of 15 shards that a test can kill part-way."""
    return write_files(tmp_path_factory.mktemp("big_corpus"), good_files(seed=11, num=30))


@pytest.fixture(scope="session")
def bad_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of bad file (named bad_*), convertible ones (conv_*) and three good images."""
    files = {name: data for name, (data, _) in bad_files().items()}
    files.update({f"good_{k.replace('/', '_')}": v for k, v in list(good_files(seed=3, num=3).items())})
    return write_files(tmp_path_factory.mktemp("bad_corpus"), files)


@pytest.fixture(scope="session")
def ref_store(
    tmp_path_factory: pytest.TempPathFactory, make_config: Callable[..., CacheConfig], corpus_dir: Path
) -> Path:
    """The float32 store of `corpus_dir`, made in this process without dask. Read-only: copy it
    (`store_copy`) before changing anything."""
    out = tmp_path_factory.mktemp("ref") / "store"
    summary = run_cache(make_config(corpus_dir, out), show_progress=False)
    assert summary.complete and summary.cached == NUM_GOOD and summary.skipped == 0
    return out


@pytest.fixture
def store_copy(tmp_path: Path, ref_store: Path) -> Path:
    return Path(shutil.copytree(ref_store, tmp_path / "store"))


@pytest.fixture(scope="session")
def same_store() -> Callable[[Path, Path], None]:
    """`assert_same_store(a, b)`: every array, image tar and marker checksum identical."""
    return assert_same_store


@pytest.fixture(scope="session")
def bad_cases() -> dict[str, tuple[bytes, str]]:
    """File name -> (bytes, reason fragment or "rgb"), as in `bad_corpus_dir`."""
    return bad_files()


@pytest.fixture(scope="session")
def bomb_header() -> Callable[[int, int], bytes]:
    """`png_header(width, height)`: a tiny valid PNG declaring a huge image."""
    return png_header
