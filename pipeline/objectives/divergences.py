"""Token-level divergences between a student and a teacher distribution.

Every function here has the signature ``f(student_logits, teacher_logits, mask, tau=2.0) -> Tensor`` and
returns the SUM over the positions where ``mask`` is true (the stage divides the step total once by its
supervised student tokens, spec/dskd.md "Reduction"). Per position, with

    P = softmax(z_t / tau)   (teacher),   Q = softmax(z_s / tau)   (student),

computed in fp32, and no tau^2 factor. Shapes: logits [N, V] (or [..., V] with mask [...]), mask bool.
Ref: DSKD, arXiv 2406.17328; AKL, Wu et al. 2024, arXiv 2404.02657.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

SKEW_ALPHA = 0.1  # a in the skewed KLs (DSKD default)
AKL_HEAD_MASS = 0.5  # mu in AKL: the head holds the most probable tokens up to this teacher mass


def _masked_log_probs(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, tau: float):
    """Keep the masked rows and return (log Q, log P), fp32, each [M, V]."""
    vocab = student_logits.shape[-1]
    keep = mask.reshape(-1).bool()
    zs = student_logits.reshape(-1, vocab)[keep].float()  # [M, V]
    zt = teacher_logits.reshape(-1, teacher_logits.shape[-1])[keep].float()  # [M, V]
    return F.log_softmax(zs / tau, dim=-1), F.log_softmax(zt / tau, dim=-1)


def _plogp_ratio(p: Tensor, log_p: Tensor, log_r: Tensor) -> Tensor:
    """sum_v p_v (log p_v - log r_v) per row, with 0 log 0 = 0 (zero-probability tokens add nothing)."""
    terms = torch.where(p > 0, p * (log_p - log_r), 0.0)  # a scalar 0: no [M, V] zeros tensor to allocate
    return terms.sum(-1)  # [M]


def forward_kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    """KL(P || Q) = sum_v P_v (log P_v - log Q_v) per row. [M, V] -> [M]."""
    return _plogp_ratio(log_p.exp(), log_p, log_q)


def reverse_kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    """KL(Q || P) = sum_v Q_v (log Q_v - log P_v) per row. [M, V] -> [M]."""
    return _plogp_ratio(log_q.exp(), log_q, log_p)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, tau: float = 2.0) -> Tensor:
    """KL(P || Q) summed over supervised positions.

    KL = sum_v P_v (log P_v - log Q_v), P = softmax(z_t / tau), Q = softmax(z_s / tau), fp32, no tau^2.
    Shapes: logits [N, V], mask [N] bool. Returns the sum; the caller normalises.
    """
    log_q, log_p = _masked_log_probs(student_logits, teacher_logits, mask, tau)
    return forward_kl_rows(log_q, log_p).sum()


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, tau: float = 2.0) -> Tensor:
    """KL(Q || P) summed over supervised positions.

    RKL = sum_v Q_v (log Q_v - log P_v), fp32, no tau^2. Shapes: logits [N, V], mask [N] bool.
    """
    log_q, log_p = _masked_log_probs(student_logits, teacher_logits, mask, tau)
    return reverse_kl_rows(log_q, log_p).sum()


def skewed_forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, tau: float = 2.0, alpha: float = SKEW_ALPHA
) -> Tensor:
    """Skewed forward KL summed over supervised positions.

    SFKL = sum_v P_v (log P_v - log(a P_v + (1 - a) Q_v)), a = 0.1, fp32, no tau^2.
    Shapes: logits [N, V], mask [N] bool.
    """
    log_q, log_p = _masked_log_probs(student_logits, teacher_logits, mask, tau)
    p = log_p.exp()
    log_mix = torch.log(alpha * p + (1.0 - alpha) * log_q.exp())  # [M, V]
    return _plogp_ratio(p, log_p, log_mix).sum()


def skewed_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, tau: float = 2.0, alpha: float = SKEW_ALPHA
) -> Tensor:
    """Skewed reverse KL summed over supervised positions.

    SRKL = sum_v Q_v (log Q_v - log((1 - a) P_v + a Q_v)), a = 0.1, fp32, no tau^2.
    Shapes: logits [N, V], mask [N] bool.
    """
    log_q, log_p = _masked_log_probs(student_logits, teacher_logits, mask, tau)
    q = log_q.exp()
    log_mix = torch.log((1.0 - alpha) * log_p.exp() + alpha * q)  # [M, V]
    return _plogp_ratio(q, log_q, log_mix).sum()


def js(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, tau: float = 2.0) -> Tensor:
    """Jensen-Shannon divergence summed over supervised positions.

    JS = 0.5 [sum_v P_v (log P_v - log M_v) + sum_v Q_v (log Q_v - log M_v)], M = (P + Q) / 2, fp32, no tau^2.
    Shapes: logits [N, V], mask [N] bool.
    """
    log_q, log_p = _masked_log_probs(student_logits, teacher_logits, mask, tau)
    p, q = log_p.exp(), log_q.exp()
    log_m = torch.log(0.5 * (p + q))  # [M, V]
    return 0.5 * (_plogp_ratio(p, log_p, log_m) + _plogp_ratio(q, log_q, log_m)).sum()


def adaptive_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, tau: float = 2.0, head_mass: float = AKL_HEAD_MASS
) -> Tensor:
    """Adaptive KL (AKL, Wu et al. 2024, arXiv 2404.02657) summed over supervised positions.

    Sort the teacher probabilities in ascending order; the tail is the prefix whose cumulative teacher mass
    is < mu (= 0.5), the head is the rest (the most probable tokens). With the per-token gaps |P_v - Q_v|:

        g_head = sum_{v in head} |P_v - Q_v|,   g_tail = sum_{v in tail} |P_v - Q_v|   (both detached)
        AKL    = g_head / (g_head + g_tail) * FKL + g_tail / (g_head + g_tail) * RKL

    P and Q use the same tau as the KLs (fp32, no tau^2). Shapes: logits [N, V], mask [N] bool.
    """
    log_q, log_p = _masked_log_probs(student_logits, teacher_logits, mask, tau)
    with torch.no_grad():  # the mixing weights are constants (detached in the AKL reference code)
        p_sorted, order = log_p.exp().sort(dim=-1)  # ascending, [M, V]
        q_sorted = log_q.exp().gather(-1, order)  # [M, V]
        gap = (p_sorted - q_sorted).abs()
        tail = torch.cumsum(p_sorted, dim=-1) < head_mass  # [M, V] bool
        g_tail = (gap * tail).sum(-1)  # [M]
        g_head = (gap * ~tail).sum(-1)  # [M]
        total = (g_head + g_tail).clamp_min(torch.finfo(torch.float32).tiny)  # P == Q exactly: both KLs are 0
        w_head, w_tail = g_head / total, g_tail / total
    return (w_head * forward_kl_rows(log_q, log_p) + w_tail * reverse_kl_rows(log_q, log_p)).sum()


def tvd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, tau: float = 2.0) -> Tensor:
    """Total variation distance summed over supervised positions.

    TVD = 0.5 sum_v |P_v - Q_v|, fp32. Shapes: logits [N, V], mask [N] bool.
    """
    log_q, log_p = _masked_log_probs(student_logits, teacher_logits, mask, tau)
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum()


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy summed over the positions with label != -100, fp32.

    CE = sum_{i: y_i != -100} -log softmax(z_i)[y_i]. Shapes: logits [..., V], labels [...] (already aligned:
    labels[i] is the target of logits[i], no shift here). Only the labelled rows are taken to fp32: prompt and pad
    rows would double the [rows, V] buffers that a large vocabulary makes the biggest of the step.
    """
    labelled = labels != -100
    return F.cross_entropy(logits[labelled].float(), labels[labelled], reduction="sum")


Divergence = Callable[..., Tensor]

DIVERGENCES: dict[str, Divergence] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "sfkl": skewed_forward_kl,
    "srkl": skewed_reverse_kl,
    "js": js,
    "akl": adaptive_kl,
    "tvd": tvd,
}


def get_divergence(name: str) -> Divergence:
    """Look a divergence up by its config name; unknown names list the known ones."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; expected one of: {', '.join(sorted(DIVERGENCES))}")
    return DIVERGENCES[name]
