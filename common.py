"""Values and the one helper that both stages share: ImageNet normalisation, the
decompression-bomb limit and the device resolver (the store's dtypes are its codec registry's,
`dpal.store.codecs`).

Each is stated here once; `pipeline/`, `trainer/` and the shared modules import it from here (this
module imports only `dpal.errors`, which imports nothing, so any of them may).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpal.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a device is resolved: `dpal --help` reads this module
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of RGB in [0, 1]: every view is normalised with it, teacher's and student's."""
IMAGENET_STD = (0.229, 0.224, 0.225)

MAX_PIXELS = 64_000_000
"""Images whose header declares more pixels than this are skipped as decompression bombs."""

DEVICE_CHOICES = "auto, cpu or cuda[:i]"


def resolve_device(device: str, local_rank: int | None = None) -> torch.device:
    """The torch device for a `device` setting: `auto` is cuda where a GPU is visible, else cpu.

    Args:
        device: `auto`, `cpu`, `cuda` or `cuda:i`.
        local_rank: under torchrun, this process's rank on its host: a CUDA device becomes
            cuda:local_rank (one GPU per rank), whatever index `device` named.

    Raises:
        ConfigError: `device` is not a device torch knows.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not one of {DEVICE_CHOICES}") from None
    if out.type == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return out
