"""DSKDv2: ideal projector init, same-vocabulary DSKDv2 and Exact Token Alignment (spec/other_methods.md "DSKDv2").

Ref: Zhang et al., DSKDv2, arXiv 2504.11426.

Normalisation, and how it differs from DSKD v1 (objectives/dskd.py). In v1 every term is a token SUM over the
supervised student tokens. In v2 CE_s stays a sum, but the three KD terms are per-term MEANS, each over its own
positions: CE_t2s over all positions (same vocabulary) or kept aligned pairs (ETA); KD_t2s over the positions where
argmax(Zt2s) agrees with the teacher's argmax; KD_s2t over all positions / kept aligned teacher positions.
The distill stage divides each micro-batch's returned loss by the step's supervised student tokens, so every mean
term is returned multiplied by a weight w (the same convention as CMA-GA's generator term):
- w = n_s, the micro-batch's supervised student tokens (default): after the stage's division each mean counts
  with its micro-batch's share of the step's tokens (a token-weighted average over micro-batches and ranks), like
  every sum term; k micro-batches of one example each then weigh their means by length.
- w = the step's supervised student tokens / (micro-batches x ranks) (option --v2-mean-weighting micro-batch, the
  released code: its per-micro-batch means are averaged with equal weights by gradient accumulation and data
  parallelism; its "loss_denom"). With one micro-batch per step on one process the two are the same.
For the same vocabulary a mean over all positions times n_s is the token sum, so only KD_t2s (a mean over the
agreeing positions) depends on w there; for ETA all three KD terms do.
DSKDOutput.ce_t2s / kd_t2s / kd_s2t hold the weighted values (so loss = _combine(...) as in v1).

Agreement mask (spec/other_methods.md DSKDv2 step 2): KD_t2s is always restricted to the agreeing positions by
default. The released code drops the mask when |agree| / D > 1.0 (its --t2s-agreement) and then averages over all
positions: for the same vocabulary D is its loss_denom (the AVERAGE supervised tokens of a micro-batch of the step),
so a micro-batch longer than average with high agreement loses its mask (a bug: the ratio was meant to be at most
1); for ETA D is the number of kept pairs and the mask is never dropped. agreement_threshold reproduces that test
(option --v2-agreement-threshold 1.0, with w as above standing for D on the same vocabulary).

The teacher temperature is not applied to the t2s target (as the released criteria) unless t2s_teacher_temperature;
the s2t logits keep the teacher head's bias (the release calls teacher_model.lm_head).

Gradients: the student gets CE_s, KD_t2s (through Zs) and KD_s2t (through Hs); t2s gets CE_t2s only. s2t is not
trained: it is Ws_K pinv(Wt_K) from the current, detached student head. Nothing flows into the teacher or either head.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dskd_pipe.pipeline.alignment import EtaPairs
from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum, get_divergence
from dskd_pipe.pipeline.objectives.dskd import (
    DEFAULT_CHUNK_TOKENS,
    DSKDOutput,
    TeacherHead,
    _apply,
    _combine,
    chunked_fkl_over_head,
    fp32_region,
    teacher_logits,
)

# --------------------------------------------------------------------------------------------------------
# Ideal projector initialisation (logit equivalence)
# --------------------------------------------------------------------------------------------------------


def head_columns(head_weight: Tensor, ids: Tensor) -> Tensor:
    """W_K = the LM-head rows of `ids`, as columns: head_weight [V, d] -> [d, K], fp32, detached."""
    return head_weight.detach()[ids.to(head_weight.device)].float().T


def ideal_t2s_weight(wt_k: Tensor, ws_k: Tensor) -> Tensor:
    """t2s weight = (Wt_K pinv(Ws_K))^T [ds, dt], so that Ht t2s Ws_K = Ht Wt_K pinv(Ws_K) Ws_K ~ Ht Wt_K.

    Exact when Ws_K [ds, K] has full column rank (K <= ds): pinv(Ws_K) Ws_K = I_K. Shapes: wt_k [dt, K], ws_k [ds, K].
    """
    return (wt_k.float() @ torch.linalg.pinv(ws_k.float())).T.contiguous()  # [ds, dt]


def s2t_matrix(student_head_k: Tensor, teacher_pinv: Tensor) -> Tensor:
    """s2t = Ws_K pinv(Wt_K) [ds, dt] from the current student head columns, detached (s2t is not trained).

    Hs2t = Hs @ s2t, so Hs2t Wt_K = Hs Ws_K pinv(Wt_K) Wt_K ~ Hs Ws_K. Shapes: student_head_k [ds, K],
    teacher_pinv = pinv(Wt_K) [K, dt] (precomputed once: the teacher is frozen).
    """
    return student_head_k.detach().float() @ teacher_pinv.float()  # [ds, dt]


class DSKDv2Projectors(nn.Module):
    """t2s (nn.Linear dt -> ds, no bias, trained) plus what s2t needs each step.

    Buffers (saved with the state dict): student_ids [K] (the overlap columns of the student head) and
    teacher_pinv = pinv(Wt_K) [K, dt].
    """

    def __init__(self, ds: int, dt: int, student_ids: Tensor, teacher_pinv: Tensor):
        super().__init__()
        self.t2s = nn.Linear(dt, ds, bias=False)
        self.register_buffer("student_ids", student_ids.clone().long())
        self.register_buffer("teacher_pinv", teacher_pinv.detach().float().clone())

    def s2t(self, student_head: Tensor) -> Tensor:
        """s2t_matrix from the current student head [Vs, ds] -> [ds, dt], detached."""
        return s2t_matrix(head_columns(student_head, self.student_ids), self.teacher_pinv)


def ideal_projector_init(
    teacher_head: Tensor, student_head: Tensor, teacher_ids: Tensor, student_ids: Tensor
) -> DSKDv2Projectors:
    """DSKDv2 step 1: projectors with the ideal init, from the two LM heads and the vocabulary overlap.

    teacher_head [Vt, dt], student_head [Vs, ds] (nn weights); teacher_ids / student_ids [K] from
    alignment.vocab_overlap (for one shared vocabulary: torch.arange(V) twice).
    t2s.weight = (Wt_K pinv(Ws_K))^T; teacher_pinv = pinv(Wt_K) for s2t_matrix. Computed in fp32.
    """
    if teacher_ids.shape != student_ids.shape:
        raise ValueError(f"ideal_projector_init: {teacher_ids.numel()} teacher ids but {student_ids.numel()} student "
                         "ids; pass the two outputs of vocab_overlap.")
    wt_k = head_columns(teacher_head, teacher_ids)  # [dt, K]
    ws_k = head_columns(student_head, student_ids)  # [ds, K]
    proj = DSKDv2Projectors(ws_k.shape[0], wt_k.shape[0], student_ids.cpu(), torch.linalg.pinv(wt_k).cpu())
    with torch.no_grad():
        proj.t2s.weight.copy_(ideal_t2s_weight(wt_k, ws_k))
    return proj


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def teacher_argmax(teacher_hidden: Tensor, head: TeacherHead, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Tensor:
    """argmax_v of the rebuilt teacher logits, chunked over rows. teacher_hidden [N, dt] -> [N] long."""
    out = [teacher_logits(teacher_hidden[k : k + chunk_tokens], head).argmax(-1)
           for k in range(0, teacher_hidden.shape[0], chunk_tokens)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=teacher_hidden.device)


def _s2t_divergence(div_name: str, teacher_hidden: Tensor, hs2t: Tensor, head: TeacherHead, tau: float,
                    chunk_tokens: int):
    """sum_rows D(Zs2t, Zt; tau) over the full teacher vocabulary, Zs2t = hs2t Wt^T + bt (the head's weight and bias,
    detached, as the release's teacher_model.lm_head), Zt = teacher_logits.

    Forward KL uses the exact chunked kernel of DSKD; any other divergence recomputes each chunk in backward
    (activation checkpointing), so at most one chunk of [c, Vt] logits is alive. Shapes: [M, dt] -> (sum, argmax [M]).
    """
    if div_name == "fkl":
        keep = torch.ones(hs2t.shape[0], dtype=torch.bool, device=hs2t.device)
        return chunked_fkl_over_head(teacher_hidden, hs2t, head, keep, tau=tau, chunk_tokens=chunk_tokens,
                                     return_argmax=True, student_head_bias=True)
    div = get_divergence(div_name)
    weight = head.weight.detach().float()  # [Vt, dt], frozen teacher head
    bias = None if head.bias is None else head.bias.detach().float()

    def student_logits(hs_c):
        with fp32_region(hs_c.device):
            zs = hs_c.float() @ weight.T  # [c, Vt]
        return zs if bias is None else zs + bias

    def chunk(ht_c, hs_c):
        zs = student_logits(hs_c)
        with fp32_region(zs.device):
            return div(zs, teacher_logits(ht_c, head), torch.ones(zs.shape[0], dtype=torch.bool, device=zs.device),
                       tau=tau)

    total = torch.zeros((), dtype=torch.float32, device=hs2t.device)
    argmax = []
    for k in range(0, hs2t.shape[0], chunk_tokens):
        ht_c, hs_c = teacher_hidden[k : k + chunk_tokens].detach(), hs2t[k : k + chunk_tokens]
        total = total + checkpoint(chunk, ht_c, hs_c, use_reentrant=False)
        with torch.no_grad():
            argmax.append(student_logits(hs_c).argmax(-1))
    argmax = torch.cat(argmax) if argmax else torch.empty(0, dtype=torch.long, device=hs2t.device)
    return total, argmax


def _mean(total: Tensor, count: Tensor) -> Tensor:
    """total / count, or 0 (keeping the graph) when count is 0."""
    return total / count.clamp_min(1).to(total.dtype)


def _v2_terms(
    student_logits_rows: Tensor,
    student_hidden_rows: Tensor,
    teacher_hidden_rows: Tensor,
    target_rows: Tensor,
    teacher_argmax_rows: Tensor,
    student_head: Tensor,
    teacher_head: TeacherHead,
    projectors: DSKDv2Projectors,
    divergence: str,
    tau: float,
    teacher_temperature: float,
    chunk_tokens: int,
    t2s_teacher_temperature: bool = False,
    agreement_threshold: float | None = None,
    agreement_denominator: Tensor | float | None = None,
):
    """The three KD means on matched rows (row r of every argument is one (teacher i, student j) pair).

    Ht2s = t2s(Ht_i); Zt2s = Ht2s Ws^T (Ws detached, fp32); CE_t2s = mean_r CE(Zt2s, target);
    agree = argmax Zt2s == target; KD_t2s = sum_agree D(Zs_j, stopgrad(Zt2s); tau) / |agree| (the target divided
    by T_t when t2s_teacher_temperature); with agreement_threshold set and |agree| / agreement_denominator above it
    (the released test), KD_t2s = sum_r D(Zs_j, stopgrad(Zt2s); tau) / agreement_denominator instead;
    Hs2t = Hs_j s2t; KD_s2t = mean_r D(Zs2t, Zt_i; tau) over the full teacher vocabulary.
    Shapes: Zs rows [P, Vs], Hs rows [P, ds], Ht rows [P, dt], targets [P] (student ids), teacher argmax [P].
    """
    div = get_divergence(divergence)
    n = torch.tensor(target_rows.shape[0], device=student_logits_rows.device)
    ws = student_head.detach()  # the t2s branch must not train the student's head
    ht2s = _apply(projectors.t2s, teacher_hidden_rows.detach())  # [P, ds]
    with fp32_region(ht2s.device):
        zt2s = ht2s.float() @ ws.float().T  # [P, Vs]
    ce_t2s = _mean(cross_entropy_sum(zt2s, target_rows), n)
    agree = zt2s.detach().argmax(-1) == target_rows  # [P]
    target = zt2s.detach() / teacher_temperature if t2s_teacher_temperature else zt2s.detach()
    denominator = torch.as_tensor(n if agreement_denominator is None else agreement_denominator,
                                  dtype=torch.float32, device=n.device)
    if agreement_threshold is not None and float(agree.sum()) / float(denominator.clamp_min(1e-3)) > agreement_threshold:
        kd_t2s = div(student_logits_rows, target, torch.ones_like(agree), tau=tau) / denominator.clamp_min(1e-3)
    else:
        kd_t2s = _mean(div(student_logits_rows, target, agree, tau=tau), agree.sum())

    s2t = projectors.s2t(student_head)  # [ds, dt], detached
    hs2t = student_hidden_rows.float() @ s2t  # [P, dt], grad into Hs only
    kd_s2t_sum, s2t_argmax = _s2t_divergence(divergence, teacher_hidden_rows, hs2t, teacher_head, tau, chunk_tokens)
    kd_s2t = _mean(kd_s2t_sum, n)
    with torch.no_grad():
        s2t_correct = (s2t_argmax == teacher_argmax_rows).sum()
    return ce_t2s, kd_t2s, kd_s2t, agree.sum(), s2t_correct


# --------------------------------------------------------------------------------------------------------
# Same vocabulary
# --------------------------------------------------------------------------------------------------------


def dskd_v2_same_vocab_loss(
    student_hidden: Tensor,
    student_logits: Tensor,
    labels: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: TeacherHead,
    projectors: DSKDv2Projectors,
    divergence: str = "fkl",
    kd_rate: float = 0.5,
    tau: float = 2.0,
    teacher_temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ce_labels: Tensor | None = None,
    mean_weight: Tensor | float | None = None,
    agreement_threshold: float | None = None,
    t2s_teacher_temperature: bool = False,
) -> DSKDOutput:
    """DSKDv2 with a shared vocabulary and tokenization (spec/other_methods.md DSKDv2 step 2).

    a = argmax Zt (rebuilt teacher logits) at the supervised positions ms.
    CE_t2s = mean_ms CE(Zt2s, a); KD_t2s = sum over {argmax Zt2s == a} of D(Zs, stopgrad(Zt2s)) / their count;
    KD_s2t = mean_ms D(Zs2t, Zt), Zs2t = (Hs s2t) Wt^T + bt, D the configured divergence.
    Returned: ce_student = sum_ms CE(Zs, y); ce_t2s, kd_t2s, kd_s2t = the means times w (module docstring:
    mean_weight, None = n_s = |ms|); loss = (1 - lambda) ce_student + lambda (ce_t2s + kd_t2s + kd_s2t).
    agreement_threshold (None = always mask): the released test |agree| / w > threshold drops the mask, and then
    KD_t2s = sum_ms D(Zs, stopgrad(Zt2s)) / w (module docstring).
    t2s_correct = t2s_kd_tokens = |agree|; s2t_correct = |argmax Zs2t == a|; n_teacher = n_student = |ms|.
    Shapes: Hs [B,S,ds], Zs [B,S,V], y [B,S], Ws [V,ds], Ht [B,S,dt], head weight [V,dt].
    """
    ms = labels != -100  # [B, S]
    n = ms.sum()
    w = n if mean_weight is None else torch.as_tensor(mean_weight, dtype=torch.float32, device=n.device)
    ce_student = cross_entropy_sum(student_logits, labels if ce_labels is None else ce_labels)
    ht = teacher_hidden.detach()[ms]  # [Ns, dt], the teacher is frozen
    with torch.no_grad():
        a = teacher_argmax(ht, teacher_head, chunk_tokens)  # [Ns]
    ce_t2s, kd_t2s, kd_s2t, agree, s2t_correct = _v2_terms(
        student_logits[ms], student_hidden[ms], ht, a, a, student_head, teacher_head, projectors,
        divergence, tau, teacher_temperature, chunk_tokens, t2s_teacher_temperature, agreement_threshold, w,
    )
    # Means -> the stage's per-token convention. CE_t2s and KD_s2t are means over all of ms: times n_s they are the
    # token sums whatever w is (the release divides these sums by its token denominator too).
    ce_t2s, kd_t2s, kd_s2t = ce_t2s * n, kd_t2s * w, kd_s2t * n
    return DSKDOutput(
        loss=_combine(ce_student, ce_t2s, kd_t2s, kd_s2t, kd_rate),
        ce_student=ce_student, ce_t2s=ce_t2s, kd_t2s=kd_t2s, kd_s2t=kd_s2t,
        n_student=n, n_teacher=n, t2s_correct=agree, s2t_correct=s2t_correct, t2s_kd_tokens=agree,
        student_mask=ms, teacher_mask=ms,
    )


# --------------------------------------------------------------------------------------------------------
# Different vocabularies: Exact Token Alignment
# --------------------------------------------------------------------------------------------------------


def dskd_v2_eta_loss(
    student_hidden: Tensor,
    student_logits: Tensor,
    labels: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: TeacherHead,
    projectors: DSKDv2Projectors,
    pairs: EtaPairs,
    token_map: Tensor,
    divergence: str = "fkl",
    kd_rate: float = 0.5,
    tau: float = 2.0,
    teacher_temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ce_labels: Tensor | None = None,
    mean_weight: Tensor | float | None = None,
    agreement_threshold: float | None = None,
    t2s_teacher_temperature: bool = False,
) -> DSKDOutput:
    """DSKDv2 with Exact Token Alignment (spec/other_methods.md DSKDv2 step 3).

    pairs: alignment.eta_pairs_for_batch(teacher_labels, student_labels, ...) (label positions, -1 padded).
    token_map [Vt]: alignment.teacher_to_student_token_map (student id by token string, EOS -> EOS, -1 if none;
    with unmapped="unk" the released behaviour: the student's unk id instead of -1, GPT-2's being its EOS).
    For each pair (i, j): a_i = token_map[argmax Zt_i]; pairs with a_i = -1 are dropped from every term.
    Ht2s[j] = t2s(Ht)[i]; Hs2t[i] = Hs[j] s2t.
    CE_t2s = mean over kept pairs of CE(Zt2s_j, a_i); KD_t2s = sum over {argmax Zt2s_j == a_i} of
    D(Zs_j, stopgrad(Zt2s_j)) / their count; KD_s2t = mean over kept pairs of D(Zs2t_i, Zt_i), Zs2t = Hs2t Wt^T + bt.
    L = (1 - lambda) CE_s + lambda (CE_t2s + KD_t2s + KD_s2t), the means returned times w (mean_weight, None = n_s
    = |ms|; module docstring). agreement_threshold: the released test |agree| / kept > threshold (never true at
    1.0) replaces KD_t2s by the mean over kept pairs.
    n_teacher = kept pairs; t2s_correct = t2s_kd_tokens = |agree|; s2t_correct = |argmax Zs2t_i == argmax Zt_i|.
    Shapes: Hs [B,S,ds], Zs [B,S,Vs], y [B,S], Ws [Vs,ds], Ht [B,T,dt], head weight [Vt,dt].
    """
    ms = labels != -100  # [B, S]
    n = ms.sum()
    ce_student = cross_entropy_sum(student_logits, labels if ce_labels is None else ce_labels)
    b, ti, sj = pairs.to(student_logits.device).flat()  # [P] each
    ht = teacher_hidden.detach()[b, ti]  # [P, dt], the teacher is frozen
    with torch.no_grad():
        t_arg = teacher_argmax(ht, teacher_head, chunk_tokens)  # [P], teacher ids
        mapped = token_map.to(t_arg.device)[t_arg]  # [P], student ids or -1
        keep = mapped >= 0
    b, ti, sj, ht, t_arg, mapped = b[keep], ti[keep], sj[keep], ht[keep], t_arg[keep], mapped[keep]
    ce_t2s, kd_t2s, kd_s2t, agree, s2t_correct = _v2_terms(
        student_logits[b, sj], student_hidden[b, sj], ht, mapped, t_arg, student_head, teacher_head, projectors,
        divergence, tau, teacher_temperature, chunk_tokens, t2s_teacher_temperature, agreement_threshold,
    )
    w = n if mean_weight is None else torch.as_tensor(mean_weight, dtype=torch.float32, device=n.device)
    ce_t2s, kd_t2s, kd_s2t = ce_t2s * w, kd_t2s * w, kd_s2t * w  # means -> the stage's per-token convention
    return DSKDOutput(
        loss=_combine(ce_student, ce_t2s, kd_t2s, kd_s2t, kd_rate),
        ce_student=ce_student, ce_t2s=ce_t2s, kd_t2s=kd_t2s, kd_s2t=kd_s2t,
        n_student=n, n_teacher=keep.sum(), t2s_correct=agree, s2t_correct=s2t_correct, t2s_kd_tokens=agree,
        student_mask=ms,
    )
