"""Export of the pretrained student backbone as a plain timm ViT: a model folder, or one file.

After pretraining only the backbone is kept (docs/method.md, "What is kept"): the state-dict
entries under `BACKBONE_PREFIXES`, with timm's own key names, each written as its own dense tensor.
Two forms:
- a model folder (the default): `model.safetensors`, `config.json` in timm's hub layout
  (architecture, num_features, model_args, pretrained_cfg) and `README.md`, a model card made from
  the run (card.py). `timm.create_model("local-dir:FOLDER", pretrained=True)` loads it, and it is
  what `huggingface_hub.upload_folder` takes;
- `<stem>.safetensors` with `<stem>.json` beside it saying how to rebuild the model
  (`timm.create_model(model_name, pretrained=False, num_classes=0, img_size=...,
  pretrained_cfg_overlay=pretrained_cfg, **timm_kwargs)`).
Either way `pretrained_cfg` records the input as trained (size, ImageNet mean and std, bilinear
resizing), so that `timm.data.resolve_data_config` on the rebuilt model gives the preprocessing the
student learned with. Before writing, the kept keys and shapes are checked against a freshly built
model, so every export loads with `strict=True`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

import dpal
from dpal.errors import InputError
from dpal.store import atomic_write_bytes
from dpal.trainer.student import BACKBONE_PREFIXES, data_config  # registers dpal_vit_tiny with timm

logger = logging.getLogger(__name__)

# wrappers whose prefixes are stripped: torch.compile and DistributedDataParallel
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# a model folder's files, named as timm and the Hugging Face hub expect them
MODEL_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
# suffixes of files that --out cannot mean as a model folder
# timm's training-only arguments, which its own exports leave out of model_args (timm.models._input)
_DROP_RATES = ("drop_rate", "drop_path_rate", "drop_block_rate")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".json", ".ckpt", ".npz")


def _plain_key(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def backbone_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The backbone entries of `model`'s state dict: plain timm keys, detached, contiguous, on CPU.

    Every tensor owns its memory. Tied weights (two entries on one storage, which safetensors
    refuses to write) become separate copies, as the rebuilt timm model holds them apart; a warning
    names them.
    """
    out: dict[str, Tensor] = {}
    spans: list[tuple[int, int, str]] = []  # [begin, end) bytes of each kept tensor, and its key
    tied = []
    for key, value in model.state_dict().items():
        key = _plain_key(key)
        if key.split(".", 1)[0] not in BACKBONE_PREFIXES:
            continue
        value = value.detach().to("cpu").contiguous()
        begin = value.data_ptr()
        end = begin + value.numel() * value.element_size()
        other = next((k for b, e, k in spans if b < end and begin < e), None)
        if other is not None:
            tied.append(f"{key} (shares memory with {other})")
            value = value.clone()
        else:
            spans.append((begin, end, key))
        out[key] = value
    if tied:
        logger.warning("tied weights are exported as separate copies: %s", ", ".join(tied))
    return out


def _build(
    model_name: str,
    img_size: tuple[int, int],
    timm_kwargs: dict[str, Any],
    pretrained_cfg: dict[str, Any] | None = None,
) -> nn.Module:
    overlay = data_config(img_size) if pretrained_cfg is None else pretrained_cfg
    return timm.create_model(
        model_name,
        pretrained=False,
        num_classes=0,
        img_size=tuple(img_size),
        pretrained_cfg_overlay=dict(overlay),
        **timm_kwargs,
    )


def export_student(
    model: nn.Module,
    model_name: str,
    img_size: tuple[int, int],
    out_path: Path,
    timm_kwargs: dict[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """Write the student backbone to `out_path`: a model folder, or a .safetensors file.

    Args:
        model: the trained student (a timm ViT, possibly wrapped by DDP or torch.compile).
        model_name: its timm name (`dpal_vit_tiny`, `vit_small_patch16_224`, ...).
        img_size: (H, W) its native input size.
        out_path: a `.safetensors` file (its config goes to the .json beside), or else a folder
            that receives model.safetensors, config.json and README.md; parents are created.
        timm_kwargs: extra `timm.create_model` arguments that built it; defaults to those that
            `create_student` recorded on the model (`dpal_timm_kwargs`), else none.
        card: the folder's README.md (card.model_card); None writes a short card without the run.

    Returns:
        The path written (the .safetensors file, or the folder).

    Raises:
        InputError: `out_path` names another kind of file, or a file where the folder would go.
        ValueError: the kept keys or shapes differ from a freshly built `model_name`.
    """
    out_path = Path(out_path)
    if out_path.suffix in _FILE_SUFFIXES or (out_path.suffix != ".safetensors" and out_path.is_file()):
        raise InputError(
            f"--out {out_path} must be a model folder (model.safetensors, config.json, README.md) "
            "or a FILE.safetensors"
        )
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    if timm_kwargs is None:
        timm_kwargs = dict(getattr(inner, "dpal_timm_kwargs", {}))
    state = backbone_state_dict(model)
    reference = _check_backbone(state, model_name, img_size, timm_kwargs)
    try:
        json.dumps(timm_kwargs)
    except TypeError as err:
        raise ValueError(f"timm_kwargs {timm_kwargs} must be JSON-serialisable to be exported") from err
    weights = safetensors_bytes(state, {"format": "pt", "model_name": model_name})
    # Every file atomically, with the mode the umask gives a new file (0644 under the usual 022), so
    # that whoever may read the config may read the weights (safetensors' save_file made them 0600).
    if out_path.suffix == ".safetensors":
        config = {
            "model_name": model_name,
            "img_size": list(img_size),
            "num_classes": 0,
            "timm_kwargs": timm_kwargs,
            "pretrained_cfg": data_config(img_size),
            "dpal_version": dpal.__version__,
        }
        atomic_write_bytes(out_path, weights)
        atomic_write_bytes(out_path.with_suffix(".json"), (json.dumps(config, indent=2) + "\n").encode())
    else:
        from dpal.trainer.card import basic_card

        config = timm_config(reference, model_name, img_size, timm_kwargs)
        text = card if card is not None else basic_card(model_name, reference.num_features, img_size)
        atomic_write_bytes(out_path / MODEL_FILE, weights)
        atomic_write_bytes(out_path / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        atomic_write_bytes(out_path / CARD_FILE, text.encode())
    logger.info("exported %s backbone (%d tensors) to %s", model_name, len(state), out_path)
    return out_path


def _check_backbone(
    state: dict[str, Tensor], model_name: str, img_size: tuple[int, int], timm_kwargs: dict[str, Any]
) -> nn.Module:
    """`model_name` built on the meta device; ValueError when `state`'s keys or shapes differ from it."""
    with torch.device("meta"):
        reference = _build(model_name, img_size, timm_kwargs)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        raise ValueError(
            f"the backbone of this model does not match timm {model_name!r} with img_size={tuple(img_size)} "
            f"and {timm_kwargs}: missing {missing[:5]}, unexpected {extra[:5]}, other shapes {shapes[:5]}"
        )
    return reference


def timm_config(
    model: nn.Module, model_name: str, img_size: tuple[int, int], timm_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """A model folder's config.json in timm's hub layout (as `timm.models.save_for_hf` writes it):
    the architecture, its reconstruction arguments (drop rates left out: training only) and the input
    as trained; `dpal` records how dpal built it."""
    model_args = {
        "img_size": list(img_size),
        "num_classes": 0,
        **{k: v for k, v in timm_kwargs.items() if k not in _DROP_RATES and not k.endswith("_drop_rate")},
    }
    pretrained_cfg = {
        **{k: list(v) if isinstance(v, tuple) else v for k, v in data_config(img_size).items()},
        "num_classes": 0,
        "fixed_input_size": True,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }
    return {
        "architecture": model_name,
        "num_classes": 0,
        "num_features": int(model.num_features),
        "global_pool": model.global_pool,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "dpal": {"version": dpal.__version__, "img_size": list(img_size), "timm_kwargs": timm_kwargs},
    }


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_bytes(state: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """`state` in the safetensors format, the same bytes in every process.

    safetensors' own writer keeps the metadata in a hash map whose order changes from one process
    to the next, so two exports of the same weights differed in their header. Here the header is
    JSON with sorted keys and the tensors follow in name order: an 8-byte little-endian header
    length, the header padded with spaces to a multiple of 8, then each tensor's bytes (row-major,
    little-endian) at its `data_offsets`.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def is_model_folder(path: Path | str) -> bool:
    """Whether `path` is an exported model folder (config.json and model.safetensors)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()


def load_exported(path: Path | str) -> nn.Module:
    """Rebuild an exported student: timm model from its config, weights loaded with strict=True.

    Args:
        path: a model folder, or the .safetensors file (or the .json beside it).

    Returns:
        The model on CPU, in eval mode; its `pretrained_cfg` holds the input as trained, so
        `timm.data.resolve_data_config({}, model=model)` gives size, mean, std and interpolation.
    """
    path = Path(path)
    if path.is_dir():
        if not is_model_folder(path):
            raise InputError(
                f"{path} is not an exported model folder (it needs {CONFIG_FILE} and {MODEL_FILE})"
            )
        return timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    weights, config_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    config = json.loads(config_path.read_text())
    # JSON turned timm's tuples into lists; an export older than pretrained_cfg gets the recipe's.
    cfg = config.get("pretrained_cfg")
    cfg = None if cfg is None else {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    model = _build(config["model_name"], tuple(config["img_size"]), config.get("timm_kwargs", {}), cfg)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval()


@dataclass(frozen=True)
class ExportResult:
    """What `export_run` wrote: `path` (the folder or the .safetensors file) and the files in it."""

    path: Path
    model_name: str
    step: int
    files: tuple[Path, ...]


def export_run(source: Path | str, out: Path | str) -> ExportResult:
    """Export the student of a run directory's newest checkpoint (or of a checkpoint file) to `out`:
    a model folder with the run's model card, or a .safetensors file (`export_student`)."""
    from dpal.trainer.card import model_card
    from dpal.trainer.checkpoint import build_student_from_checkpoint
    from dpal.trainer.rundir import CHECKPOINT_DIR

    source, out = Path(source), Path(out)
    model, ckpt = build_student_from_checkpoint(source)
    run_dir = source if source.is_dir() else source.parent.parent
    if not source.is_dir() and source.parent.name != CHECKPOINT_DIR:
        run_dir = None  # a checkpoint file outside a run directory: no metrics to read
    name, img_size = ckpt["student_name"], tuple(ckpt["img_size"])
    card = None if out.suffix == ".safetensors" else model_card(ckpt, run_dir, name, model.num_features)
    path = export_student(model, name, img_size, out, timm_kwargs=ckpt.get("student_kwargs") or {}, card=card)
    files = (
        (path, path.with_suffix(".json"))
        if path.suffix == ".safetensors"
        else tuple(path / f for f in (MODEL_FILE, CONFIG_FILE, CARD_FILE))
    )
    return ExportResult(path, name, int(ckpt["step"]), files)
