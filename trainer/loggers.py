"""Stage two's experiment loggers (`--logger tensorboard|wandb|mlflow`, any of them): the metrics
that rank 0 writes to `metrics.jsonl` also go to each logger chosen, and the run's config with them.

Each logger is an optional extra (`pip install 'dpal[mlflow]'`); a chosen one that is not installed
is one error line before anything is written (`require`). A sink takes the scalars of a
metrics.jsonl line: a training line's keys but `step`, a validation line's loss terms and ReID
scores under `val/`, at the line's step. Where each writes:

- tensorboard: event files in `run_dir/tb` (the config as a text summary).
- mlflow: the tracking server or store that `MLFLOW_TRACKING_URI` names (a `file:` store needs
  `MLFLOW_ALLOW_FILE_STORE=true`: MLflow 3.18 refuses one without it), experiment
  `MLFLOW_EXPERIMENT_NAME` (default `dpal`), one MLflow run per dpal run named after the run
  directory: the config as params (dotted keys) and as the artifact config.yaml.
- wandb: project `WANDB_PROJECT` (default `dpal`), files under `WANDB_DIR` (default the run
  directory), `WANDB_MODE=offline` for no network; the config as the W&B run's config.

A resume continues the same MLflow and W&B run: their ids are kept in `run_dir/loggers.json`. The
steps between the checkpoint and a kill that metrics.jsonl cuts back (metrics.truncate_jsonl) stay
in these loggers, logged twice.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from dpal.config import DistillConfig, dump_yaml, to_dict
from dpal.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

IDS_FILE = "loggers.json"
# --logger name -> the module it needs (the extra of the same name installs it)
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def require(loggers: tuple[str, ...]) -> None:
    """One error line naming every chosen logger whose package is not installed, and its extra."""
    missing = [name for name in loggers if importlib.util.find_spec(MODULES[name]) is None]
    if missing:
        what = "is" if len(missing) == 1 else "are"
        raise ConfigError(
            f"--logger {', '.join(missing)}: {' and '.join(MODULES[m] for m in missing)} {what} not "
            f"installed: pip install 'dpal[{','.join(missing)}]'"
        )


def flat_params(cfg: DistillConfig) -> dict[str, str]:
    """The config as flat `key: text` pairs (dotted keys for sections; lists and mappings as JSON)."""
    out: dict[str, str] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v and k != "student_kwargs":
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v)

    walk(to_dict(cfg), "")
    return out


class TensorBoardSink:
    def __init__(self, run_dir: Path, cfg: DistillConfig, ids: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))
        self.writer.add_text("config", "```\n" + dump_yaml(cfg) + "```")

    def scalars(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class MlflowSink:
    def __init__(self, run_dir: Path, cfg: DistillConfig, ids: dict[str, str]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient()  # MLFLOW_TRACKING_URI
            self.run_id = ids.get("mlflow", "")
            if self.run_id:
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "dpal"
                experiment = self.client.get_experiment_by_name(name)
                exp_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                self.run_id = self.client.create_run(exp_id, run_name=run_dir.name).info.run_id
                params = [Param(k, v) for k, v in flat_params(cfg).items()]
                self.client.log_batch(self.run_id, params=params)  # params are fixed once logged
            self.client.log_text(self.run_id, dump_yaml(cfg), "config.yaml")
        except MlflowException as e:
            raise UserError(f"--logger mlflow: {str(e).splitlines()[0]}") from None
        ids["mlflow"] = self.run_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ms, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbSink:
    def __init__(self, run_dir: Path, cfg: DistillConfig, ids: dict[str, str]) -> None:
        import wandb

        run_id = ids.get("wandb") or uuid.uuid4().hex[:8]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "dpal",
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=os.environ.get("WANDB_DIR") or str(run_dir),
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )
        self.run.config.update(to_dict(cfg), allow_val_change=True)
        ids["wandb"] = run_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


SINKS = {"tensorboard": TensorBoardSink, "mlflow": MlflowSink, "wandb": WandbSink}


def open_sinks(run_dir: Path, cfg: DistillConfig) -> list[Any]:
    """The chosen loggers' sinks on rank 0, continuing the runs that `loggers.json` names."""
    if (run_dir / "tb").is_dir() and "tensorboard" not in cfg.loggers:
        logger.info("%s is from an earlier run: add --logger tensorboard to keep writing it", run_dir / "tb")
    path = run_dir / IDS_FILE
    ids = json.loads(path.read_text()) if path.exists() else {}
    sinks = [SINKS[name](run_dir, cfg, ids) for name in cfg.loggers]
    if ids:
        path.write_text(json.dumps(ids, indent=1) + "\n")
    return sinks
