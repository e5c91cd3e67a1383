"""Stage one on a real SLURM: `dpal cache-teacher --slurm` (dask-jobqueue worker jobs), one worker
job cancelled mid-run, and the array-job script scripts/slurm/cache-array.sbatch. Each store must
equal, file by file and byte for byte, the store one process writes (tests/conftest.py's tiny
recipe and random ViT-Ti teacher, one torch thread everywhere)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import dpal_tests_cluster_util as cu  # registered by tests/cluster/conftest.py
import pytest

from dpal.config import CacheConfig
from dpal.pipeline.engine import run_cache
from dpal.store import MARKERS_DIR, done_shards, read_attrs, verify_store

BIG_SHARD = (
    3  # conftest.SHARD_SIZE: big_corpus_dir's 30 images -> 10 shards, long enough to cancel a worker mid-run
)
SLURM_SETS = [
    "--set",
    "slurm.jobs=2",
    "--set",
    "slurm.gpus_per_job=0",
    "--set",
    "slurm.cores=1",
    "--set",
    "slurm.memory=1GB",
    "--set",
    "slurm.walltime=00:05:00",
]


def store_files(store: Path) -> dict[str, Path]:
    return {p.relative_to(store).as_posix(): p for p in sorted(store.rglob("*")) if p.is_file()}


# The root zarr.json records the command that created the store: where it ran (a dask cluster,
# SLURM jobs, --shards) and its --out. Those settings, and the attributes' checksum that covers
# them, differ between the stores compared; every other byte must not.
WHERE_IT_RAN = ("out", "workers", "threads_per_worker", "scheduler", "use_slurm", "slurm", "shards")


def _root_without_where_it_ran(raw: bytes) -> dict:
    root = json.loads(raw)
    attrs = root["attributes"]
    for k in WHERE_IT_RAN:
        attrs["config"].pop(k)
    attrs["integrity"].pop("attrs_sha256")
    return root


def assert_bytes_equal(a: Path, b: Path) -> int:
    """Every file of store `a` equals the same file of store `b` byte for byte, but for the
    markers' `seconds` (a shard's wall time) and WHERE_IT_RAN in the root zarr.json. Returns the
    bytes compared."""
    fa, fb = store_files(a), store_files(b)
    assert fa.keys() == fb.keys(), sorted(fa.keys() ^ fb.keys())
    assert len([r for r in fa if r.startswith(MARKERS_DIR + "/")]) == read_attrs(a)["num_shards"]
    compared = 0
    for rel, pa in fa.items():
        x, y = pa.read_bytes(), fb[rel].read_bytes()
        if rel.startswith(MARKERS_DIR + "/"):
            ma, mb = json.loads(x), json.loads(y)
            ma.pop("seconds"), mb.pop("seconds")
            assert ma == mb, rel
        elif rel == "zarr.json":
            assert _root_without_where_it_ran(x) == _root_without_where_it_ran(y)
        else:
            assert x == y, rel
        compared += len(x)
    return compared


def assert_verified(store: Path) -> None:
    rep = verify_store(store)
    assert rep["ok"], rep
    assert read_attrs(store)["complete"] is True


@pytest.fixture(scope="module")
def big_ref(
    tmp_path_factory: pytest.TempPathFactory, big_corpus_dir: Path, make_config: Callable[..., CacheConfig]
) -> Path:
    """big_corpus_dir's store with shards of 3, written by this process alone."""
    out = tmp_path_factory.mktemp("big_ref") / "store"
    assert run_cache(make_config(big_corpus_dir, out, shard_size=BIG_SHARD), show_progress=False).complete
    return out


def squeue_jobs(name: str) -> dict[int, str]:
    """This cluster's jobs called `name`: job id -> state."""
    res = cu.run(["squeue", "-h", "-n", name, "-o", "%A %T"])
    return {int(j): st for j, st in (ln.split() for ln in res.stdout.splitlines())}


def test_dask_worker_jobs_one_cancelled_mid_run(
    slurm: cu.Cluster,
    tmp_path: Path,
    big_corpus_dir: Path,
    big_ref: Path,
    cli_args: Callable[..., list[str]],
    child_env: dict[str, str],
) -> None:
    """Two dask-jobqueue worker jobs; once both run and a shard is done, `scancel` one of them.
    The other finishes every shard, none lost or half-written, and the store equals big_ref."""
    out = tmp_path / "store"
    cmd = [str(cu.BIN / "dpal"), *cli_args(big_corpus_dir, out, "--slurm", *SLURM_SETS, "--quiet")]
    # cwd: dask-jobqueue writes each worker job's log (slurm-N.out) in the driver's folder
    proc = subprocess.Popen(
        cmd,
        env=child_env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen: set[int] = set()
    try:

        def both_running_and_one_shard_done() -> bool:
            jobs = squeue_jobs("dpal-cache")
            seen.update(jobs)
            assert proc.poll() is None, f"the run ended before the cancel: {proc.communicate()}"
            return sum(st == "RUNNING" for st in jobs.values()) == 2 and len(done_shards(out)) >= 1

        cu.wait_until(both_running_and_one_shard_done, "two running worker jobs and a done shard", 120)
        victim = max(seen)
        done_before = len(done_shards(out))
        assert done_before < 10
        assert cu.run(["scancel", str(victim)]).returncode == 0
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        slurm.note_jobs(sorted(seen))
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "store complete" in stdout, stdout
    assert cu.job_field(victim, "JobState") in {"CANCELLED", None}
    slurm.counts["preemptions_survived"] += 1
    assert_verified(out)
    slurm.counts["bytes_compared"] += assert_bytes_equal(out, big_ref)


def test_array_job_script(
    slurm: cu.Cluster,
    tmp_path: Path,
    corpus_dir: Path,
    ref_store: Path,
    cli_args: Callable[..., list[str]],
    child_env: dict[str, str],
) -> None:
    """scripts/slurm/cache-array.sbatch as docs/training.md shows it: three array tasks of two
    shards each (5 shards: the last task gets one) write one store equal to ref_store."""
    out = tmp_path / "store"
    args = cli_args(corpus_dir, out)
    cache_args = args[args.index("--teacher") :]  # everything but --corpus/--out, which the script sets
    env = {
        **child_env,
        "DPAL": str(cu.BIN / "dpal"),
        "DPAL_CORPUS": str(corpus_dir),
        "DPAL_OUT": str(out),
        "DPAL_SHARDS_PER_TASK": "2",
        "DPAL_CACHE_ARGS": " ".join(cache_args),
    }
    log = tmp_path / "task-%a.log"
    job = slurm.sbatch(
        cu.SCRIPTS / "cache-array.sbatch",
        "--array=0-2",
        "--gpus=0",
        "--cpus-per-task=1",
        "--mem=1G",
        "--time=5",
        f"--output={log}",
        env=env,
    )
    slurm.counts["jobs_submitted"] += 2  # three array tasks, each a job
    logs = [tmp_path / f"task-{i}.log" for i in range(3)]

    def all_done() -> bool:
        return not squeue_jobs("dpal-cache") or all(
            cu.job_field(f"{job}_{i}", "JobState") in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
            for i in range(3)
        )

    cu.wait_until(all_done, f"array job {job}'s three tasks", 240)
    time.sleep(0.5)
    for i, lg in enumerate(logs):
        text = lg.read_text()
        assert cu.job_field(f"{job}_{i}", "JobState") in {"COMPLETED", None}, text[-2000:]
        assert re.search(r"cached \d+ images in [12] shards", text), text[-2000:]
    assert_verified(out)
    slurm.counts["bytes_compared"] += assert_bytes_equal(out, ref_store)
