"""A stop signal that arrives while stage two is still being built (store opened, model built,
DataLoader made) stops the run after its first step with a checkpoint, instead of killing it.

SLURM sends `--signal=B:USR1@T` up to a minute early (docs/training.md, "Clusters"), and a
requeued job's ranks may still be starting then; SIGUSR1's default action ends a process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import dpal_tests_stage2_util as u  # registered by conftest.py
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    sys.path.insert(0, sys.argv[3])
    import stage2_util as u
    from dpal.trainer.data import BatchDataset
    from dpal.trainer.train import train

    class SignalledWhileBuilding(BatchDataset):
        def __init__(self, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGUSR1)  # the scheduler's warning, before any step
            super().__init__(*args, **kwargs)

    cfg = u.distill_config(sys.argv[1], sys.argv[2])
    res = train(cfg, show_progress=False, dataset_class=SignalledWhileBuilding)
    handler = signal.getsignal(signal.SIGUSR1)
    print(json.dumps({"step": res.step, "stopped": res.stopped_by_signal, "signal": res.signal_name,
                      "checkpoint": res.last_checkpoint.name, "handler_restored": handler == signal.SIG_DFL}))
    """
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("early_signal")
    return u.make_store(u.make_corpus(root / "corpus"), root / "store")


@pytest.mark.subprocess
def test_usr1_while_the_run_is_built_stops_after_one_step_with_a_checkpoint(
    store: Path, tmp_path: Path
) -> None:
    script = tmp_path / "early.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), str(store), str(run), str(Path(u.__file__).parent)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]  # -10 (killed by SIGUSR1) before the fix
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {
        "step": 1,
        "stopped": True,
        "signal": "SIGUSR1",
        "checkpoint": "step-00000001.pt",
        "handler_restored": True,
    }
    assert u.checkpoint_steps(run) == [1]
