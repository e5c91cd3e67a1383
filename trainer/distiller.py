"""What stage two trains and how: the student plus D-PaDe as one module whose forward is the loss,
the optimizer, the learning-rate schedule, and the teacher that wrote a store (for --online-teacher).

One micro-batch's loss is the five D-PaDe calls of docs/method.md (CLS of v0, v1, v2 -> pattern 0;
patches of v0 -> 1; all tokens of Ic -> 2), the three alignment losses, the router CE and the
expert regulariser. The ablations of docs/training.md ("Recipes") are settings of the same module:
each objective's weight (0 skips its student passes and its decoder call) and a plain linear
projector in place of D-PaDe (`LinearProjector`: no router or expert terms). The other recipes
(proteus, feature-kd) are recipes.py's. The learning rate is a pure function of the step (linear warmup per step, then
half-cycle cosine), so a resume needs no scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dpal.config import DistillConfig
from dpal.trainer.dpade import PATTERN_GLOBAL, PATTERN_LOCAL, PATTERN_RELATION, DPaDe
from dpal.trainer.losses import (
    PAPER_EPOCHS,
    global_mse,
    local_masked_mse,
    relation_kl,
    route_weight,
    shape_mask,
    weighted_sum,
)
from dpal.trainer.student import create_student, recompute_mlp_activations, student_tokens
from dpal.views import ViewRecipe

# ---------------------------------------------------------------- schedule


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then half-cycle cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / decay, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Schedule:
    """`lr_at` with a run's numbers; the peak follows the linear scaling rule (base_lr x global batch / 256)."""

    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_lr: float = 0.0

    @classmethod
    def for_run(cls, cfg: DistillConfig, steps_per_epoch: int, world_size: int) -> Schedule:
        global_batch = cfg.batch_size * world_size
        return cls(
            cfg.base_lr * global_batch / 256,
            int(round(cfg.warmup_epochs * steps_per_epoch)),
            cfg.epochs * steps_per_epoch,
            cfg.min_lr,
        )

    @classmethod
    def constant(cls, lr: float) -> Schedule:
        """`lr` at every step (benchmarks: the value changes no kernel)."""
        return cls(lr, 0, 0, lr)

    def lr(self, step: int) -> float:
        return lr_at(step, self.peak_lr, self.warmup_steps, self.total_steps, self.min_lr)


def param_groups(modules: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only, none on 1-D parameters and biases."""
    decay, no_decay = [], []
    for name, p in modules.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, with the fused kernel (one pass per parameter group instead of
    a dozen element-wise ops per tensor: 0.15 -> 0.01 s of a CPU step). Learning rate 0 until the
    schedule sets it."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=0.0, betas=cfg.betas, fused=True)


# ---------------------------------------------------------------- model


@dataclass(frozen=True)
class LinearOut:
    """What a `LinearProjector` branch returns: the projected tokens y (B, L, D), as `DPaDeOut.y`."""

    y: Tensor


class LinearProjector(nn.Module):
    """The ablation of D-PaDe: one Linear(d, D) shared by the three objectives, with `DPaDe.forward_many`'s
    call shape (a list of (tokens, pattern) branches; the pattern is ignored) and its output (`.y`)."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward_many(self, branches: list[tuple[Tensor, int]]) -> list[LinearOut]:
        return [LinearOut(self.proj(x)) for x, _ in branches]  # y (B, L, D) per branch


class Distiller(nn.Module):
    """Student plus D-PaDe (or the linear ablation); `forward` returns the total loss and its terms for
    one micro-batch.

    The terms stay on the device (0-d detached tensors, and `route_weight` a float) so that a step
    need not wait for the device; `metrics.mean_terms` reads them on log steps. An objective whose
    weight is 0 is not computed and has no term.
    """

    def __init__(
        self,
        student: nn.Module,
        dpade: DPaDe | LinearProjector,
        grid_hw: tuple[int, int],
        fix_mask_sign: bool,
        weights: dict[str, float] | None = None,
        num_epochs: int = PAPER_EPOCHS,
    ) -> None:
        super().__init__()
        self.student = student
        # the D-PaDe attribute keeps its name (state-dict keys, benchmarks); `heads` is every recipe's
        if isinstance(dpade, DPaDe):
            self.dpade = dpade
        else:
            self.projector = dpade
        self.grid_hw = grid_hw
        self.fix_mask_sign = fix_mask_sign
        self.weights = dict(weights or {"global": 1.0, "local": 1.0, "relation": 1.0})
        self.num_epochs = num_epochs  # the schedule's length: the route weight switches at its tenth
        # record_parts: forward keeps each weighted term of the total, with its graph, in `parts`
        # (the trainer's --grad-shares measures each one's gradient on the student)
        self.record_parts = False
        self.parts: dict[str, Tensor] = {}

    @property
    def heads(self) -> nn.Module:
        """The training-only module after the student (thrown away at export)."""
        return self.dpade if hasattr(self, "dpade") else self.projector

    @property
    def checkpoint_key(self) -> str:
        """The checkpoint entry holding `heads`: `dpade` as always for D-PaDe, `heads` for the ablation."""
        return "dpade" if hasattr(self, "dpade") else "heads"

    @property
    def needs_shape_mask(self) -> bool:
        return self.weights["local"] > 0

    def forward(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, Tensor | float]]:
        # B batch, P patches of v0, T tokens of Ic, d student width, D teacher width
        w = self.weights
        b = batch["v0"].shape[0]
        npre = self.student.num_prefix_tokens
        # docs/method.md's five D-PaDe calls. Student and D-PaDe treat every image on its own, so the
        # three global calls (CLS of v0, v1, v2) run as one call on 3B tokens, and the expert
        # generator runs once for all branches: the same values (up to float summation order)
        # for fewer, larger kernels and one weight-gradient pass. The student's passes run in the
        # same order whichever objectives are on (drop path draws from the global RNG in that order).
        branches: list[tuple[Tensor, int]] = []
        tok0 = (
            student_tokens(self.student, batch["v0"]) if w["global"] or w["local"] else None
        )  # (B, 1 + P, d)
        if w["global"]:
            tok12 = student_tokens(
                self.student, torch.cat([batch["v1"], batch["v2"]])
            )  # (2B, 1 + P_local, d)
            branches.append((torch.cat([tok0[:, :1], tok12[:, :1]]), PATTERN_GLOBAL))  # y (3B, 1, D)
        if w["local"]:
            branches.append((tok0[:, npre:], PATTERN_LOCAL))  # y (B, P, D)
        if w["relation"]:
            tok_ic = student_tokens(self.student, batch["ic"])  # (B, T, d)
            branches.append(
                (torch.cat([tok_ic[:, :1], tok_ic[:, npre:]], dim=1), PATTERN_RELATION)
            )  # y (B, T, D)
        outs = iter(self.heads.forward_many(branches))
        parts: dict[str, Tensor] = {}
        calls = []  # one per D-PaDe call of the method: the global output serves three
        if w["global"]:
            glob = next(outs)
            parts["global"] = global_mse(list(glob.y[:, 0].reshape(3, b, -1)), batch["g_t"])  # three (B, D)
            calls += [glob, glob, glob]  # the mean over 3B equals the mean of the three means
        if w["local"]:
            loc = next(outs)
            local_t = batch["local_t"]
            mask = batch.get("mask")  # (B, P, 1) from the loader (BatchDataset's mask_fix_sign) or:
            if mask is None:
                mask = shape_mask(local_t, self.grid_hw, self.fix_mask_sign)
            parts["local"] = local_masked_mse(loc.y, local_t, mask)
            calls.append(loc)
        if w["relation"]:
            rel = next(outs)
            parts["relation"] = relation_kl(rel.y, batch["rel_t"])
            calls.append(rel)
        total = weighted_sum(parts, w)
        terms: dict[str, Tensor | float] = {k: v.detach() for k, v in parts.items()}
        self.parts = {k: w[k] * v.float() for k, v in parts.items()} if self.record_parts else {}
        if hasattr(self, "dpade"):
            total = self._add_dpade_terms(total, terms, calls, epoch)
        else:
            terms["total"] = total.detach()
        return total, terms

    def _add_dpade_terms(
        self, total: Tensor, terms: dict[str, Tensor | float], calls: list, epoch: int
    ) -> Tensor:
        """total + lambda_route(epoch) x mean route loss + mean expert term, over the D-PaDe calls;
        their terms added to `terms` (and to `parts` when recorded)."""
        lam = route_weight(epoch, self.num_epochs)
        route = torch.stack([c.route_loss.float() for c in calls]).mean()
        l2 = torch.stack([c.weight_l2.float() for c in calls]).mean()
        total = total + lam * route + l2
        if self.record_parts:
            self.parts.update(route=lam * route, weight_l2=l2)
        terms.update(
            route=route.detach(),
            weight_l2=l2.detach(),
            total=total.detach(),
            route_weight=lam,
            route_acc=torch.stack([c.route_correct for c in calls]).mean().detach(),
        )
        return total


def build_student(cfg: DistillConfig, recipe: ViewRecipe) -> nn.Module:
    """The configured student at v0's size, initialised from `cfg.seed` (then every recipe's heads,
    from the RNG where the student's initialisation left it)."""
    torch.manual_seed(cfg.seed)
    student = create_student(
        cfg.student, img_size=tuple(recipe.global_size), init=cfg.student_init, **cfg.student_kwargs
    )
    recompute_mlp_activations(student, cfg.recompute)
    return student


def build_distiller(
    cfg: DistillConfig, recipe: ViewRecipe, teacher_dim: int, grid_hw: tuple[int, int]
) -> Distiller:
    """The configured student and D-PaDe (or its linear ablation) for a store's targets (teacher width D, v0's patch grid), on
    CPU, initialised from `cfg.seed`."""
    student = build_student(cfg, recipe)
    if cfg.projector == "linear":
        head: DPaDe | LinearProjector = LinearProjector(student.embed_dim, teacher_dim)
    else:
        head = DPaDe(
            student.embed_dim,
            teacher_dim,
            scale=cfg.dpade_scale,
            l2_weight=cfg.l2_weight,
            recompute=cfg.recompute,
        )
    weights = {"global": cfg.global_weight, "local": cfg.local_weight, "relation": cfg.relation_weight}
    return Distiller(student, head, tuple(grid_hw), cfg.fix_mask_sign, weights, cfg.epochs)
