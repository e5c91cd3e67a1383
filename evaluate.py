"""Resolve "a model" for evaluation into an embedding function: image batch -> global feature.

`dpal eval reid --model M` accepts an exported student (a model folder, or .safetensors with its
.json), a run directory or checkpoint of `dpal distill`, a store (the teacher that wrote it, with
the layer and input scale it used), a teacher preset (`efficientnet-lite2`, `path-b` with
a checkpoint), or a timm / dpal model name. A bare name has no weights, so it needs
`random_init=True`: nobody scores a random network by accident. Students give their CLS token
after the final norm (the backbone that is kept); teachers give the global target of stage one.

This module sits on top: it builds students and reads checkpoints and exports through trainer/.
Embedding and scoring (`Embedder`, `evaluate_reid`, re-exported here) live below it, in embed.py,
which trainer/validate.py uses for `--eval-reid`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dpal.embed import FEATURES, Embedder, student_embedder
from dpal.embed import evaluate_reid as evaluate_reid  # noqa: F401 - callers score through dpal.evaluate too
from dpal.errors import InputError
from dpal.teachers import PRESETS, TeacherSpec, load_teacher


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
    return student_embedder(name, load_exported(path), size, "student", feature)


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
        return student_embedder(name, student, image_size or tuple(ckpt["img_size"]), "student", feature)
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
    return student_embedder(f"{model} (random)", student, size, "random", feature)


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
