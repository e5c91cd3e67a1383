"""Resolve "a model" for evaluation into an embedding function: image batch -> global feature.

`dpal eval reid --model M` accepts an exported student (a model folder, or .safetensors with its
.json), a run directory or checkpoint of `dpal distill`, a store (the teacher that wrote it, with
the layer and input scale it used), a teacher preset (`efficientnet-lite2`, `path-b` with
a checkpoint), or a timm / dpal model name. A bare name has no weights, so it needs
`random_init=True`: nobody scores a random network by accident. Students give their CLS token
after the final norm (the backbone that is kept); teachers give the global target of stage one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from dpal.errors import InputError
from dpal.teachers import PRESETS, TeacherSpec, load_teacher
from dpal.vit import vit_tokens

if TYPE_CHECKING:
    from dpal.reid import MarketSplit

EmbedFn = Callable[[Tensor], Tensor]


@dataclass
class Embedder:
    """A model ready to embed images: `fn` maps (B, 3, H, W) normalised pixels to (B, D)."""

    name: str
    fn: EmbedFn
    image_size: tuple[int, int]
    kind: str  # "student", "teacher" or "random"


FEATURES = ("cls", "mean")


def _student_embedder(
    name: str, model: nn.Module, image_size: tuple[int, int], kind: str, feature: str = "cls"
) -> Embedder:
    model.eval()
    npre = model.num_prefix_tokens

    def fn(x: Tensor) -> Tensor:
        tokens = vit_tokens(model, x)  # (B, prefix + N, d)
        return tokens[:, 0] if feature == "cls" else tokens[:, npre:].mean(dim=1)

    return Embedder(name, fn, image_size, kind)


def _exported_embedder(path: Path, image_size: tuple[int, int] | None, feature: str) -> Embedder:
    """An exported student: a model folder, or a .safetensors file with its .json."""
    import json

    from dpal.trainer.export import load_exported

    if path.is_dir():
        cfg = json.loads((path / "config.json").read_text())
        size = image_size or tuple(cfg["pretrained_cfg"]["input_size"][1:])
        name = f"{cfg['architecture']} ({path.name})"
    else:
        cfg = json.loads(path.with_suffix(".json").read_text())
        size = image_size or tuple(cfg["img_size"])
        # the model's own name, then the file it came from (its stem is often just "student")
        name = f"{cfg['model_name']} ({path.with_suffix('.safetensors').name})"
    return _student_embedder(name, load_exported(path), size, "student", feature)


def resolve_model(
    model: str,
    image_size: tuple[int, int] | None = None,
    random_init: bool = False,
    checkpoint: str | None = None,
    seed: int = 0,
    feature: str = "cls",
    init: str = "dpal",
) -> Embedder:
    """Build the embedder for `model` (see the module docstring for what it may name).

    A random student starts as `dpal distill` starts one (`init`: dpal or timm, seeded by `seed`).
    `feature` picks a student's global feature: its CLS token (`cls`, default) or the mean of its
    patch tokens (`mean`). Teachers always give their stage-one global target.

    Raises:
        ValueError: unknown model, or a bare model name without `random_init`.
    """
    if feature not in FEATURES:
        raise InputError(f"--feature {feature!r}: choose one of {', '.join(FEATURES)}")
    path = Path(model)
    if (path.is_dir() and (path / "config.json").is_file()) or (
        path.suffix in (".safetensors", ".json") and path.exists()
    ):
        return _exported_embedder(path, image_size, feature)
    if path.is_dir() and (path / "zarr.json").exists():  # a store: the teacher that wrote it
        return _store_teacher(path, image_size)
    if path.is_dir() or path.suffix == ".pt":
        from dpal.trainer.checkpoint import build_student_from_checkpoint

        student, ckpt = build_student_from_checkpoint(path)
        name = f"{ckpt['student_name']} step {ckpt['step']} ({path.name})"
        return _student_embedder(name, student, image_size or tuple(ckpt["img_size"]), "student", feature)
    size = image_size or (256, 128)
    if model in PRESETS or checkpoint is not None:
        teacher = load_teacher(
            TeacherSpec(
                name=model,
                checkpoint=checkpoint,
                random_init=random_init,
                random_init_seed=seed,
                global_size=size,
            )
        )
        return Embedder(model, lambda x: teacher.encode_global(x)[0], size, "teacher")
    import timm

    from dpal.trainer.student import create_student

    if not timm.is_model(model):
        raise InputError(
            f"--model {model!r} is not an exported .safetensors, a run directory, a teacher preset "
            f"({', '.join(PRESETS)}) or a timm/dpal model name"
        )
    if not random_init:
        raise InputError(
            f"--model {model!r} names an architecture without weights; pass --random-init to score "
            "a randomly initialised network on purpose"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            student = create_student(model, img_size=size, init=init)
        except ValueError:
            teacher = load_teacher(
                TeacherSpec(name=model, random_init=True, random_init_seed=seed, global_size=size)
            )
            return Embedder(f"{model} (random)", lambda x: teacher.encode_global(x)[0], size, "random")
    return _student_embedder(f"{model} (random)", student, size, "random", feature)


def _store_teacher(path: Path, image_size: tuple[int, int] | None) -> Embedder:
    """The teacher that wrote a store, as it wrote it (layer, input scale): its global target."""
    from dpal.store import StoreReader

    meta = StoreReader(path).store_meta
    size = image_size or tuple(meta.recipe.global_size)
    spec = dataclasses.replace(meta.teacher_spec(), global_size=size)
    teacher = load_teacher(spec)
    meta.check_teacher(teacher.identity())
    return Embedder(
        f"{spec.name} (teacher of {path.name})", lambda x: teacher.encode_global(x)[0], size, "teacher"
    )


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
    from dpal.reid import (
        bootstrap_interval,
        checked_market,
        extract_features,
        score_queries,
        summarize_scores,
    )

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
