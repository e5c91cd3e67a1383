"""The run directory of stage two (trainer/rundir.py and train's use of it): one owner at a time,
no mixed runs, what a crash leaves cleaned, disk full, and what a run tells the user on the way.

Real processes for everything that involves another process (the lock, signals); the tiny run of
tests/stage2_util.py (10 images, batch 4: 6 steps in 3 epochs, a second or so each).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import dpal_tests_stage2_util as u  # registered by conftest.py
import pytest
from typer.testing import CliRunner

from dpal.cli import app
from dpal.trainer.rundir import RunDirError, RunLock
from dpal.trainer.train import train


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    yield from u.one_torch_thread()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rundir")


@pytest.fixture(scope="module")
def store(root: Path) -> Path:
    return u.make_store(u.make_corpus(root / "corpus"), root / "store", dtype="float32")


@pytest.fixture(scope="module")
def reference(root: Path, store: Path) -> Path:
    """The uninterrupted 6-step run, in-process."""
    out = root / "reference"
    assert train(u.distill_config(store, out), show_progress=False).step == 6
    return out


def _cli(args: list[str]) -> Any:
    return CliRunner().invoke(app, args)


def _one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def _run(args: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run([*u.DPAL, *args], env=kw.pop("env", u.env()), cwd=u.REPO_ROOT, capture_output=True,
                          text=True, timeout=180, **kw)


# ---------------------------------------------------------------- 1. one owner


def test_a_second_run_into_the_same_out_is_refused_and_a_crash_frees_it(root: Path, store: Path) -> None:
    out = root / "locked"
    args = u.distill_args(store, out, "--epochs", "100", "--set", "checkpoint_every=1")
    first = u.start_until_steps(args, out)
    second = _run(u.distill_args(store, out))
    assert second.returncode == 2, second.stderr
    line = _one_error_line(second.stderr)
    assert f"run directory {out} is in use by another dpal distill (host {socket.gethostname()}, pid {first.pid}, " \
           "started 20" in line, line
    assert "another --out" in line
    # the second run wrote nothing: every metrics line is the first run's, one per step
    steps = [m["step"] for m in u.metrics(out)]
    assert steps == list(range(1, len(steps) + 1))

    first.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
    first.communicate()
    assert f"pid {first.pid}," in (out / ".lock").read_text()  # the stale text stays...
    last = u.checkpoint_steps(out)[-1]
    # ...and does not hold the directory: the next run takes it and resumes
    result = train(u.distill_config(store, out, epochs=100, checkpoint_every=1, max_steps=last + 1),
                   show_progress=False)
    assert result.step == last + 1
    assert f"pid {first.pid}," not in (out / ".lock").read_text()


def test_the_lock_is_released_when_a_run_fails_in_process(root: Path, store: Path, reference: Path) -> None:
    # a refused resume (another seed) raises inside train(); the lock must not outlive it, or every
    # later run in this process would be refused
    run = root / "released"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / "checkpoints" / "step-00000006.pt", run / "checkpoints")
    for _ in range(2):
        with pytest.raises(ValueError, match=r"seed 0 \(now 1\)"):
            train(u.distill_config(store, run, seed=1), show_progress=False)
    with RunLock(run):  # free now; held here, it refuses a run
        with pytest.raises(RunDirError, match="is in use by another dpal distill"):
            train(u.distill_config(store, run), show_progress=False)


def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_stops(root: Path, store: Path) -> None:
    import os
    import sys

    out = root / "locked-ddp"
    args = u.distill_args(store, out, "--batch-size", "2")
    with RunLock(out):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                               "-m", "dpal.cli", *args], env=u.env(), cwd=u.REPO_ROOT, capture_output=True,
                              text=True, timeout=300)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    # both ranks stop with rank 0's verdict (none waits forever in a collective), naming this process
    assert len(errors) == 2 and len(set(errors)) == 1, proc.stderr[-3000:]
    assert f"pid {os.getpid()}," in errors[0] and "is in use" in errors[0]
    assert not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------- 2. no mixed runs


def test_resume_none_where_a_run_exists_is_refused_and_fresh_moves_it_aside(root: Path, store: Path,
                                                                          reference: Path) -> None:
    run = root / "fresh"
    shutil.copytree(reference, run)
    metrics_before = (run / "metrics.jsonl").read_text()
    result = _cli(u.distill_args(store, run, "--resume", "none", "--max-steps", "2"))
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.stderr)
    assert f"{run} already holds a run (checkpoints up to step 6)" in line and "--fresh" in line, line
    assert (run / "metrics.jsonl").read_text() == metrics_before and u.checkpoint_steps(run) == [6]

    result = _cli(u.distill_args(store, run, "--fresh", "--max-steps", "2"))
    assert result.exit_code == 0, result.output
    (aside,) = root.glob("fresh.old-*")
    assert (aside / "metrics.jsonl").read_text() == metrics_before and u.checkpoint_steps(aside) == [6]
    assert u.checkpoint_steps(run) == [2] and u.metrics(run) == u.metrics(reference)[:2]
    # the new run is whole: resumed without --fresh, it ends equal to the uninterrupted one
    assert train(u.distill_config(store, run), show_progress=False).step == 6
    assert u.metrics(run) == u.metrics(reference)
    u.assert_same_training_state(u.load_last(run), u.load_last(reference))


def test_fresh_cannot_resume_a_given_checkpoint(root: Path, store: Path) -> None:
    result = _cli(u.distill_args(store, root / "x", "--fresh", "--resume", str(root / "a.pt")))
    assert result.exit_code == 2
    assert "--fresh starts over" in _one_error_line(result.stderr)


# ---------------------------------------------------------------- 14. leftovers of a crash


def test_a_checkpoint_temporary_file_left_by_a_crash_is_removed_on_resume(root: Path, store: Path,
                                                                         reference: Path) -> None:
    run = root / "leftover"
    train(u.distill_config(store, run, max_steps=4), show_progress=False)
    # what a SIGKILL during save_checkpoint leaves: atomic_write_bytes' mkstemp file, half written
    tmp = run / "checkpoints" / ".step-00000005.pt.k2j4x9_a.tmp"
    tmp.write_bytes((run / "checkpoints" / "step-00000004.pt").read_bytes()[:4096])
    keep = run / "checkpoints" / "notes.tmp"  # not a checkpoint's temporary file: not ours to delete
    keep.write_text("mine")
    train(u.distill_config(store, run), show_progress=False)
    assert not tmp.exists() and keep.read_text() == "mine"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["notes.tmp", "step-00000004.pt",
                                                                      "step-00000006.pt"]
