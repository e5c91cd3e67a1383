"""Helpers of the cluster tier (tests/cluster/): where the scripts and programs are, the SLURM
commands the tests use, and `Cluster`, the jobs a session submitted and the figures it counts.

Not a test module and not a conftest: tests/cluster/conftest.py registers it as
`dpal_tests_cluster_util` (pytest's importlib mode gives test files no package to import from).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
SCRIPTS = REPO_ROOT / "scripts" / "slurm"
START_STOP = HERE / "slurm_local.sh"
BIN = Path(sys.executable).parent  # the venv's bin/: python, dpal, torchrun
SKIP_EXIT = 3  # slurm_local.sh: SLURM is not installed and cannot be installed here


def skip_tier(reason: str) -> NoReturn:
    """Skip the whole tier, saying why; under CI=true (as CI services set it) a tier that cannot run
    fails the run instead, with that reason in one line, so that CI never passes without it."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.exit(f"cluster tier: CI=true, so it must run, but it would be skipped: {reason}", returncode=1)
    pytest.skip(f"cluster tier: {reason}")


def run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def answering() -> bool:
    """sbatch is installed and the controller answers."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        return run(["sinfo", "-h"], timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class Cluster:
    """The SLURM the tier submits to, and the jobs it submitted (cancelled at the end, if left)."""

    started_here: bool
    jobs: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: {
            "jobs_submitted": 0,
            "preemptions_survived": 0,
            "time_limits_survived": 0,
            "bytes_compared": 0,
        }
    )

    def sbatch(self, script: Path, *options: str, env: dict[str, str]) -> int:
        """`sbatch --parsable OPTIONS SCRIPT` from environment `env`, which the job inherits (sbatch's
        default --export=ALL; `--export=ALL,K=V` cannot carry a comma, and DPAL_*_ARGS hold some).
        Returns the job id."""
        res = subprocess.run(
            ["sbatch", "--parsable", *options, str(script)],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert res.returncode == 0, f"sbatch failed: {res.stderr}"
        job = int(res.stdout.strip().split(";")[0])
        self.jobs.append(job)
        self.counts["jobs_submitted"] += 1
        return job

    def note_jobs(self, jobs: list[int]) -> None:
        """Jobs submitted by something else (dask-jobqueue), for the count and the cleanup."""
        self.jobs += jobs
        self.counts["jobs_submitted"] += len(jobs)


def job_field(job: int | str, name: str) -> str | None:
    """One field of `scontrol show job` (None once SLURM has forgotten the job)."""
    res = run(["scontrol", "-o", "show", "job", str(job)])
    if res.returncode != 0:
        return None
    m = re.search(rf"(?:^| ){name}=(\S*)", res.stdout)
    return m.group(1) if m else None


def wait_until(predicate: Callable[[], bool], what: str, timeout: float, log: Path | None = None) -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")
        time.sleep(0.2)


def wait_state(job: int | str, states: set[str], timeout: float, log: Path | None = None) -> str:
    """Wait until the job's JobState is one of `states`; returns it."""
    seen: list[str | None] = [None]

    def reached() -> bool:
        seen[0] = job_field(job, "JobState")
        return seen[0] in states

    wait_until(reached, f"job {job} in {sorted(states)} (last {seen[0]})", timeout, log)
    return str(seen[0])


ALIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUE_HOLD",
    "RESIZING",
}
