"""The run directory of stage two (trainer/rundir.py and train's use of it): one owner at a time,
no mixed runs, what a crash leaves cleaned, disk full, and what a run tells the user on the way.

Real processes for everything that involves another process (the lock, signals); the tiny run of
tests/stage2_util.py (10 images, batch 4: 6 steps in 3 epochs, a second or so each).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import dpal_tests_stage2_util as u  # registered by conftest.py
import pytest
import torch
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
    return subprocess.run(
        [*u.DPAL, *args],
        env=kw.pop("env", u.env()),
        cwd=u.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        **kw,
    )


# ---------------------------------------------------------------- 1. one owner


@pytest.mark.subprocess
def test_a_second_run_into_the_same_out_is_refused_and_a_crash_frees_it(root: Path, store: Path) -> None:
    out = root / "locked"
    args = u.distill_args(store, out, "--epochs", "100", "--set", "checkpoint_every=1")
    first = u.start_until_steps(args, out)
    second = _run(u.distill_args(store, out))
    assert second.returncode == 2, second.stderr
    line = _one_error_line(second.stderr)
    assert (
        f"run directory {out} is in use by another dpal distill (host {socket.gethostname()}, pid {first.pid}, "
        "started 20" in line
    ), line
    assert "another --out" in line
    # the second run wrote nothing: every metrics line is the first run's, one per step
    steps = [m["step"] for m in u.metrics(out)]
    assert steps == list(range(1, len(steps) + 1))

    first.send_signal(signal.SIGKILL)  # a crash: no cleanup runs
    first.communicate()
    assert f"pid {first.pid}," in (out / ".lock").read_text()  # the stale text stays...
    last = u.checkpoint_steps(out)[-1]
    # ...and does not hold the directory: the next run takes it and resumes
    result = train(
        u.distill_config(store, out, epochs=100, checkpoint_every=1, max_steps=last + 1), show_progress=False
    )
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


@pytest.mark.subprocess
def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_stops(root: Path, store: Path) -> None:
    import sys

    out = root / "locked-ddp"
    args = u.distill_args(store, out, "--batch-size", "2")
    with RunLock(out):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--standalone",
                "-m",
                "dpal.cli",
                *args,
            ],
            env=u.env(),
            cwd=u.REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    # both ranks stop with rank 0's verdict (none waits forever in a collective), naming this process
    assert len(errors) == 2 and len(set(errors)) == 1, proc.stderr[-3000:]
    assert f"pid {os.getpid()}," in errors[0] and "is in use" in errors[0]
    assert not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------- 2. no mixed runs


def test_resume_none_where_a_run_exists_is_refused_and_fresh_moves_it_aside(
    root: Path, store: Path, reference: Path
) -> None:
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


def test_a_checkpoint_temporary_file_left_by_a_crash_is_removed_on_resume(
    root: Path, store: Path, reference: Path
) -> None:
    run = root / "leftover"
    train(u.distill_config(store, run, max_steps=4), show_progress=False)
    # what a SIGKILL during save_checkpoint leaves: atomic_write_bytes' mkstemp file, half written
    tmp = run / "checkpoints" / ".step-00000005.pt.k2j4x9_a.tmp"
    tmp.write_bytes((run / "checkpoints" / "step-00000004.pt").read_bytes()[:4096])
    keep = run / "checkpoints" / "notes.tmp"  # not a checkpoint's temporary file: not ours to delete
    keep.write_text("mine")
    train(u.distill_config(store, run), show_progress=False)
    assert not tmp.exists() and keep.read_text() == "mine"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "notes.tmp",
        "step-00000004.pt",
        "step-00000006.pt",
    ]


# ---------------------------------------------------------------- 16. Ctrl-C, and what a run says


@pytest.mark.subprocess
def test_ctrl_c_checkpoints_says_how_to_resume_and_the_rerun_continues_exactly(
    root: Path, store: Path, reference: Path
) -> None:
    out = root / "ctrl-c"
    args = u.distill_args(store, out, "--num-workers", "1")  # the DataLoader worker gets the SIGINT too
    proc = u.start_until_steps(args, out)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the terminal signals the foreground group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "starting fresh at step 0 (no checkpoint in " in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    steps = u.checkpoint_steps(out)
    assert len(steps) == 1 and 2 <= steps[0] < 6, steps  # checkpoint_every is 500: this one is Ctrl-C's
    checkpoint = out / "checkpoints" / f"step-{steps[0]:08d}.pt"
    assert stdout.strip().splitlines()[-1].startswith(f"stopped at step {steps[0]} by SIGINT (epoch ")
    assert f"checkpoint {checkpoint}); rerun the same command to resume" in stdout

    rerun = _cli(args)
    assert rerun.exit_code == 0, rerun.output
    assert f"resumed from {checkpoint} at step {steps[0]}" in rerun.stderr
    last = out / "checkpoints" / "step-00000006.pt"
    assert "done: step 6, epoch 3," in rerun.stdout and f"last checkpoint {last}" in rerun.stdout
    assert u.metrics(out) == u.metrics(reference)
    u.assert_same_training_state(u.load_last(out), u.load_last(reference))
    # a finished run, rerun, trains nothing and names its last checkpoint (it said "checkpoint None")
    again = _cli(args)
    assert again.exit_code == 0 and "done: step 6, epoch 3," in again.stdout
    assert f"last checkpoint {last}" in again.stdout and "None" not in again.stdout


# ---------------------------------------------------------------- 17. progress in a log file


@pytest.mark.subprocess
def test_a_log_file_gets_plain_progress_lines_with_the_losses(
    root: Path, store: Path, reference: Path
) -> None:
    out = root / "progress"
    args = [a for a in u.distill_args(store, out, "--set", "progress_seconds=0") if a != "--quiet"]
    with open(root / "progress.log", "w") as log:  # a batch job: stderr is a file, not a terminal
        proc = subprocess.run(
            [*u.DPAL, *args],
            env=u.env(),
            cwd=u.REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=180,
        )
    assert proc.returncode == 0
    text = (root / "progress.log").read_text()
    pattern = re.compile(
        r"^distill (\d)/6 steps \((\d+\.\d)%\) \| (\d+\.\d) images/s \| loss (\d+\.\d{4}) "
        r"\(global (\d+\.\d{4}), local (\d+\.\d{4}), relation (\d+\.\d{4})\) \| "
        r"elapsed \d:\d\d:\d\d \| ETA \d:\d\d:\d\d$"
    )
    found = [m for ln in text.splitlines() if (m := pattern.match(ln))]
    assert [int(m[1]) for m in found] == [1, 2, 3, 4, 5, 6], text  # progress_seconds=0: one per step
    assert [m[2] for m in found] == ["16.7", "33.3", "50.0", "66.7", "83.3", "100.0"]
    want = u.metrics(reference)  # the same run: the printed losses are the logged ones, rounded
    for m, w in zip(found, want, strict=True):
        assert [float(v) for v in m.groups()[3:]] == [
            round(w[k], 4) for k in ("total", "global", "local", "relation")
        ]
        assert float(m[3]) > 0
    assert "loss 0.0000" not in text and "\x1b[" not in text  # no made-up loss, no terminal codes


def test_progress_shows_no_loss_before_the_first_step_and_paces_its_lines() -> None:
    import io

    from dpal.progress import Progress

    stream = io.StringIO()
    p = Progress("distill", total=10, completed=4, interval_s=3600.0, stream=stream)
    assert (
        " | loss - | " in p.line()
        and p.line().endswith("ETA -")
        and p.line().startswith("distill 4/10 steps")
    )
    for step in (5, 6, 7):
        p.update(step, 8, {"total": 1.5, "global": 0.5})
    assert stream.getvalue() == ""  # within the interval: nothing yet
    p.update(10, 8, {"total": 1.25, "global": 0.25})  # the last step always prints
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("distill 10/10 steps (100.0%) | ") and "loss 1.2500 (global 0.2500)" in line
    assert line.endswith("ETA 0:00:00")
    p.stop()
    assert len(stream.getvalue().splitlines()) == 1  # nothing new to print at the end


# ---------------------------------------------------------------- 19. the peak lr


def test_the_peak_lr_and_its_derivation_are_said_at_the_start(root: Path, store: Path) -> None:
    result = _cli(u.distill_args(store, root / "lr-line", "--max-steps", "1"))
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if "peak lr" in ln]
    # 2.5e-4 x 4 / 256 = 3.90625e-6, the tiny run's schedule: 2 warmup steps of 6
    assert len(lines) == 1 and lines[0].endswith(
        "peak lr 3.91e-06 = base_lr 0.00025 x global batch 4 / 256 (linear scaling rule); warmup 2 steps, "
        "then cosine to 0 at step 6"
    ), result.stderr


# ---------------------------------------------------------------- 7. a changed schedule on resume


def test_a_resume_with_another_schedule_says_so_and_records_it(root: Path, store: Path) -> None:
    from dpal.config import DistillConfig, resolve
    from dpal.trainer.distiller import lr_at

    out = root / "reschedule"
    assert _cli(u.distill_args(store, out, "--max-steps", "3")).exit_code == 0
    result = _cli(u.distill_args(store, out, "--base-lr", "5e-4", "--epochs", "4"))
    assert result.exit_code == 0, result.output
    note = "with changed settings: epochs 3 -> 4, base_lr 0.00025 -> 0.0005"
    warned = [ln for ln in result.stderr.splitlines() if note in ln]
    assert len(warned) == 1 and "resuming at step 3 " + note in warned[0], result.stderr
    # the new schedule from step 3 on: peak 5e-4 x 4 / 256, 2 warmup steps, 8 steps in all
    lrs = [m["lr"] for m in u.metrics(out)]
    assert lrs[3:] == pytest.approx([lr_at(s, 5e-4 * 4 / 256, 2, 8) for s in range(3, 8)], rel=1e-12)
    assert lrs[:3] == pytest.approx([lr_at(s, 2.5e-4 * 4 / 256, 2, 6) for s in range(3)], rel=1e-12)
    # recorded: a comment atop config.yaml (which still loads as a config) and in every later checkpoint
    text = (out / "config.yaml").read_text()
    assert text.splitlines()[0] == "# resumed at step 3 " + note
    cfg = resolve(DistillConfig, str(out / "config.yaml"), {}, [])
    assert (cfg.base_lr, cfg.epochs) == (5e-4, 4)
    assert u.load_last(out)["config_changes"] == [
        {"step": 3, "changes": ["epochs 3 -> 4", "base_lr 0.00025 -> 0.0005"]}
    ]


# ---------------------------------------------------------------- 10. disk full


@pytest.mark.subprocess
def test_a_full_disk_is_one_line_keeps_the_checkpoints_and_a_rerun_resumes(
    root: Path, store: Path, reference: Path
) -> None:
    # A real full filesystem: the run directory on an 18 MB tmpfs in a private mount namespace, room
    # for two 7.3 MB checkpoints of the tiny run and not a third. Then the tmpfs grows (space freed)
    # and the same command resumes. The run directory is copied out after each run.
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    mnt, kept = root / "full-mnt", root / "full-kept"
    mnt.mkdir()
    kept.mkdir()
    run = mnt / "run"
    cmd = " ".join(f"'{a}'" for a in [*u.DPAL, *u.distill_args(store, run, "--set", "checkpoint_every=1")])
    script = (
        f"mount -t tmpfs -o size=18m tmpfs {mnt} || exit 97\n"
        f"{cmd} >{kept}/out1 2>{kept}/err1; echo $? >{kept}/rc1; cp -a {run} {kept}/after-full\n"
        f"mount -o remount,size=100m {mnt}\n"
        f"{cmd} >{kept}/out2 2>{kept}/err2; echo $? >{kept}/rc2; cp -a {run} {kept}/after-resume\n"
    )
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--mount", "--map-root-user"]
    proc = subprocess.run(
        [*unshare, "sh", "-c", script],
        env=u.env(),
        cwd=u.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode == 97 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr

    full = kept / "after-full"
    assert (kept / "rc1").read_text().strip() == "2"
    err = (kept / "err1").read_text()
    line = _one_error_line(err)
    assert line == (
        f"error: no space left on the device of {run / 'checkpoints'} (writing "
        f"{run / 'checkpoints' / 'step-00000003.pt'}: No space left on device); free space there and "
        f"rerun the same command: it resumes from {run / 'checkpoints' / 'step-00000002.pt'}"
    ), line
    # the checkpoints written before are whole, and the failed write left nothing behind
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == [
        "step-00000001.pt",
        "step-00000002.pt",
    ]
    assert u.load_last(full)["step"] == 2
    assert [m["step"] for m in u.metrics(full)] == [1, 2, 3]

    assert (kept / "rc2").read_text().strip() == "0", (kept / "err2").read_text()
    after = kept / "after-resume"
    assert "resumed from" in (kept / "err2").read_text()
    assert u.metrics(after) == u.metrics(reference)
    u.assert_same_training_state(u.load_last(after), u.load_last(reference))


# ---------------------------------------------------------------- 22. what is kept


def test_older_checkpoints_can_be_kept_as_student_weights_only(root: Path, store: Path) -> None:
    from dpal.trainer.checkpoint import build_student_from_checkpoint, find_resume

    out = root / "kept"
    train(
        u.distill_config(store, out, checkpoint_every=1, keep_last=2, keep_weights_only_older=2),
        show_progress=False,
    )
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [
        "step-00000003.student.pt",
        "step-00000004.student.pt",
        "step-00000005.pt",
        "step-00000006.pt",
    ]
    # a reduced one holds the student of its step: a run cut at step 4 has the same, bit for bit
    cut = root / "kept-cut"
    train(u.distill_config(store, cut, max_steps=4), show_progress=False)
    reduced = torch.load(out / "checkpoints" / "step-00000004.student.pt", weights_only=True)
    assert reduced["step"] == 4 and reduced["weights_only"] is True
    assert set(reduced) >= {"model", "student_name", "img_size", "student_kwargs", "config"}
    assert not {"dpade", "optimizer", "rng", "sampler"} & set(reduced)
    whole = u.load_last(cut)
    assert reduced["model"].keys() == whole["model"].keys()
    assert all(torch.equal(reduced["model"][k], whole["model"][k]) for k in whole["model"])
    whole_size = (out / "checkpoints" / "step-00000006.pt").stat().st_size
    assert (out / "checkpoints" / "step-00000004.student.pt").stat().st_size < whole_size / 5
    # resume takes a whole one; export and eval take a reduced one too
    assert find_resume(out, "auto") == out / "checkpoints" / "step-00000006.pt"
    model, ckpt = build_student_from_checkpoint(out / "checkpoints" / "step-00000003.student.pt")
    assert ckpt["step"] == 3

    # the default keeps none of the older ones (keep_last whole checkpoints only)
    plain = root / "kept-default"
    train(u.distill_config(store, plain, checkpoint_every=1, keep_last=2), show_progress=False)
    assert u.checkpoint_steps(plain) == [5, 6] and not list((plain / "checkpoints").glob("*.student.pt"))
