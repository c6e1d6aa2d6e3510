"""Dual-Space Knowledge Distillation (DSKD) and its cross-model-attention form (DSKD-CMA).

The math is spec/dskd.md; this module follows it step by step ("reference mode"). Every loss term is a token
SUM; the stage divides the step total once by the supervised student tokens of the whole step.
Like every loss of pipeline/objectives, they take `ce_labels`: the labels of the student's own CE term when they
differ from `labels` (on-policy rounds pass -100 on rows that are student samples: the KD terms use those rows,
the CE stays on gold data). Default: `labels`.

Precision: the attention scores (softmax inputs) and every full-vocabulary term (teacher logits, t2s logits, the
s2t forward KL) are computed in fp32 with autocast switched off around them, on every device (the released code
computes the attention scores in fp32 too; under bf16 autocast a plain matmul would round them to bf16). The
projections themselves follow the caller's autocast.
Ref: Zhang et al., EMNLP 2024, arXiv 2406.17328.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch import Tensor

from dskd_pipe.pipeline.config import T2S_KD_ROWS, T2S_VALUES
from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum, get_divergence


MASK_LOGIT = -1e5  # additive attention mask of the reference code (not -inf: fully masked rows stay finite)
DEFAULT_CHUNK_TOKENS = 1024  # rows of [chunk, Vt] fp32 logits: 1024 x 152k x 4 B = 0.6 GB for a Qwen teacher


@contextmanager
def fp32_region(device: torch.device | str) -> Iterator[None]:
    """Autocast off for the enclosed ops: softmax inputs and full-vocabulary logits stay fp32 under bf16 autocast
    (inputs must be cast with .float() inside; autocast would otherwise round a matmul's output to bf16)."""
    with torch.autocast(torch.device(device).type, enabled=False):
        yield


# --------------------------------------------------------------------------------------------------------
# Teacher head
# --------------------------------------------------------------------------------------------------------


@dataclass
class TeacherHead:
    """What is needed to rebuild the teacher's logits from its post-norm last hidden state.

    weight [Vt, dt]; bias [Vt] or None; logit_scale multiplies the logits (Cohere-style, 1.0 otherwise);
    final_logit_softcap (Gemma-2-style) maps z -> cap * tanh(z / cap) when set.
    """

    weight: Tensor
    bias: Optional[Tensor] = None
    logit_scale: float = 1.0
    final_logit_softcap: Optional[float] = None


def teacher_logits(hidden: Tensor, head: TeacherHead) -> Tensor:
    """Rebuild the teacher's logits as the HF model computes them, in fp32 and detached from the head.

    z = (h W^T + b) * logit_scale;  z = cap * tanh(z / cap) if final_logit_softcap is set.
    Shapes: hidden [..., dt] -> [..., Vt].
    """
    weight = head.weight.detach().float()  # the teacher is frozen
    with fp32_region(hidden.device):
        z = hidden.float() @ weight.T  # [..., Vt]
    if head.bias is not None:
        z = z + head.bias.detach().float()
    if head.logit_scale != 1.0:
        z = z * head.logit_scale
    if head.final_logit_softcap is not None:
        cap = float(head.final_logit_softcap)
        z = cap * torch.tanh(z / cap)
    return z


# --------------------------------------------------------------------------------------------------------
# Chunked forward KL over the teacher vocabulary
# --------------------------------------------------------------------------------------------------------


class _ChunkedFKL(torch.autograd.Function):
    """sum_i KL(softmax(Zt_i / tau) || softmax(Zs_i / tau)) with Zs_i = hs_i Wt^T, built chunk by chunk.

    The gradient is exact and cheap: d KL_i / d Zs_i = (Q_i - P_i) / tau (sum P_i = 1), so
    d KL_i / d hs_i = ((Q_i - P_i) / tau) Wt. It is computed in the same pass as the value and kept as a
    [M, dt] tensor, so no [M, Vt] tensor outlives its chunk and backward does no recomputation.
    """

    @staticmethod
    def forward(ctx, teacher_hidden, student_hidden, head_weight, student_bias, head, tau, chunk_tokens):
        # teacher_hidden [M, dt], student_hidden [M, dt], head_weight [Vt, dt] fp32 (detached)
        need_grad = ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        grad_hidden = torch.zeros_like(student_hidden, dtype=torch.float32) if need_grad else None
        argmax = torch.empty(student_hidden.shape[0], dtype=torch.long, device=student_hidden.device)
        with fp32_region(student_hidden.device):
            for start in range(0, student_hidden.shape[0], chunk_tokens):
                rows = slice(start, start + chunk_tokens)
                log_p = torch.log_softmax(teacher_logits(teacher_hidden[rows], head) / tau, dim=-1)  # [c, Vt]
                zs = student_hidden[rows].float() @ head_weight.T  # [c, Vt]
                if student_bias is not None:
                    zs = zs + student_bias
                argmax[rows] = zs.argmax(-1)
                log_q = torch.log_softmax(zs / tau, dim=-1)  # [c, Vt]
                p = log_p.exp()
                total += torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum()
                if need_grad:
                    grad_hidden[rows] = ((log_q.exp() - p) / tau) @ head_weight  # [c, dt]
        ctx.save_for_backward(grad_hidden if need_grad else None)
        ctx.student_dtype = student_hidden.dtype
        ctx.mark_non_differentiable(argmax)
        return total, argmax

    @staticmethod
    def backward(ctx, grad_total, grad_argmax):
        (grad_hidden,) = ctx.saved_tensors
        grad_student = None
        if grad_hidden is not None:
            grad_student = (grad_total * grad_hidden).to(ctx.student_dtype)
        return None, grad_student, None, None, None, None, None


def chunked_fkl_over_head(
    teacher_hidden: Tensor,
    student_in_teacher_space: Tensor,
    head: TeacherHead,
    mask: Tensor,
    tau: float = 2.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    student_uses_full_head: bool = False,
    return_argmax: bool = False,
    student_head_bias: bool = False,
):
    """Forward KL over the full teacher vocabulary, summed over masked positions, built in chunks of rows.

    KL_i = sum_v P_iv (log P_iv - log Q_iv), P_i = softmax(Zt_i / tau), Q_i = softmax(Zs2t_i / tau), fp32, no tau^2,
    Zt = teacher_logits(teacher_hidden, head) (bias, scale and soft-cap included), and
    Zs2t = student_in_teacher_space @ Wt^T (DSKD-CMA: no bias, no scale, no cap; Wt detached). With
    student_head_bias=True, Zs2t = student_in_teacher_space @ Wt^T + b (the head's nn.Linear as a module: what the
    released same-vocabulary DSKD calls, `teacher_model.lm_head(s2t_hiddens)`). With student_uses_full_head=True
    the student side goes through the whole head like the teacher instead (bias, scale and soft-cap).

    At most ``chunk_tokens`` rows of [*, Vt] fp32 logits exist at any time, in forward and in backward.
    Gradient flows into student_in_teacher_space only.
    Shapes: teacher_hidden [N, dt], student_in_teacher_space [N, dt], mask [N] bool.
    Returns the sum (0-dim fp32); with return_argmax also argmax_v Zs2t for the masked rows [M] (in mask order).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    keep = mask.reshape(-1).bool()
    dt = student_in_teacher_space.shape[-1]
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep].detach()  # [M, dt]
    hs = student_in_teacher_space.reshape(-1, dt)[keep]  # [M, dt]
    if student_uses_full_head:
        total, argmax = _chunked_fkl_full_head(ht, hs, head, tau, chunk_tokens)
    else:
        weight = head.weight.detach().float()  # [Vt, dt], frozen teacher head
        bias = head.bias.detach().float() if student_head_bias and head.bias is not None else None
        total, argmax = _ChunkedFKL.apply(ht, hs, weight, bias, head, tau, chunk_tokens)
    return (total, argmax) if return_argmax else total


def _chunked_fkl_full_head(ht: Tensor, hs: Tensor, head: TeacherHead, tau: float, chunk_tokens: int):
    """Variant where both sides use the full head (soft-cap is nonlinear, so autograd recomputes per chunk)."""
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(ht_c, hs_c):
        log_p = torch.log_softmax(teacher_logits(ht_c, head) / tau, dim=-1)
        log_q = torch.log_softmax(teacher_logits(hs_c, head) / tau, dim=-1)
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum()

    total = torch.zeros((), dtype=torch.float32, device=hs.device)
    argmax = []
    for start in range(0, hs.shape[0], chunk_tokens):
        ht_c, hs_c = ht[start : start + chunk_tokens], hs[start : start + chunk_tokens]
        with fp32_region(hs.device):  # teacher_logits is fp32 already; the softmaxes and the sum stay so
            total = total + checkpoint(chunk_loss, ht_c, hs_c, use_reentrant=False)
        with torch.no_grad():
            argmax.append(teacher_logits(hs_c, head).argmax(-1))
    argmax = torch.cat(argmax) if argmax else torch.empty(0, dtype=torch.long, device=hs.device)
    return total, argmax


# --------------------------------------------------------------------------------------------------------
# Projectors
# --------------------------------------------------------------------------------------------------------


class Projectors(nn.Module):
    """The trainable projectors of DSKD: t2s (dt -> ds), s2t (ds -> dt) and, for CMA, query (2ds -> 2dt).

    Default nn.Linear init with bias (reference mode).
    """

    def __init__(self, ds: int, dt: int, with_query: bool):
        super().__init__()
        self.t2s = nn.Linear(dt, ds)
        self.s2t = nn.Linear(ds, dt)
        self.query = nn.Linear(2 * ds, 2 * dt) if with_query else None


def build_projectors(ds: int, dt: int, *, with_query: bool) -> Projectors:
    """DSKD's projectors between a student of width ds and a teacher of width dt: t2s and s2t, and with_query the
    cross-model attention's query projector (DSKD-CMA, CMA-GA; same-vocabulary DSKD has none)."""
    return Projectors(ds, dt, with_query=with_query)


def _apply(linear: nn.Linear, x: Tensor) -> Tensor:
    """linear(x) in the projector's own dtype (projectors may be fp32 while the models run in bf16)."""
    return linear(x.to(linear.weight.dtype))


# --------------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------------


@dataclass
class DSKDOutput:
    """Loss terms (token sums, fp32) and diagnostics of one micro-batch.

    loss = (1 - lambda) ce_student + lambda (ce_t2s + kd_t2s + kd_s2t).
    n_student / n_teacher: supervised tokens (ms / mt). t2s_correct / n_student and s2t_correct / n_teacher are
    the projection accuracies; t2s_kd_tokens = |ms & acc| (positions KD_t2s is summed over).
    attention_entropy: mean over student response positions of the entropy of the a_t2s row (CMA only).
    queries [B, S, 2dt] (with grad into the query projector) and keys [B, T, 2dt] (no grad): CMA only, for CMA-GA.
    """

    loss: Tensor
    ce_student: Tensor
    ce_t2s: Tensor
    kd_t2s: Tensor
    kd_s2t: Tensor
    n_student: Tensor
    n_teacher: Tensor
    t2s_correct: Tensor
    s2t_correct: Tensor
    t2s_kd_tokens: Tensor
    attention_entropy: Optional[Tensor] = None
    queries: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    student_mask: Optional[Tensor] = None
    teacher_mask: Optional[Tensor] = None

    def log_dict(self) -> dict[str, float]:
        """Plain floats for the step log (sums and counts; the stage turns them into rates)."""
        names = ["loss", "ce_student", "ce_t2s", "kd_t2s", "kd_s2t", "n_student", "n_teacher", "t2s_correct",
                 "s2t_correct", "t2s_kd_tokens", "attention_entropy"]
        out = {}
        for name in names:
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value.detach())
        return out


def _combine(ce_student: Tensor, ce_t2s: Tensor, kd_t2s: Tensor, kd_s2t: Tensor, kd_rate: float) -> Tensor:
    """L = (1 - lambda) CE_s + lambda (CE_t2s + KD_t2s + KD_s2t), all sums (spec/dskd.md)."""
    return (1.0 - kd_rate) * ce_student + kd_rate * (ce_t2s + kd_t2s + kd_s2t)


# --------------------------------------------------------------------------------------------------------
# DSKD, same vocabulary
# --------------------------------------------------------------------------------------------------------


def dskd_same_vocab_loss(
    student_hidden: Tensor,
    student_logits: Tensor,
    labels: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: TeacherHead,
    projectors: Projectors,
    divergence: str = "fkl",
    kd_rate: float = 0.5,
    tau: float = 2.0,
    teacher_temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ce_labels: Tensor | None = None,
    t2s_teacher_temperature: bool = False,
) -> DSKDOutput:
    """DSKD with a shared vocabulary and tokenization (spec/dskd.md "DSKD, same vocabulary").

    Zt2s = t2s(Ht) Ws^T (Ws detached, fp32);  CE_t2s = sum_ms CE(Zt2s, y);  KD_t2s = sum_ms D(Zs, stopgrad(Zt2s); tau)
    Zs2t = s2t(Hs) Wt^T + bt (the teacher head as a module: weight and bias, detached; Hs not);
    KD_s2t = sum_ms FKL(Zt || Zs2t; tau), Zt = rebuilt teacher logits.
    L = (1 - lambda) CE_s + lambda (CE_t2s + KD_t2s + KD_s2t).
    As the released dual_space_kd.py: the t2s target is NOT divided by the teacher temperature (its CMA criterion
    does divide; both agree at the published T_t = 1); with t2s_teacher_temperature=True it is, KD_t2s =
    sum_ms D(Zs, stopgrad(Zt2s) / T_t; tau) (option --same-vocab-teacher-temperature). The s2t logits keep the
    head's bias like the release's `teacher_model.lm_head(s2t_hiddens)` (GPT-2 and Llama heads have none).
    Shapes: Hs [B,S,ds], Zs [B,S,V], y [B,S], Ws [V,ds], Ht [B,S,dt], head weight [V,dt].
    """
    div = get_divergence(divergence)
    ms = labels != -100  # [B, S]
    y = labels[ms]  # [Ns]
    ce_student = cross_entropy_sum(student_logits, labels if ce_labels is None else ce_labels)

    ws = student_head.detach()  # the t2s branch must not train the student's head
    ht2s = _apply(projectors.t2s, teacher_hidden.detach()[ms])  # [Ns, ds]
    with fp32_region(ht2s.device):
        zt2s = ht2s.float() @ ws.float().T  # [Ns, V]
    ce_t2s = cross_entropy_sum(zt2s, y)
    all_rows = torch.ones_like(y, dtype=torch.bool)
    target = zt2s.detach() / teacher_temperature if t2s_teacher_temperature else zt2s.detach()
    kd_t2s = div(student_logits[ms], target, all_rows, tau=tau)

    hs2t = _apply(projectors.s2t, student_hidden)  # [B, S, dt]
    kd_s2t, s2t_argmax = chunked_fkl_over_head(
        teacher_hidden, hs2t, teacher_head, ms, tau=tau, chunk_tokens=chunk_tokens, return_argmax=True,
        student_head_bias=True,
    )
    with torch.no_grad():
        t2s_correct = (zt2s.argmax(-1) == y).sum()
        s2t_correct = (s2t_argmax == y).sum()
    n = ms.sum()
    return DSKDOutput(
        loss=_combine(ce_student, ce_t2s, kd_t2s, kd_s2t, kd_rate),
        ce_student=ce_student,
        ce_t2s=ce_t2s,
        kd_t2s=kd_t2s,
        kd_s2t=kd_s2t,
        n_student=n,
        n_teacher=n,
        t2s_correct=t2s_correct,
        s2t_correct=s2t_correct,
        t2s_kd_tokens=n,
        student_mask=ms,
        teacher_mask=ms,
    )


# --------------------------------------------------------------------------------------------------------
# DSKD-CMA, different vocabularies
# --------------------------------------------------------------------------------------------------------


def _index_embeddings(embed: Tensor, ids: Tensor, labels: Tensor, mask: Tensor, scale: float = 1.0):
    """Step 1: [E[x~] ; E[y~]] and E[y~], x~ = x where mask else 0 (the embedding of id 0, not zeros), detached."""
    table = embed.detach()  # the lookups are inputs, never trained by these terms
    x = torch.where(mask, ids, torch.zeros_like(ids))
    y = torch.where(mask, labels, torch.zeros_like(labels))
    e_in, e_tg = table[x], table[y]  # [B, L, d] each
    if scale != 1.0:  # Gemma-style architectures multiply embeddings by sqrt(d) in the model
        e_in, e_tg = e_in * scale, e_tg * scale
    return torch.cat([e_in, e_tg], dim=-1), e_tg  # [B, L, 2d], [B, L, d]


def _scalar_std_normalise(x: Tensor, valid: Tensor | None = None) -> Tensor:
    """Step 2: x / std(x), ONE unbiased std over every entry of x at the `valid` positions [B, L] (prompt and
    response tokens; pads excluded), or over the whole padded tensor when `valid` is None (the released code)."""
    x = x.float()
    return x / (x.std() if valid is None else x[valid.bool()].std())


@dataclass
class CrossModelAttention:
    """DSKD-CMA steps 1-4 for one batch, shared by every method built on the cross-model attention.

    queries [B,S,2dt] (with grad into the query projector; None in the chunk-level projection ablation), keys
    [B,T,2dt] (no parameters; None likewise), a_t2s [B,S,T] (softmax
    over teacher positions), a_s2t [B,T,S] (over student positions), v_t2s [B,T,ds], v_s2t [B,S,dt], the normalised
    teacher target embeddings e_tg [B,T,dt] and hidden states ht_norm [B,T,dt], and the two response masks.
    """

    queries: Tensor | None
    keys: Tensor | None
    a_t2s: Tensor
    a_s2t: Tensor
    v_t2s: Tensor
    v_s2t: Tensor
    e_tg: Tensor
    ht_norm: Tensor
    student_mask: Tensor
    teacher_mask: Tensor

    def attention_entropy(self) -> Tensor:
        """Mean entropy of the a_t2s rows of student response positions (0-dim, no grad)."""
        with torch.no_grad():
            rows = self.a_t2s[self.student_mask]  # [Ns, T]
            entropy = -torch.where(rows > 0, rows * rows.log(), torch.zeros_like(rows)).sum(-1)  # [Ns]
            return entropy.mean() if entropy.numel() else entropy.sum()


def cross_model_attention(
    student_hidden: Tensor,
    labels: Tensor,
    input_ids: Tensor,
    student_embed: Tensor,
    teacher_input_ids: Tensor,
    teacher_labels: Tensor,
    teacher_hidden: Tensor,
    teacher_embed: Tensor,
    projectors: Projectors,
    teacher_embed_scale: float = 1.0,
    chunks: Tensor | None = None,
    chunk_mode: str | None = None,
    teacher_attention_mask: Tensor | None = None,
    t2s_values: str = "hidden+target",
) -> CrossModelAttention:
    """spec/dskd.md "DSKD-CMA" steps 1-4.

    1. Qin = [Es[x~]; Es[y~]], Kin = [Et[xt~]; Et[yt~]], Etg = Et[yt~] (detached; id 0 where masked).
    2. K = Kin / std(Kin), Etg~ = Etg / std(Etg), Ht~ = Ht / std(Ht): one unbiased scalar std each, over the
       teacher's real tokens (teacher_attention_mask [B, T], prompt and response; pads excluded), so that the loss
       does not depend on how much padding the batch has. With teacher_attention_mask=None the std is taken over the
       whole padded tensor as in the released code (option --cma-std padded); the release pads every batch to
       max_length (512) with the teacher's real states on the pads, which a store does not hold. Measured on one
       small batch: the released loss moved 9.6e-4 (relative) when the batch was padded from 16 to 512 teacher
       positions, the valid-position loss 0; the two stds gave losses 1.8e-4 apart (BENCHMARKS.md "Fidelity").
    3. Q = query(Qin), Vt2s = t2s(Ht~ + Etg~), Vs2t = s2t(Hs).
    4. A = Q K^T / sqrt(2 dt) (fp32) - 1e5 where not (ms_i and mt_j); a_t2s = softmax_j(A), a_s2t = softmax_i(A^T).

    The two ablations of spec/cma_ga.md ("Probes and heatmaps") replace step 4; `chunks` [B,S,T] bool is the
    ground-truth chunk alignment of the label positions (pipeline/probes.chunk_alignment):
    - chunk_mode "attention": A additionally gets -1e5 outside the token's chunk, in each softmax's own direction;
      a row (or column) with no chunk (a truncated tail) keeps its plain CMA attention.
    - chunk_mode "projection": no query and no keys; a_t2s[i] is the uniform average over i's chunk (a_s2t[j]
      over j's chunk); a row with no chunk averages uniformly over the other side's response positions.

    t2s_values="hidden" (an option; reference "hidden+target"): Vt2s = t2s(Ht~) without the teacher's target
    embedding. Etg~ is the embedding of the gold next token, so with it the t2s logits can read the label they are
    asked to predict: on held-out data they score below the generator's own entropy, and KD_t2s then passes the
    student mostly its own gold label rather than the teacher's distribution (BENCHMARKS.md "Why the DSKD family
    did not transfer").
    """
    if t2s_values not in T2S_VALUES:
        raise ValueError(f"t2s_values {t2s_values!r}: expected one of {', '.join(T2S_VALUES)}")
    if chunk_mode not in (None, "attention", "projection"):
        raise ValueError(f"chunk_mode {chunk_mode!r}: expected None, 'attention' or 'projection'")
    if chunk_mode is not None and chunks is None:
        raise ValueError(f"chunk_mode {chunk_mode!r} needs the chunk alignment `chunks` [B, S, T]")
    if projectors.query is None and chunk_mode != "projection":
        raise ValueError("cross-model attention needs projectors with a query; build them with "
                         "build_projectors(ds, dt, with_query=True)")
    ms = labels != -100  # [B, S]
    mt = teacher_labels != -100  # [B, T]
    dt = teacher_hidden.shape[-1]
    allowed = ms[:, :, None] & mt[:, None, :]  # [B, S, T]: response positions on both axes

    # Steps 1-2: index embeddings and scalar std normalisation.
    q_in = _index_embeddings(student_embed, input_ids, labels, ms)[0] if chunk_mode != "projection" else None
    k_in, e_tg = _index_embeddings(teacher_embed, teacher_input_ids, teacher_labels, mt, teacher_embed_scale)
    valid = teacher_attention_mask
    keys = _scalar_std_normalise(k_in, valid) if chunk_mode != "projection" else None  # [B, T, 2dt]
    e_tg = _scalar_std_normalise(e_tg, valid)  # [B, T, dt]
    ht_norm = _scalar_std_normalise(teacher_hidden.detach(), valid)  # [B, T, dt]; the teacher is frozen

    # Step 3: projections; attention math in fp32.
    v_t2s = _apply(projectors.t2s, ht_norm + e_tg if t2s_values == "hidden+target" else ht_norm).float()  # [B,T,ds]
    v_s2t = _apply(projectors.s2t, student_hidden).float()  # [B, S, dt]
    if chunk_mode == "projection":
        a_t2s, a_s2t = _chunk_average(chunks, allowed)
        return CrossModelAttention(None, None, a_t2s, a_s2t, v_t2s, v_s2t, e_tg, ht_norm, ms, mt)
    queries = _apply(projectors.query, q_in).float()  # [B, S, 2dt]

    # Step 4: one shared score matrix, response positions on both axes only; fp32 under any autocast.
    with fp32_region(queries.device):
        scores = queries.float() @ keys.float().transpose(-1, -2) / math.sqrt(2 * dt)  # [B, S, T]
    scores = scores + (~allowed).float() * MASK_LOGIT
    scores_s2t = scores.transpose(-1, -2)  # [B, T, S]
    if chunk_mode == "attention":
        # Only rows (columns) that have a chunk are confined: adding -1e5 to a whole row would round its fp32
        # scores to multiples of 1/128 instead of leaving the plain CMA row.
        chunks = chunks.bool()
        scores = scores + (chunks.any(-1, keepdim=True) & ~chunks).float() * MASK_LOGIT
        chunks_t = chunks.transpose(-1, -2)
        scores_s2t = scores_s2t + (chunks_t.any(-1, keepdim=True) & ~chunks_t).float() * MASK_LOGIT
    a_t2s = torch.softmax(scores, dim=-1)  # [B, S, T], over teacher positions
    a_s2t = torch.softmax(scores_s2t, dim=-1)  # [B, T, S], over student positions
    return CrossModelAttention(queries, keys, a_t2s, a_s2t, v_t2s, v_s2t, e_tg, ht_norm, ms, mt)


def _chunk_average(chunks: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """(a_t2s [B,S,T], a_s2t [B,T,S]) of the chunk-level projection ablation: uniform weights over the row's chunk,
    or over the response positions where the row has no chunk (uniform over everything for masked rows, which no
    loss term reads)."""
    chunks = chunks.bool() & allowed

    def rows(c: Tensor, a: Tensor) -> Tensor:  # [B, R, C] bool -> row-normalised fp32 weights
        w = torch.where(c.any(-1, keepdim=True), c, a).float()  # the chunk, else the response positions
        w = torch.where(w.sum(-1, keepdim=True) > 0, w, torch.ones_like(w))  # masked rows: uniform
        return w / w.sum(-1, keepdim=True)

    return rows(chunks, allowed), rows(chunks.transpose(-1, -2), allowed.transpose(-1, -2))


def dskd_cma_loss(
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
    projectors: Projectors,
    divergence: str = "fkl",
    kd_rate: float = 0.5,
    tau: float = 2.0,
    teacher_temperature: float = 1.0,
    teacher_embed_scale: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunks: Tensor | None = None,
    chunk_mode: str | None = None,
    ce_labels: Tensor | None = None,
    teacher_attention_mask: Tensor | None = None,
    t2s_kd_rows: str = "accurate",
    student_kd: bool = True,
    t2s_values: str = "hidden+target",
) -> DSKDOutput:
    """DSKD-CMA (spec/dskd.md "DSKD-CMA", steps 1-7), all terms token sums.

    1. Qin = [Es[x~]; Es[y~]], Kin = [Et[xt~]; Et[yt~]], Etg = Et[yt~] (detached; id 0 where masked).
    2. K = Kin / std(Kin), Etg~ = Etg / std(Etg), Ht~ = Ht / std(Ht) (one unbiased scalar std each, over the
       positions of teacher_attention_mask; the whole padded tensor when None: see cross_model_attention).
    3. Q = query(Qin), Vt2s = t2s(Ht~ + Etg~), Vs2t = s2t(Hs).
    4. A = Q K^T / sqrt(2 dt) (fp32) - 1e5 where not (ms_i and mt_j); a_t2s = softmax_j(A), a_s2t = softmax_i(A^T).
    5. Zt2s = (a_t2s Vt2s) Ws^T; CE_t2s = sum_ms CE(Zt2s, y); acc = argmax Zt2s == y;
       KD_t2s = sum_{ms & acc} D(Zs, stopgrad(Zt2s) / T_t; tau).
    6. Zs2t = (a_s2t Vs2t) Wt^T (no bias); KD_s2t = sum_mt FKL(Zt || Zs2t; tau) over the full teacher vocabulary.
    7. L = (1 - lambda) CE_s + lambda (CE_t2s + KD_t2s + KD_s2t).
    Shapes: Hs [B,S,ds], Zs [B,S,Vs], y/x [B,S], Es/Ws [Vs,ds]; xt/yt [B,T], Ht [B,T,dt], Et [Vt,dt].
    `chunks` [B,S,T] and `chunk_mode` ("attention" | "projection"): the chunk-level ablations of step 4 (see
    cross_model_attention); steps 5-7 are unchanged.

    Options, off in reference mode (measured in BENCHMARKS.md "Why the DSKD family did not transfer"):
    - t2s_kd_rows="all": KD_t2s over every supervised row, not only those where argmax Zt2s == y; "none": no
      KD_t2s (the teacher reaches the student through KD_s2t only; CE_t2s still trains the attention).
    - student_kd=False: the student gets no gradient from the KD terms: KD_t2s stays out of L (it is still
      returned) and Hs enters the s2t branch detached, so CE_t2s and KD_s2t train the projectors only. The distill
      stage uses it for a projector warm-up (--projector-warmup-steps).
    - t2s_values="hidden": Vt2s = t2s(Ht~), without the gold target's embedding (see cross_model_attention).
    """
    if t2s_kd_rows not in T2S_KD_ROWS:
        raise ValueError(f"t2s_kd_rows {t2s_kd_rows!r}: expected one of {', '.join(T2S_KD_ROWS)}")
    div = get_divergence(divergence)
    ht = teacher_hidden.detach()  # the teacher is frozen (cached states)
    ce_student = cross_entropy_sum(student_logits, labels if ce_labels is None else ce_labels)
    hs = student_hidden if student_kd else student_hidden.detach()  # warm-up: KD_s2t trains s2t (and query) only
    cma = cross_model_attention(hs, labels, input_ids, student_embed, teacher_input_ids, teacher_labels,
                                teacher_hidden, teacher_embed, projectors, teacher_embed_scale, chunks,
                                chunk_mode, teacher_attention_mask, t2s_values)  # steps 1-4
    ms, mt, a_t2s, a_s2t = cma.student_mask, cma.teacher_mask, cma.a_t2s, cma.a_s2t

    # Step 5: teacher -> student, only the supervised student rows need logits.
    ws = student_head.detach()  # the t2s branch must not train the student's head
    with fp32_region(a_t2s.device):  # fp32 weighted sums, as the release (its values are .float())
        ht2s = (a_t2s @ cma.v_t2s).to(ws.dtype)  # [B, S, ds], back to the model dtype
        hs2t = a_s2t @ cma.v_s2t  # [B, T, dt]
    y = labels[ms]  # [Ns]
    with fp32_region(ht2s.device):
        zt2s = ht2s[ms].float() @ ws.float().T  # [Ns, Vs]
    ce_t2s = cross_entropy_sum(zt2s, y)
    acc = zt2s.detach().argmax(-1) == y  # [Ns]
    rows = {"accurate": acc, "all": torch.ones_like(acc), "none": torch.zeros_like(acc)}[t2s_kd_rows]
    kd_t2s = div(student_logits[ms], zt2s.detach() / teacher_temperature, rows, tau=tau)

    # Step 6: student -> teacher over the full teacher vocabulary, chunked.
    kd_s2t, s2t_argmax = chunked_fkl_over_head(
        ht, hs2t, teacher_head, mt, tau=tau, chunk_tokens=chunk_tokens, return_argmax=True
    )
    s2t_correct = (s2t_argmax == teacher_labels[mt]).sum()

    return DSKDOutput(
        loss=_combine(ce_student, ce_t2s, kd_t2s if student_kd else torch.zeros_like(kd_t2s), kd_s2t, kd_rate),
        ce_student=ce_student,
        ce_t2s=ce_t2s,
        kd_t2s=kd_t2s,
        kd_s2t=kd_s2t,
        n_student=ms.sum(),
        n_teacher=mt.sum(),
        t2s_correct=acc.sum(),
        s2t_correct=s2t_correct,
        t2s_kd_tokens=rows.sum(),
        attention_entropy=cma.attention_entropy(),
        queries=cma.queries,
        keys=cma.keys,
        student_mask=ms,
        teacher_mask=mt,
    )
