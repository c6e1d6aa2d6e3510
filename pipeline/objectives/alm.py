"""ALM, approximate likelihood matching across tokenizers (Minixhofer, Vulić & Ponti 2025, "Universal Cross-Tokenizer
Distillation via Approximate Likelihood Matching", arXiv 2503.20083), as its authors define and release it
(tokenkit: `training/losses.py` `compute_alm_loss`, defaults of `scripts/cross_tokenizer_distill.py`).

Both tokenizations of a response are cut into chunks: the shortest stretches of text that end on a token end of
BOTH sides (pipeline/probes.chunk_ids; tokenkit's "unconstrained" chunks). Chunk c holds the student label
positions S_c and the teacher label positions T_c, and each model gives the chunk a likelihood along the gold path:

    log pT(c) = sum_{i in T_c} log softmax(z_t,i)[yt_i],     log pS(c) = sum_{j in S_c} log softmax(z_s,j)[ys_j]

Debiasing (`debias`, tokenkit's alm_mode):
- "space" (append_space): each chunk's likelihood times the model's probability that the token after the chunk
  starts a new word, sigma(c) = sum_{v in W} softmax(z at the position after c's last token)_v, W the tokens whose
  text starts with a space, tab or newline, or special ones (alignment.word_start_mask). A chunk likelihood alone
  is biased by how each tokenizer cuts what FOLLOWS ("Ġapple" vs "Ġap|ple": the teacher's p("Ġap") counts every
  word starting with "ap"); closing the chunk on a word start removes that bias. The text's end counts as a word
  start (sigma = 1 for a chunk with no position after it).
- "space+merge" (merge_by_space_prob+append_space, the published default): first, consecutive chunks are merged
  until one ends where the teacher's sigma > `merge_threshold` (published 0.1): a merged chunk's likelihood is
  the sum of its chunks' and its sigma that of its last chunk.
- "none": the plain form (tokenkit's PyTorch notebook).

Distance: the two likelihoods as Bernoulli probabilities at the binarisation temperature tau (published 100; at
tau 100 the term compares chunk NLLs nearly scale-free: a chunk of probability 1e-4 still pulls), by binary
cross-entropy (tokenkit's "binary_ce"; the binary KL minus the teacher's binary entropy: the same gradient):

    a = exp(log pT(c) / tau - eps),  b = exp(log pS(c) / tau - eps),  eps = 1e-6
    BCE(c) = -[a log b + (1 - a) log(1 - b)]
    ALM = mean over the batch's chunks of BCE(c)                 (tokenkit: numerator and denominator "chunk_count")

The released code divides the merged chunks' sum by a count merged twice (its "NB: cant merge global chunks"),
a batch-dependent scale of the loss (x1.6 on a random batch); `mean_over="released"` (--alm-mean released)
reproduces it, the default is the mean over the chunks the loss sums.

Gradient flows into the student's logits only (the teacher's side comes from the store, detached).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dskd_pipe.pipeline.config import DEBIAS_CHOICES, MEAN_CHOICES
from dskd_pipe.pipeline.objectives.dskd import DEFAULT_CHUNK_TOKENS, TeacherHead, teacher_logits


EPSILON = 1e-6  # tokenkit's compute_alm_loss: subtracted after the temperature so that log(1 - b) stays finite


@dataclass
class AlmOutput:
    """loss: the mean BCE over the micro-batch's (merged) chunks, fp32; chunks: how many."""

    loss: Tensor
    chunks: Tensor


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012: expm1 near 0, log1p far from it)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_cross_entropy(log_a: Tensor, log_b: Tensor, tau: float) -> Tensor:
    """-[a log b + (1 - a) log(1 - b)] with a = exp(log_a / tau - eps), b = exp(log_b / tau - eps), elementwise."""
    log_a = log_a.float() / tau - EPSILON
    log_b = log_b.float() / tau - EPSILON
    return -(log_a.exp() * log_b + (-torch.expm1(log_a)) * log1mexp(log_b))


def label_log_probs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(log softmax(z)[label], logsumexp(z)) per row, fp32 from one copy of the rows: logits [N, V], labels [N]
    (any id where the row has no label) -> ([N], [N])."""
    z = logits.float()
    norm = torch.logsumexp(z, dim=-1)
    return z.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1) - norm, norm


def word_start_log_probs(logits: Tensor, word_start: Tensor | None, norm: Tensor) -> Tensor:
    """log sum_{v in word_start} softmax(z)_v per row, fp32 [N]: logits [N, V], word_start bool [V] (None: zeros),
    norm = logsumexp(z) [N] (label_log_probs)."""
    if word_start is None:
        return torch.zeros_like(norm)
    return torch.logsumexp(logits[:, word_start.to(logits.device)].float(), dim=-1) - norm


def teacher_position_log_probs(hidden: Tensor, labels: Tensor, head: TeacherHead, word_start: Tensor | None = None,
                               chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[Tensor, Tensor]:
    """(gold, word-start) log-probabilities of the teacher's rows rebuilt from its hidden states and head, detached:
    hidden [N, dt], labels [N] -> ([N], [N]). At most chunk_tokens rows of [*, Vt] logits exist at once."""
    gold, start = [], []
    for i in range(0, hidden.shape[0], chunk_tokens):
        z = teacher_logits(hidden[i : i + chunk_tokens].detach(), head)  # [c, Vt]
        g, norm = label_log_probs(z, labels[i : i + chunk_tokens].to(z.device))
        gold.append(g)
        start.append(word_start_log_probs(z, word_start, norm))
    if not gold:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(gold), torch.cat(start)


def _chunk_sums(chunk: Tensor, values: Tensor, n_chunks: int) -> tuple[Tensor, Tensor]:
    """(sum of `values` per chunk [B * n_chunks], last position of each chunk [B * n_chunks], -1 where empty):
    chunk [B, W] ids (-1 outside), values [B, W]."""
    batch, width = chunk.shape
    inside = chunk >= 0
    flat = (chunk + torch.arange(batch, device=chunk.device)[:, None] * n_chunks)[inside]  # [R]
    sums = torch.zeros(batch * n_chunks, dtype=torch.float32, device=values.device).index_add(0, flat, values[inside])
    pos = torch.arange(width, device=chunk.device).expand(batch, width)[inside]
    last = torch.full((batch * n_chunks,), -1, dtype=torch.long, device=chunk.device)
    last = last.scatter_reduce(0, flat, pos, reduce="amax")
    return sums, last


def _after_chunk(word_start_lp: Tensor, last: Tensor, labels: Tensor, n_chunks: int) -> Tensor:
    """sigma(c) in log space per chunk [B * n_chunks]: the word-start log-probability at the position after the
    chunk's last one; 0 (probability 1: the text ends) where that position has no label or does not exist."""
    batch, width = labels.shape
    nxt = last + 1  # [B * C]
    rows = torch.arange(batch, device=last.device).repeat_interleave(n_chunks)
    ok = (last >= 0) & (nxt < width)
    safe = nxt.clamp(max=width - 1)
    ok = ok & (labels[rows, safe] != -100)
    return torch.where(ok, word_start_lp[rows, safe], torch.zeros_like(word_start_lp[rows, safe]))


def _merge_groups(teacher_sigma: Tensor, exists: Tensor, n_chunks: int, threshold: float) -> tuple[Tensor, Tensor]:
    """(group id of every chunk [B * n_chunks], the released denominator) for merge_by_space_prob: a group runs up
    to and including the next chunk whose teacher sigma exceeds `threshold`; ids are per example, offset by
    b * n_chunks. The released code divides by the groups' count after merging it a SECOND time ("NB: cant merge
    global chunks"): with G_b groups in example b, the group index of chunk slot G_b - 1, plus one."""
    batch = exists.numel() // n_chunks
    closes = ((teacher_sigma.exp() > threshold) & exists).view(batch, n_chunks).long()
    group = torch.cumsum(closes, dim=1) - closes  # closing chunks before this one
    real = exists.view(batch, n_chunks)
    groups = torch.where(real, group + 1, torch.zeros_like(group)).amax(dim=1)  # G_b
    released = torch.where(groups > 0, group.gather(1, (groups - 1).clamp_min(0)[:, None]).squeeze(1) + 1,
                           torch.zeros_like(groups)).sum()
    return (group + torch.arange(batch, device=group.device)[:, None] * n_chunks).view(-1), released


def alm_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_hidden: Tensor,
    teacher_labels: Tensor,
    teacher_head: TeacherHead,
    student_chunk: Tensor,
    teacher_chunk: Tensor,
    tau: float = 100.0,
    debias: str = "space+merge",
    student_word_start: Tensor | None = None,
    teacher_word_start: Tensor | None = None,
    merge_threshold: float = 0.1,
    mean_over: str = "chunks",
    student_label_log_probs: tuple[Tensor, Tensor] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> AlmOutput:
    """ALM of one micro-batch (module docstring): the mean BCE over its chunks.

    Shapes: student_logits [B, S, Vs], labels [B, S] (-100 outside the response), teacher_hidden [B, T, dt],
    teacher_labels [B, T]; student_chunk [B, S'] / teacher_chunk [B, T'] (S' <= S, T' <= T): the chunk ordinal of
    each label position, -1 outside (probes.chunk_ids, padded with -1). word_start: bool [Vs] / [Vt]
    (alignment.word_start_mask), needed unless debias is "none". mean_over: "chunks" (the mean over the merged
    chunks) | "released" (space+merge only: tokenkit's denominator, the count merged twice; `_merge_groups`).
    student_label_log_probs: label_log_probs of the student's rows with a label (labels != -100), when the caller
    has them already (its CE uses the same numbers): the student's [Ns, Vs] logits then go to fp32 once.
    """
    if debias not in DEBIAS_CHOICES:
        raise ValueError(f"ALM debias {debias!r}: choose one of {', '.join(DEBIAS_CHOICES)}.")
    if mean_over not in MEAN_CHOICES:
        raise ValueError(f"ALM mean_over {mean_over!r}: choose one of {', '.join(MEAN_CHOICES)}.")
    spaced = debias != "none"
    if spaced and (student_word_start is None or teacher_word_start is None):
        raise ValueError(f"ALM debias {debias!r} needs both word_start masks (alignment.word_start_mask).")
    device = student_logits.device
    width_s, width_t = student_chunk.shape[1], teacher_chunk.shape[1]
    student_chunk, teacher_chunk = student_chunk.to(device), teacher_chunk.to(device)
    n_chunks = int(max(student_chunk.max(), teacher_chunk.max(), -1)) + 1
    if n_chunks == 0:
        zero = student_logits.sum() * 0.0
        return AlmOutput(loss=zero.float(), chunks=torch.zeros((), device=device))
    batch = labels.shape[0]

    # Per label position: gold log-prob (on chunk positions) and word-start log-prob (on every labelled position:
    # the one after a chunk's last may lie in the next chunk).
    labelled = labels != -100  # [B, S]
    zs = student_logits[labelled]  # [Ns, Vs]
    g, norm = label_log_probs(zs, labels[labelled]) if student_label_log_probs is None else student_label_log_probs
    st = word_start_log_probs(zs, student_word_start if spaced else None, norm)
    gold_s = torch.zeros(labels.shape, dtype=torch.float32, device=device).masked_scatter(labelled, g)
    start_s = torch.zeros_like(gold_s).masked_scatter(labelled, st)
    s_lab, s_rows = labels[:, :width_s], labelled[:, :width_s]  # [B, S']
    gold_s, start_s = gold_s[:, :width_s], start_s[:, :width_s]
    t_lab = teacher_labels[:, :width_t].to(device)
    t_rows = t_lab != -100
    g, st = teacher_position_log_probs(teacher_hidden[:, :width_t][t_rows.to(teacher_hidden.device)],
                                       teacher_labels[:, :width_t][t_rows.to(teacher_labels.device)], teacher_head,
                                       teacher_word_start if spaced else None, chunk_tokens)
    gold_t = torch.zeros(batch, width_t, dtype=torch.float32, device=device).masked_scatter(t_rows, g.to(device))
    start_t = torch.zeros_like(gold_t).masked_scatter(t_rows, st.to(device))

    log_ps, last_s = _chunk_sums(student_chunk.masked_fill(~s_rows, -1), gold_s, n_chunks)  # [B * C]
    log_pt, last_t = _chunk_sums(teacher_chunk.masked_fill(~t_rows, -1), gold_t, n_chunks)
    exists = (last_s >= 0) & (last_t >= 0)
    if spaced:
        sigma_s = _after_chunk(start_s, last_s, s_lab, n_chunks)
        sigma_t = _after_chunk(start_t, last_t, t_lab, n_chunks)
        if debias == "space+merge":
            group, released_count = _merge_groups(sigma_t, exists, n_chunks, merge_threshold)
            size = batch * n_chunks
            keep = exists.float()
            log_ps = torch.zeros(size, device=device).index_add(0, group, log_ps * keep)
            log_pt = torch.zeros(size, device=device).index_add(0, group, log_pt * keep)
            # a group's sigma is its last chunk's: the chunk of the group with the highest index
            index = torch.arange(size, device=device)
            last_chunk = torch.full((size,), -1, dtype=torch.long, device=device).scatter_reduce(
                0, group, torch.where(exists, index, torch.full_like(index, -1)), reduce="amax")
            grouped = last_chunk >= 0
            sigma_s = torch.where(grouped, sigma_s[last_chunk.clamp_min(0)], torch.zeros_like(sigma_s))
            sigma_t = torch.where(grouped, sigma_t[last_chunk.clamp_min(0)], torch.zeros_like(sigma_t))
            exists = grouped
        log_ps = log_ps + sigma_s
        log_pt = log_pt + sigma_t
    log_pt = log_pt[exists].clamp(max=0.0)  # tokenkit clips the aligned log-probs at 0
    log_ps = log_ps[exists].clamp(max=0.0)
    bce = binary_cross_entropy(log_pt, log_ps, tau)
    count = exists.sum().float()
    if mean_over == "released" and debias == "space+merge":
        count = released_count.float()
    return AlmOutput(loss=bce.sum() / count.clamp_min(1.0), chunks=exists.sum().float())
