"""DPAL's objectives as pure functions from tensors to scalars (docs/method.md, "Objectives").

Global (identity): the decoded student CLS of every view is pulled to the teacher's global
feature on v0. Local (shape): decoded student patches on v0 match the teacher's patches, both
weighted by a shape mask, the min-max scaled first principal component of the teacher's patches.
Relation (interaction): the row-softmaxed token affinities of the decoded student tokens on the
crowd image match the teacher's, in KL(A_t || A_s). `total_loss` adds the three and D-PaDe's
router and expert terms. Every mean-squared error averages over channels, then tokens and batch.

The baselines' objectives (docs/training.md, "Recipes") are here too: `token_mse` (feature-kd's
two terms, proteus's token term), `proteus_feature_mse` (CLS and patches together) and
`masked_token_mse` (proteus's masked branch); `weighted_sum` adds any recipe's terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# B batch, D teacher width, P patch tokens (h * w grid), L tokens (T = 257 on the crowd image)

ROUTE_WEIGHT_EARLY = 0.1
ROUTE_WEIGHT_LATE = 0.01
# The paper switches at epoch 20 of 200: dpal keeps that tenth of any schedule.
ROUTE_WEIGHT_SWITCH = (20, 200)
PAPER_EPOCHS = 200
# the terms of `total_loss`, in the order it stacks them
TERM_NAMES = ("global", "local", "relation", "route", "weight_l2", "total")


def global_mse(student_globals: Sequence[Tensor], teacher_global: Tensor) -> Tensor:
    """L_g: mean over the views of MSE(decoded student CLS, teacher global feature).

    Args:
        student_globals: one (B, D) (or (B, 1, D)) tensor per view (v0, v1, v2).
        teacher_global: (B, D) the teacher's CLS (or mean token) on v0.

    Returns:
        () the loss.
    """
    if not student_globals:
        raise ValueError("student_globals is empty")
    t = teacher_global.float()
    losses = [F.mse_loss(s.reshape(t.shape).float(), t) for s in student_globals]
    return torch.stack(losses).mean()


def shape_mask(teacher_patches: Tensor, grid_hw: tuple[int, int], fix_sign: bool) -> Tensor:
    """The shape mask M: first principal component of all teacher patches, min-max scaled.

    The B * P patch vectors are centred by their mean and projected on the top right singular
    vector of the centred matrix (exact, by eigendecomposition); the projections are min-max scaled to [0, 1] over
    the whole batch. The result is a constant (no gradient).

    A principal component's sign is arbitrary, so without a fix the mask may highlight the
    background instead of the person. With `fix_sign` the sign is chosen so that the mean mask
    value over the border tokens of the grid (first and last row and column) is not higher than
    over the inner tokens: a person crop is centred on the person. The comparison is made on the
    projections before scaling (min-max scaling of -p equals 1 - scaling of p, so flipping the
    sign is the same as M -> 1 - M). docs/method.md lists it among dpal's departures from the public code,
    which keeps whatever sign the SVD returns.

    Args:
        teacher_patches: (B, P, D) with P = h * w, row-major.
        grid_hw: (h, w) the patch grid (16 x 8 for 256 x 128).
        fix_sign: choose the sign as above; False keeps the SVD's sign.

    Returns:
        (B, P, 1) in [0, 1], float32; all zeros when every patch is the same vector.
    """
    b, p, dim = teacher_patches.shape
    h, w = grid_hw
    if h * w != p:
        raise ValueError(f"grid_hw {grid_hw} does not match {p} patch tokens")
    # float32 products even under bf16 autocast (GPU training): the mask is a constant of the targets
    with torch.no_grad(), torch.autocast(teacher_patches.device.type, enabled=False):
        x = teacher_patches.detach().float().reshape(b * p, dim)  # (B*P, D)
        x = x - x.mean(dim=0, keepdim=True)
        proj = (x @ _top_principal_axis(x)).reshape(b, p)  # (B, P)
        if fix_sign and h > 2 and w > 2:
            border = torch.ones(h, w, dtype=torch.bool, device=proj.device)
            border[1:-1, 1:-1] = False
            border = border.flatten()  # (P,)
            if proj[:, border].mean() > proj[:, ~border].mean():
                proj = -proj
        lo, hi = proj.min(), proj.max()
        span = hi - lo
        mask = (proj - lo) / span if span > 0 else torch.zeros_like(proj)
    return mask.unsqueeze(-1)  # (B, P, 1)


def _top_principal_axis(x: Tensor) -> Tensor:
    """Unit top right singular vector (D,) of centred x (N, D), from the eigendecomposition of the
    smaller of x^T x (D, D) and x x^T (N, N): exact like an SVD, and ~10x cheaper than one here."""
    n, dim = x.shape
    # float64 eigh: more accurate, and faster than float32 on CPU LAPACK.
    if dim <= n:
        return torch.linalg.eigh((x.T @ x).double()).eigenvectors[:, -1].to(x.dtype)  # (D,)
    u = torch.linalg.eigh((x @ x.T).double()).eigenvectors[:, -1].to(x.dtype)  # (N,)
    v = x.T @ u  # (D,)
    return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)


def local_masked_mse(student_patches: Tensor, teacher_patches: Tensor, mask: Tensor) -> Tensor:
    """L_l = MSE(M * student, M * teacher), averaged over channels, tokens and batch.

    Args:
        student_patches: (B, P, D) decoded student patches on v0.
        teacher_patches: (B, P, D) teacher patches on v0.
        mask: (B, P, 1) from `shape_mask`.

    Returns:
        () the loss.
    """
    m = mask.float()
    return F.mse_loss(m * student_patches.float(), m * teacher_patches.float())


def relation_kl(student: Tensor, teacher_logits: Tensor) -> Tensor:
    """L_r = KL(A_t || A_s) of row-softmaxed token affinities; mean over batch and rows.

    A_s = softmax_row(Y Y^T / sqrt(D)) with Y the decoded student tokens, A_t =
    softmax_row(teacher_logits). Only softmaxes of the teacher logits enter, so rows shifted by
    a constant (e.g. a cache that subtracts each row's max) give the same loss.

    Args:
        student: (B, L, D) decoded student tokens on the crowd image.
        teacher_logits: (B, L, L) the teacher's F F^T / sqrt(D).

    Returns:
        () the loss.
    """
    # the affinities in float32 even under bf16 autocast (GPU training): bf16 keeps 8 significant
    # bits, so logits spanning ~40 would be rounded by up to ~0.1, and the softmax with them
    with torch.autocast(student.device.type, enabled=False):
        y = student.float()
        logits_s = y @ y.transpose(1, 2) / y.shape[-1] ** 0.5  # (B, L, L)
        log_a_s = logits_s.log_softmax(dim=-1)
        log_a_t = teacher_logits.float().log_softmax(dim=-1)  # (B, L, L)
        kl = (log_a_t.exp() * (log_a_t - log_a_s)).sum(dim=-1)  # (B, L)
        return kl.mean()


def token_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE of projected student tokens against the teacher's, in float32 (even under autocast's
    bf16 outputs), averaged over channels, tokens and batch.

    Args:
        student: (B, D) or (B, L, D).
        teacher: the same shape.

    Returns:
        () the loss.
    """
    return F.mse_loss(student.float(), teacher.float())


def proteus_feature_mse(
    student_cls: Tensor, student_patches: Tensor, teacher_global: Tensor, teacher_patches: Tensor
) -> Tensor:
    """Proteus's feature term: MSE over all 1 + P tokens at once, the CLS (through the token head) and
    the patches (through the feature head) against the teacher's global target and patches.

    Args:
        student_cls: (B, D) the token head's output.
        student_patches: (B, P, D) the feature head's output.
        teacher_global: (B, D).
        teacher_patches: (B, P, D).

    Returns:
        () the loss: (P x MSE(patches) + MSE(CLS)) / (1 + P).
    """
    s = torch.cat([student_cls.unsqueeze(1), student_patches], dim=1)  # (B, 1 + P, D)
    t = torch.cat([teacher_global.unsqueeze(1), teacher_patches], dim=1)
    return token_mse(s, t)


def masked_token_mse(student_patches: Tensor, teacher_patches: Tensor, masked: Tensor) -> Tensor:
    """MSE over the masked positions only (proteus's patch term): the mean over every masked token of
    every image (images with more masked tokens weigh more, as in Proteus's code) and over channels.

    Args:
        student_patches: (B, P, D) the patch head's output on the masked input.
        teacher_patches: (B, P, D) the teacher's patches on the unmasked view.
        masked: (B, P) bool, at least one True.

    Returns:
        () the loss.
    """
    return token_mse(student_patches[masked], teacher_patches[masked])  # (M, D) each


def weighted_sum(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """sum over `terms` (in order) of weights[name] x term, in float32; a weight of 1 changes no bit."""
    total = torch.zeros((), dtype=torch.float32, device=next(iter(terms.values())).device)
    for name, term in terms.items():
        total = total + weights[name] * term.float()
    return total


def route_weight(epoch: int, num_epochs: int = PAPER_EPOCHS) -> float:
    """lambda_route: 0.1 in the first tenth of the schedule (the paper's 20 of 200 epochs), then 0.01.

    Epoch e (0-based) is early while e / num_epochs < 20 / 200: epochs 0-19 of 200, 0-4 of 48,
    0-1 of 12.
    """
    early, total = ROUTE_WEIGHT_SWITCH
    return ROUTE_WEIGHT_EARLY if epoch * total < early * num_epochs else ROUTE_WEIGHT_LATE


def total_loss(
    loss_global: Tensor,
    loss_local: Tensor,
    loss_relation: Tensor,
    route_losses: Sequence[Tensor],
    weight_l2s: Sequence[Tensor],
    epoch: int,
    num_epochs: int = PAPER_EPOCHS,
) -> tuple[Tensor, dict[str, float]]:
    """L = L_g + L_l + L_r + lambda_route(epoch) * mean(route CE) + mean(L_W), the reference that
    `Distiller.forward` (which also weighs and skips objectives) is tested against.

    Args:
        loss_global: () L_g.
        loss_local: () L_l.
        loss_relation: () L_r.
        route_losses: () router cross-entropy of each D-PaDe call (5 per step).
        weight_l2s: () expert regulariser of each D-PaDe call (5 per step).
        epoch: the current epoch, 0-based.
        num_epochs: the schedule's length (`route_weight`).

    Returns:
        The total (), and its terms as floats: global, local, relation, route, weight_l2,
        route_weight, total.
    """
    if not route_losses or not weight_l2s:
        raise ValueError("route_losses and weight_l2s must not be empty")
    lam = route_weight(epoch, num_epochs)
    route = torch.stack([r.float() for r in route_losses]).mean()
    l2 = torch.stack([w.float() for w in weight_l2s]).mean()
    total = loss_global.float() + loss_local.float() + loss_relation.float() + lam * route + l2
    parts = torch.stack([loss_global.float(), loss_local.float(), loss_relation.float(), route, l2, total])
    terms = dict(zip(TERM_NAMES, parts.tolist(), strict=True))  # one device sync for all terms
    terms["route_weight"] = lam
    return total, terms
