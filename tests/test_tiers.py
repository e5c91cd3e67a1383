"""The test tiers (README.md, Development): a test that starts a process carries the `subprocess`
mark, which `make test-fast` leaves out. tests/conftest.py makes every process start fail in a
test without the mark; these tests check that it does, and that a marked test is let through.
Also: the cluster tier skips with its reason where SLURM cannot run, but not under CI=true."""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest


def test_an_unmarked_test_cannot_start_a_process() -> None:
    with pytest.raises(RuntimeError, match="not marked @pytest.mark.subprocess"):
        subprocess.run([sys.executable, "-c", "pass"], check=False)
    with pytest.raises(RuntimeError, match="not marked @pytest.mark.subprocess"):
        multiprocessing.get_context("spawn").Process(target=print).start()
    with pytest.raises(RuntimeError, match="not marked @pytest.mark.subprocess"):
        os.fork()


@pytest.mark.subprocess
def test_a_marked_test_starts_processes() -> None:
    r = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, check=True)
    assert r.stdout == "42\n"


def _cluster_util() -> ModuleType:
    """tests/cluster/cluster_util.py, under the name tests/cluster/conftest.py gives it."""
    name = "dpal_tests_cluster_util"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).parent / "cluster" / "cluster_util.py"
        )
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_the_cluster_tier_skips_with_its_reason_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    cu = _cluster_util()
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="^cluster tier: no SLURM here$"):
        cu.skip_tier("no SLURM here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.exit.Exception) as exc:
        cu.skip_tier("no SLURM here")
    assert exc.value.returncode == 1
    assert str(exc.value) == "cluster tier: CI=true, so it must run, but it would be skipped: no SLURM here"
