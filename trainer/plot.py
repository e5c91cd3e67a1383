"""`dpal plot RUN_DIR`: the training and validation curves of every loss term in a run's metrics.jsonl,
drawn with PIL (a dependency already) as one small line plot per term, so that no plotting package
is needed.

One panel per term, in the order the terms first appear (training terms, then the validation-only
ones such as reid_mAP): the training lines (no `split`) in `TRAIN_COLOUR`, the validation lines
(`"split": "val"`) in `VAL_COLOUR` with a dot at each validation. x: the step, from 0 to the last
logged step; y: from the term's smallest to its largest value over both curves.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from dpal.errors import InputError
from dpal.trainer.metrics import METRICS_FILE, read_metric_lines

TRAIN_COLOUR = (31, 119, 180)  # blue
VAL_COLOUR = (255, 127, 14)  # orange
AXIS_COLOUR = (90, 90, 90)
BACKGROUND = (255, 255, 255)
PANEL = (320, 200)  # (width, height) in pixels of one term's plot
COLUMNS = 3
MARGIN = (44, 22, 10, 18)  # left, top, right, bottom of the plot area inside a panel
LEGEND_HEIGHT = 20
# what a metrics line holds beside the loss terms
NOT_TERMS = ("step", "epoch", "lr", "images_per_s", "split", "images", "route_weight")


def read_curves(
    run_dir: Path,
) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """({term: [(step, value)]} of the training lines, the same of the validation lines)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise InputError(f"{path} does not exist; give the run directory of `dpal distill` (its --out)")
    train: dict[str, list[tuple[int, float]]] = {}
    val: dict[str, list[tuple[int, float]]] = {}
    for _, line in read_metric_lines(path):  # damaged lines left out, counted in one warning
        curves = val if line.get("split") == "val" else train
        for k, v in line.items():
            if k not in NOT_TERMS and isinstance(v, (int, float)) and math.isfinite(v):
                curves.setdefault(k, []).append((int(line["step"]), float(v)))
    if not train and not val:
        raise InputError(f"{path} holds no metric lines yet; plot after the first logged step")
    return train, val


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw `run_dir`'s curves into `out` (default RUN_DIR/curves.png); returns the file written."""
    train, val = read_curves(run_dir)
    terms = list(dict.fromkeys([*train, *val]))
    last = max(s for curves in (train, val) for points in curves.values() for s, _ in points)
    rows = -(-len(terms) // COLUMNS)
    w, h = PANEL
    image = Image.new("RGB", (w * COLUMNS, LEGEND_HEIGHT + h * rows), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i, (label, colour) in enumerate((("train", TRAIN_COLOUR), ("val", VAL_COLOUR))):
        x = 10 + 90 * i
        draw.line([(x, 10), (x + 24, 10)], fill=colour, width=3)
        draw.text((x + 30, 4), label, fill=AXIS_COLOUR, font=font)
    for i, term in enumerate(terms):
        origin = ((i % COLUMNS) * w, LEGEND_HEIGHT + (i // COLUMNS) * h)
        _panel(draw, font, origin, term, train.get(term, []), val.get(term, []), max(last, 1))
    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    image.save(out)
    return out


def _panel(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont,
    origin: tuple[int, int],
    term: str,
    train: list[tuple[int, float]],
    val: list[tuple[int, float]],
    last_step: int,
) -> None:
    """One term's axes, title, y range labels and curves, with its top left corner at `origin`."""
    ox, oy = origin
    left, top, right, bottom = (
        ox + MARGIN[0],
        oy + MARGIN[1],
        ox + PANEL[0] - MARGIN[2],
        oy + PANEL[1] - MARGIN[3],
    )
    values = [v for _, v in train + val]
    lo, hi = min(values), max(values)
    span = hi - lo if hi > lo else 1.0

    def xy(step: int, value: float) -> tuple[float, float]:
        return (left + (right - left) * step / last_step, bottom - (bottom - top) * (value - lo) / span)

    draw.rectangle([left, top, right, bottom], outline=AXIS_COLOUR)
    draw.text((left, oy + 4), term, fill=(0, 0, 0), font=font)
    draw.text((ox + 2, top - 4), f"{hi:.3g}", fill=AXIS_COLOUR, font=font)
    draw.text((ox + 2, bottom - 8), f"{lo:.3g}", fill=AXIS_COLOUR, font=font)
    draw.text((right - 40, bottom + 3), f"step {last_step}", fill=AXIS_COLOUR, font=font)
    for points, colour in ((train, TRAIN_COLOUR), (val, VAL_COLOUR)):
        coords = [xy(s, v) for s, v in points]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        if colour == VAL_COLOUR or len(coords) == 1:
            for x, y in coords:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
