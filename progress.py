"""Progress of a long run, for both stages: a rich bar on a terminal, plain lines in a log.

A batch job's stderr is a file, where a bar draws nothing (rich only animates a terminal), so
there `Progress` prints one plain line every `interval_s` seconds instead, and one at the end:

    distill 120/6000 steps (2.0%) | 38.4 images/s | loss 2.1034 (global 0.5120, ...) | elapsed 0:01:05 | ETA 0:53:10

Rates are over the last interval; the ETA is the time per unit so far in this process times the
units left. Until the first unit is done there is no value to show, so a line or the bar shows
`loss -`, never a made-up 0.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_fields(fields: dict[str, float] | None, main: str = "loss") -> str:
    """`loss 2.1034 (global 0.5120, local 0.3000)`: the first field named `main`, the others in brackets;
    `loss -` before any value exists."""
    if not fields:
        return f"{main} -"
    first, *rest = fields.items()
    text = f"{main} {first[1]:.4f}"
    if rest:
        text += " (" + ", ".join(f"{k} {v:.4f}" for k, v in rest) + ")"
    return text


class Progress:
    """Report `completed` of `total` units as they advance: a bar on a terminal, else plain lines.

    Args:
        label: what runs (`distill`, `cache-teacher`).
        total: units in the whole run.
        completed: units already done before this process (a resume).
        unit: the name of a unit (`steps`, `shards`).
        items: what a rate counts (`images`).
        interval_s: seconds between plain lines; 0 prints one per update.
        stream: where plain lines go (stderr by default).
        bar: True/False to force the bar on or off; None: a bar exactly when `stream` is a terminal.
    """

    def __init__(
        self,
        label: str,
        total: int,
        completed: int = 0,
        unit: str = "steps",
        items: str = "images",
        interval_s: float = 60.0,
        stream: TextIO | None = None,
        bar: bool | None = None,
        main: str | None = "loss",
    ) -> None:
        self.label, self.total, self.unit, self.items = label, total, unit, items
        self.main = main  # name of the fields' first value; None: a run without fields (stage one)
        self.interval_s = interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.completed = self._start_completed = completed
        self._t0 = self._t_line = time.perf_counter()
        self._items_since_line = 0
        self._fields: dict[str, float] | None = None
        self._pending: Callable[[], dict[str, float]] | None = None
        self._printed_at = completed
        self._bar: Any = None
        if bar is None:
            bar = self.stream.isatty()
        if bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn(f"[bold]{label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(unit),
                TextColumn("{task.fields[text]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, completed=completed, text=self._fields_text())

    def update(
        self,
        completed: int,
        items: int = 0,
        fields: dict[str, float] | Callable[[], dict[str, float]] | None = None,
    ) -> None:
        """`completed` units done in all (not an increment), `items` more processed since the last
        call, the latest `fields` (losses), or a function giving them, called only when they are
        drawn (reading a GPU's losses waits for it)."""
        self.completed = completed
        self._items_since_line += items
        due = time.perf_counter() - self._t_line >= self.interval_s or completed >= self.total
        draw = self._bar is not None or (due and completed != self._printed_at)
        self._pending = fields if callable(fields) and not draw else None  # for stop()'s last line
        if callable(fields):
            fields = fields() if draw else None
        if fields:
            self._fields = dict(fields)
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, text=self._fields_text())
            return
        if draw:
            self._print_line()

    def line(self) -> str:
        """The plain progress line of now."""
        now = time.perf_counter()
        pct = 100.0 * self.completed / max(self.total, 1)
        rate = self._items_since_line / max(now - self._t_line, 1e-9)
        done_here = self.completed - self._start_completed
        eta = (now - self._t0) / done_here * (self.total - self.completed) if done_here > 0 else None
        parts = [
            f"{self.label} {self.completed}/{self.total} {self.unit} ({pct:.1f}%)",
            f"{rate:.1f} {self.items}/s",
            self._fields_text(),
            f"elapsed {_clock(now - self._t0)}",
            f"ETA {_clock(eta) if eta is not None else '-'}",
        ]
        return " | ".join(p for p in parts if p)

    def _fields_text(self) -> str:
        return format_fields(self._fields, self.main) if self.main else ""

    def _print_line(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._t_line, self._items_since_line, self._printed_at = time.perf_counter(), 0, self.completed

    def stop(self) -> None:
        """End the bar, or print the last plain line if units were done since the previous one."""
        if self._bar is not None:
            self._bar.stop()
        elif self.completed != self._printed_at:
            if self._pending is not None:
                self._fields = dict(self._pending()) or self._fields
            self._print_line()
