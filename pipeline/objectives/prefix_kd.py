"""prefix-kd: the teacher's full next-token distribution carried across tokenizers, as a distribution over the next
characters, matched at every boundary both tokenizations share.

Wherever both tokenizations end a token at the same point of the text (a chunk boundary, pipeline/probes.chunk_ids,
whitespace aside), both models predict what text comes next. Sum each model's next-token probabilities by the
text the token starts with (alignment.next_text_events: markers decoded, whitespace dropped, cut to the first
`chars` bytes, onto the cuts both vocabularies produce; EOS is the event "the text ends"):

    qT(e) = sum_{v: ev_t(v) = e} softmax(z_t)_v / Zt,   qS(e) = sum_{u: ev_s(u) = e} softmax(z_s)_u / Zs
    (Zt, Zs: the mass on tokens that belong to an event; whitespace-only tokens and non-EOS specials are left out)
    PT = softmax(log qT / tau),  PS = softmax(log qS / tau)       (temper "events", the default)

    prefix-kd = sum over shared boundaries k of KL(PT_k || PS_k) = sum_k sum_e PT_k(e) (log PT_k(e) - log PS_k(e))

The temperature acts on the events' distribution. With temper "tokens" it divides the token logits before the sums
instead (qT from softmax(z_t / tau)); then the student can raise an event's tempered mass by spreading its own mass
over the many tokens of that event rather than by matching the teacher, and on the quality benchmark's dev set it
did worse (BENCHMARKS.md "Closing the gap").

With chars = 1 both sides are exact: every token's text has a first byte. What it carries that ALM cannot: ALM
scores the gold path only; here the teacher's spread over the answers it did NOT see written ("sunny" 0.6,
"rainy" 0.3, "cloudy" 0.1 after "The weather is") reaches the student whatever its tokenizer, since both
distributions are over the same events. The store holds exactly what it needs (hidden states + head: the full
distribution at every position); a top-k cache cannot give the sums. Cost: one [N, V] -> [N, C] scatter per side
over the N boundary positions (N <= the response tokens), about ALM's.

Boundary positions: in each chunk, the first label position (on each side) whose label token is not whitespace
only: after a newline token ("Ċ") the teacher predicts the next word from the position after it, as the
WordPiece student (which has no newline token) does from its position.
Gradient flows into the student's logits only; the sum over boundaries is returned (the stage normalises).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dskd_pipe.pipeline.objectives.dskd import DEFAULT_CHUNK_TOKENS, TeacherHead, teacher_logits


@dataclass
class PrefixKdOutput:
    """kd: sum over boundaries of KL(PT || PS) (fp32); boundaries: how many; teacher_entropy: sum of H(PT)."""

    kd: Tensor
    boundaries: Tensor
    teacher_entropy: Tensor


def shared_boundaries(teacher_chunk: Tensor, student_chunk: Tensor, teacher_blank: Tensor,
                      student_blank: Tensor) -> tuple[Tensor, Tensor]:
    """(teacher [N, 2], student [N, 2]) long: the (example, label position) pairs predicting the text after each
    shared boundary, in text order per example.

    teacher_chunk [B, T'], student_chunk [B, S']: chunk ordinals (-1 outside, probes.chunk_ids); *_blank [B, T'] /
    [B, S'] bool: the label token at that position is whitespace only. In each chunk the first non-blank position
    of each side; a chunk with none on either side gives no boundary.
    """
    batch = teacher_chunk.shape[0]
    n_chunks = int(max(teacher_chunk.max(), student_chunk.max(), -1)) + 1
    if n_chunks == 0:
        empty = torch.zeros(0, 2, dtype=torch.long, device=teacher_chunk.device)
        return empty, empty

    def first(chunk: Tensor, blank: Tensor) -> Tensor:
        width = chunk.shape[1]
        use = (chunk >= 0) & ~blank.to(chunk.device)
        slot = (chunk + torch.arange(batch, device=chunk.device)[:, None] * n_chunks)[use]
        flat = (torch.arange(width, device=chunk.device) + torch.arange(batch, device=chunk.device)[:, None] * width)
        big = batch * width
        out = torch.full((batch * n_chunks,), big, dtype=torch.long, device=chunk.device)
        return out.scatter_reduce(0, slot, flat[use], reduce="amin")  # [B * C], `big` where none

    t_first = first(teacher_chunk, teacher_blank)
    s_first = first(student_chunk, student_blank)
    both = (t_first < teacher_chunk.numel()) & (s_first < student_chunk.numel())
    t_first, s_first = t_first[both], s_first[both]
    width_t, width_s = teacher_chunk.shape[1], student_chunk.shape[1]
    return (torch.stack([t_first // width_t, t_first % width_t], -1),
            torch.stack([s_first // width_s, s_first % width_s], -1))


def event_log_probs(logits: Tensor, events: Tensor, n_events: int, tau: float = 1.0) -> Tensor:
    """log P(e) [N, n_events]: softmax(logits / tau) summed by event and renormalised over the tokens that belong to
    one (events [V] long, -1 = none); -inf for an event with no mass. fp32; differentiable in `logits`."""
    z = logits.float() / tau
    keep = events >= 0
    z, ev = z[:, keep], events[keep].to(z.device)  # [N, V']
    index = ev.expand_as(z)
    # a stable logsumexp per event: subtract each event's own max (a constant for the gradient)
    top = torch.full((z.shape[0], n_events), float("-inf"), device=z.device).scatter_reduce(
        1, index, z.detach(), reduce="amax")  # [N, C]
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mass = torch.zeros_like(top).scatter_add(1, index, (z - shift.gather(1, index)).exp())
    log_mass = mass.log() + shift  # [N, C]
    return log_mass - torch.logsumexp(log_mass, dim=-1, keepdim=True)


def prefix_kd_loss(
    student_logits: Tensor,
    teacher_hidden: Tensor,
    teacher_head: TeacherHead,
    teacher_pos: Tensor,
    student_pos: Tensor,
    teacher_events: Tensor,
    student_events: Tensor,
    n_events: int,
    tau: float = 1.0,
    temper: str = "events",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> PrefixKdOutput:
    """prefix-kd (module docstring) summed over the given boundaries.

    Shapes: student_logits [B, S, Vs], teacher_hidden [B, T, dt]; teacher_pos / student_pos [N, 2] (example,
    label position) pairs (shared_boundaries); teacher_events [Vt] / student_events [Vs]
    (alignment.next_text_events). At most chunk_tokens rows of [*, V] logits per side exist at once in fp32.
    """
    device = student_logits.device
    kd = student_logits.sum() * 0.0
    entropy = torch.zeros((), device=device)
    n = teacher_pos.shape[0]
    for i in range(0, n, chunk_tokens):
        tp = teacher_pos[i : i + chunk_tokens].to(teacher_hidden.device)
        sp = student_pos[i : i + chunk_tokens].to(device)
        token_tau = tau if temper == "tokens" else 1.0
        log_pt = event_log_probs(teacher_logits(teacher_hidden[tp[:, 0], tp[:, 1]].detach(), teacher_head),
                                 teacher_events, n_events, token_tau).to(device)
        log_ps = event_log_probs(student_logits[sp[:, 0], sp[:, 1]], student_events, n_events, token_tau)
        if temper == "events":  # P(e)^(1/tau), renormalised: the temperature acts on the events' own distribution
            log_pt = torch.log_softmax(log_pt / tau, dim=-1)
            log_ps = torch.log_softmax(log_ps / tau, dim=-1)
        pt = log_pt.exp()
        seen = pt > 0  # 0 log 0 = 0; the student's -inf only where the teacher has no mass either
        kd = kd + (pt * (log_pt - log_ps)).masked_fill(~seen, 0.0).sum()
        entropy = entropy - (pt * log_pt).masked_fill(~seen, 0.0).sum()
    return PrefixKdOutput(kd=kd, boundaries=torch.tensor(float(n), device=device),
                          teacher_entropy=entropy.detach())
