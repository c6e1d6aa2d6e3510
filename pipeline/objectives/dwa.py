"""DWA-KD: entropy-weighted dual-space KD plus Soft-DTW alignment, on top of DSKD-CMA (spec/other_methods.md).

Ref: DWA-KD, arXiv 2602.21669; a public implementation, voluyen/dwa_mta code/criterions/dwa_kd.py ("the code",
not confirmed as the authors'). Where the paper is explicit the default follows it, where it is silent the code;
the other behaviour is an option in both cases. Per micro-batch, on the DSKD-CMA attention of spec/dskd.md 1-4:
1. Entropy weights (detached, rescaled per sequence to sum to that sequence's response tokens):
   student side w_i = rescale(H(softmax(Zs_i)) * g_i), g_i = max_v softmax(Zt2s_i)_v (paper eq. 12), multiplies
   KD_t2s per token (no accuracy mask); weights="released": w_i = rescale(H_i) * g_i as the code (H rescaled
   first, then times g: about 1/mean(g) heavier). Teacher side w_j = rescale(clamp(1 - H(softmax(Zt_j)) / log Vt,
   0, 1)) multiplies the s2t forward KL per token.
2. Soft-DTW on the RESPONSE positions of both sequences (label != -100, packed left): hidden pair (Hs, t2s(Ht))
   and target-embedding pair (Es[y], embed(Et[yt])), the teacher sides RAW as in paper and code (dtw_inputs=
   "normalised": t2s(Ht~) and embed(Etg~), the CMA's std-normalised tensors); cost C_ij = 1 - cos(x_i, y_j);
   band from a_t2s: C~_ij = C_ij + 1 outside |j - c_i| <= w_i; nDTW = sDTW(C~(X,Y)) - 0.5 [sDTW(C(X,X)) +
   sDTW(C(Y,Y))]. dtw_positions="released": the code's positions instead, the first n_b positions of each
   sequence from index 0 (prompt tokens included, n_b = its response length), band rows/columns likewise.
3. L = (1 - lambda) CE + lambda (KD_t2s^w + KD_s2t^w + CE_t2s) + 0.2 DTW, where DTW = sum_b nDTW_b (hidden +
   embedding) as the code: each sequence's nDTW counts once and the stage divides the step total by its supervised
   student tokens (the paper does not say). dtw_reduction="tokens": sum_b n_b nDTW_b, each sequence weighted by
   its response tokens (~n_b = 40x heavier, which gave grad norms ~60 at weight 0.2).
KD warm-up (kd_scale = min(1, (step + 1) / 300) by default, kd_warmup_steps): the code ramps KD_t2s only;
kd_warmup_terms="both" ramps KD_t2s and KD_s2t. Soft-DTW gamma: dtw_gamma, 2.0 -> 0.8 linearly over the first
3,570 steps and 0.8 after (the code; the paper does not state gamma); anneal_steps = the run's steps spreads it
over the whole run.
Every term is a token SUM; the stage divides the step total once by the step's supervised student tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dskd_pipe.pipeline.config import DTW_INPUTS, DTW_POSITIONS, DTW_REDUCTIONS, KD_WARMUP_TERMS, WEIGHT_FORMS
from dskd_pipe.pipeline.objectives.divergences import (SKEW_ALPHA, _plogp_ratio, cross_entropy_sum, forward_kl_rows,
                                                       reverse_kl_rows)
from dskd_pipe.pipeline.objectives.dskd import (DEFAULT_CHUNK_TOKENS, DSKDOutput, Projectors, TeacherHead, _apply,
                                                cross_model_attention, fp32_region, teacher_logits)


BAND_ALPHA = 0.7  # a in the band centre c_i = a sum_j j A_ij + (1 - a) i m/n
BAND_BASE_WIDTH = 5.0  # w_i = 5 + 2 H(A_i)
BAND_ENTROPY_SCALE = 2.0
BAND_PENALTY = 1.0  # added to C_ij outside the band
GAMMA_START, GAMMA_END = 2.0, 0.8  # the paper does not state gamma; the code anneals linearly, then holds
GAMMA_ANNEAL_STEPS = 3570  # the code's dtw_gamma_steps
KD_WARMUP_STEPS = 300
_BIG = 1e10  # "infinite" DP cell; finite so that exp(-_BIG / gamma) is exactly 0 and no inf - inf NaN appears


# --------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------


def dtw_gamma(step: int, anneal_steps: int = GAMMA_ANNEAL_STEPS, start: float = GAMMA_START,
              end: float = GAMMA_END) -> float:
    """Soft-DTW temperature at optimizer step `step` (0-based): start + (end - start) * min(1, (step + 1) /
    anneal_steps), as the code (2.0 -> 0.8 over 3,570 steps, then 0.8). Pass the run's total steps as anneal_steps
    to spread the anneal over the whole run (--dtw-gamma-steps 0). The code counts micro-batches; its published
    script uses no gradient accumulation, so they are optimizer steps there."""
    if anneal_steps < 1:
        raise ValueError(f"dtw_gamma: anneal_steps must be >= 1, got {anneal_steps}")
    p = min(max(float(step + 1) / anneal_steps, 0.0), 1.0)
    return start + (end - start) * p


def kd_warmup(step: int, warmup_steps: int = KD_WARMUP_STEPS) -> float:
    """KD ramp factor min(1, (step + 1) / warmup_steps); 1.0 when warmup_steps <= 0 (the ramp is optional)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


# --------------------------------------------------------------------------------------------------------
# Soft-DTW
# --------------------------------------------------------------------------------------------------------


def soft_dtw(
    cost: Tensor, gamma: float, lengths_x: Optional[Tensor] = None, lengths_y: Optional[Tensor] = None
) -> Tensor:
    """Batched Soft-DTW value R[b, n_b, m_b] (Cuturi & Blondel 2017), fp32, differentiable.

    R[0,0] = 0, R[i,0] = R[0,j] = inf, R[i,j] = C[i-1,j-1] + softmin_g(R[i-1,j-1], R[i-1,j], R[i,j-1]),
    softmin_g(a) = -g log sum exp(-a / g). Computed along anti-diagonals d = i + j (one loop step per diagonal,
    all sequences and cells of a diagonal at once). Cells past a sequence's lengths are never read by R[n_b, m_b];
    a sequence with a zero length gets 0.
    The gradient is the paper's backward recursion (its Algorithm 2), written as: dR[n,m]/dC[i,j] = E[i,j] with
    E[n,m] = 1 and E[p] = sum over the cells c that p feeds of E[c] * w_c(p), w_c = softmax(-R[preds of c] / g), the
    softmin's own weights kept from the forward pass. One reverse diagonal loop without an autograd graph (autograd
    through the forward loop recorded ~8 ops per diagonal): 1.4x faster forward + backward at 24 x 100 x 100 cells,
    2.3x at 24 x 200 x 200, on a 2-core CPU.
    Shapes: cost [B, N, M]; lengths [B] (default N and M). Returns [B].
    """
    if gamma <= 0:
        raise ValueError(f"soft_dtw: gamma must be > 0, got {gamma}")
    bsz, n, m = cost.shape
    device = cost.device
    lx = torch.full((bsz,), n, device=device, dtype=torch.long) if lengths_x is None else lengths_x.to(device).long()
    ly = torch.full((bsz,), m, device=device, dtype=torch.long) if lengths_y is None else lengths_y.to(device).long()
    if n == 0 or m == 0 or bsz == 0:
        return cost.new_zeros(bsz, dtype=torch.float32) + 0.0 * cost.float().sum()
    return _SoftDTW.apply(cost, float(gamma), lx, ly)


def _diagonal_cells(n: int, m: int, lx: Tensor, ly: Tensor):
    """For the anti-diagonal layout [D = n+m+1, n+1] (cell (d, i) holds R[i, d-i]): the cost row and column each
    cell reads and which cells are inside each sequence's [1..n_b] x [1..m_b]."""
    device = lx.device
    i = torch.arange(n + 1, device=device)  # row index of a cell on a diagonal
    d = torch.arange(n + m + 1, device=device)  # diagonal index d = i + j
    j = d[:, None] - i[None, :]  # [D, N+1]
    inside = (i[None, :] >= 1) & (j >= 1) & (j <= m)
    valid = inside[None] & (i[None, None, :] <= lx[:, None, None]) & (j[None] <= ly[:, None, None])  # [B, D, N+1]
    rows, cols = (i - 1).clamp(0, n - 1).expand_as(j), (j - 1).clamp(0, m - 1)
    return rows, cols, valid


class _SoftDTW(torch.autograd.Function):
    """Forward: the diagonal DP of `soft_dtw`, keeping the softmin weights. Backward: the reverse recursion."""

    @staticmethod
    def forward(ctx, cost: Tensor, gamma: float, lx: Tensor, ly: Tensor) -> Tensor:
        bsz, n, m = cost.shape
        rows, cols, valid = _diagonal_cells(n, m, lx, ly)
        skew = cost.detach().float()[:, rows, cols]  # [B, D, N+1]: skew[b, d, i] = C[b, i-1, d-i-1]
        last = int((lx + ly).max())
        # R on diagonal d lives in table[:, d, 1:]; column 0 is a permanent _BIG so that R[i-1, .] for i = 0 is
        # a plain slice (no concatenation per diagonal).
        table = skew.new_full((bsz, last + 1, n + 2), _BIG)
        table[:, 0, 1] = 0.0  # R[0, 0]
        weights = skew.new_zeros(bsz, last + 1, n + 1, 3)  # softmin weights over (up-left, up, left) per cell
        for dd in range(2, last + 1):
            stacked = torch.stack([table[:, dd - 2, :-1], table[:, dd - 1, :-1], table[:, dd - 1, 1:]], dim=-1)
            scaled = -stacked / gamma
            lse = torch.logsumexp(scaled, dim=-1)
            ok = valid[:, dd]
            table[:, dd, 1:] = torch.where(ok, skew[:, dd] - gamma * lse, _BIG)
            weights[:, dd] = torch.exp(scaled - lse[..., None]) * ok[..., None]
        b = torch.arange(bsz, device=cost.device)
        value = table[b, lx + ly, lx + 1]  # R[b, n_b, m_b]
        has_both = (lx > 0) & (ly > 0)
        ctx.save_for_backward(weights, valid, rows, cols, lx, ly, has_both)
        ctx.cost_shape, ctx.cost_dtype = cost.shape, cost.dtype
        return torch.where(has_both, value, torch.zeros_like(value))

    @staticmethod
    def backward(ctx, grad_value: Tensor):
        weights, valid, rows, cols, lx, ly, has_both = ctx.saved_tensors
        bsz, last1, width, _ = weights.shape
        grad = torch.zeros(bsz, last1, width, dtype=weights.dtype, device=weights.device)  # E on the diagonals
        b = torch.arange(bsz, device=weights.device)
        grad[b, lx + ly, lx] = grad_value.float() * has_both  # E[n_b, m_b]; last1 - 1 = max(lx + ly)
        for dd in range(last1 - 1, 1, -1):
            e = grad[:, dd]  # complete: every cell it feeds lies on a later diagonal
            grad[:, dd - 2, :-1] += e[:, 1:] * weights[:, dd, 1:, 0]  # to R[i-1, j-1]
            grad[:, dd - 1, :-1] += e[:, 1:] * weights[:, dd, 1:, 1]  # to R[i-1, j]
            grad[:, dd - 1] += e * weights[:, dd, :, 2]  # to R[i, j-1]
        grad = grad * valid[:, :last1]
        grad_cost = torch.zeros(ctx.cost_shape, dtype=grad.dtype, device=grad.device)
        # Each valid cell (d, i) is one cost entry (i-1, d-i-1); the invalid ones carry 0, so accumulating is safe.
        grad_cost.index_put_((b[:, None, None], rows[None, :last1], cols[None, :last1]), grad, accumulate=True)
        return grad_cost.to(ctx.cost_dtype), None, None, None


def cosine_cost(x: Tensor, y: Tensor) -> Tensor:
    """C_ij = 1 - cos(x_i, y_j), fp32. Shapes: x [B, N, d], y [B, M, d] -> [B, N, M]."""
    xn = F.normalize(x.float(), dim=-1, eps=1e-8)
    yn = F.normalize(y.float(), dim=-1, eps=1e-8)
    return 1.0 - xn @ yn.transpose(-1, -2)


def _pad_cost(cost: Tensor, size: int) -> Tensor:
    return F.pad(cost, (0, size - cost.shape[2], 0, size - cost.shape[1]))


def _normalized_soft_dtw_pairs(pairs, gamma, lengths_x, lengths_y, outside, penalty):
    """nDTW for several (x, y) pairs that share lengths and band, with ONE soft_dtw call (one diagonal loop)."""
    costs, lx, ly = [], [], []
    for x, y in pairs:
        cxy = cosine_cost(x, y)
        if outside is not None:
            cxy = cxy + penalty * outside.to(cxy.dtype)  # C~ = C + 1 outside the band
        costs += [cxy, cosine_cost(x, x), cosine_cost(y, y)]
        lx += [lengths_x, lengths_x, lengths_y]
        ly += [lengths_y, lengths_x, lengths_y]
    size = max(max(c.shape[1], c.shape[2]) for c in costs)
    values = soft_dtw(torch.cat([_pad_cost(c, size) for c in costs]), gamma, torch.cat(lx), torch.cat(ly))
    bsz = lengths_x.shape[0]
    values = values.view(len(pairs), 3, bsz)  # [pair, (xy, xx, yy), B]
    both = (lengths_x > 0) & (lengths_y > 0)  # an empty side leaves nothing to align: 0, not -0.5 sDTW(self)
    return [torch.where(both, v[0] - 0.5 * (v[1] + v[2]), torch.zeros_like(v[0])) for v in values]


def normalized_soft_dtw(
    x: Tensor,
    y: Tensor,
    gamma: float,
    lengths_x: Optional[Tensor] = None,
    lengths_y: Optional[Tensor] = None,
    outside_band: Optional[Tensor] = None,
    penalty: float = BAND_PENALTY,
) -> Tensor:
    """nDTW = sDTW(C~(X, Y)) - 0.5 [sDTW(C(X, X)) + sDTW(C(Y, Y))], C_ij = 1 - cos(x_i, y_j).

    C~ = C + penalty where ``outside_band`` (bool [B, N, M], see attention_band); no band: C~ = C.
    A sequence with an empty side gets 0.
    Shapes: x [B, N, d], y [B, M, d], lengths [B] (default N, M). Returns [B] fp32.
    """
    bsz = x.shape[0]
    lx = torch.full((bsz,), x.shape[1], device=x.device, dtype=torch.long) if lengths_x is None else lengths_x.long()
    ly = torch.full((bsz,), y.shape[1], device=x.device, dtype=torch.long) if lengths_y is None else lengths_y.long()
    return _normalized_soft_dtw_pairs([(x, y)], gamma, lx, ly, outside_band, penalty)[0]


@torch.no_grad()
def attention_band(
    attn: Tensor,
    lengths_x: Tensor,
    lengths_y: Tensor,
    alpha: float = BAND_ALPHA,
    base_width: float = BAND_BASE_WIDTH,
    entropy_scale: float = BAND_ENTROPY_SCALE,
) -> Tensor:
    """Cells OUTSIDE the band built from the CMA attention (rows: student positions i, columns: teacher positions j).

    Each row is renormalised over its m_b valid columns; with 0-based i, j:
    c_i = alpha sum_j j A_ij + (1 - alpha) i m_b / n_b;  w_i = base + entropy_scale H(A_i) (nats);
    outside_ij = |j - c_i| > w_i. The band is a hard mask, so it is detached.
    Shapes: attn [B, N, M], lengths [B]. Returns bool [B, N, M].
    """
    bsz, n, m = attn.shape
    lx, ly = lengths_x.long().to(attn.device), lengths_y.long().to(attn.device)
    col = torch.arange(m, device=attn.device, dtype=torch.float32)  # [M]
    row = torch.arange(n, device=attn.device, dtype=torch.float32)  # [N]
    a = torch.where(col[None, None, :] < ly[:, None, None], attn.float(), torch.zeros((), device=attn.device))
    a = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)  # [B, N, M]
    expected = (a * col).sum(-1)  # [B, N]
    ratio = ly.float() / lx.float().clamp_min(1.0)  # [B]
    centre = alpha * expected + (1.0 - alpha) * row[None, :] * ratio[:, None]  # [B, N]
    entropy = -torch.where(a > 0, a * a.log(), torch.zeros_like(a)).sum(-1)  # [B, N]
    width = base_width + entropy_scale * entropy  # [B, N]
    return (col[None, None, :] - centre[..., None]).abs() > width[..., None]


# --------------------------------------------------------------------------------------------------------
# Response positions
# --------------------------------------------------------------------------------------------------------


def leading_order(mask: Tensor):
    """The code's positions (dtw_positions="released"): the first n_b positions of each row, n_b = mask.sum(-1).

    Same return as response_order: (index [B, Nmax] long, lengths [B]); index[b, k] = k.
    """
    lengths = mask.sum(-1)
    nmax = int(lengths.max()) if mask.numel() else 0
    index = torch.arange(nmax, device=mask.device).expand(mask.shape[0], nmax)
    return index, lengths


def response_order(mask: Tensor):
    """Positions where ``mask`` is true, packed left in their original order.

    Returns (index [B, Nmax] long, lengths [B]); index[b, k] is the k-th response position of sequence b
    for k < lengths[b] (entries past the length point at other positions and must be ignored).
    """
    lengths = mask.sum(-1)
    order = torch.sort((~mask).to(torch.int32), dim=-1, stable=True).indices  # true positions first, in order
    nmax = int(lengths.max()) if mask.numel() else 0
    return order[:, :nmax], lengths


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, k]] for x [B, L, ...] and index [B, K] -> [B, K, ...] (differentiable)."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


# --------------------------------------------------------------------------------------------------------
# Entropy weights
# --------------------------------------------------------------------------------------------------------


def _entropy(logits: Tensor) -> Tensor:
    """H(softmax(z)) per row in nats, fp32. [M, V] -> [M].

    H = log S - sum_v e_v (z_v - m) / S with m = max_v z_v, e = exp(z - m), S = sum_v e_v: one exp over the row and
    no [M, V] log-probabilities (about 40% less time than -sum p log p over a 152k vocabulary). A -inf logit is
    clamped to the most negative finite float first, so its term is 0 * finite = 0, as 0 log 0 = 0.
    """
    z = logits.float()
    shifted = z - z.amax(-1, keepdim=True)
    shifted.clamp_(min=torch.finfo(torch.float32).min)
    e = shifted.exp()
    total = e.sum(-1)
    return total.log() - (e * shifted).sum(-1) / total


def rescale_per_sequence(weights: Tensor, seq_index: Tensor, n_seq: int) -> Tensor:
    """w_k * n_b / sum_{k in b} w_k, so each sequence's weights sum to its token count; all-zero sequences get 1.

    Shapes: weights [M] (the masked rows of a [B, L] batch, row-major), seq_index [M] (the b of each row).
    """
    w = weights.float()
    sums = torch.zeros(n_seq, device=w.device, dtype=w.dtype).index_add_(0, seq_index, w)  # [B]
    counts = torch.bincount(seq_index, minlength=n_seq).to(w.dtype)  # [B]
    scale = torch.where(sums > 0, counts / sums.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(sums))
    return torch.where(sums[seq_index] > 0, w * scale[seq_index], torch.ones_like(w))


@torch.no_grad()
def student_entropy_weights(student_logits: Tensor, t2s_logits: Tensor, seq_index: Tensor, n_seq: int,
                            form: str = "paper") -> Tensor:
    """Student-side KD_t2s weights, detached, per supervised row. H_i = H(softmax(Zs_i)), g_i = max_v softmax(Zt2s_i)_v:
    form "paper" (eq. 12): w_i = rescale(H_i g_i); form "released" (the code): w_i = rescale(H_i) g_i.
    rescale = rescale_per_sequence (each sequence's weights sum to its rows). Both distributions at temperature 1.
    Shapes: logits [M, Vs] (the supervised rows), seq_index [M]. Returns [M] fp32.
    """
    if form not in WEIGHT_FORMS:
        raise ValueError(f"unknown weight form {form!r}; expected one of: {', '.join(WEIGHT_FORMS)}")
    z = t2s_logits.float()
    confidence = torch.exp(z.amax(-1) - torch.logsumexp(z, dim=-1))  # max_v softmax(z)_v, no [M, V] softmax kept
    if form == "released":
        return rescale_per_sequence(_entropy(student_logits), seq_index, n_seq) * confidence
    return rescale_per_sequence(_entropy(student_logits) * confidence, seq_index, n_seq)


@torch.no_grad()
def teacher_confidence_weights(teacher_entropy: Tensor, vocab_size: int, seq_index: Tensor, n_seq: int) -> Tensor:
    """w_j = clamp(1 - H_j / log Vt, 0, 1), detached, rescaled per sequence; H_j in nats (temperature 1). [M]."""
    raw = (1.0 - teacher_entropy.float() / math.log(vocab_size)).clamp(0.0, 1.0)
    return rescale_per_sequence(raw, seq_index, n_seq)


# --------------------------------------------------------------------------------------------------------
# Per-row divergences
# --------------------------------------------------------------------------------------------------------


def divergence_rows(name: str, student_logits: Tensor, teacher_logits_: Tensor, tau: float = 2.0) -> Tensor:
    """Per-row D(student, teacher; tau) as in divergences.py (same formulas, fp32, no tau^2). [M, V] -> [M].

    Supports fkl, rkl, sfkl, srkl, js (the published DWA-KD uses srkl on the student side).
    """
    log_q = torch.log_softmax(student_logits.float() / tau, dim=-1)
    log_p = torch.log_softmax(teacher_logits_.float() / tau, dim=-1)
    if name == "fkl":
        return forward_kl_rows(log_q, log_p)
    if name == "rkl":
        return reverse_kl_rows(log_q, log_p)
    p, q = log_p.exp(), log_q.exp()
    if name == "sfkl":
        return _plogp_ratio(p, log_p, torch.log(SKEW_ALPHA * p + (1.0 - SKEW_ALPHA) * q))
    if name == "srkl":
        return _plogp_ratio(q, log_q, torch.log((1.0 - SKEW_ALPHA) * p + SKEW_ALPHA * q))
    if name == "js":
        log_m = torch.log(0.5 * (p + q))
        return 0.5 * (_plogp_ratio(p, log_p, log_m) + _plogp_ratio(q, log_q, log_m))
    raise ValueError(
        f"dwa-kd: divergence {name!r} has no per-token form here; expected one of: fkl, js, rkl, sfkl, srkl"
    )


# --------------------------------------------------------------------------------------------------------
# Chunked forward KL over the teacher vocabulary, per row
# --------------------------------------------------------------------------------------------------------


class _ChunkedFKLRows(torch.autograd.Function):
    """Per-row KL(softmax(Zt_i / tau) || softmax(hs_i Wt^T / tau)) built chunk by chunk, plus H(softmax(Zt_i)).

    Same scheme as dskd._ChunkedFKL, but the rows are returned, so any (detached) row weights can be applied by
    the caller: d KL_i / d hs_i = ((Q_i - P_i) / tau) Wt is kept as [M, dt] and backward multiplies it by the
    incoming per-row gradient. No [M, Vt] tensor outlives its chunk.
    """

    @staticmethod
    def forward(ctx, teacher_hidden, student_hidden, head_weight, head, tau, chunk_tokens):
        # teacher_hidden [M, dt], student_hidden [M, dt], head_weight [Vt, dt] fp32 (detached)
        need_grad = ctx.needs_input_grad[1]
        rows_n = student_hidden.shape[0]
        device = student_hidden.device
        kl = torch.zeros(rows_n, dtype=torch.float32, device=device)
        entropy = torch.zeros(rows_n, dtype=torch.float32, device=device)
        argmax = torch.empty(rows_n, dtype=torch.long, device=device)
        grad_hidden = torch.zeros_like(student_hidden, dtype=torch.float32) if need_grad else None
        for start in range(0, rows_n, chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            zt = teacher_logits(teacher_hidden[rows], head)  # [c, Vt]
            entropy[rows] = _entropy(zt)
            log_p = torch.log_softmax(zt / tau, dim=-1)  # [c, Vt]
            zs = student_hidden[rows].float() @ head_weight.T  # [c, Vt]
            argmax[rows] = zs.argmax(-1)
            log_q = torch.log_softmax(zs / tau, dim=-1)
            p = log_p.exp()
            kl[rows] = _plogp_ratio(p, log_p, log_q)  # forward_kl_rows, with P kept for the gradient
            if need_grad:  # Q - P in place: the [c, Vt] buffers are the cost of this loop on a CPU
                grad_hidden[rows] = log_q.exp_().sub_(p).div_(tau) @ head_weight  # [c, dt]
        ctx.save_for_backward(grad_hidden if need_grad else None)
        ctx.student_dtype = student_hidden.dtype
        ctx.mark_non_differentiable(argmax, entropy)
        return kl, argmax, entropy

    @staticmethod
    def backward(ctx, grad_kl, grad_argmax, grad_entropy):
        (grad_hidden,) = ctx.saved_tensors
        grad_student = None
        if grad_hidden is not None:
            grad_student = (grad_kl[:, None].float() * grad_hidden).to(ctx.student_dtype)
        return None, grad_student, None, None, None, None


def chunked_fkl_rows_over_head(
    teacher_hidden: Tensor,
    student_in_teacher_space: Tensor,
    head: TeacherHead,
    mask: Tensor,
    tau: float = 2.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
):
    """Per-row forward KL over the full teacher vocabulary at the masked positions, built in chunks of rows.

    KL_i = sum_v P_iv (log P_iv - log Q_iv), P = softmax(Zt / tau) with Zt = teacher_logits(Ht) (bias, scale,
    soft-cap), Q = softmax(Zs2t / tau), Zs2t = student_in_teacher_space @ Wt^T (no bias; Wt detached); fp32, no tau^2.
    rows.sum() equals dskd.chunked_fkl_over_head. Gradient flows into student_in_teacher_space only.
    Shapes: teacher_hidden [B, T, dt], student_in_teacher_space [B, T, dt], mask [B, T] bool.
    Returns (kl [M], argmax_v Zs2t [M], teacher entropy H(softmax(Zt)) at temperature 1 [M]), rows in mask order.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    keep = mask.reshape(-1).bool()
    dt = student_in_teacher_space.shape[-1]
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep].detach()  # [M, dt]
    hs = student_in_teacher_space.reshape(-1, dt)[keep]  # [M, dt]
    weight = head.weight.detach().float()  # [Vt, dt], frozen teacher head
    return _ChunkedFKLRows.apply(ht, hs, weight, head, tau, chunk_tokens)


# --------------------------------------------------------------------------------------------------------
# Projectors and output
# --------------------------------------------------------------------------------------------------------


class DWAProjectors(Projectors):
    """DSKD-CMA projectors (t2s, s2t, query) plus ``embed`` (dt -> ds) for the target-embedding Soft-DTW pair."""

    def __init__(self, ds: int, dt: int):
        super().__init__(ds, dt, with_query=True)
        self.embed = nn.Linear(dt, ds)


def build_dwa_projectors(ds: int, dt: int) -> DWAProjectors:
    """Projectors for --method dwa-kd (default nn.Linear init with bias, like the DSKD projectors)."""
    return DWAProjectors(ds, dt)


@dataclass
class DWAOutput(DSKDOutput):
    """DSKDOutput (kd_t2s and kd_s2t are the WEIGHTED sums, before the warm-up) plus the Soft-DTW terms.

    dtw = sum_b (nDTW_hidden,b + nDTW_embed,b) (times n_b with dtw_reduction="tokens") enters the loss times
    dtw_weight; dtw_hidden / dtw_embed are the plain per-sequence sums sum_b nDTW_b (for the log).
    t2s_kd_tokens = n_student (no accuracy mask).
    """

    dtw: Optional[Tensor] = None
    dtw_hidden: Optional[Tensor] = None
    dtw_embed: Optional[Tensor] = None
    n_sequences: Optional[Tensor] = None

    def log_dict(self) -> dict[str, float]:
        out = super().log_dict()
        for name in ("dtw", "dtw_hidden", "dtw_embed", "n_sequences"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value.detach())
        return out


# --------------------------------------------------------------------------------------------------------
# DWA-KD
# --------------------------------------------------------------------------------------------------------


def dwa_kd_loss(
    student_hidden: Tensor,
    student_logits: Tensor,
    labels: Tensor,
    input_ids: Tensor,
    student_embed: Tensor,
    student_head: Tensor,
    teacher_input_ids: Tensor,
    teacher_labels: Tensor,
    teacher_hidden: Tensor,
    teacher_embed: Tensor,
    teacher_head: TeacherHead,
    projectors: DWAProjectors,
    gamma: float = GAMMA_START,
    kd_scale: float = 1.0,
    divergence: str = "srkl",
    weights: str = "paper",
    dtw_inputs: str = "raw",
    dtw_positions: str = "response",
    dtw_reduction: str = "sequence",
    kd_warmup_terms: str = "t2s",
    teacher_attention_mask: Tensor | None = None,
    kd_rate: float = 0.5,
    dtw_weight: float = 0.2,
    tau: float = 2.0,
    teacher_temperature: float = 1.0,
    teacher_embed_scale: float = 1.0,
    band_alpha: float = BAND_ALPHA,
    band_base_width: float = BAND_BASE_WIDTH,
    band_entropy_scale: float = BAND_ENTROPY_SCALE,
    band_penalty: float = BAND_PENALTY,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ce_labels: Tensor | None = None,
) -> DWAOutput:
    """DWA-KD on DSKD-CMA (module docstring), all terms token sums.

    CMA steps 1-4 as dskd_cma_loss (teacher_attention_mask: the std positions, see cross_model_attention). Then,
    with ms / mt the supervised positions:
    CE_t2s = sum_ms CE(Zt2s, y);  KD_t2s = sum_ms w^s_i D(Zs_i, stopgrad(Zt2s_i) / T_t; tau);
    KD_s2t = sum_mt w^t_j FKL(Zt_j || Zs2t_j; tau) (full teacher vocabulary, chunked);
    DTW = sum_b [nDTW(Hs, t2s(Ht)) + nDTW(Es[y], embed(Et[yt]))]_b on response positions, banded by a_t2s;
    L = (1 - lambda) CE_s + lambda (kd_scale KD_t2s + KD_s2t + CE_t2s) + dtw_weight DTW.
    Options (module docstring; defaults = paper where explicit, else the code): weights "paper" | "released",
    dtw_inputs "raw" | "normalised", dtw_positions "response" | "released", dtw_reduction "sequence" | "tokens"
    (tokens: sum_b n_b nDTW_b), kd_warmup_terms "t2s" | "both" (both: kd_scale (KD_t2s + KD_s2t)).
    gamma: Soft-DTW temperature (dtw_gamma(step)); kd_scale: KD ramp (kd_warmup(step), 1.0 without ramp).
    Gradients: student (CE, KD_t2s, KD_s2t via Hs, DTW via Hs and Es rows of the targets), query (CE_t2s, KD_s2t),
    t2s (CE_t2s, hidden DTW), s2t (KD_s2t), embed (embedding DTW). Nothing into the teacher tensors or either head.
    Shapes: Hs [B,S,ds], Zs [B,S,Vs], y/x [B,S], Es/Ws [Vs,ds]; xt/yt [B,T], Ht [B,T,dt], Et [Vt,dt].
    """
    for name, value, choices in (("weights", weights, WEIGHT_FORMS), ("dtw_inputs", dtw_inputs, DTW_INPUTS),
                                 ("dtw_positions", dtw_positions, DTW_POSITIONS),
                                 ("dtw_reduction", dtw_reduction, DTW_REDUCTIONS),
                                 ("kd_warmup_terms", kd_warmup_terms, KD_WARMUP_TERMS)):
        if value not in choices:
            raise ValueError(f"dwa_kd_loss: unknown {name} {value!r}; expected one of: {', '.join(choices)}")
    bsz = labels.shape[0]
    ht = teacher_hidden.detach()  # the teacher is frozen (cached states)
    ce_student = cross_entropy_sum(student_logits, labels if ce_labels is None else ce_labels)
    cma = cross_model_attention(student_hidden, labels, input_ids, student_embed, teacher_input_ids, teacher_labels,
                                teacher_hidden, teacher_embed, projectors, teacher_embed_scale,
                                teacher_attention_mask=teacher_attention_mask)  # DSKD-CMA 1-4
    ms, mt, a_t2s, a_s2t = cma.student_mask, cma.teacher_mask, cma.a_t2s, cma.a_s2t

    # Teacher -> student, entropy-weighted (replaces the accuracy mask).
    ws = student_head.detach()  # the t2s branch must not train the student's head
    with fp32_region(a_t2s.device):  # fp32 weighted sums and vocabulary logits, as dskd_cma_loss
        ht2s = (a_t2s @ cma.v_t2s).to(ws.dtype)  # [B, S, ds]
        hs2t = a_s2t @ cma.v_s2t  # [B, T, dt]
        zt2s = ht2s[ms].float() @ ws.float().T  # [Ns, Vs]
    y = labels[ms]  # [Ns]
    ce_t2s = cross_entropy_sum(zt2s, y)
    zs_rows = student_logits[ms]  # [Ns, Vs]
    seq_s = ms.nonzero(as_tuple=True)[0]  # [Ns], row-major like boolean indexing
    w_s = student_entropy_weights(zs_rows, zt2s.detach(), seq_s, bsz, weights)  # [Ns], detached
    kd_t2s = (w_s * divergence_rows(divergence, zs_rows, zt2s.detach() / teacher_temperature, tau=tau)).sum()

    # Student -> teacher, full teacher vocabulary, chunked, weighted per row.
    kl_rows, s2t_argmax, t_entropy = chunked_fkl_rows_over_head(ht, hs2t, teacher_head, mt, tau, chunk_tokens)
    seq_t = mt.nonzero(as_tuple=True)[0]  # [Nt]
    w_t = teacher_confidence_weights(t_entropy, teacher_head.weight.shape[0], seq_t, bsz)  # [Nt], detached
    kd_s2t = (w_t * kl_rows).sum()

    # Soft-DTW on response positions (packed left; prompt and pad positions never enter), or the code's positions.
    order = response_order if dtw_positions == "response" else leading_order
    s_idx, n_s = order(ms)  # [B, Ns_max], [B]
    t_idx, n_t = order(mt)  # [B, Nt_max], [B]
    if dtw_inputs == "raw":  # the teacher's own states and target embeddings, as paper and code
        ht_in = ht  # [B, T, dt]
        yt = torch.where(mt, teacher_labels, torch.zeros_like(teacher_labels))
        e_in = teacher_embed.detach()[yt] * teacher_embed_scale  # [B, T, dt]
    else:
        ht_in, e_in = cma.ht_norm, cma.e_tg  # the CMA's std-normalised tensors
    x_hidden = gather_rows(student_hidden, s_idx)  # [B, Ns_max, ds]
    y_hidden = _apply(projectors.t2s, gather_rows(ht_in, t_idx))  # [B, Nt_max, ds], shared t2s projector
    targets = torch.where(ms, labels, torch.zeros_like(labels))
    x_embed = gather_rows(student_embed[targets], s_idx)  # [B, Ns_max, ds], NOT detached: trains Es rows
    y_embed = _apply(projectors.embed, gather_rows(e_in, t_idx))  # [B, Nt_max, ds]
    attn = gather_rows(a_t2s.detach(), s_idx)  # [B, Ns_max, T]
    attn = attn.gather(2, t_idx[:, None, :].expand(-1, attn.shape[1], -1))  # [B, Ns_max, Nt_max]
    outside = attention_band(attn, n_s, n_t, band_alpha, band_base_width, band_entropy_scale)
    nd_hidden, nd_embed = _normalized_soft_dtw_pairs(
        [(x_hidden, y_hidden), (x_embed, y_embed)], gamma, n_s, n_t, outside, band_penalty
    )
    per_sequence = nd_hidden + nd_embed  # [B]
    dtw = (per_sequence if dtw_reduction == "sequence" else n_s.float() * per_sequence).sum()

    ramped = kd_scale * (kd_t2s + kd_s2t) if kd_warmup_terms == "both" else kd_scale * kd_t2s + kd_s2t
    loss = (1.0 - kd_rate) * ce_student + kd_rate * (ramped + ce_t2s) + dtw_weight * dtw

    with torch.no_grad():
        t2s_correct = (zt2s.argmax(-1) == y).sum()
        s2t_correct = (s2t_argmax == teacher_labels[mt]).sum()

    return DWAOutput(
        loss=loss,
        ce_student=ce_student,
        ce_t2s=ce_t2s,
        kd_t2s=kd_t2s,
        kd_s2t=kd_s2t,
        n_student=ms.sum(),
        n_teacher=mt.sum(),
        t2s_correct=t2s_correct,
        s2t_correct=s2t_correct,
        t2s_kd_tokens=ms.sum(),
        attention_entropy=cma.attention_entropy(),
        queries=cma.queries,
        keys=cma.keys,
        student_mask=ms,
        teacher_mask=mt,
        dtw=dtw,
        dtw_hidden=nd_hidden.sum(),
        dtw_embed=nd_embed.sum(),
        n_sequences=torch.tensor(bsz, device=labels.device),
    )
