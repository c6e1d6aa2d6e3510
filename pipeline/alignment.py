"""Token-string alignment between two tokenizers: normalised token texts, vocabulary overlap, the ETA walk.

Shared by DSKDv2 (ideal projector init, Exact Token Alignment), MinED and probes (spec/other_methods.md).

Three tokenizer families are handled:
- byte-level BPE (GPT-2, Qwen): every byte is shown as one printable character (" " -> "Ġ", "\\n" -> "Ċ");
  the token's bytes come back through the inverse of GPT-2's bytes_to_unicode table.
- SentencePiece-style (Llama-2): "▁" marks a space; byte-fallback tokens "<0x0A>" stand for one raw byte.
- WordPiece (BERT; the quality benchmark's student): "##" marks a piece that continues a word; any other token
  starts a word, which in text follows a space unless it is punctuation (BERT's pre-tokenizer splits it off).
Special tokens (EOS, ...) keep their own string.

A normalised token is BYTES, not str: byte-level tokens often hold part of a UTF-8 character ("Ġæ", "Ŀ", "±" for
" 東"), so the ETA prefixes are compared and measured in bytes.
Ref: DSKDv2, arXiv 2504.11426.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
WORDPIECE = "wordpiece"
CONTINUATION_WP = "##"  # WordPiece's mark of a piece inside a word
SPACE_MARKER_BL = "Ġ"  # byte-level BPE's picture of the space byte
SPACE_MARKER_SP = "▁"  # SentencePiece's space marker
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class AlignmentError(ValueError):
    """A tokenizer or an input the alignment code cannot handle; the message says which and what to do."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}


def tokenizer_kind(tokenizer) -> str:
    """BYTE_LEVEL or SENTENCEPIECE, read from the fast tokenizer's decoder (the part that turns tokens into text)."""
    try:
        decoder = tokenizer.backend_tokenizer.decoder
        state = decoder.__getstate__().decode("utf-8") if decoder is not None else ""
    except AttributeError as e:
        raise AlignmentError(f"{getattr(tokenizer, 'name_or_path', tokenizer)}: not a fast tokenizer ({e}); "
                             "token alignment needs tokenizer.json.") from e
    if '"ByteLevel"' in state:
        return BYTE_LEVEL
    if SPACE_MARKER_SP in state or '"Metaspace"' in state:
        return SENTENCEPIECE
    if '"WordPiece"' in state:
        return WORDPIECE
    raise AlignmentError(f"{getattr(tokenizer, 'name_or_path', tokenizer)}: unknown token format (decoder: "
                         f"{state[:120] or 'none'}); expected a byte-level BPE, a SentencePiece '▁' or a WordPiece "
                         "tokenizer.")


def _wordpiece_text(token: str) -> str:
    """A WordPiece token as text: "##ing" -> "ing" (inside a word), "the" -> " the" (a word after a space),
    "." -> "." (punctuation: BERT splits it off the word it follows)."""
    if token.startswith(CONTINUATION_WP) and len(token) > len(CONTINUATION_WP):
        return token[len(CONTINUATION_WP):]
    if all(not c.isalnum() for c in token):
        return token
    return " " + token


def token_bytes(token: str, kind: str, special: bool = False) -> bytes:
    """The text bytes one token stands for, with spaces as real spaces (the markers decoded).

    byte-level: "Ġthe" -> b" the", "Ċ" -> b"\\n", "Ã©" -> b"\\xc3\\xa9" ("é");
    SentencePiece: "▁the" -> b" the", "<0x0A>" -> b"\\n"; WordPiece: "the" -> b" the", "##e" -> b"e", "." -> b".";
    special tokens: their own string, UTF-8.
    """
    if special:
        return token.encode("utf-8")
    if kind == WORDPIECE:
        return _wordpiece_text(token).encode("utf-8")
    if kind == BYTE_LEVEL:
        if all(c in _BYTE_DECODER for c in token):
            return bytes(_BYTE_DECODER[c] for c in token)
        return token.encode("utf-8")  # an added token outside the byte alphabet: its string as is
    m = _BYTE_FALLBACK.match(token)
    if m:
        return bytes([int(m.group(1), 16)])
    return token.replace(SPACE_MARKER_SP, " ").encode("utf-8")


class TokenStrings:
    """Per-tokenizer normalisation of token ids, cached per id.

    `eta(ids)`: the ETA strings, i.e. token_bytes with the space markers removed (every decoded space byte of a
    non-special token dropped), special tokens unchanged. `eos`: the ETA string of the EOS token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.kind = tokenizer_kind(tokenizer)
        self.special_ids = set(int(i) for i in tokenizer.all_special_ids)
        if tokenizer.eos_token_id is None:
            raise AlignmentError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token; set eos_token in its config.")
        self.eos_id = int(tokenizer.eos_token_id)
        self._cache: dict[int, bytes] = {}

    def token_bytes(self, token_id: int) -> bytes:
        token_id = int(token_id)
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        return token_bytes(token, self.kind, special=token_id in self.special_ids)

    def eta_one(self, token_id: int) -> bytes:
        token_id = int(token_id)
        out = self._cache.get(token_id)
        if out is None:
            raw = self.token_bytes(token_id)
            out = raw if token_id in self.special_ids else raw.replace(b" ", b"")
            self._cache[token_id] = out
        return out

    def eta(self, ids: Sequence[int]) -> list[bytes]:
        return [self.eta_one(i) for i in ids]

    @property
    def eos(self) -> bytes:
        return self.eta_one(self.eos_id)


def _as_token_strings(tok) -> TokenStrings:
    return tok if isinstance(tok, TokenStrings) else TokenStrings(tok)


# --------------------------------------------------------------------------------------------------------
# Vocabulary overlap and the token-string map
# --------------------------------------------------------------------------------------------------------


def vocab_key(token: str, kind: str, special: bool, match: str = "string"):
    """The key two vocabularies are matched on.

    match="string" (spec/other_methods.md DSKDv2 step 1): the token string with "Ġ" mapped to "▁" (so GPT-2 "Ġthe"
    meets Llama "▁the"; "Ċ" does NOT meet "<0x0A>"). match="bytes": the decoded text bytes (token_bytes), which also
    matches newlines, byte-fallback tokens and non-ASCII pieces across the two formats. Special tokens match only
    special tokens with the same string.
    """
    if special:
        return ("special", token)
    if match == "string":
        if kind == WORDPIECE:  # in the "▁" convention: "the" meets "Ġthe" / "▁the", "##e" meets "e"
            return _wordpiece_text(token).replace(" ", SPACE_MARKER_SP)
        return token.replace(SPACE_MARKER_BL, SPACE_MARKER_SP)
    if match == "bytes":
        return token_bytes(token, kind)
    raise AlignmentError(f"unknown vocabulary match {match!r}; expected 'string' or 'bytes'.")


def _key_to_id(tokenizer, match: str) -> dict:
    """key -> lowest id with that key (never the unk id for a missing key: this is a plain dict lookup)."""
    kind = tokenizer_kind(tokenizer)
    special = set(int(i) for i in tokenizer.all_special_ids)
    out: dict = {}
    for token, idx in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        key = vocab_key(token, kind, idx in special, match)
        out.setdefault(key, idx)
    return out


def vocab_overlap(teacher_tok, student_tok, top_k: Optional[int] = None, match: str = "string") -> tuple[Tensor, Tensor]:
    """Token ids present in both vocabularies, matched by token string after mapping "Ġ" -> "▁" on both sides.

    Returns (teacher_ids [K], student_ids [K]) LongTensors, sorted by teacher id (BPE ids roughly follow merge
    order, i.e. frequency); with top_k only the first top_k of those pairs. When several ids share a key the
    lowest id is used. See vocab_key for `match`.
    """
    t_keys = _key_to_id(teacher_tok, match)
    s_keys = _key_to_id(student_tok, match)
    pairs = sorted((t_id, s_keys[key]) for key, t_id in t_keys.items() if key in s_keys)
    if top_k is not None:
        pairs = pairs[:top_k]
    if not pairs:
        raise AlignmentError(f"{teacher_tok.name_or_path} and {student_tok.name_or_path} share no token string; "
                             "try match='bytes'.")
    t_ids, s_ids = zip(*pairs)
    return torch.tensor(t_ids, dtype=torch.long), torch.tensor(s_ids, dtype=torch.long)


UNMAPPED_CHOICES = ("drop", "unk")


def teacher_to_student_token_map(teacher_tok, student_tok, match: str = "string", unmapped: str = "drop") -> Tensor:
    """LongTensor [len(teacher_tok)]: the student id with the same token string (vocab_key), -1 where none.

    The teacher's EOS maps to the student's EOS whatever their strings. Built from get_vocab(), so a missing
    string gives -1, never the unk id (convert_tokens_to_ids would silently return unk for Llama).
    unmapped="unk" (--eta-unmapped unk) reproduces the released DSKDv2 ETA code instead, which looks the teacher's
    token up with convert_tokens_to_ids and trains on whatever comes back: a missing string becomes the student's
    unk id (GPT-2's unk is its EOS, so the t2s branch learns "end of text" there); -1 only for a student without one.
    """
    if unmapped not in UNMAPPED_CHOICES:
        raise AlignmentError(f"unknown unmapped={unmapped!r}; expected one of: {', '.join(UNMAPPED_CHOICES)}.")
    fill = -1
    if unmapped == "unk" and student_tok.unk_token_id is not None:
        fill = int(student_tok.unk_token_id)
    table = torch.full((len(teacher_tok),), fill, dtype=torch.long)
    t_ids, s_ids = vocab_overlap(teacher_tok, student_tok, match=match)
    table[t_ids] = s_ids
    table[int(teacher_tok.eos_token_id)] = int(student_tok.eos_token_id)
    return table


# --------------------------------------------------------------------------------------------------------
# Exact Token Alignment (ETA)
# --------------------------------------------------------------------------------------------------------


def eta_align(
    teacher_token_strings: Sequence[bytes],
    student_token_strings: Sequence[bytes],
    teacher_eos: bytes,
    student_eos: bytes,
) -> list[tuple[int, int]]:
    """The ETA walk of spec/other_methods.md DSKDv2 step 3, over two lists of normalised token strings.

    Strings are TokenStrings.eta outputs (space markers removed; lengths in bytes). With prefixes Pt, Ps:
      Pt == Ps and (t[i] == s[j] or both EOS): align (i, j), append both, advance both;
      elif len(Pt) > len(Ps): append s[j], advance j;   elif len(Pt) < len(Ps): append t[i], advance i;
      else: append both, advance both (same length, different text: skipped).
    Stops when either side runs out. Returns the aligned (teacher index, student index) pairs, in order.
    """
    pairs: list[tuple[int, int]] = []
    t, s = teacher_token_strings, student_token_strings
    i = j = 0
    len_t = len_s = 0
    pt: list[bytes] = []  # prefix pieces; joined only when the lengths are equal
    ps: list[bytes] = []
    while i < len(t) and j < len(s):
        both_eos = t[i] == teacher_eos and s[j] == student_eos
        if len_t == len_s and (t[i] == s[j] or both_eos) and b"".join(pt) == b"".join(ps):
            pairs.append((i, j))
            pt.append(t[i]); ps.append(s[j]); len_t += len(t[i]); len_s += len(s[j])
            i += 1; j += 1
        elif len_t > len_s:
            ps.append(s[j]); len_s += len(s[j]); j += 1
        elif len_t < len_s:
            pt.append(t[i]); len_t += len(t[i]); i += 1
        else:
            pt.append(t[i]); ps.append(s[j]); len_t += len(t[i]); len_s += len(s[j])
            i += 1; j += 1
    return pairs


@dataclass
class EtaPairs:
    """Aligned label positions of a batch, padded with -1.

    teacher_pos [B, A]: indices into the teacher's label axis T (teacher_labels[b, teacher_pos[b, a]] is the
    aligned teacher target); student_pos [B, A]: the same on the student's label axis S. Pair a of example b is
    valid where teacher_pos[b, a] >= 0 (then student_pos[b, a] >= 0 too).
    """

    teacher_pos: Tensor
    student_pos: Tensor

    @property
    def mask(self) -> Tensor:
        return self.teacher_pos >= 0  # [B, A]

    def to(self, device) -> "EtaPairs":
        return EtaPairs(self.teacher_pos.to(device), self.student_pos.to(device))

    def flat(self) -> tuple[Tensor, Tensor, Tensor]:
        """(batch index, teacher position, student position), each [P] over the valid pairs, example-major order."""
        m = self.mask
        b = torch.arange(m.shape[0], device=m.device)[:, None].expand_as(m)
        return b[m], self.teacher_pos[m], self.student_pos[m]


LabelRows = Union[Tensor, Sequence[Sequence[int]]]


def _supervised(row) -> tuple[list[int], list[int]]:
    """(positions, ids) of the labels != -100 of one row."""
    values = row.tolist() if isinstance(row, Tensor) else list(row)
    pos = [k for k, v in enumerate(values) if v != -100]
    return pos, [values[k] for k in pos]


def aligned_pairs_for_batch(teacher_labels: LabelRows, student_labels: LabelRows, teacher_tok, student_tok,
                            align) -> EtaPairs:
    """Aligned response positions of a batch, on CPU, as padded label-position tensors (EtaPairs).

    teacher_labels / student_labels: per example, the label rows as built for training (TokenSequence
    .inputs_and_labels(), or the padded [B, T] / [B, S] label tensors): -100 outside the response span, so the
    supervised labels are exactly the response ids (+ EOS) to align. teacher_tok / student_tok: tokenizers or
    TokenStrings (pass TokenStrings to reuse the per-id cache across batches). align(teacher_strings,
    student_strings, teacher_eos, student_eos) -> [(i, j)] works on the ETA strings (space markers removed).
    """
    if len(teacher_labels) != len(student_labels):
        raise AlignmentError(f"{len(teacher_labels)} teacher label rows but {len(student_labels)} student rows; "
                             "pass the same examples in the same order.")
    t_str, s_str = _as_token_strings(teacher_tok), _as_token_strings(student_tok)
    rows = []
    for t_row, s_row in zip(teacher_labels, student_labels):
        t_pos, t_ids = _supervised(t_row)
        s_pos, s_ids = _supervised(s_row)
        aligned = align(t_str.eta(t_ids), s_str.eta(s_ids), t_str.eos, s_str.eos)
        rows.append([(t_pos[i], s_pos[j]) for i, j in aligned])
    width = max((len(r) for r in rows), default=0)
    teacher_pos = torch.full((len(rows), width), -1, dtype=torch.long)
    student_pos = torch.full((len(rows), width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            teacher_pos[b, : len(r)] = torch.tensor([p for p, _ in r])
            student_pos[b, : len(r)] = torch.tensor([q for _, q in r])
    return EtaPairs(teacher_pos, student_pos)


def eta_pairs_for_batch(teacher_labels: LabelRows, student_labels: LabelRows, teacher_tok, student_tok) -> EtaPairs:
    """ETA pairs for a batch (spec/other_methods.md DSKDv2 step 3); see aligned_pairs_for_batch."""
    return aligned_pairs_for_batch(teacher_labels, student_labels, teacher_tok, student_tok, eta_align)
