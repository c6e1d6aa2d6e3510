"""Chunk likelihood matching across tokenizers: the ALM objective (approximate likelihood matching; Minixhofer,
Vulić & Ponti 2025, "Universal Cross-Tokenizer Distillation via Approximate Likelihood Matching"), as built here.

Both tokenizations of a response are cut into chunks: the shortest stretches of text that end on a token end of
BOTH sides (pipeline/probes.chunk_alignment, from the character offsets; most chunks are one token on each side).
Chunk c holds the student label positions S_c and the teacher label positions T_c, and each model gives the chunk
a likelihood along the gold path:

    log pT(c) = sum_{i in T_c} log softmax(z_t,i)[yt_i],     log pS(c) = sum_{j in S_c} log softmax(z_s,j)[ys_j]

and the two are matched as the probabilities of a Bernoulli event, at temperature tau:

    ALM = sum_c  a (log a - log b) + (1 - a) (log(1 - a) - log(1 - b)),   a = pT(c)^(1/tau),  b = pS(c)^(1/tau)
    L   = (1 - lambda) CE_s + lambda ALM          (token sums, like every loss here; lambda = kd_rate)

What it carries that a token map cannot: the teacher's probability of a whole word wherever the two tokenizers
cut the word differently (the teacher's "Ġap" + "ple" against the student's "apple"): the product over the chunk
needs only the teacher's states on the gold path, which is what the store holds. A chunk whose probability the
student already gives exactly as the teacher adds nothing; above the teacher's it pulls the student down, which
CE never does. Gradient flows into the student's logits only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum
from dskd_pipe.pipeline.objectives.dskd import DEFAULT_CHUNK_TOKENS, TeacherHead, teacher_logits

# log pS(c) / tau is capped just below 0 so that log(1 - b) stays finite when a chunk is certain in fp32
# (its gradient is then 0, as for any saturated probability).
LOG_PROB_CAP = -1e-6


@dataclass
class AlmOutput:
    """Loss terms (token sums, fp32) of one micro-batch: loss = (1 - lambda) ce_student + lambda kd."""

    loss: Tensor
    ce_student: Tensor
    kd: Tensor
    chunks: Tensor  # chunks matched (with tokens on both sides)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012: expm1 near 0, log1p far from it)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _label_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] per row, fp32: logits [N, V], labels [N] -> [N]."""
    z = logits.float()
    return z.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


def gold_log_probs(hidden: Tensor, labels: Tensor, head: TeacherHead,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """The teacher's log-probability of each gold label, fp32, detached: hidden [N, dt], labels [N] -> [N].
    At most chunk_tokens rows of [*, Vt] logits exist at once."""
    out = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        z = teacher_logits(hidden[start : start + chunk_tokens].detach(), head)  # [c, Vt]
        out.append(_label_log_probs(z, labels[start : start + chunk_tokens].to(z.device)))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def chunk_likelihood_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_hidden: Tensor,
    teacher_labels: Tensor,
    teacher_head: TeacherHead,
    chunks: Tensor,
    kd_rate: float = 0.5,
    tau: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ce_labels: Tensor | None = None,
) -> AlmOutput:
    """ALM (module docstring), summed over the chunks of the batch.

    Shapes: student_logits [B, S, Vs], labels [B, S] (-100 outside the response), teacher_hidden [B, T, dt],
    teacher_labels [B, T], chunks bool [B, S', T'] (methods.chunk_extras: True where student label position j and
    teacher label position i lie in the same chunk; S' <= S, T' <= T, padded with False).
    """
    batch, width_s, width_t = chunks.shape
    device = student_logits.device
    chunks = chunks.to(device)
    # log-probabilities of the gold tokens on both sides, 0 where there is no label. The student's also give its
    # CE (the negated sum), so its [Ns, Vs] logits go to fp32 once.
    labelled = labels != -100  # [B, S]
    gold_s = _label_log_probs(student_logits[labelled], labels[labelled])  # [Ns]
    ce_student = -gold_s.sum() if ce_labels is None else cross_entropy_sum(student_logits, ce_labels)
    ls_all = torch.zeros(labels.shape, dtype=torch.float32, device=device)
    ls_all[labelled] = gold_s
    ms, ls = labelled[:, :width_s], ls_all[:, :width_s]  # [B, S']
    mt = teacher_labels[:, :width_t] != -100  # [B, T']
    lt = torch.zeros(batch, width_t, dtype=torch.float32, device=device)
    lt[mt] = gold_log_probs(teacher_hidden[:, :width_t][mt], teacher_labels[:, :width_t][mt], teacher_head,
                            chunk_tokens).to(device)

    # A chunk is named by its first teacher position; every student row of a chunk has the same teacher set.
    rows = chunks.any(-1) & ms  # [B, S'] student rows inside a chunk
    first = chunks.to(torch.uint8).argmax(-1)  # [B, S']
    chunk_id = (first + torch.arange(batch, device=device)[:, None] * width_t)[rows]  # [R]
    log_ps = torch.zeros(batch * width_t, dtype=torch.float32, device=device).index_add(0, chunk_id, ls[rows])
    log_pt_row = (chunks.float() * lt[:, None, :]).sum(-1)[rows]  # [R]: the teacher's log pT of the row's chunk
    log_pt = torch.zeros(batch * width_t, dtype=torch.float32, device=device).index_copy(0, chunk_id, log_pt_row)
    named = torch.zeros(batch * width_t, dtype=torch.bool, device=device)
    named[chunk_id] = True

    log_a = (log_pt[named] / tau).clamp(max=LOG_PROB_CAP)
    log_b = (log_ps[named] / tau).clamp(max=LOG_PROB_CAP)
    a = log_a.exp()
    alm = (a * (log_a - log_b) + (1.0 - a) * (log1mexp(log_a) - log1mexp(log_b))).sum()
    return AlmOutput(loss=(1.0 - kd_rate) * ce_student + kd_rate * alm, ce_student=ce_student, kd=alm,
                     chunks=named.sum())
