"""DDP on CPU: two gloo ranks under `torchrun --standalone` take equal steps on disjoint samples, stop
together when only one of them gets SIGTERM, and a second torchrun resumes the data stream exactly.
Two nodes on localhost (two torchrun agents, `--nnodes 2`, one rank each, static rendezvous): a run
killed whole with SIGKILL resumes to the uninterrupted two-node run's metrics and checkpoint bit for bit.

The ranks run `dpal distill` through a small probe script (written by the test) that records, per
rank, its pid and every batch it loads: (epoch, step, store indices). With num_workers 0 the
dataset runs in the rank's own process, so one recorded batch is one step taken.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dpal_tests_stage2_util as u  # registered by conftest.py
import numpy as np
import pytest
import torch

from dpal.store import StoreReader
from dpal.trainer.data import EpochSampler, valid_rows
from dpal.trainer.distiller import lr_at

WORLD = 2
BATCH = 2  # per rank: global batch 4, 10 images -> 2 steps per epoch, 2 images left out each epoch
EPOCHS = 4
TOTAL = EPOCHS * 2

PROBE = """
import json, os, sys
from pathlib import Path

from dpal.trainer import data

probe_dir = Path(os.environ["DPAL_TEST_PROBE_DIR"])
rank = os.environ["RANK"]
(probe_dir / f"pid-rank{rank}").write_text(str(os.getpid()))
_getitem = data.BatchDataset.__getitem__


def getitem(self, req):
    out = _getitem(self, req)
    with open(probe_dir / f"samples-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"epoch": req.epoch, "step": req.step, "index": out["index"].tolist()}) + "\\n")
    return out


data.BatchDataset.__getitem__ = getitem
from dpal.cli import main

sys.argv[0] = "dpal"
main()
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return u.make_store(u.make_corpus(root / "corpus"), root / "store")
    finally:
        torch.set_num_threads(before)


def _torchrun(probe: Path, store: Path, out: Path, probe_dir: Path) -> subprocess.Popen:
    args = u.distill_args(store, out, "--batch-size", str(BATCH), "--epochs", str(EPOCHS))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(WORLD),
        "--standalone",
        str(probe),
        *args,
    ]
    env = {**u.env(), "DPAL_TEST_PROBE_DIR": str(probe_dir)}
    return subprocess.Popen(
        cmd, env=env, cwd=u.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _samples(probe_dir: Path, rank: int) -> list[dict[str, Any]]:
    f = probe_dir / f"samples-rank{rank}.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.exists() else []


@pytest.mark.subprocess
def test_ddp_equal_steps_disjoint_samples_sigterm_and_resume(tmp_path: Path, store: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    out = tmp_path / "run"

    # run 1: SIGTERM to rank 1 only, after its second batch; StopFlag.agreed must stop both ranks at
    # the same step boundary, rank 0 checkpoints, both exit 0
    proc = _torchrun(probe, store, out, probe_dir)
    t0 = time.monotonic()
    while len(_samples(probe_dir, 1)) < 2:
        if proc.poll() is not None or time.monotonic() - t0 > 240:
            proc.kill()
            pytest.fail("run 1 ended or hung before rank 1's second batch:\n" + "\n".join(proc.communicate()))
        time.sleep(0.005)
    os.kill(int((probe_dir / "pid-rank1").read_text()), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    stopped = u.checkpoint_steps(out)
    assert len(stopped) == 1 and 2 <= stopped[0] < TOTAL, stopped
    k = stopped[0]
    assert f"stopped at step {k} by SIGTERM (" in stdout
    for rank in range(WORLD):
        assert len(_samples(probe_dir, rank)) == k, rank  # rank 0 never got the signal, yet stopped at k
    ckpt = u.load_last(out)
    assert ckpt["world_size"] == WORLD and ckpt["step"] == k

    # run 2: the same command resumes from step k and finishes the schedule
    proc = _torchrun(probe, store, out, probe_dir)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"done: step {TOTAL}," in stdout
    assert u.checkpoint_steps(out)[-1] == TOTAL

    # equal steps, the schedule's (epoch, step) sequence once, each rank's rows those of its sampler
    valid = valid_rows(StoreReader(store))
    samplers = [EpochSampler(valid, BATCH, WORLD, r, seed=0) for r in range(WORLD)]
    expected = [(e, s) for e in range(EPOCHS) for s in range(samplers[0].steps_per_epoch)]
    runs = [_samples(probe_dir, r) for r in range(WORLD)]
    for rank, lines in enumerate(runs):
        assert [(m["epoch"], m["step"]) for m in lines] == expected, rank
        for m in lines:
            assert m["index"] == samplers[rank].batch(m["epoch"], m["step"]).tolist()
    for a, b in zip(*runs, strict=True):
        assert len(a["index"]) == len(b["index"]) == BATCH
        assert not set(a["index"]) & set(b["index"])  # disjoint across ranks
    for e in range(EPOCHS):
        rows = [i for lines in runs for m in lines if m["epoch"] == e for i in m["index"]]
        assert len(rows) == len(set(rows)) == BATCH * WORLD * samplers[0].steps_per_epoch

    # one metrics line per step, none repeated, with the schedule of the global batch
    lines = u.metrics(out)
    assert [m["step"] for m in lines] == list(range(1, TOTAL + 1))
    peak = 2.5e-4 * BATCH * WORLD / 256
    assert [m["lr"] for m in lines] == pytest.approx(
        [lr_at(s, peak, 2, TOTAL) for s in range(TOTAL)], rel=1e-12
    )
    assert all(math.isfinite(m["total"]) for m in lines)
    assert np.isfinite(np.array([m["global"] for m in lines])).all()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _agents(store: Path, out: Path) -> tuple[list[str], list[list[str]]]:
    """`dpal distill` arguments and the two agents' launchers: `torchrun --nnodes 2` with node ranks
    0 and 1 on this host, one rank each, the first node's address and a fresh port (static rendezvous)."""
    port = str(_free_port())
    launchers = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        + ["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", port, "-m", "dpal.cli"]
        for node in (0, 1)
    ]
    args = u.distill_args(store, out, "--batch-size", str(BATCH), "--set", "checkpoint_every=2")
    return args, launchers


def _two_nodes(store: Path, out: Path, until_steps: int | None = None) -> list[subprocess.Popen]:
    """Both agents started (node 1 first: node 0 waits at the rendezvous for it), each in its own
    session; with `until_steps`, returned once metrics.jsonl has that many lines, else once done."""
    args, (node0, node1) = _agents(store, out)
    popen = dict(cwd=u.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen([*node1, *args], env=u.env(), start_new_session=True, **popen)
    if until_steps is not None:
        return [u.start_until_steps(args, out, until_steps, launcher=node0), second]
    first = subprocess.Popen([*node0, *args], env=u.env(), start_new_session=True, **popen)
    for proc in (first, second):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    return [first, second]


@pytest.mark.subprocess
@pytest.mark.slow  # three two-node runs (2 agents, 2 ranks) on two cores: about 80 s
def test_two_nodes_killed_whole_resume_bit_for_bit(tmp_path: Path, store: Path) -> None:
    reference = tmp_path / "reference"
    _two_nodes(store, reference)
    steps = 3 * (10 // (BATCH * 2))  # 3 epochs of 10 images, global batch 4: 2 steps an epoch
    assert u.checkpoint_steps(reference)[-1] == steps and u.load_last(reference)["world_size"] == 2

    out = tmp_path / "run"
    agents = _two_nodes(store, out, until_steps=3)  # past the checkpoint at step 2
    for proc in agents:  # the whole job killed, as a node failure or scancel --signal=KILL would
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert u.checkpoint_steps(out)[0] == 2 and len(u.metrics(out)) >= 3
    _two_nodes(store, out)  # the same commands again: --resume auto from step 2
    assert u.metrics(out) == u.metrics(reference)
    assert [m["step"] for m in u.metrics(out)] == list(range(1, steps + 1))
    u.assert_same_training_state(u.load_last(out), u.load_last(reference))
