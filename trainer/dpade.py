"""D-PaDe, the Dynamic Pattern Decoder: student tokens -> teacher-width pattern (training only).

One module serves the three patterns (0 global, 1 local, 2 relation; docs/method.md, "D-PaDe"). A router
reads the branch's tokens and softly mixes three per-image experts, each a (d, D) projection
generated from a learned pattern query by cross-attention to the branch's raw tokens; the mixed
projection maps every token to the teacher's width. The router is told which pattern the caller
wants through a cross-entropy (`route_loss`), and the mixed projection is kept small by an L2
term (`weight_l2`). The module is discarded after pretraining.

Choices, following the authors' public code where the paper leaves room (docs/method.md):
- The LayerNorm after the d -> d*D expert generator normalises the whole d*D vector of each
  expert (one mean and variance per expert, an affine weight of size d*D), exactly as
  `nn.LayerNorm(d * D)` on the (B, 3, d*D) tensor, before it is reshaped to (d, D).
- Every LayerNorm uses eps 1e-6.
- The router's gate Wg is an `nn.Linear(d, 3, bias=False)` that keeps PyTorch's default
  kaiming-uniform(a = sqrt 5) initialisation, bound 1/sqrt(d), as in the public code, where every
  other Linear weight gets xavier-uniform.
- The expert mixing constant is `scale` (default 1/256, the literal the public code multiplies
  each image's W by).

The lean expert path (default). The router's probabilities s sum to one, so the mixed projection is
an exact rearrangement of per-expert statistics: with h_k = GELU(z_k) the generator's output for
expert k, mu_k its mean, r_k its reciprocal standard deviation and c_k = s_k r_k,

    W = scale * sum_k s_k (gamma * (h_k - mu_k) r_k + beta)
      = scale * (gamma * (sum_k c_k h_k - sum_k c_k mu_k) + beta).

`_MixedExperts` builds W this way, one chunk of images at a time, without materialising the K
normalised experts, and returns ||W_b||_F^2 from the same pass. Its backward pass recomputes the
generator (one more matrix product) instead of keeping the (B, K, d*D) tensors alive, so the
expert path's memory no longer grows with the batch; with `recompute=False` it keeps z = the
generator's pre-activation instead (no extra product, one (B, K, d*D) tensor per step). Under
autocast it works in the autocast dtype with float32 statistics, without float32 copies of the
experts. `lean=False` keeps the textbook formulation (LayerNorm module, einsum), which the tests
compare the lean path against.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# B batch, L tokens of the branch (1 CLS, 128 patches or 257 crowd tokens), d student width,
# D teacher width, K = 3 patterns/experts


NUM_PATTERNS = 3
PATTERN_GLOBAL, PATTERN_LOCAL, PATTERN_RELATION = 0, 1, 2
LN_EPS = 1e-6


EXPERT_CHUNK_BYTES = 64 << 20


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and parameter gradients: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _expert_stats(h: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and reciprocal standard deviation (float32, (rows,)) of each row of h (rows, N), as
    `nn.LayerNorm` computes them (biased variance), from float32 reductions of h and of its norm:
    two streaming reads of h and no copy of it (`var_mean` is about 5x slower on CPU). The rows
    are GELU outputs, whose mean is of the order of their spread, so E[h^2] - E[h]^2 keeps the
    variance to a few 1e-6 relative in float32."""
    n, acc = h.shape[-1], _acc_dtype(h.dtype)
    mu = h.sum(dim=-1, dtype=acc) / n
    sq = torch.linalg.vector_norm(h, dim=-1, dtype=acc).square() / n
    return mu, torch.rsqrt((sq - mu.square()).clamp_min(0) + LN_EPS)


def _chunks(rows: int, max_rows: int) -> list[tuple[int, int]]:
    """[a, b) ranges of at most `max_rows` covering `rows`, of near-equal size (no tiny last chunk,
    whose matrix products would run far below the machine's rate)."""
    count = -(-rows // max(max_rows, 1))
    size = -(-rows // count)
    return [(a, min(a + size, rows)) for a in range(0, rows, size)]


class _MixedExperts(torch.autograd.Function):
    """W (R, N) = scale * (gamma * (sum_k c_k h_k - sum_k c_k mu_k) + beta) and ||W_r||^2, from the
    expert generator's input, chunk by chunk (the module docstring has the algebra).

    R images (rows), K experts, d student width, N = d * D. Inputs: qn (R, K, d) the normalised
    pattern queries (input of `expert_fc`), weight (N, d) and bias (N,) of `expert_fc`, gamma and
    beta (N,) of `expert_norm`, s (R, K) the router's probabilities. Returns W in the compute
    dtype and its squared Frobenius norms (R,) in float32, computed from W as returned.
    """

    @staticmethod
    def forward(
        ctx: Any,
        qn: Tensor,
        weight: Tensor,
        bias: Tensor,
        gamma: Tensor,
        beta: Tensor,
        s: Tensor,
        scale: float,
        dtype: torch.dtype,
        chunk_rows: int,
        recompute: bool,
    ) -> tuple[Tensor, Tensor]:
        r_all, k, d = qn.shape
        n = weight.shape[0]
        with torch.autocast(qn.device.type, enabled=False):
            w_c, b_c = weight.to(dtype), bias.to(dtype)
            out = torch.empty(r_all, n, dtype=dtype, device=qn.device)
            acc = _acc_dtype(dtype)
            sq = torch.empty(r_all, dtype=acc, device=qn.device)
            mu_all = torch.empty(r_all * k, dtype=acc, device=qn.device)
            rstd_all = torch.empty_like(mu_all)
            z_all = None if recompute else torch.empty(r_all * k, n, dtype=dtype, device=qn.device)
            for a, b in _chunks(r_all, chunk_rows):
                x = qn[a:b].reshape(-1, d).to(dtype)  # (r K, d)
                if z_all is None:
                    z = torch.addmm(b_c, x, w_c.t())  # (r K, N)
                else:
                    z = torch.addmm(b_c, x, w_c.t(), out=z_all[a * k : b * k])
                h = F.gelu(z)
                mu, rstd = _expert_stats(h)
                mu_all[a * k : b * k], rstd_all[a * k : b * k] = mu, rstd
                w = _mix(h.view(b - a, k, n), s[a:b], mu.view(-1, k), rstd.view(-1, k), gamma, beta, scale)[0]
                out[a:b] = w
                sq[a:b] = w.to(acc).square().sum(dim=-1)
        ctx.save_for_backward(
            qn, weight, bias, gamma, beta, s, mu_all, rstd_all, *([] if z_all is None else [z_all])
        )
        ctx.cfg = (scale, dtype, chunk_rows)
        return out, sq

    @staticmethod
    def backward(ctx: Any, grad_w: Tensor | None, grad_sq: Tensor | None) -> tuple[Tensor | None, ...]:
        qn, weight, bias, gamma, beta, s, mu_all, rstd_all, *saved_z = ctx.saved_tensors
        scale, dtype, chunk_rows = ctx.cfg
        r_all, k, d = qn.shape
        n = weight.shape[0]
        f32 = _acc_dtype(dtype)  # float32 unless the inputs are float64
        with torch.autocast(qn.device.type, enabled=False):
            w_c, b_c = weight.to(dtype), bias.to(dtype)
            g_qn = torch.empty(r_all, k, d, dtype=qn.dtype, device=qn.device)
            g_s = torch.empty(r_all, k, dtype=f32, device=qn.device)
            g_weight: Tensor | None = None
            g_bias = torch.zeros(n, dtype=f32, device=qn.device)
            g_gamma = torch.zeros(n, dtype=f32, device=qn.device)
            g_beta = torch.zeros(n, dtype=f32, device=qn.device)
            gamma32 = gamma.to(f32)
            for a, b in _chunks(r_all, chunk_rows):
                rows = b - a
                x = qn[a:b].reshape(-1, d).to(dtype)  # (r K, d)
                z = saved_z[0][a * k : b * k] if saved_z else torch.addmm(b_c, x, w_c.t())  # (r K, N)
                h = F.gelu(z).view(rows, k, n)
                mu, rstd = mu_all[a * k : b * k].view(rows, k), rstd_all[a * k : b * k].view(rows, k)
                w, mixed, c = _mix(h, s[a:b], mu, rstd, gamma, beta, scale)  # (r, N), (r, N) float32, (r, K)
                g = (
                    grad_w[a:b].to(f32)
                    if grad_w is not None
                    else torch.zeros(rows, n, dtype=f32, device=qn.device)
                )
                if grad_sq is not None:  # d ||W||^2 / dW = 2 W (of W as returned)
                    g = g + (2 * grad_sq[a:b, None]) * w.to(f32)
                g_beta += scale * g.sum(dim=0)
                g_gamma += scale * (g * mixed).sum(dim=0)
                gg = (g * gamma32).mul_(scale)  # (r, N) dL/d(sum_k s_k n_k)
                # dot(gg, n_k) = r_k (dot(gg, h_k) - mu_k sum(gg)): the gradient of s_k, and LN's
                # backward term for expert k
                dots = torch.bmm(h, gg.to(dtype).unsqueeze(-1)).squeeze(-1).to(f32)  # (r, K)
                a_k = rstd * (dots - mu * gg.sum(dim=-1, keepdim=True))
                g_s[a:b] = a_k
                # LayerNorm backward of n_k = (h_k - mu_k) r_k with upstream s_k gg:
                # dh_k = c_k gg + alpha_k h_k + beta_k
                alpha = -c * rstd * a_k / n
                beta_k = -c * gg.mean(dim=-1, keepdim=True) - alpha * mu
                dh = torch.addcmul(beta_k.unsqueeze(-1), h, alpha.unsqueeze(-1))  # (r, K, N) float32
                dh.addcmul_(c.unsqueeze(-1), gg.unsqueeze(1))
                dz = torch.ops.aten.gelu_backward(dh.view(rows * k, n).to(dtype), z)  # (r K, N)
                del dh, h
                g_bias += dz.sum(dim=0, dtype=f32)
                if g_weight is None:
                    g_weight = (dz.t() @ x).to(f32)  # (N, d)
                elif dtype == f32:
                    g_weight.addmm_(dz.t(), x)
                else:
                    g_weight += (dz.t() @ x).to(f32)
                g_qn[a:b] = (dz @ w_c).view(rows, k, d).to(qn.dtype)
        g_w, g_b = g_weight.to(weight.dtype), g_bias.to(bias.dtype)
        g_ln = (g_gamma.to(gamma.dtype), g_beta.to(beta.dtype))
        # none for the non-tensor inputs: scale, dtype, chunk_rows, recompute
        return (g_qn, g_w, g_b, *g_ln, g_s.to(s.dtype)) + (None,) * 4


def _mix(
    h: Tensor, s: Tensor, mu: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The mixed projection of one chunk: W (r, N) in h's dtype, sum_k s_k n_k (r, N) and
    c = s * rstd (r, K) in the statistics' dtype. h (r, K, N); s, mu, rstd (r, K)."""
    acc = rstd.dtype
    c = s.to(acc) * rstd  # (r, K)
    c_mu = (c * mu).sum(dim=-1, keepdim=True)  # (r, 1)
    mixed = torch.bmm(c.to(h.dtype).unsqueeze(1), h).squeeze(1).to(acc) - c_mu  # (r, N)
    w = torch.addcmul(beta.to(acc), mixed, gamma.to(acc)).mul_(scale)
    return w.to(h.dtype), mixed, c


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
    """Dynamic Pattern Decoder (docs/method.md, "D-PaDe").

    Args:
        student_dim: d, width of the student tokens.
        teacher_dim: D, width of the teacher tokens.
        num_patterns: K, number of patterns and experts.
        num_heads: heads of the token self-attention and of the pattern queries' self- and
            cross-attention (16; 192 / 16 = 12 per head).
        router_num_heads: heads of the router's cross-attention (12; 192 / 12 = 16 per head).
        scale: constant multiplying the mixed expert weights (1/256).
        l2_weight: weight of the expert regulariser (0.025 = 0.05 * 0.5).
        lean: build the mixed projection with `_MixedExperts` (same function, less time and
            memory); False runs the textbook formulation.
        recompute: lean path only: recompute the expert generator in the backward pass instead of
            keeping its pre-activation. None: on CUDA yes (memory traffic bounds the step there),
            elsewhere no (a CPU step is bound by matrix products).
        expert_chunk_bytes: lean path only: the generator runs on as many images at a time as
            keep one (images, K, d*D) tensor of the compute dtype within this size.
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
        lean: bool = True,
        recompute: bool | None = None,
        expert_chunk_bytes: int = EXPERT_CHUNK_BYTES,
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
        self.lean = lean
        self.recompute = recompute
        self.expert_chunk_bytes = expert_chunk_bytes

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
        """Xavier-uniform Linear weights (MHA in/out projections included), zero biases, LN (1, 0);
        the gate kaiming-uniform(a = sqrt 5), nn.Linear's default, as in the public code.

        `router_token` keeps its randn init and `pattern_queries` their zeros.
        """
        for m in self.modules():
            if m is self.gate:
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))  # bound 1 / sqrt(d)
            elif isinstance(m, nn.MultiheadAttention):
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
        and its gradient is one matrix product instead of one per call (docs/method.md's five calls
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
        q0 = (
            self.pattern_queries
            + self.query_attn(
                self.pattern_queries, self.pattern_queries, self.pattern_queries, need_weights=False
            )[0]
        )  # (1, K, d)
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
        s = torch.cat(probs)  # (sum B, K)
        if self.lean:
            w_all, sq_all = self._mixed_lean(self.expert_in_norm(q), s)  # (sum B, d, D), (sum B,)
        else:
            e = self.expert_norm(F.gelu(self.expert_fc(self.expert_in_norm(q))))  # (sum B, K, d*D)
            e = e.view(-1, k, d, dt)  # (sum B, K, d, D)
            w_all = torch.einsum("bk,bkcD->bcD", s.to(e.dtype), e) * self.scale  # (sum B, d, D)
            sq_all = w_all.to(_acc_dtype(w_all.dtype)).pow(2).sum(dim=(1, 2))  # (sum B,)

        outs = []
        for (_, pattern), x, logits, w, sq in zip(
            branches, xs, logits_all, w_all.split(sizes), sq_all.split(sizes), strict=True
        ):
            target = torch.full((x.shape[0],), pattern, dtype=torch.long, device=x.device)
            route_loss = F.cross_entropy(logits.float(), target)
            route_correct = (logits.detach().argmax(dim=-1) == target).float().mean()
            weight_l2 = self.l2_weight * sq.mean()
            y = self.out_norm(F.gelu(torch.bmm(x, w.to(x.dtype))))  # (B, L, D)
            outs.append(DPaDeOut(y, logits, route_loss, weight_l2, route_correct))
        return outs

    def _mixed_lean(self, qn: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """`_MixedExperts` on the normalised queries qn (R, K, d) and probabilities s (R, K):
        W (R, d, D) and ||W_r||_F^2 (R,)."""
        device = qn.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else qn.dtype
        k, n = self.num_patterns, self.student_dim * self.teacher_dim
        chunk_rows = max(1, self.expert_chunk_bytes // (k * n * torch.empty((), dtype=dtype).element_size()))
        recompute = self.recompute if self.recompute is not None else qn.device.type == "cuda"
        w, sq = _MixedExperts.apply(
            qn,
            self.expert_fc.weight,
            self.expert_fc.bias,
            self.expert_norm.weight,
            self.expert_norm.bias,
            s,
            self.scale,
            dtype,
            chunk_rows,
            recompute,
        )
        return w.view(-1, self.student_dim, self.teacher_dim), sq
