"""The Market-1501 person re-identification protocol, independent of any model.

This module owns the folder layout and file names of a Market-1501 split (`query/` and
`bounding_box_test/`, names like `0002_c1s1_000451_03.jpg`: person id, camera, sequence, frame,
box), the image preprocessing for feature extraction (RGB, bilinear resize, ImageNet mean/std), the
ranking metrics (mAP and CMC rank-k, with Market's rules: gallery images of the query's person seen
by the query's camera are not counted, junk images with pid -1 are ignored, distractors with pid 0
stay as negatives) and the printed results table. A model enters only as a function from an image
batch to features.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from dpal.common import IMAGENET_MEAN, IMAGENET_STD
from dpal.errors import InputError

logger = logging.getLogger(__name__)

# Nq queries, Ng gallery images, D feature width, B batch, H x W image size

QUERY_DIR = "query"
GALLERY_DIR = "bounding_box_test"
JUNK_PID = -1
DISTRACTOR_PID = 0
MARKET_NAME = re.compile(r"^(?P<pid>-1|\d{4})_c(?P<cam>\d+)s\d+_\d+_\d+\.jpg$")
TABLE_RANKS = (1, 5, 10)
RANK_CHUNK = 256
BOOTSTRAP_SAMPLES = 10_000
BOOTSTRAP_BLOCK = 1000  # resamples drawn at once: 1000 x Nq indices


@dataclass(frozen=True)
class MarketImages:
    """The images of one Market-1501 folder, sorted by file name.

    Attributes:
        paths: image files.
        pids: (N,) int64 person ids; -1 junk, 0 distractor.
        cams: (N,) int64 camera ids (1-based, as in the names).
    """

    paths: list[Path]
    pids: np.ndarray
    cams: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class MarketSplit:
    """A Market-1501 evaluation split.

    Attributes:
        query: the `query/` images.
        gallery: the `bounding_box_test/` images.
    """

    query: MarketImages
    gallery: MarketImages


def parse_market_name(name: str) -> tuple[int, int]:
    """(pid, camera) from a Market-1501 file name such as `0002_c1s1_000451_03.jpg`.

    Raises:
        ValueError: the name is not in Market-1501 form.
    """
    match = MARKET_NAME.match(name)
    if match is None:
        raise InputError(
            f"{name!r} is not a Market-1501 file name: expected PPPP_cCsS_FFFFFF_BB.jpg "
            "(4-digit pid, or -1 for junk), e.g. 0002_c1s1_000451_03.jpg"
        )
    return int(match["pid"]), int(match["cam"])


def read_market_folder(folder: Path) -> MarketImages:
    """Every `.jpg` in one folder (other files are ignored), with pid and camera from the name.

    Raises:
        ValueError: the folder is missing or holds no .jpg, or a .jpg name is not in Market form
            (the message names the file).
    """
    if not folder.is_dir():
        raise InputError(
            f"{folder} is not a folder; a Market-1501 root holds {QUERY_DIR}/ and {GALLERY_DIR}/"
        )
    paths = sorted(p for p in folder.iterdir() if p.suffix == ".jpg" and p.is_file())
    if not paths:
        raise InputError(f"{folder} holds no .jpg images")
    pids, cams = [], []
    for path in paths:
        try:
            pid, cam = parse_market_name(path.name)
        except ValueError as err:
            raise InputError(f"{path}: {err}") from None
        pids.append(pid)
        cams.append(cam)
    return MarketImages(paths, np.asarray(pids, dtype=np.int64), np.asarray(cams, dtype=np.int64))


def read_market(root: str | Path) -> MarketSplit:
    """Read a Market-1501 evaluation split: `root/query/` and `root/bounding_box_test/`.

    Args:
        root: the dataset folder (e.g. `Market-1501-v15.09.15/` or `sample_data/reid/`).

    Raises:
        ValueError: a folder is missing or empty, or a file name is not in Market form.
    """
    root = Path(root)
    return MarketSplit(read_market_folder(root / QUERY_DIR), read_market_folder(root / GALLERY_DIR))


def image_problem(path: Path) -> str | None:
    """Why an image file cannot be used (empty, not an image, truncated or corrupt), decoding it
    whole; None for a good one."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError as e:
        return f"decompression bomb: {e}"
    except (OSError, SyntaxError, ValueError) as e:
        return f"truncated or corrupt: {e}"
    return None


def _keep(images: MarketImages, keep: list[bool]) -> MarketImages:
    mask = np.asarray(keep, dtype=bool)
    return MarketImages(
        [p for p, k in zip(images.paths, keep, strict=True) if k], images.pids[mask], images.cams[mask]
    )


def checked_market(root: str | Path, strict: bool = False, where: str = "--data") -> tuple[MarketSplit, int]:
    """`read_market`, with every image decoded once: one that does not decode is left out and
    counted (one warning line naming the first few), or, `strict`, refused in one line. Refuses a
    split in which no query has a true match (a gallery image of its person from another camera),
    on which no score exists. Returns the split and how many images were left out."""
    split = read_market(root)
    bad: list[str] = []
    kept = []
    for images in (split.query, split.gallery):
        keep = []
        for path in images.paths:
            problem = image_problem(path)
            if problem is not None and strict:
                raise InputError(
                    f"{where}: {path}: {problem}; rerun without --strict to leave such images out"
                )
            if problem is not None:
                bad.append(f"{path.parent.name}/{path.name}: {problem}")
            keep.append(problem is None)
        kept.append(_keep(images, keep))
    split = MarketSplit(*kept)
    if bad:
        logger.warning(
            "%s: %d of %d images do not decode and are left out (%s%s); --strict refuses them",
            where, len(bad), len(bad) + len(split.query) + len(split.gallery), "; ".join(bad[:3]),
            f"; ... and {len(bad) - 3} more" if len(bad) > 3 else "",
        )  # fmt: skip
    _check_matches(split, where)
    return split, len(bad)


def _check_matches(split: MarketSplit, where: str) -> None:
    q, g = split.query, split.gallery
    for pid, cam in zip(q.pids, q.cams, strict=True):
        if pid != JUNK_PID and np.any((g.pids == pid) & (g.cams != cam)):
            return
    raise InputError(
        f"{where}: no query of its {len(q)} readable query images has a true match in the gallery (an image "
        "of the same person id from another camera); mAP and rank-1 are undefined there"
    )


def load_image(path: Path, image_size: tuple[int, int]) -> Tensor:
    """One image as the models see it: RGB, bilinear resize, ImageNet mean/std.

    Args:
        path: image file.
        image_size: (height, width).

    Returns:
        (3, H, W) float32.
    """
    height, width = image_size
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    except (OSError, SyntaxError, ValueError) as e:  # read when checked_market ran: changed since
        raise InputError(
            f"{path} cannot be read ({image_problem(path) or e}); it changed since it was checked"
        ) from None
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def extract_features(
    embed_fn: Callable[[Tensor], Tensor],
    paths: Sequence[str | Path],
    image_size: tuple[int, int] = (256, 128),
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Embed images in order, in batches, under `torch.inference_mode`.

    Args:
        embed_fn: maps a (B, 3, H, W) float32 batch of normalised pixels to (B, D) features.
        paths: image files.
        image_size: (height, width) every image is resized to.
        batch_size: images per call of `embed_fn`.
        device: where batches are sent before `embed_fn`.

    Returns:
        (N, D) float32 features on the CPU, row i for paths[i].

    Raises:
        ValueError: no paths, a batch size below 1, or `embed_fn` returns another shape.
    """
    if len(paths) == 0:
        raise ValueError("extract_features: no images given")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    feats = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            batch = torch.stack([load_image(Path(p), image_size) for p in chunk]).to(device)  # (B, 3, H, W)
            out = embed_fn(batch)
            if out.ndim != 2 or out.shape[0] != len(chunk):
                raise ValueError(f"embed_fn must return (B, D) = ({len(chunk)}, D), got {tuple(out.shape)}")
            feats.append(out.float().cpu())
    return torch.cat(feats)


def _as_array(x: Tensor | np.ndarray, dtype: type) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _check_ranking_inputs(
    q: np.ndarray,
    g: np.ndarray,
    q_pids: np.ndarray,
    q_cams: np.ndarray,
    g_pids: np.ndarray,
    g_cams: np.ndarray,
    max_rank: int,
) -> None:
    """Raise ValueError naming the first input of `evaluate_ranking` whose shape is wrong."""
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"features must be (Nq, D) and (Ng, D), got {q.shape} and {g.shape}")
    if q_pids.shape != (len(q),) or q_cams.shape != (len(q),):
        raise ValueError(
            f"q_pids and q_cams must have shape ({len(q)},), got {q_pids.shape} and {q_cams.shape}"
        )
    if g_pids.shape != (len(g),) or g_cams.shape != (len(g),):
        raise ValueError(
            f"g_pids and g_cams must have shape ({len(g)},), got {g_pids.shape} and {g_cams.shape}"
        )
    if max_rank < 1:
        raise ValueError(f"max_rank must be at least 1, got {max_rank}")


@dataclass(frozen=True)
class QueryScores:
    """Each query's score in a ranking (see `score_queries`); queries without a true match left out.

    Attributes:
        index: (Nv,) int64 positions, in the query list, of the Nv queries that have a true match.
        ap: (Nv,) float64 average precision of each of them.
        cmc: (Nv, max_rank) bool, [i, k - 1] true when query i has a true match among its first k.
        num_queries: Nq, every query given, with or without a true match.
    """

    index: np.ndarray
    ap: np.ndarray
    cmc: np.ndarray
    num_queries: int

    @property
    def rank1(self) -> np.ndarray:
        """(Nv,) float64: 1.0 where the first ranked gallery image is a true match, else 0.0."""
        return self.cmc[:, 0].astype(np.float64)


def score_queries(
    query_feats: Tensor | np.ndarray,
    gallery_feats: Tensor | np.ndarray,
    q_pids: Tensor | np.ndarray,
    q_cams: Tensor | np.ndarray,
    g_pids: Tensor | np.ndarray,
    g_cams: Tensor | np.ndarray,
    max_rank: int = 10,
) -> QueryScores:
    """Per-query AP and CMC of ranking the gallery for each query by cosine similarity.

    The rules are `evaluate_ranking`'s (which averages these): features L2-normalised, ties keep
    gallery order, junk (pid -1) and the query's pid seen by the query's camera removed, distractors
    (pid 0) kept as negatives, a query with no remaining true match left out.

    Raises:
        ValueError: shapes disagree, max_rank < 1, or no query has a true match.
    """
    q, g = _as_array(query_feats, np.float64), _as_array(gallery_feats, np.float64)
    q_pids, q_cams = _as_array(q_pids, np.int64), _as_array(q_cams, np.int64)
    g_pids, g_cams = _as_array(g_pids, np.int64), _as_array(g_cams, np.int64)
    _check_ranking_inputs(q, g, q_pids, q_cams, g_pids, g_cams, max_rank)

    q = q / np.clip(np.linalg.norm(q, axis=1, keepdims=True), 1e-12, None)
    g = g / np.clip(np.linalg.norm(g, axis=1, keepdims=True), 1e-12, None)
    index, aps, cmcs = [], [], []
    for i in range(len(q)):
        if i % RANK_CHUNK == 0:
            # a chunk of rows at a time keeps memory at RANK_CHUNK x Ng for Market's 3368 x 19732
            order = np.argsort(-(q[i : i + RANK_CHUNK] @ g.T), axis=1, kind="stable")
        ranked = order[i % RANK_CHUNK]  # (Ng,) gallery indices, best first
        same_view = (g_pids[ranked] == q_pids[i]) & (g_cams[ranked] == q_cams[i])
        keep = ~same_view & (g_pids[ranked] != JUNK_PID)
        hits = (g_pids[ranked][keep] == q_pids[i]).astype(np.float64)  # ranking with removals
        if not hits.any():
            continue
        ranks = np.arange(1, len(hits) + 1)
        precision = np.cumsum(hits) / ranks
        index.append(i)
        aps.append(float((precision * hits).sum() / hits.sum()))
        first = int(np.argmax(hits))  # 0-based rank of the first true match
        cmcs.append(np.arange(max_rank) >= first)
    if not aps:
        raise InputError("no query has a true match in the gallery (other than same-camera images)")
    return QueryScores(np.asarray(index, dtype=np.int64), np.asarray(aps), np.stack(cmcs), num_queries=len(q))


def evaluate_ranking(
    query_feats: Tensor | np.ndarray,
    gallery_feats: Tensor | np.ndarray,
    q_pids: Tensor | np.ndarray,
    q_cams: Tensor | np.ndarray,
    g_pids: Tensor | np.ndarray,
    g_cams: Tensor | np.ndarray,
    max_rank: int = 10,
) -> dict[str, float | int]:
    """mAP and CMC of ranking the gallery for each query by cosine similarity.

    Features are L2-normalised, so only their direction counts; equal similarities keep gallery
    order. For each query, gallery images with pid -1 (junk) and images of the query's pid seen by
    the query's camera are removed from the ranking; distractors (pid 0) and everyone else stay as
    negatives. A query with no remaining true match is skipped and not counted.

    AP of a query is the mean, over its true matches, of the precision at each match's rank (hits
    so far / rank), i.e. the usual `np.cumsum` formulation. CMC rank-k is the fraction of queries
    with a true match among their first k. `score_queries` gives the per-query values.

    Args:
        query_feats: (Nq, D).
        gallery_feats: (Ng, D).
        q_pids, q_cams: (Nq,) person and camera ids of the queries.
        g_pids, g_cams: (Ng,) person and camera ids of the gallery.
        max_rank: length of the CMC curve; the result holds rank-k for k in 1, 5, 10 up to it.

    Returns:
        {"mAP", "rank1", "rank5", "rank10"} floats in [0, 1] (ranks above max_rank left out) and
        "num_valid_queries", "num_skipped_queries" ints.

    Raises:
        ValueError: shapes disagree, max_rank < 1, or no query has a true match.
    """
    scores = score_queries(query_feats, gallery_feats, q_pids, q_cams, g_pids, g_cams, max_rank)
    return summarize_scores(scores)


def summarize_scores(scores: QueryScores) -> dict[str, float | int]:
    """mAP, CMC rank-1/5/10 (those within max_rank) and the query counts of `evaluate_ranking`."""
    cmc = scores.cmc.mean(axis=0)  # (max_rank,)
    result: dict[str, float | int] = {"mAP": float(np.mean(scores.ap))}
    for k in TABLE_RANKS:
        if k <= len(cmc):
            result[f"rank{k}"] = float(cmc[k - 1])
    result["num_valid_queries"] = len(scores.ap)
    result["num_skipped_queries"] = scores.num_queries - len(scores.ap)
    return result


def _bootstrap_means(values: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """(num_samples,) means of `values` resampled with replacement, drawn in fixed-size blocks."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = []
    for start in range(0, num_samples, BOOTSTRAP_BLOCK):
        rows = min(BOOTSTRAP_BLOCK, num_samples - start)
        means.append(values[rng.integers(0, n, size=(rows, n))].mean(axis=1))
    return np.concatenate(means)


def _check_bootstrap_args(values: np.ndarray, level: float, num_samples: int) -> None:
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-D array, got shape {values.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    level: float = 0.9,
    num_samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. per-query AP).

    `num_samples` resamples of len(values) items with replacement, from a generator seeded with
    `seed`, so the result is the same on every call; the interval is the (1 - level) / 2 and
    (1 + level) / 2 quantiles of their means (numpy's linear interpolation). It treats the values as
    independent draws: queries cut from neighbouring frames of one walk are not, and then the
    interval is too narrow.

    Returns:
        (lo, hi).

    Raises:
        ValueError: values empty or not 1-D, level outside (0, 1), num_samples < 1.
    """
    arr = np.asarray(values, dtype=np.float64)
    _check_bootstrap_args(arr, level, num_samples)
    means = _bootstrap_means(arr, num_samples, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


class PairedDifference(NamedTuple):
    """mean(a) - mean(b) over the same queries, and its bootstrap interval (see `paired_bootstrap`)."""

    mean: float
    lo: float
    hi: float


def paired_bootstrap(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    level: float = 0.9,
    num_samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
) -> PairedDifference:
    """Difference of two models scored on the same queries (a[i] and b[i] from query i).

    Both are resampled with the same query indices, i.e. `bootstrap_interval` of a - b: queries that
    are hard for both models cancel, so the interval is narrower than comparing two separate
    intervals. An interval that excludes 0 says the difference is larger than the query sampling
    noise.

    Raises:
        ValueError: a and b differ in shape, or as `bootstrap_interval`.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"paired_bootstrap needs scores of the same queries, got {a_arr.shape} and {b_arr.shape}"
        )
    diff = a_arr - b_arr
    lo, hi = bootstrap_interval(diff, level, num_samples, seed)
    return PairedDifference(float(diff.mean()), lo, hi)


INTERVAL_CELL = len("  99.9 [100.0, 100.0]")  # a metric and its interval, as `format_table` prints it


def _cell(row: dict, key: str, scale: float, with_interval: bool) -> str:
    """One metric in percent; `value [lo, hi]` in a column that shows intervals (blank when absent)."""
    text = f"{scale * row[key]:6.1f}"
    if not with_interval:
        return text
    if f"{key}_lo" in row:
        text += f" [{scale * row[key + '_lo']:.1f}, {scale * row[key + '_hi']:.1f}]"
    return f"{text:<{INTERVAL_CELL}}"


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of results, one row per model, metrics in percent with one decimal.

    Args:
        rows: dicts with "model" (a name) and "mAP", "rank1", "rank5", "rank10" in [0, 1], as
            returned by `evaluate_ranking`, or already in percent where the row says
            "unit": "percent" (as `dpal eval reid --json` prints them); extra keys are ignored,
            except "mAP_lo"/"mAP_hi" and "rank1_lo"/"rank1_hi" (bootstrap intervals, in the row's
            unit), which are shown after the value as `33.8 [30.1, 37.2]` when any row has them.

    Returns:
        The table, lines joined by newlines, no trailing newline.

    Raises:
        ValueError: a row lacks one of those keys.
    """
    keys = ("mAP", "rank1", "rank5", "rank10")
    for row in rows:
        missing = [k for k in ("model", *keys) if k not in row]
        if missing:
            raise ValueError(f"results row {row!r} lacks {missing}")
    shown = {k: any(f"{k}_lo" in row for row in rows) for k in keys}
    width = max([len("model"), *(len(str(row["model"])) for row in rows)])
    names = ("mAP", "R1", "R5", "R10")
    header = [
        f"{name:>6}".ljust(INTERVAL_CELL if shown[k] else 6) for k, name in zip(keys, names, strict=True)
    ]
    lines = [f"{'model':<{width}}  " + "  ".join(header)]
    for row in rows:
        scale = 1 if row.get("unit") == "percent" else 100
        values = "  ".join(_cell(row, k, scale, shown[k]) for k in keys)
        lines.append(f"{str(row['model']):<{width}}  {values}".rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------- label-free fidelity


def linear_cka(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float:
    """Linear centred kernel alignment of two embeddings of the same N images (Kornblith et al.,
    2019): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with Xc, Yc the column-centred (N, p) and
    (N, q) features, in float64. 1 when one is an orthogonal transform and scaling of the other, 0
    when they share no linear structure; the widths may differ.
    """
    xc, yc = (torch.as_tensor(v, dtype=torch.float64) for v in (x, y))
    if xc.ndim != 2 or yc.ndim != 2 or xc.shape[0] != yc.shape[0] or xc.shape[0] < 2:
        raise ValueError(
            f"linear_cka needs (N, p) and (N, q) with N >= 2, got {tuple(xc.shape)}, {tuple(yc.shape)}"
        )
    xc, yc = xc - xc.mean(0), yc - yc.mean(0)
    cross = torch.linalg.matrix_norm(yc.T @ xc) ** 2
    return float(cross / (torch.linalg.matrix_norm(xc.T @ xc) * torch.linalg.matrix_norm(yc.T @ yc)))


def knn_agreement(x: Tensor | np.ndarray, y: Tensor | np.ndarray, k: int = 10) -> float:
    """Mean over the N images of the fraction of each image's k nearest neighbours (cosine, itself
    excluded) that two embeddings share: 1 when they rank the neighbours alike, about k / (N - 1)
    by chance."""
    sets = []
    for v in (x, y):
        f = torch.nn.functional.normalize(torch.as_tensor(v, dtype=torch.float64), dim=1)
        sim = f @ f.T
        sim.fill_diagonal_(-float("inf"))
        sets.append(sim.topk(k, dim=1).indices)  # (N, k)
    a, b = sets
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)  # (N,)
    return float(shared.double().mean() / k)
