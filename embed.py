"""Embed images with a model and score the embeddings on a ReID split.

A model enters as an `Embedder`: a function from (B, 3, H, W) normalised pixels to (B, D) global
features, with the input size it expects. `evaluate_reid` runs it over a Market-style folder and
scores the features (reid.py's protocol, bootstrap intervals included). This module sits below
pipeline/ and trainer/ (it imports neither, nor evaluate.py): stage two's ReID probe
(trainer/validate.py, `--eval-reid`) uses it as `dpal eval reid` does. Turning a model name, path,
checkpoint or store into an `Embedder` is evaluate.py's work, on top.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from dpal.reid import (
    MarketSplit,
    bootstrap_interval,
    checked_market,
    extract_features,
    score_queries,
    summarize_scores,
)
from dpal.vit import vit_tokens

EmbedFn = Callable[[Tensor], Tensor]
FEATURES = ("cls", "mean")  # a student's global feature: its CLS token or the mean of its patch tokens


@dataclass
class Embedder:
    """A model ready to embed images: `fn` maps (B, 3, H, W) normalised pixels to (B, D)."""

    name: str
    fn: EmbedFn
    image_size: tuple[int, int]
    kind: str  # "student", "teacher" or "random"


def student_embedder(
    name: str, model: nn.Module, image_size: tuple[int, int], kind: str, feature: str = "cls"
) -> Embedder:
    """A ViT student (eval mode) as an `Embedder` of its `feature` (one of FEATURES)."""
    model.eval()
    npre = model.num_prefix_tokens

    def fn(x: Tensor) -> Tensor:
        tokens = vit_tokens(model, x)  # (B, prefix + N, d)
        return tokens[:, 0] if feature == "cls" else tokens[:, npre:].mean(dim=1)

    return Embedder(name, fn, image_size, kind)


def evaluate_reid(
    embedder: Embedder,
    data: str | Path,
    batch_size: int = 64,
    per_query: bool = False,
    level: float = 0.9,
    features: bool = False,
    strict: bool = False,
    split: MarketSplit | None = None,
) -> dict:
    """Market-1501 protocol on `data` (query/ and bounding_box_test/): mAP and CMC rank-1/5/10.

    Also the percentile bootstrap interval over queries (`dpal.reid.bootstrap_interval`, `level`,
    seed 0) of mAP and rank-1, as "mAP_lo", "mAP_hi", "rank1_lo", "rank1_hi" in [0, 1]. With
    `per_query`, "per_query_ap" and "per_query_rank1" hold each valid query's AP and rank-1 hit
    ((Nv,) float64, in query-file order; "per_query_index" their positions in the sorted query
    list), for `dpal.reid.paired_bootstrap` between two models scored on the same folder. With
    `features`, "query_features" and "gallery_features" hold the embeddings ((N, D) tensors, in
    sorted file order), for label-free comparisons (`dpal.reid.linear_cka`, `knn_agreement`).
    Images that do not decode are left out, counted in "num_unreadable" (`strict`: refused, one
    line); `split`: an already checked split of `data` (reid.checked_market), read once by a caller
    that scores it often.
    """
    unreadable = 0
    if split is None:  # images that do not decode left out and counted ("num_unreadable"), or refused
        split, unreadable = checked_market(data, strict)
    qf = extract_features(embedder.fn, split.query.paths, embedder.image_size, batch_size)
    gf = extract_features(embedder.fn, split.gallery.paths, embedder.image_size, batch_size)
    scores = score_queries(qf, gf, split.query.pids, split.query.cams, split.gallery.pids, split.gallery.cams)
    res: dict = summarize_scores(scores)
    for key, values in (("mAP", scores.ap), ("rank1", scores.rank1)):
        res[f"{key}_lo"], res[f"{key}_hi"] = bootstrap_interval(values, level)
    res.update(
        num_unreadable=unreadable,
        num_query=len(split.query.paths),
        num_gallery=len(split.gallery.paths),
        image_size=list(embedder.image_size),
    )
    if per_query:
        res.update(per_query_ap=scores.ap, per_query_rank1=scores.rank1, per_query_index=scores.index)
    if features:
        res.update(query_features=qf, gallery_features=gf)
    return res
