"""Cross-tokenizer baselines: MinED (minimum-edit-distance token mapping + DTW) and ULD (sorted-distribution L1).

The math is spec/other_methods.md "Baselines". Every loss term is a token SUM; the stage divides the step total
once by the supervised student tokens of the whole step (spec/dskd.md "Reduction").
Token strings are normalised by dskd_pipe.pipeline.alignment.TokenStrings: the text BYTES a token stands for,
with the space markers ("Ġ", "▁") removed; special tokens keep their own string.
Refs: MinED as in FuseLLM (Wan et al., arXiv 2401.10491) and the DSKD baselines (arXiv 2406.17328);
ULD: Boizard et al., arXiv 2402.12030.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from dskd_pipe.pipeline.alignment import EtaPairs, TokenStrings, aligned_pairs_for_batch
from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum, forward_kl
from dskd_pipe.pipeline.objectives.dskd import DEFAULT_CHUNK_TOKENS, TeacherHead, teacher_logits

UNMAPPED_LOGIT = -1e5  # student ids no teacher id maps to (spec: "unmapped ids -1e5"); also the one-hot's zeros
TOKEN_MAP_VERSION = 1  # bump when the mapping rule changes: old cache files are then rebuilt
_FIRST_WINDOW = 2  # first length window (|len_t - len_s| <= 2) of the bucketed edit-distance search
_MAX_DP_CELLS = 1 << 23  # [n_teacher, n_candidates, M+1] int32 cells per DP block: 32 MiB


class BaselineError(ValueError):
    """A baseline cannot run on these inputs; the message says which input and what to do."""


# --------------------------------------------------------------------------------------------------------
# Edit distance, vectorised
# --------------------------------------------------------------------------------------------------------


def _pad_bytes(strings: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """[n, M] int16 byte codes padded with -1 (never equal to a byte) and the lengths [n]."""
    lengths = np.array([len(s) for s in strings], dtype=np.int64)
    width = int(lengths.max()) if len(strings) else 0
    out = np.full((len(strings), max(width, 1)), -1, dtype=np.int16)
    for k, s in enumerate(strings):
        if s:
            out[k, : len(s)] = np.frombuffer(s, dtype=np.uint8)
    return out, lengths


def _edit_distance_block(teacher: np.ndarray, cand: np.ndarray, cand_len: np.ndarray) -> np.ndarray:
    """Levenshtein distances [nt, nc] between nt teacher strings of ONE length L and nc candidates.

    teacher [nt, L], cand [nc, M] padded with -1, cand_len [nc]. Row recurrence of the DP table over the teacher
    characters; within a row D[i, j] = min(A_j, D[i, j-1] + 1) with A_j = min(D[i-1, j] + 1, D[i-1, j-1] + sub),
    which is the prefix minimum j + cummin_k(A_k - k): one vectorised step per teacher character.
    Cells past a candidate's length are computed but never read (they do not feed earlier cells).
    """
    nt, length = teacher.shape
    nc, width = cand.shape
    cols = np.arange(width + 1, dtype=np.int32)
    prev = np.broadcast_to(cols, (nt, nc, width + 1)).copy()  # D[0, j] = j
    for i in range(1, length + 1):
        sub = (teacher[:, None, None, i - 1] != cand[None, :, :]).astype(np.int32)  # [nt, nc, M]
        a = np.empty_like(prev)
        a[..., 0] = i
        np.minimum(prev[..., 1:] + 1, prev[..., :-1] + sub, out=a[..., 1:])
        prev = np.minimum.accumulate(a - cols, axis=-1) + cols
    idx = np.broadcast_to(cand_len[None, :, None], (nt, nc, 1))
    return np.take_along_axis(prev, idx, axis=-1)[..., 0]  # [nt, nc]


def edit_distance_matrix(a: Sequence[bytes], b: Sequence[bytes]) -> np.ndarray:
    """Levenshtein distance (unit insert/delete/substitute, over bytes) for every pair: [len(a), len(b)] int32."""
    out = np.zeros((len(a), len(b)), dtype=np.int32)
    if not len(a) or not len(b):
        return out
    cand, cand_len = _pad_bytes(b)
    a_len = np.array([len(s) for s in a])
    for length in np.unique(a_len):
        rows = np.nonzero(a_len == length)[0]
        if length == 0:
            out[rows] = cand_len[None, :]
            continue
        block, _ = _pad_bytes([a[r] for r in rows])
        step = max(1, _MAX_DP_CELLS // (len(b) * (cand.shape[1] + 1)))
        for s in range(0, len(rows), step):
            out[rows[s : s + step]] = _edit_distance_block(block[s : s + step, :length], cand, cand_len)
    return out


# --------------------------------------------------------------------------------------------------------
# MinED token map
# --------------------------------------------------------------------------------------------------------


def _vocab_strings(tok: TokenStrings, size: int) -> tuple[list[bytes], list[bytes]]:
    """Per id: (decoded bytes with spaces kept, normalised bytes with the space markers removed)."""
    full = [tok.token_bytes(i) for i in range(size)]
    stripped = [tok.eta_one(i) for i in range(size)]
    return full, stripped


def _search_candidates(t_strings: list[bytes], s_stripped: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(best student id, distance) for each teacher string by the bucketed minimum edit distance search.

    Buckets: student ids by the first normalised byte. For a teacher string of length L starting with byte c:
    pass 1 searches the bucket c within |len diff| <= w (w = 2, doubled until the window holds a candidate);
    pass 2 widens the window to the best distance d found (a candidate with |len diff| > d cannot be closer), so
    the result is the exact minimum over the student tokens that share the first byte. Teacher strings whose
    first byte starts no student token search every non-empty student token the same way. Ties: lowest id.
    """
    s_len = np.array([len(s) for s in s_stripped], dtype=np.int64)
    s_first = np.array([s[0] if s else -1 for s in s_stripped], dtype=np.int64)
    nonempty = np.nonzero(s_len > 0)[0]  # ascending ids, so argmin ties pick the lowest id
    buckets = {int(c): nonempty[s_first[nonempty] == c] for c in np.unique(s_first[nonempty])}
    best_id = np.full(len(t_strings), -1, dtype=np.int64)
    best_d = np.full(len(t_strings), np.iinfo(np.int32).max, dtype=np.int64)

    def run(members: np.ndarray, cands: np.ndarray, length: int) -> None:
        if not len(cands):
            return
        cand, cand_len = _pad_bytes([s_stripped[c] for c in cands])
        block, _ = _pad_bytes([t_strings[m] for m in members])
        step = max(1, _MAX_DP_CELLS // (len(cands) * (cand.shape[1] + 1)))
        for s in range(0, len(members), step):
            rows = members[s : s + step]
            dist = _edit_distance_block(block[s : s + step, :length], cand, cand_len)  # [n, nc]
            k = dist.argmin(axis=1)
            d = dist[np.arange(len(rows)), k]
            ids = cands[k]
            better = (d < best_d[rows]) | ((d == best_d[rows]) & (ids < best_id[rows]))
            best_d[rows[better]], best_id[rows[better]] = d[better], ids[better]

    t_len = np.array([len(t_strings[m]) for m in range(len(t_strings))], dtype=np.int64)
    t_first = np.array([t_strings[m][0] if t_strings[m] else -1 for m in range(len(t_strings))], dtype=np.int64)
    empty = np.nonzero(t_len == 0)[0]
    if len(empty):  # distance = the candidate's length: the shortest non-empty student string, lowest id
        pick = nonempty[np.argmin(s_len[nonempty])] if len(nonempty) else 0
        best_id[empty], best_d[empty] = pick, s_len[pick]
    keys = {(int(c), int(n)) for c, n in zip(t_first, t_len) if n > 0}
    for c, length in sorted(keys):
        members = np.nonzero((t_first == c) & (t_len == length))[0]
        pool = buckets.get(c, nonempty)
        diff = np.abs(s_len[pool] - length)
        w = _FIRST_WINDOW
        while not (diff <= w).any() and w < int(diff.max(initial=0)):
            w *= 2
        run(members, pool[diff <= w], length)
        reach = int(best_d[members].max())
        if reach > w:  # pass 2: lengths the first window skipped but that could still be closer
            run(members, pool[(diff > w) & (diff <= reach)], length)
    return best_id, best_d


def _token_map_path(cache_dir: Path, fp_t: str, fp_s: str) -> Path:
    key = hashlib.sha256(f"{fp_t}|{fp_s}|v{TOKEN_MAP_VERSION}".encode()).hexdigest()[:32]
    return cache_dir / f"mined_token_map_{key}.safetensors"


def mined_token_map(teacher_tok, student_tok, cache_dir: Optional[str | os.PathLike] = None) -> Tensor:
    """LongTensor [len(teacher_tok)]: for every teacher id, the student id with the minimum edit distance.

    Token strings are compared as normalised bytes (TokenStrings.eta_one: space markers removed, special tokens
    as themselves). Order of rules:
      1. the teacher's EOS maps to the student's EOS;
      2. exact match of the decoded bytes WITH spaces (so "Ġthe" -> "Ġthe", "ĠĠ" -> "ĠĠ"), lowest student id;
      3. exact match of the normalised bytes (Llama "▁the" -> GPT-2 "Ġthe"), lowest student id;
      4. minimum Levenshtein distance over bytes, searched in buckets (see _search_candidates: exact within the
         student tokens that share the first byte), ties -> lowest id.
    With cache_dir the map is stored once per tokenizer pair as safetensors, keyed by both
    tokenizer_fingerprint()s, and loaded from there on later calls.
    """
    from safetensors.torch import load_file, save_file

    from dskd_pipe.pipeline.models import tokenizer_fingerprint

    fp_t, fp_s = tokenizer_fingerprint(teacher_tok), tokenizer_fingerprint(student_tok)
    path = _token_map_path(Path(cache_dir), fp_t, fp_s) if cache_dir is not None else None
    if path is not None and path.exists():
        table = load_file(str(path))["token_map"]
        if table.shape != (len(teacher_tok),):
            raise BaselineError(f"{path}: token map has shape {tuple(table.shape)}, expected ({len(teacher_tok)},) "
                                "for this teacher tokenizer. Delete the file to rebuild it.")
        return table

    t_str, s_str = TokenStrings(teacher_tok), TokenStrings(student_tok)
    t_full, t_stripped = _vocab_strings(t_str, len(teacher_tok))
    s_full, s_stripped = _vocab_strings(s_str, len(student_tok))
    by_full: dict[bytes, int] = {}
    by_stripped: dict[bytes, int] = {}
    for idx in range(len(student_tok)):  # ascending ids: setdefault keeps the lowest
        by_full.setdefault(s_full[idx], idx)
        by_stripped.setdefault(s_stripped[idx], idx)

    table = np.full(len(teacher_tok), -1, dtype=np.int64)
    for idx in range(len(teacher_tok)):
        hit = by_full.get(t_full[idx], by_stripped.get(t_stripped[idx], -1))
        table[idx] = hit
    table[t_str.eos_id] = s_str.eos_id
    rest = np.nonzero(table < 0)[0]
    if len(rest):
        best_id, _ = _search_candidates([t_stripped[r] for r in rest], s_stripped)
        table[rest] = best_id
    out = torch.from_numpy(table)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"token_map": out}, str(tmp), metadata={
            "teacher_fingerprint": fp_t, "student_fingerprint": fp_s, "version": str(TOKEN_MAP_VERSION)})
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written map under the real name
    return out


def first_teacher_per_student(token_map: Tensor, student_vocab: int) -> Tensor:
    """LongTensor [student_vocab]: the lowest teacher id mapped to each student id, -1 where none is."""
    valid = (token_map >= 0) & (token_map < student_vocab)
    t_ids = torch.nonzero(valid).squeeze(-1)  # [K]
    # scatter_reduce amin: deterministic on every device (index_put with duplicate indices is not)
    inverse = torch.full((student_vocab,), len(token_map), dtype=torch.long, device=token_map.device)
    inverse.scatter_reduce_(0, token_map[t_ids], t_ids, reduce="amin")
    return torch.where(inverse == len(token_map), torch.full_like(inverse, -1), inverse)


# --------------------------------------------------------------------------------------------------------
# MinED sequence alignment (DTW)
# --------------------------------------------------------------------------------------------------------


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """The classic DTW path through a [T, S] cost matrix: D[i, j] = C[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1]).

    Filled along anti-diagonals (vectorised). Backtracking from (T-1, S-1) prefers the diagonal, then (i-1, j),
    then (i, j-1) on ties. Returns the path from (0, 0) to (T-1, S-1).
    """
    t_n, s_n = cost.shape
    inf = np.iinfo(np.int64).max // 4
    acc = np.full((t_n + 1, s_n + 1), inf, dtype=np.int64)  # acc[i+1, j+1] = D[i, j]
    acc[0, 0] = 0
    c = cost.astype(np.int64)
    for k in range(t_n + s_n - 1):  # anti-diagonal i + j = k
        i = np.arange(max(0, k - s_n + 1), min(k, t_n - 1) + 1)
        j = k - i
        best = np.minimum(np.minimum(acc[i, j], acc[i, j + 1]), acc[i + 1, j])
        acc[i + 1, j + 1] = c[i, j] + best
    path = [(t_n - 1, s_n - 1)]
    i, j = t_n - 1, s_n - 1
    while (i, j) != (0, 0):
        options = [(acc[i, j], i - 1, j - 1), (acc[i, j + 1], i - 1, j), (acc[i + 1, j], i, j - 1)]
        _, i, j = min(options, key=lambda o: o[0])  # min keeps the first of equal values: diagonal first
        path.append((i, j))
    return path[::-1]


def mined_alignment(teacher_strings: Sequence[bytes], student_strings: Sequence[bytes]) -> list[tuple[int, int]]:
    """1-to-1 aligned positions of two token-string sequences of one example (MinED).

    DTW over the cost C[i, j] = Levenshtein(teacher_strings[i], student_strings[j]) (normalised strings, see
    TokenStrings.eta); a path pair (i, j) is kept when i occurs in no other path pair and j in no other path pair.
    Returns [(teacher index, student index)] in order; empty if either side is empty.
    """
    if not len(teacher_strings) or not len(student_strings):
        return []
    path = dtw_path(edit_distance_matrix(list(teacher_strings), list(student_strings)))
    t_count: dict[int, int] = {}
    s_count: dict[int, int] = {}
    for i, j in path:
        t_count[i] = t_count.get(i, 0) + 1
        s_count[j] = s_count.get(j, 0) + 1
    return [(i, j) for i, j in path if t_count[i] == 1 and s_count[j] == 1]


def mined_pairs_for_batch(teacher_labels, student_labels, teacher_tok, student_tok) -> EtaPairs:
    """MinED 1-to-1 pairs for a batch, on CPU, in the padded label-position form of alignment.EtaPairs.

    Runs mined_alignment over the supervised labels (label != -100: the response ids + EOS) of each row.
    teacher_tok / student_tok: tokenizers or TokenStrings (reuse TokenStrings across batches for its id cache).
    The token-map condition is applied later, in mined_loss.
    """
    return aligned_pairs_for_batch(teacher_labels, student_labels, teacher_tok, student_tok,
                                   lambda t, s, t_eos, s_eos: mined_alignment(t, s))


# --------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------


@dataclass
class BaselineOutput:
    """Loss terms (token sums, fp32) of one micro-batch: loss = (1 - lambda) ce_student + lambda kd.

    n_student: supervised student tokens; kd_positions: positions the KD term is summed over;
    aligned: positions with a carried teacher distribution (MinED) or valid on both sides (ULD).
    """

    loss: Tensor
    ce_student: Tensor
    kd: Tensor
    n_student: Tensor
    kd_positions: Tensor
    aligned: Tensor

    def log_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach())
                for name in ("loss", "ce_student", "kd", "n_student", "kd_positions", "aligned")}


def _carried_head(head: TeacherHead, inverse: Tensor) -> TeacherHead:
    """The teacher head restricted to one row per student id (row inverse[s]; row 0 where unmapped, masked later).

    Zt[:, inverse] computed as h Wt[inverse]^T: the [N, Vt] teacher logits are never built.
    """
    rows = inverse.clamp_min(0).to(head.weight.device)
    bias = head.bias[rows] if head.bias is not None else None
    return TeacherHead(head.weight[rows], bias, head.logit_scale, head.final_logit_softcap)


def mined_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_hidden: Tensor,
    teacher_labels: Tensor,
    teacher_head: TeacherHead,
    pairs: EtaPairs,
    token_map: Tensor,
    kd_rate: float = 0.5,
    tau: float = 2.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ce_labels: Tensor | None = None,
) -> BaselineOutput:
    """MinED (spec/other_methods.md "Baselines"), all terms token sums.

    Target per supervised student position j (logits over student ids):
      aligned (a 1-to-1 pair (i, j) of `pairs` with token_map[yt_i] == y_j): Zc_j[s] = Zt_i[first teacher id
        mapped to s], UNMAPPED_LOGIT (-1e5) where no teacher id maps to s;
      otherwise: one-hot on the gold token y_j (logit 0 there, -1e5 elsewhere).
    KD = sum_ms FKL(target_j || Zs_j; tau);  L = (1 - lambda) CE_s + lambda KD.
    Only the aligned teacher rows are turned into logits, chunk_tokens rows at a time, through the head rows of
    the carried ids: at most [chunk, Vs] carried logits exist per step; gradient flows into student_logits only.
    Shapes: Zs [B,S,Vs], y [B,S], Ht [B,T,dt], yt [B,T], token_map [len(teacher tokenizer)].
    """
    ms = labels != -100  # [B, S]
    batch, seq, vocab = student_logits.shape
    ce_student = cross_entropy_sum(student_logits, labels if ce_labels is None else ce_labels)

    b_idx, t_pos, s_pos = (x.to(labels.device) for x in pairs.flat())  # [P] each
    token_map = token_map.to(labels.device)
    t_tok = teacher_labels[b_idx, t_pos]  # [P]
    s_tok = labels[b_idx, s_pos]  # [P]
    keep = (t_tok >= 0) & (s_tok >= 0) & (token_map[t_tok.clamp_min(0)] == s_tok)
    b_idx, t_pos, s_pos = b_idx[keep], t_pos[keep], s_pos[keep]

    # Targets as logits over student ids for every supervised student row: one-hot gold first.
    row_of = torch.full((batch, seq), -1, dtype=torch.long, device=labels.device)
    row_of[ms] = torch.arange(int(ms.sum()), device=labels.device)
    target = torch.full((int(ms.sum()), vocab), UNMAPPED_LOGIT, dtype=torch.float32, device=student_logits.device)
    target[torch.arange(target.shape[0], device=target.device), labels[ms]] = 0.0
    if len(s_pos):
        inverse = first_teacher_per_student(token_map, vocab).to(teacher_head.weight.device)  # [Vs]
        head = _carried_head(teacher_head, inverse)
        unmapped = (inverse < 0).to(target.device)  # [Vs]
        rows = row_of[b_idx, s_pos]  # [A]
        hidden = teacher_hidden.detach()[b_idx, t_pos]  # [A, dt]: only the aligned teacher rows
        for start in range(0, len(rows), chunk_tokens):
            z = teacher_logits(hidden[start : start + chunk_tokens], head).to(target.device)  # [c, Vs]
            target[rows[start : start + chunk_tokens]] = z.masked_fill(unmapped, UNMAPPED_LOGIT)
    all_rows = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    kd = forward_kl(student_logits[ms], target, all_rows, tau=tau)
    return BaselineOutput(
        loss=(1.0 - kd_rate) * ce_student + kd_rate * kd,
        ce_student=ce_student,
        kd=kd,
        n_student=ms.sum(),
        kd_positions=ms.sum(),
        aligned=torch.tensor(len(s_pos), device=labels.device),
    )


def _response_rows(labels: Tensor) -> list[Tensor]:
    """Per example, the positions with label != -100, in order (the response span shifted to start at 0)."""
    return [torch.nonzero(row != -100).squeeze(-1) for row in labels]


def uld_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher_hidden: Tensor,
    teacher_labels: Tensor,
    teacher_head: TeacherHead,
    kd_rate: float = 0.5,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ce_labels: Tensor | None = None,
) -> BaselineOutput:
    """Universal Logit Distillation (spec/other_methods.md "Baselines"; Boizard et al., arXiv 2402.12030).

    Both sequences are cut to their response spans (labels != -100) and shifted to start at 0; position k of
    example b pairs the k-th student response position with the k-th teacher one, for k < min(ns_b, nt_b).
    Per pair: p_s = sort_desc(softmax(Zs)), p_t = sort_desc(softmax(Zt)) (tau 1, fp32), the smaller vocabulary
    zero-padded; ULD = sum_k sum_v |p_s,v - p_t,v|;  L = (1 - lambda) CE_s + lambda ULD.
    Teacher logits are rebuilt from the hidden states chunk_tokens rows at a time; gradient into Zs only.
    Shapes: Zs [B,S,Vs], y [B,S], Ht [B,T,dt], yt [B,T].
    """
    ce_student = cross_entropy_sum(student_logits, labels if ce_labels is None else ce_labels)
    s_rows, t_rows = _response_rows(labels), _response_rows(teacher_labels)
    b_s, b_t = [], []
    for b, (s, t) in enumerate(zip(s_rows, t_rows)):
        n = min(len(s), len(t))
        b_s.append(b * labels.shape[1] + s[:n])
        b_t.append(b * teacher_labels.shape[1] + t[:n])
    s_flat = torch.cat(b_s) if b_s else torch.empty(0, dtype=torch.long, device=labels.device)
    t_flat = torch.cat(b_t).to(teacher_hidden.device) if b_t else torch.empty(0, dtype=torch.long)
    zs_all = student_logits.reshape(-1, student_logits.shape[-1])
    ht_all = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    uld = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    for start in range(0, len(s_flat), chunk_tokens):
        zs = zs_all[s_flat[start : start + chunk_tokens]].float()  # [c, Vs]
        p_s = torch.softmax(zs, dim=-1).sort(dim=-1, descending=True).values
        with torch.no_grad():
            zt = teacher_logits(ht_all[t_flat[start : start + chunk_tokens]], teacher_head)  # [c, Vt]
            p_t = torch.softmax(zt, dim=-1).sort(dim=-1, descending=True).values.to(p_s.device)
        shared = min(p_s.shape[-1], p_t.shape[-1])
        # The zero-padded tail of the smaller side contributes |p - 0| = the larger side's tail mass.
        uld = uld + (p_s[:, :shared] - p_t[:, :shared]).abs().sum() + p_s[:, shared:].sum() + p_t[:, shared:].sum()
    ms = labels != -100
    return BaselineOutput(
        loss=(1.0 - kd_rate) * ce_student + kd_rate * uld,
        ce_student=ce_student,
        kd=uld,
        n_student=ms.sum(),
        kd_positions=torch.tensor(len(s_flat), device=labels.device),
        aligned=torch.tensor(len(s_flat), device=labels.device),
    )
