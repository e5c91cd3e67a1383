"""The loggers of `dpal distill --logger` (trainer/loggers.py), each run for real and offline and read
back: MLflow through its client from a `file:` store, W&B from its offline run directory's .wandb
file, TensorBoard through its event reader where it is installed. One tiny run in two halves (3
steps, then a resume to 6) with a validation every 2 steps: each logger holds metrics.jsonl's
scalars at the same steps (train lines' keys, val lines' under `val/`) and the config, and the
resume continues the same MLflow run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import dpal_tests_stage2_util as u  # registered by conftest.py
import pytest

from dpal.config import to_dict
from dpal.trainer.loggers import flat_params
from dpal.trainer.train import train

WANDB_BLOCK = 32768  # the .wandb file is a LevelDB log: 32 KiB blocks of checksummed chunks
WANDB_HEADER = 7  # ":W&B", a 2-byte magic, a version byte


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    yield from u.one_torch_thread()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A run with --logger mlflow --logger wandb (offline, under the test's folder), in two halves."""
    root = tmp_path_factory.mktemp("loggers")
    store = u.make_store(u.make_corpus(root / "corpus"), root / "store")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.18 refuses a file store without it
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(root / "wandb"))
    mp.setenv("WANDB_SILENT", "true")
    out = root / "run"
    cfg = u.distill_config(store, out, loggers=("mlflow", "wandb"), val_store=str(store), val_every=2)
    assert train(replace(cfg, max_steps=3), show_progress=False).step == 3
    assert train(cfg, show_progress=False).step == 6
    yield out, cfg
    mp.undo()


def _expected(run_dir: Path) -> dict[str, dict[int, float]]:
    """{scalar: {step: value}} of metrics.jsonl, as the loggers name them."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        val = d.pop("split", None) == "val"
        step = d.pop("step")
        if val:
            d.pop("epoch")
        for k, v in d.items():
            out[f"val/{k}" if val else k][step] = float(v)
    return dict(out)


@pytest.mark.subprocess
def test_run_logs_train_and_val_lines(run: tuple[Path, Any]) -> None:
    expected = _expected(run[0])
    assert sorted(expected["total"]) == [1, 2, 3, 4, 5, 6]
    assert {2, 3, 4, 6} <= set(expected["val/total"])  # every 2 steps and at the end of each half


@pytest.mark.subprocess
def test_mlflow_run_holds_the_metrics_and_config(run: tuple[Path, Any]) -> None:
    from mlflow.tracking import MlflowClient

    run_dir, cfg = run
    ids = json.loads((run_dir / "loggers.json").read_text())
    client = MlflowClient()
    assert len(client.search_runs([client.get_experiment_by_name("dpal").experiment_id])) == 1  # resumed
    got = {
        k: {m.step: m.value for m in client.get_metric_history(ids["mlflow"], k)} for k in _expected(run_dir)
    }
    assert got == _expected(run_dir)
    mlrun = client.get_run(ids["mlflow"])
    assert mlrun.data.params == flat_params(replace(cfg, max_steps=3))  # as the run started
    assert mlrun.data.params["loggers"] == '["mlflow", "wandb"]'
    assert mlrun.info.run_name == "run" and mlrun.info.status == "FINISHED"
    config = Path(client.download_artifacts(ids["mlflow"], "config.yaml")).read_text()
    assert "val_every: 2" in config and "max_steps: null" in config  # as it resumed


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file (LevelDB log format: chunks FULL 1, FIRST 2, MIDDLE 3, LAST 4)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, records = WANDB_HEADER, b"", []
    while pos + 7 <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:  # a block's tail too short for a chunk header: padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            records.append(buf)
    return records


@pytest.mark.subprocess
def test_wandb_offline_run_holds_the_metrics_and_config(run: tuple[Path, Any]) -> None:
    from wandb.proto.wandb_internal_pb2 import Record

    run_dir, cfg = run
    wandb_id = json.loads((run_dir / "loggers.json").read_text())["wandb"]
    # one file per half: offline mode cannot resume, the second continues the id. W&B names the
    # folder offline-run-<second>-<id> and adds -1 when both halves start within one second.
    files = sorted(Path(run_dir.parent / "wandb").glob(f"wandb/offline-run-*/run-{wandb_id}.wandb"))
    assert len(files) == 2
    got: dict[str, dict[int, float]] = defaultdict(dict)
    config: dict[str, Any] = {}
    for f in files:
        for raw in _wandb_records(f):
            rec = Record.FromString(raw)
            if rec.WhichOneof("record_type") == "history":
                step = rec.history.step.num
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    if not key.startswith("_"):
                        got[key][step] = float(json.loads(item.value_json))
            elif rec.WhichOneof("record_type") == "config":
                config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    assert dict(got) == _expected(run_dir)
    assert {k: config[k] for k in to_dict(cfg)} == json.loads(json.dumps(to_dict(cfg)))


@pytest.mark.subprocess
def test_tensorboard_event_file_holds_the_metrics(tmp_path: Path, run: tuple[Path, Any]) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, cfg = run
    out = tmp_path / "tb_run"
    train(replace(cfg, out=str(out), loggers=("tensorboard",)), show_progress=False)
    events = EventAccumulator(str(out / "tb")).Reload()
    got = {k: {e.step: e.value for e in events.Scalars(k)} for k in events.Tags()["scalars"]}
    want = _expected(out)
    assert got.keys() == want.keys()
    for k in want:  # TensorBoard keeps float32
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
