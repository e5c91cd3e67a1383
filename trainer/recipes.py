"""The recipes `dpal distill --recipe` trains over one store (docs/training.md, "Recipes"): which
model each builds, which of the store's targets each reads, and the two baselines' models.

- `dpal` (distiller.py's `Distiller`): D-PaDe and the three objectives of docs/method.md; its
  ablations (objective weights, a linear projector) are settings of the same module.
- `proteus` (`ProteusDistiller`), after Proteus (Zhang et al., ICLR 2025, and its public code
  BeSpontaneous/Proteus-pytorch): three LayerNorm + Linear heads from the student's width d to the
  teacher's D. Token term: the CLS through the token head against the global target g. Feature
  term: that CLS and the patches through the feature head, all 1 + P tokens against (g, F) at once.
  Patch term: a masked branch, where the first images of the micro-batch see v0 with some patch
  embeddings replaced by a learned mask token, and the patch head's outputs at the masked positions
  are pulled to the teacher's patches there. Loss = the sum of the three.
- `feature-kd` (`FeatureKD`): one LayerNorm + Linear projector; MSE of the projected CLS against g
  and of the projected patches against F, each weighted (`global_weight`, `local_weight`).

All three read v0 and its targets; only dpal reads v1, v2, Ic and the relation targets (`batch_needs`:
what the loader builds, and so skips, for a run's recipe and ablation). Every model
has `student`, `heads` (the training-only modules, dropped at export), `checkpoint_key` (the
checkpoint entry that holds `heads`) and `forward(batch, epoch) -> (total, terms)`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from dpal.config import DistillConfig
from dpal.errors import InputError
from dpal.store import FEATURES, GLOBAL, LOCAL, RELATION
from dpal.trainer.distiller import Distiller, build_distiller, build_student
from dpal.trainer.losses import masked_token_mse, proteus_feature_mse, token_mse, weighted_sum
from dpal.trainer.student import student_tokens
from dpal.views import ViewRecipe, view_rng

# B batch, P patches of v0, d student width, D teacher width, n masked images, m masked patches each

MASK_STREAM = "proteus-mask"  # views.view_rng's stream of the masked positions


def needed_targets(cfg: DistillConfig) -> tuple[str, ...]:
    """The store's target arrays (store.FEATURES names) that `cfg`'s recipe reads."""
    if cfg.recipe == "proteus":
        return (GLOBAL, LOCAL)
    weights = {GLOBAL: cfg.global_weight, LOCAL: cfg.local_weight, RELATION: cfg.relation_weight}
    if cfg.recipe == "feature-kd":  # its relation_weight is refused by the config (stays at 1)
        weights[RELATION] = 0.0
    return tuple(name for name in FEATURES if weights[name] > 0)


@dataclass(frozen=True)
class Needs:
    """What a run's model reads from a batch, so that the loader (data.BatchDataset) builds only that.

    v0 is always built: every recipe reads it except dpal with only the relation term, whose Ic needs
    v0's PIL replay anyway (person B is v0 resized), and the training step counts a batch's images
    on it.
    """

    local_crops: bool  # v1 and v2: drawn, cut from the image and shipped
    ic: bool  # the crowd image: its background read and replayed, composed
    targets: tuple[str, ...]  # store.FEATURES names read from the store


EVERYTHING = Needs(local_crops=True, ic=True, targets=FEATURES)  # what dpal with every term reads


def batch_needs(cfg: DistillConfig) -> Needs:
    """What `cfg`'s recipe reads from a batch (docs/training.md, "Recipes"): dpal's global term reads
    v1 and v2, its relation term Ic; proteus and feature-kd read v0 and its targets alone. With
    --online-teacher no target is read: the teacher computes them all in the step, from v0 and Ic."""
    targets = needed_targets(cfg)
    local_crops = cfg.recipe == "dpal" and cfg.global_weight > 0
    if cfg.online_teacher:
        return Needs(local_crops=local_crops, ic=True, targets=())
    return Needs(local_crops=local_crops, ic=RELATION in targets, targets=targets)


def check_targets(cfg: DistillConfig, available: Collection[str], where: str) -> None:
    """Refuse, in one line, a recipe that needs targets `where` does not hold (`available`: the names
    of its target arrays; every store of this schema holds all of store.FEATURES)."""
    missing = [name for name in needed_targets(cfg) if name not in available]
    if missing:
        raise InputError(
            f"--recipe {cfg.recipe} needs the {' and '.join(missing)} targets, which {where} lacks (it holds "
            f"{', '.join(sorted(available)) or 'none'}); choose a recipe that reads only those, or switch the "
            "objective off (--set relation_weight=0), or cache a store with them"
        )


def projection_head(student_dim: int, teacher_dim: int) -> nn.Sequential:
    """LayerNorm(d) then Linear(d, D), PyTorch's default initialisation (as Proteus's heads)."""
    return nn.Sequential(nn.LayerNorm(student_dim), nn.Linear(student_dim, teacher_dim))


def proteus_mask(index: Tensor, epoch: int, seed: int, num_patches: int, mask_ratio: float) -> Tensor:
    """The masked patches of each image: max(1, int(P x ratio)) positions drawn without replacement from
    a generator of (seed, image index, epoch) alone (views.view_rng), so that a resumed run, another
    world size or another number of loader workers masks exactly the same patches.

    Args:
        index: (n,) store rows of the masked images.
        epoch: the epoch (an image comes back once per epoch).
        seed: the run's seed.
        num_patches: P.
        mask_ratio: the fraction of P to mask.

    Returns:
        (n, P) bool, on the CPU.
    """
    m = max(1, int(num_patches * mask_ratio))
    out = np.zeros((len(index), num_patches), dtype=bool)
    for i, row in enumerate(index.tolist()):
        out[i, view_rng(seed, str(row), epoch, stream=MASK_STREAM).permutation(num_patches)[:m]] = True
    return torch.from_numpy(out)


class _Heads(nn.Module):
    """Proteus's training-only parameters: the three heads and the mask token."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.token = projection_head(student_dim, teacher_dim)
        self.feature = projection_head(student_dim, teacher_dim)
        self.patch = projection_head(student_dim, teacher_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, student_dim))  # zeros, as DINOv2's student


class ProteusDistiller(nn.Module):
    """The student and Proteus's heads; `forward` returns the total loss and its terms (token, feature,
    patch, total) for one micro-batch, on the device."""

    checkpoint_key = "heads"
    needs_shape_mask = False

    def __init__(
        self, student: nn.Module, teacher_dim: int, seed: int, mask_ratio: float, mask_probability: float
    ) -> None:
        super().__init__()
        self.student = student
        self.heads = _Heads(student.embed_dim, teacher_dim)
        self.seed, self.mask_ratio, self.mask_probability = seed, mask_ratio, mask_probability

    def forward(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, Tensor | float]]:
        v0, g_t, local_t = batch["v0"], batch["g_t"], batch["local_t"]
        npre = self.student.num_prefix_tokens
        tok = student_tokens(self.student, v0)  # (B, 1 + P, d)
        cls = self.heads.token(tok[:, 0])  # (B, D)
        parts = {
            "token": token_mse(cls, g_t),
            "feature": proteus_feature_mse(cls, self.heads.feature(tok[:, npre:]), g_t, local_t),
        }
        # The masked branch sees only the images it masks: the student treats every image on its own,
        # so Proteus's unmasked rest of that pass (which enters no loss) is left out.
        n = max(1, int(v0.shape[0] * self.mask_probability))
        masked = proteus_mask(batch["index"][:n].cpu(), epoch, self.seed, local_t.shape[1], self.mask_ratio)
        masked = masked.to(v0.device)  # (n, P)
        tok_m = student_tokens(self.student, v0[:n], patch_mask=masked, mask_token=self.heads.mask_token)
        parts["patch"] = masked_token_mse(self.heads.patch(tok_m[:, npre:]), local_t[:n], masked)
        total = weighted_sum(parts, dict.fromkeys(parts, 1.0))
        terms: dict[str, Tensor | float] = {k: v.detach() for k, v in parts.items()}
        terms["total"] = total.detach()
        return total, terms


class FeatureKD(nn.Module):
    """The student and one LayerNorm + Linear projector; MSE on the global target and v0's patches."""

    checkpoint_key = "heads"
    needs_shape_mask = False

    def __init__(self, student: nn.Module, teacher_dim: int, weights: dict[str, float]) -> None:
        super().__init__()
        self.student = student
        self.heads = projection_head(student.embed_dim, teacher_dim)
        self.weights = weights

    def forward(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, Tensor | float]]:
        npre = self.student.num_prefix_tokens
        y = self.heads(student_tokens(self.student, batch["v0"]))  # (B, 1 + P, D)
        parts = {}
        if self.weights["global"]:
            parts["global"] = token_mse(y[:, 0], batch["g_t"])
        if self.weights["local"]:
            parts["local"] = token_mse(y[:, npre:], batch["local_t"])
        total = weighted_sum(parts, self.weights)
        terms: dict[str, Tensor | float] = {k: v.detach() for k, v in parts.items()}
        terms["total"] = total.detach()
        return total, terms


Model = Distiller | ProteusDistiller | FeatureKD


def build_model(cfg: DistillConfig, recipe: ViewRecipe, teacher_dim: int, grid_hw: tuple[int, int]) -> Model:
    """The configured recipe's model for a store's targets (teacher width D, v0's patch grid), on CPU,
    initialised from `cfg.seed` (the student first, as dpal's, so each recipe starts from the same
    student)."""
    if cfg.recipe == "dpal":
        return build_distiller(cfg, recipe, teacher_dim, grid_hw)
    student = build_student(cfg, recipe)
    if cfg.recipe == "proteus":
        return ProteusDistiller(student, teacher_dim, cfg.seed, cfg.mask_ratio, cfg.mask_probability)
    return FeatureKD(student, teacher_dim, {"global": cfg.global_weight, "local": cfg.local_weight})
