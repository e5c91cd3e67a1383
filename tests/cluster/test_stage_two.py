"""Stage two on a real SLURM: scripts/slurm/distill.sbatch, the batch script docs/training.md shows,
submitted as it is with sbatch options and DPAL_* variables for the tiny run (tests/stage2_util.py:
10 noise images, a two-block student of width 48, one torch thread per rank).

- `scontrol requeue` mid-run: SLURM sends SIGTERM to the job; the ranks checkpoint, the job comes
  back with SLURM_RESTART_COUNT=1, resumes, and its exported weights equal an uninterrupted run's
  bit for bit.
- A job that reaches its time limit: USR1 (`--signal=B:USR1@60`) reaches the script, the ranks
  checkpoint on it, and the script requeues the job, which resumes from that checkpoint.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import dpal_tests_cluster_util as cu  # registered by tests/cluster/conftest.py
import dpal_tests_stage2_util as u  # registered by tests/conftest.py
import pytest

SCRIPT = cu.SCRIPTS / "distill.sbatch"
NPROC = 2
BATCH = 2  # per rank: global batch 4, 10 images -> 2 steps per epoch
EPOCHS = 40  # 80 steps, about 10 s on two cores: room to requeue part-way
# a job as small as the machine: no GPU, two CPUs; sbatch's options override the script's #SBATCH lines
JOB_OPTIONS = ["--gpus-per-node=0", "--cpus-per-task=2", "--mem=2G"]


def distill_args(epochs: int, *extra: str) -> str:
    """DPAL_DISTILL_ARGS: u.distill_args without --store/--out (the script passes them); the
    student's JSON without spaces, since the script splits the variable into words."""
    args = u.distill_args(
        Path("unused"), Path("unused"), "--batch-size", str(BATCH), "--epochs", str(epochs), *extra
    )
    args = [
        f"student_kwargs={json.dumps(u.STUDENT_KWARGS, separators=(',', ':'))}"
        if a.startswith("student_kwargs=")
        else a
        for a in args[5:]
    ]
    assert not any(" " in a for a in args)
    return " ".join(args)


def job_env(store: Path, run: Path, nproc: int, args: str) -> dict[str, str]:
    return {
        **u.env(),
        "TORCHRUN": str(cu.BIN / "torchrun"),
        "DPAL_NPROC": str(nproc),
        "DPAL_STORE": str(store),
        "DPAL_RUN": str(run),
        "DPAL_DISTILL_ARGS": args,
    }


def export(run: Path, out: Path) -> bytes:
    res = subprocess.run(
        [str(cu.BIN / "dpal"), "export", str(run), "--out", str(out)],
        env=u.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return out.read_bytes()


def steps_logged(run: Path) -> int:
    f = run / "metrics.jsonl"
    return f.read_text().count("\n") if f.exists() else 0


def requeue_now(job: int, log: Path) -> None:
    """Once the requeued job is PENDING again, start it now instead of after its ~2 minute BeginTime."""
    cu.wait_state(job, {"PENDING"}, 60, log)
    assert cu.job_field(job, "Restarts") == "1"
    # slurmd revokes the old run's credential at a time in whole seconds and refuses a credential
    # made in that same second ("Killing non-startable batch JobId=N: Job credential revoked", and
    # the job FAILS): a job that requeues itself is PENDING within that second
    time.sleep(2)
    assert cu.run(["scontrol", "update", f"JobId={job}", "StartTime=now"]).returncode == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stage2")
    with_one_thread = u.one_torch_thread()
    next(with_one_thread)
    try:
        return u.make_store(u.make_corpus(root / "corpus"), root / "store")
    finally:
        next(with_one_thread, None)


def test_requeued_mid_run_resumes_to_the_same_weights(slurm: cu.Cluster, tmp_path: Path, store: Path) -> None:
    args = distill_args(EPOCHS)
    run, log = tmp_path / "run", tmp_path / "job.log"
    # --time=10: the script's USR1 @300 comes 4 to 5 minutes in, long after this job ends
    job = slurm.sbatch(
        SCRIPT, *JOB_OPTIONS, "--time=10", f"--output={log}", env=job_env(store, run, NPROC, args)
    )

    total = EPOCHS * 2  # 10 images // global batch 4 = 2 steps per epoch
    cu.wait_state(job, {"RUNNING"}, 60, log)
    cu.wait_until(
        lambda: steps_logged(run) >= 3 or cu.job_field(job, "JobState") != "RUNNING",
        "three steps of the job",
        120,
        log,
    )
    assert cu.job_field(job, "JobState") == "RUNNING", log.read_text()[-3000:]
    assert cu.run(["scontrol", "requeue", str(job)]).returncode == 0
    requeue_now(job, log)
    # the uninterrupted run, while the job resumes: the same torchrun command, outside SLURM
    ref = tmp_path / "ref"
    cmd = [
        str(cu.BIN / "torchrun"),
        "--standalone",
        "--nproc-per-node",
        str(NPROC),
        "-m",
        "dpal.cli",
        "distill",
        "--store",
        str(store),
        "--out",
        str(ref),
        *args.split(),
        "--resume",
        "auto",
    ]
    done = subprocess.run(cmd, env=u.env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"done: step {total}," in done.stdout

    cu.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, 180, log)
    text = log.read_text()
    assert cu.job_field(job, "JobState") == "COMPLETED", text[-3000:]

    assert "SLURM_RESTART_COUNT=0" in text and "SLURM_RESTART_COUNT=1" in text, text[-3000:]
    stopped = re.search(r"stopped at step (\d+) by SIGTERM", text)
    assert stopped, text[-3000:]
    k = int(stopped.group(1))
    assert 3 <= k < total
    assert re.search(rf"resumed from \S+step-{k:08d}\.pt at step {k} ", text), text[-3000:]
    assert f"done: step {total}," in text
    assert [m["step"] for m in u.metrics(run)] == list(range(1, total + 1))
    assert u.metrics(run) == u.metrics(ref)
    a, b = export(run, tmp_path / "requeued.safetensors"), export(ref, tmp_path / "ref.safetensors")
    assert a == b  # the exported files, byte for byte (export writes a sorted header)
    slurm.counts["preemptions_survived"] += 1
    slurm.counts["bytes_compared"] += len(a)


def test_time_limit_checkpoints_and_requeues_itself(slurm: cu.Cluster, tmp_path: Path, store: Path) -> None:
    """--time=3 with USR1 60 s before: SLURM sends it 60 to 120 s after the start (up to 60 s
    early, says sbatch(1)), while the ranks are training a schedule far longer than that."""
    args = distill_args(100_000, "--set", "checkpoint_every=1000000")
    run, log = tmp_path / "run", tmp_path / "job.log"
    # one rank is enough here, and leaves the other core to the rest of the tier
    job = slurm.sbatch(
        SCRIPT,
        *JOB_OPTIONS,
        "--time=3",
        "--signal=B:USR1@60",
        f"--output={log}",
        env=job_env(store, run, 1, args),
    )
    cu.wait_state(job, {"RUNNING"}, 60, log)
    cu.wait_until(lambda: cu.job_field(job, "Restarts") == "1", "the job to requeue itself", 200, log)
    requeue_now(job, log)
    text = log.read_text()
    assert "USR1 before the time limit" in text, text[-3000:]
    stopped = re.search(r"stopped at step (\d+) by SIGUSR1", text)
    assert stopped, text[-3000:]
    k = int(stopped.group(1))
    assert u.checkpoint_steps(run) == [k] and k > 0

    cu.wait_until(
        lambda: "SLURM_RESTART_COUNT=1" in log.read_text() and steps_logged(run) > k,
        "the requeued job to train past its checkpoint",
        120,
        log,
    )
    text = log.read_text()
    assert re.search(rf"resumed from \S+step-{k:08d}\.pt at step {k} ", text), text[-3000:]
    assert cu.run(["scancel", str(job)]).returncode == 0
    cu.wait_state(job, {"CANCELLED", "COMPLETED"}, 60, log)
    slurm.counts["time_limits_survived"] += 1
