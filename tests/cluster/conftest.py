"""The cluster tier: real SLURM jobs (sbatch, job arrays, dask-jobqueue workers, requeue, time limits).

Every test here is marked `slurm` (and `subprocess`). The session fixture `slurm` uses the SLURM that answers, or,
as root, starts a single-node one with tests/cluster/slurm_local.sh (installing Debian's packages
when missing) and stops at the end only what that script started; without root and without a
running SLURM the whole tier is skipped with one reason, and under CI=true that fails the run
instead (`cluster_util.skip_tier`). A plain `pytest` run (the unit tier)
does not collect this folder (tests/conftest.py); run it with `make test-cluster`.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

UTIL = "dpal_tests_cluster_util"
if UTIL not in sys.modules:  # tests/cluster/cluster_util.py, importable by the test modules
    _spec = importlib.util.spec_from_file_location(UTIL, Path(__file__).with_name("cluster_util.py"))
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[UTIL] = _mod
    _spec.loader.exec_module(_mod)

import dpal_tests_cluster_util as cu  # noqa: E402

_figures: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: submits real SLURM jobs (the cluster tier, tests/cluster/)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if cu.HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.subprocess)  # sbatch, bash, the CLI: tests/conftest.py


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _figures:
        terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def slurm() -> Iterator[cu.Cluster]:
    """The cluster; cancels the jobs its tests left and stops what it started."""
    if cu.answering():
        cluster = cu.Cluster(started_here=False)
    elif os.geteuid() != 0:
        cu.skip_tier("no SLURM answers here (sbatch, sinfo) and starting one needs root")
    else:
        res = cu.run(["bash", str(cu.START_STOP), "start"], timeout=600)
        if res.returncode == cu.SKIP_EXIT:
            cu.skip_tier(f"SLURM cannot be installed here ({res.stderr.strip().splitlines()[-1]})")
        assert res.returncode == 0, f"slurm_local.sh start failed:\n{res.stdout}\n{res.stderr}"
        cluster = cu.Cluster(started_here=True)
    t0 = time.monotonic()
    try:
        yield cluster
    finally:
        left = [j for j in cluster.jobs if cu.job_field(j, "JobState") in cu.ALIVE]
        if left:
            cu.run(["scancel", "--full", *map(str, left)])
            cu.run(["scancel", *map(str, left)])
        if cluster.started_here:
            res = cu.run(["bash", str(cu.START_STOP), "stop"], timeout=120)
            assert res.returncode == 0, res.stderr
        c = cluster.counts
        _figures.append(
            f"cluster tier: {c['jobs_submitted']} jobs submitted, {c['preemptions_survived']} "
            f"preemptions and {c['time_limits_survived']} time limits survived, "
            f"{c['bytes_compared']} bytes compared; SLURM {'started here' if cluster.started_here else 'found running'}, "
            f"{time.monotonic() - t0:.0f} s of tests"
        )
