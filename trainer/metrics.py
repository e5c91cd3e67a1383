"""Stage two's metrics: the loss terms of a step, read from the device only when they are logged or
shown, and where they go (rank 0's `metrics.jsonl`, and the loggers of `--logger`: loggers.py).

A step leaves its terms on the device (`StepTerms`); reading them waits for the device, so the
trainer reads them on log steps and when the progress display draws, never otherwise. One line of
`metrics.jsonl` per log step: `step`, `epoch` (the one the step trained in), `lr`, the mean of each
term over the step's micro-batches (dpal: global, local, relation, route, weight_l2, total, route_weight,
route_acc; other recipes and ablations: their own terms and total, docs/training.md "Recipes") and `images_per_s` (all ranks' images since the previous line over its wall time).
A validation (validate.py) adds a line with `"split": "val"`: `step`, `epoch`, the same loss terms on
the held-out store, `images`, and with --eval-reid `reid_mAP`, `reid_rank1`; the loggers get them
under `val/`. A resume cuts both kinds of line back to the checkpoint's step alike.
"""

from __future__ import annotations

import json
import logging
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpal.config import DistillConfig
from dpal.trainer.loggers import open_sinks
from dpal.trainer.rundir import disk_full_error

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PROGRESS_TERMS = ("total", "global", "local", "relation", "token", "feature", "patch")  # those a recipe has


class StepTerms:
    """The loss terms of one optimizer step, per micro-batch, as `Distiller.forward` returns them."""

    def __init__(self, micro: list[dict[str, Tensor | float]], grad_accum: int) -> None:
        self.micro = micro
        self.grad_accum = grad_accum

    @cached_property
    def mean(self) -> dict[str, float]:
        """Each term's mean over the micro-batches, as floats: one device sync for all of them.
        Summed in float64 in micro-batch order (v / grad_accum each), as the log always has been."""
        tensors = [v for terms in self.micro for v in terms.values() if isinstance(v, Tensor)]
        values = iter(torch.stack(tensors).tolist() if tensors else [])
        out: dict[str, float] = {}
        for terms in self.micro:
            for k, v in terms.items():
                x = next(values) if isinstance(v, Tensor) else v
                out[k] = out.get(k, 0.0) + x / self.grad_accum
        return out

    def progress_fields(self) -> dict[str, float]:
        """What the progress line shows: loss (the total) and the recipe's alignment terms."""
        return {k: self.mean[k] for k in PROGRESS_TERMS if k in self.mean}


def read_metric_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The usable lines of a metrics.jsonl, as (text, parsed): JSON objects with an integer `step`.
    Other lines (`null`, `[1, 2]`, an object without `step`, bytes that are not UTF-8, text that is
    not JSON) are left out with one warning that counts them; a last line cut short without its
    newline (a run killed while writing it) is left out without one."""
    raw = Path(path).read_bytes()
    lines = raw.split(b"\n")
    torn = lines.pop() if lines else b""  # what follows the last newline: empty, or a torn line
    good, bad = [], 0
    for blob in lines:
        try:
            text = blob.decode("utf-8")
            line = json.loads(text)
        except (UnicodeDecodeError, ValueError):
            line = None
        if (
            isinstance(line, dict)
            and isinstance(line.get("step"), int)
            and not isinstance(line["step"], bool)
        ):
            good.append((text, line))
        elif blob.strip():
            bad += 1
    if torn.strip():
        try:
            line = json.loads(torn.decode("utf-8"))
            if isinstance(line, dict) and isinstance(line.get("step"), int):
                good.append((torn.decode("utf-8"), line))
        except (UnicodeDecodeError, ValueError):
            pass
    if bad:
        logger.warning(
            "%s: %d line(s) are not metric lines (not a JSON object with an integer step: damaged or "
            "edited) and are left out",
            path,
            bad,
        )
    return good


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop metric lines past a resumed checkpoint, so the log equals an uninterrupted run's; lines
    that are not metric lines go too (`read_metric_lines` says how many)."""
    if not path.exists():
        return
    keep = [text for text, line in read_metric_lines(path) if line["step"] <= max_step]
    path.write_text("".join(ln + "\n" for ln in keep))


class MetricsLog:
    """Rank 0's sinks: `metrics.jsonl` (cut back to `resumed_step` first) and the loggers that `cfg`
    chooses (loggers.py)."""

    def __init__(self, run_dir: Path, resumed_step: int, cfg: DistillConfig | None = None) -> None:
        self.run_dir = Path(run_dir)
        path = self.run_dir / METRICS_FILE
        truncate_jsonl(path, resumed_step)
        self.file = open(path, "a")  # noqa: SIM115 - open for the whole run, closed by close()
        self.sinks = open_sinks(self.run_dir, cfg) if cfg is not None else []
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t_last, self.images = time.perf_counter(), 0

    def log(self, step: int, epoch: int, lr: float, terms: StepTerms, last_ckpt: Path | None) -> None:
        """One line for `step`; the images counted since the previous line give `images_per_s`."""
        values = terms.mean  # waits for the device, so the interval's time includes its steps
        dt = time.perf_counter() - self.t_last
        line = {"step": step, "epoch": epoch, "lr": lr, **values, "images_per_s": self.images / max(dt, 1e-9)}
        self._append(json.dumps(line), last_ckpt)
        for sink in self.sinks:
            sink.scalars({k: v for k, v in line.items() if k != "step"}, step)
        self.restart_clock()

    def log_skipped(self, step: int, epoch: int, lr: float, what: str, last_ckpt: Path | None) -> None:
        """The line of a step skipped for a value that is not finite (--skip-nonfinite): no terms."""
        line = {"step": step, "epoch": epoch, "lr": lr, "skipped_nonfinite": what}
        self._append(json.dumps(line), last_ckpt)

    def log_val(
        self, step: int, epoch: int, values: dict[str, float], last_ckpt: Path | None, seconds: float = 0.0
    ) -> None:
        """One validation line for `step`; the `seconds` it took are left out of the next training
        line's `images_per_s`."""
        line = {"step": step, "epoch": epoch, "split": "val", **values}
        self._append(json.dumps(line), last_ckpt)
        for sink in self.sinks:
            sink.scalars({f"val/{k}": v for k, v in values.items()}, step)
        self.t_last += seconds

    def _append(self, line: str, last_ckpt: Path | None) -> None:
        """One metrics line, flushed; a full disk is one error line (the run resumes from `last_ckpt`)."""
        try:
            self.file.write(line + "\n")
            self.file.flush()
        except OSError as e:
            err = disk_full_error(e, self.run_dir / METRICS_FILE, str(last_ckpt) if last_ckpt else "step 0")
            if err is None:
                raise
            raise err from None

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the full disk already reported: a line it could not write stays unwritten
            pass
        for sink in self.sinks:
            sink.close()
