"""D-PaDe, the Dynamic Pattern Decoder: student tokens -> teacher-width pattern (training only).

One module serves the three patterns (0 global, 1 local, 2 relation; method.md, D-PaDe). A router
reads the branch's tokens and softly mixes three per-image experts, each a (d, D) projection
generated from a learned pattern query by cross-attention to the branch's raw tokens; the mixed
projection maps every token to the teacher's width. The router is told which pattern the caller
wants through a cross-entropy (`route_loss`), and the mixed projection is kept small by an L2
term (`weight_l2`). The module is discarded after pretraining.

Choices, following the authors' public code where method.md leaves room:
- The LayerNorm after the d -> d*D expert generator normalises the whole d*D vector of each
  expert (one mean and variance per expert, an affine weight of size d*D), exactly as
  `nn.LayerNorm(d * D)` on the (B, 3, d*D) tensor, before it is reshaped to (d, D).
- Every LayerNorm uses eps 1e-6.
- The router's gate Wg is an `nn.Linear(d, 3, bias=False)` and gets xavier-uniform like every
  other Linear weight (the public code leaves it at kaiming-uniform(a=sqrt 5)).
- The expert mixing constant is `scale` (default 1/256; the public code divides by its per-GPU
  batch of 256).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# B batch, L tokens of the branch (1 CLS, 128 patches or 257 crowd tokens), d student width,
# D teacher width, K = 3 patterns/experts

logger = logging.getLogger(__name__)

NUM_PATTERNS = 3
PATTERN_GLOBAL, PATTERN_LOCAL, PATTERN_RELATION = 0, 1, 2
LN_EPS = 1e-6


class DPaDeOut(NamedTuple):
    """What one D-PaDe call returns.

    Attributes:
        y: (B, L, D) the pattern, compared with the teacher.
        route_logits: (B, K) router logits.
        route_loss: () cross-entropy of `route_logits` against the requested pattern.
        weight_l2: () `l2_weight` * mean over the batch of ||W_b||_F^2 of the mixed projection.
        route_correct: () fraction of images whose router argmax is the requested pattern
            (a metric; no gradient).
    """

    y: Tensor
    route_logits: Tensor
    route_loss: Tensor
    weight_l2: Tensor
    route_correct: Tensor


class DPaDe(nn.Module):
    """Dynamic Pattern Decoder (method.md, D-PaDe).

    Args:
        student_dim: d, width of the student tokens.
        teacher_dim: D, width of the teacher tokens.
        num_patterns: K, number of patterns and experts.
        num_heads: heads of the token self-attention and of the pattern queries' self- and
            cross-attention (16; 192 / 16 = 12 per head).
        router_num_heads: heads of the router's cross-attention (12; 192 / 12 = 16 per head).
        scale: constant multiplying the mixed expert weights (1/256).
        l2_weight: weight of the expert regulariser (0.025 = 0.05 * 0.5).
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_patterns: int = NUM_PATTERNS,
        num_heads: int = 16,
        router_num_heads: int = 12,
        scale: float = 1.0 / 256,
        l2_weight: float = 0.025,
    ) -> None:
        super().__init__()
        d, dt = student_dim, teacher_dim
        for heads, what in ((num_heads, "num_heads"), (router_num_heads, "router_num_heads")):
            if d % heads:
                raise ValueError(f"student_dim {d} is not divisible by {what} {heads}")
        self.student_dim = d
        self.teacher_dim = dt
        self.num_patterns = num_patterns
        self.scale = scale
        self.l2_weight = l2_weight

        # token self-attention, post-norm
        self.attn = nn.MultiheadAttention(d, num_heads, bias=True, batch_first=True)
        self.attn_norm = nn.LayerNorm(d, eps=LN_EPS)
        # router
        self.router_token = nn.Parameter(torch.randn(1, 1, d))
        self.router_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.router_attn = nn.MultiheadAttention(d, router_num_heads, bias=True, batch_first=True)
        self.gate = nn.Linear(d, num_patterns, bias=False)  # Wg (K, d)
        # dynamic expert generator
        self.pattern_queries = nn.Parameter(torch.zeros(1, num_patterns, d))
        self.query_attn = nn.MultiheadAttention(d, num_heads, bias=True, batch_first=True)
        self.cross_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.cross_attn = nn.MultiheadAttention(d, num_heads, bias=True, batch_first=True)
        self.expert_in_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.expert_fc = nn.Linear(d, d * dt)
        self.expert_norm = nn.LayerNorm(d * dt, eps=LN_EPS)  # over each expert's whole d*D vector
        self.out_norm = nn.LayerNorm(dt, eps=LN_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform Linear weights (MHA in/out projections included), zero biases, LN (1, 0).

        `router_token` keeps its randn init and `pattern_queries` their zeros.
        """
        for m in self.modules():
            if isinstance(m, nn.MultiheadAttention):
                nn.init.xavier_uniform_(m.in_proj_weight)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.Linear):  # includes MHA out_proj
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, pattern: int) -> DPaDeOut:
        """Decode one branch's student tokens into pattern `pattern`.

        Args:
            x: (B, L, d) the student's final normalised tokens of the branch.
            pattern: 0 global (CLS, L = 1), 1 local (patches), 2 relation (all crowd tokens).

        Returns:
            `DPaDeOut` with y (B, L, D) and the router's logits, loss and accuracy and the
            expert regulariser.
        """
        return self.forward_many([(x, pattern)])[0]

    def forward_many(self, branches: list[tuple[Tensor, int]]) -> list[DPaDeOut]:
        """Several independent D-PaDe calls, with the expert generator run once for all of them.

        Each branch gives exactly what `forward(x, pattern)` gives (up to float summation order):
        every image is decoded on its own. The per-image experts of all branches are generated
        by one pass of the d -> d*D generator, so its 28M-parameter weight is read once per step
        and its gradient is one matrix product instead of one per call (method.md's five calls
        cost three passes otherwise: about 40% of a CPU step's D-PaDe time).

        Args:
            branches: (x, pattern) pairs, x (B_i, L_i, d); lengths L_i may differ.

        Returns:
            One `DPaDeOut` per branch, in order.
        """
        if not branches:
            raise ValueError("branches is empty")
        for _, pattern in branches:
            if not 0 <= pattern < self.num_patterns:
                raise ValueError(f"pattern {pattern} not in [0, {self.num_patterns})")
        k, d, dt = self.num_patterns, self.student_dim, self.teacher_dim
        # the pattern queries' self-attention does not depend on the image: compute it once
        q0 = self.pattern_queries + self.query_attn(
            self.pattern_queries, self.pattern_queries, self.pattern_queries, need_weights=False)[0]  # (1, K, d)
        qn0 = self.cross_norm(q0)  # (1, K, d)
        rq0 = self.router_norm(self.router_token)  # (1, 1, d)

        xs, probs, logits_all, queries = [], [], [], []
        for x0, _ in branches:
            b = x0.shape[0]
            x = self.attn_norm(x0 + self.attn(x0, x0, x0, need_weights=False)[0])  # (B, L, d)
            # router: one learned token attends to the branch
            r = self.router_attn(rq0.expand(b, -1, -1), x, x, need_weights=False)[0].squeeze(1)  # (B, d)
            logits = self.gate(r)  # (B, K)
            # dynamic expert generator: K pattern queries read the raw tokens
            q = q0 + self.cross_attn(qn0.expand(b, -1, -1), x0, x0, need_weights=False)[0]  # (B, K, d)
            xs.append(x)
            logits_all.append(logits)
            probs.append(logits.softmax(dim=-1))
            queries.append(q)

        sizes = [x.shape[0] for x in xs]
        q = torch.cat(queries)  # (sum B, K, d)
        e = self.expert_norm(F.gelu(self.expert_fc(self.expert_in_norm(q))))  # (sum B, K, d*D)
        e = e.view(-1, k, d, dt)  # (sum B, K, d, D)
        s = torch.cat(probs)  # (sum B, K)
        w_all = torch.einsum("bk,bkcD->bcD", s.to(e.dtype), e) * self.scale  # (sum B, d, D)

        outs = []
        for (_, pattern), x, logits, w in zip(branches, xs, logits_all, w_all.split(sizes), strict=True):
            target = torch.full((x.shape[0],), pattern, dtype=torch.long, device=x.device)
            route_loss = F.cross_entropy(logits.float(), target)
            route_correct = (logits.detach().argmax(dim=-1) == target).float().mean()
            weight_l2 = self.l2_weight * w.float().pow(2).sum(dim=(1, 2)).mean()
            y = self.out_norm(F.gelu(torch.bmm(x, w.to(x.dtype))))  # (B, L, D)
            outs.append(DPaDeOut(y, logits, route_loss, weight_l2, route_correct))
        return outs
