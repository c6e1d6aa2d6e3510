"""Probes of a trained cross-model attention (spec/cma_ga.md "Probes and heatmaps"): pure functions.

Ground truth: the two tokenisations of the same text agree on "chunks", the shortest stretches of tokens on both sides
that end at the same character. A good t2s attention puts each student token's weight inside its own chunk.

Position convention (as in the batch, pipeline/loader.Collate): inputs = ids[:-1], labels = ids[1:], and the rows
(student) and columns (teacher) of the attention are LABEL positions, so position k is the target token ids[k + 1].
The offsets passed here must therefore be those of the targets: `offsets[1:]` of the TokenSequence / store record
(see `label_offsets`), and the masks are `labels != -100` (response tokens, EOS included).
"""
from __future__ import annotations

import torch
from torch import Tensor

from dskd_pipe.pipeline.objectives.dskd import Projectors, cross_model_attention


def label_offsets(offsets) -> Tensor:
    """[L-1, 2] character spans of the label positions: label k is token ids[k + 1], so drop the first row."""
    off = torch.as_tensor(offsets, dtype=torch.long).reshape(-1, 2)
    return off[1:]


def chunk_ids(teacher_offsets, student_offsets, teacher_mask, student_mask) -> tuple[Tensor, Tensor]:
    """(teacher [T], student [S]) long: the ordinal of the ground-truth chunk each label position lies in, -1 outside.

    Only masked (response) positions take part, in order. Walk both lists by character END offsets: start a chunk
    at the next token of each side; while the two end offsets differ, extend the side with the smaller end; when
    they meet the stretch is one chunk (numbered 0, 1, ... in text order). After a meeting at end e, following
    tokens with a non-empty span that also end at e are absorbed into the chunk (byte-level tokenizers split one
    character into several tokens with the same span). An empty-span token (EOS, span (L, L) at the end of the text)
    is not absorbed, so EOS forms its own chunk with the other side's EOS. A trailing stretch whose ends never meet
    (one side cut by max_length) gets no chunk: its positions stay -1.
    Shapes: offsets [T, 2] / [S, 2] (label positions, see module doc), masks [T] / [S] bool.
    """
    s_off = torch.as_tensor(student_offsets, dtype=torch.long).reshape(-1, 2)
    t_off = torch.as_tensor(teacher_offsets, dtype=torch.long).reshape(-1, 2)
    s_pos = torch.nonzero(torch.as_tensor(student_mask, dtype=torch.bool).reshape(-1)[: s_off.shape[0]]).flatten()
    t_pos = torch.nonzero(torch.as_tensor(teacher_mask, dtype=torch.bool).reshape(-1)[: t_off.shape[0]]).flatten()
    s_span = s_off[s_pos].tolist()  # [[start, end], ...] of response tokens, in order
    t_span = t_off[t_pos].tolist()
    t_ids = torch.full((len(teacher_mask),), -1, dtype=torch.long)
    s_ids = torch.full((len(student_mask),), -1, dtype=torch.long)
    i = j = n = 0
    while i < len(s_span) and j < len(t_span):
        i0, j0 = i, j
        es, et = s_span[i][1], t_span[j][1]
        while es != et:
            if es < et:
                i += 1
                if i == len(s_span):
                    break
                es = s_span[i][1]
            else:
                j += 1
                if j == len(t_span):
                    break
                et = t_span[j][1]
        if i == len(s_span) or j == len(t_span):
            break  # the ends never met: a truncated tail, no chunk
        while i + 1 < len(s_span) and s_span[i + 1][1] == es and s_span[i + 1][0] < es:
            i += 1
        while j + 1 < len(t_span) and t_span[j + 1][1] == et and t_span[j + 1][0] < et:
            j += 1
        s_ids[s_pos[i0:i + 1]] = n
        t_ids[t_pos[j0:j + 1]] = n
        n, i, j = n + 1, i + 1, j + 1
    return t_ids, s_ids


def chunk_alignment(teacher_offsets, student_offsets, teacher_mask, student_mask) -> Tensor:
    """bool [S, T]: True where student position i and teacher position j lie in the same ground-truth chunk
    (`chunk_ids`). Shapes: offsets [S, 2] / [T, 2] (label positions, see module doc), masks [S] / [T] bool."""
    t_ids, s_ids = chunk_ids(teacher_offsets, student_offsets, teacher_mask, student_mask)
    return (s_ids[:, None] == t_ids[None, :]) & (s_ids[:, None] >= 0)


def alignment_counts(attn: Tensor, chunks: Tensor, student_mask: Tensor) -> tuple[int, float, int]:
    """(hits, in-chunk mass sum, rows) over student response rows that have a chunk.

    hits = #rows whose argmax_j attn[i, j] lies in the row's chunk; mass = sum_i sum_j attn[i, j] chunks[i, j].
    Shapes: attn [S, T] (rows sum to 1 over teacher positions), chunks [S, T] bool, student_mask [S] bool.
    """
    chunks = chunks.to(attn.device).bool()
    rows = student_mask.to(attn.device).bool() & chunks.any(-1)  # [S]
    a, c = attn[rows].float(), chunks[rows]  # [N, T]
    if a.shape[0] == 0:
        return 0, 0.0, 0
    hits = c.gather(1, a.argmax(-1, keepdim=True)).sum()
    mass = (a * c.float()).sum()
    return int(hits), float(mass), int(a.shape[0])


def alignment_accuracy(attn: Tensor, chunks: Tensor, student_mask: Tensor) -> tuple[float, float]:
    """(accuracy, in_chunk_mass): the share of student response tokens whose argmax attention falls inside their
    own chunk, and the mean attention mass inside the chunk. NaN for both when no row has a chunk.
    Shapes: attn [S, T], chunks [S, T] bool, student_mask [S] bool.
    """
    hits, mass, n = alignment_counts(attn, chunks, student_mask)
    if n == 0:
        return float("nan"), float("nan")
    return hits / n, mass / n


def cma_attention(batch: dict, student_hidden: Tensor, student_embed: Tensor, teacher_embed: Tensor,
                  projectors: Projectors, teacher_embed_scale: float = 1.0, cma_std: str = "valid") -> Tensor:
    """a_t2s [B, S, T] of a trained DSKD-CMA / CMA-GA for one batch: spec/dskd.md "DSKD-CMA" steps 1-4, computed by
    dskd.cross_model_attention itself (softmax over teacher label positions; -1e5 outside response x response).

    batch: the Collate dict (input_ids, labels [B, S]; teacher_input_ids, teacher_labels, teacher_attention_mask
    [B, T]; teacher_hidden [B, T, dt]). The key/hidden normalisation is one scalar std per batch as the run was
    trained (cma_std: over the teacher's real tokens, or "padded" over the padded batch), so the attention of an
    example depends (through a scalar temperature) on its batch-mates; batch size 1 is exact per example.
    """
    mask = batch["teacher_attention_mask"].bool() if cma_std == "valid" else None
    cma = cross_model_attention(student_hidden, batch["labels"], batch["input_ids"], student_embed,
                                batch["teacher_input_ids"], batch["teacher_labels"], batch["teacher_hidden"],
                                teacher_embed, projectors, teacher_embed_scale, teacher_attention_mask=mask)
    return cma.a_t2s.detach()
