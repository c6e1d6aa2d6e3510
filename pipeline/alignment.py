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

from dskd_pipe.pipeline.config import UNMAPPED_CHOICES


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


# --------------------------------------------------------------------------------------------------------
# Per-vocabulary tables of the likelihood methods (ALM's debiasing, prefix-kd's next-text events)
# --------------------------------------------------------------------------------------------------------

WHITESPACE = b" \t\n\r\x0b\x0c"
# tokenkit's space_mask_mode "space+tab+newline+special": a token "starts a word" when its text starts with one
# of these bytes (the marker decoded: "Ġ", "▁", a WordPiece word start) or it is a special token (EOS).
WORD_START_BYTES = b" \t\n"


def _vocab_bytes(tokenizer, size: int | None = None) -> tuple[list[bytes | None], TokenStrings]:
    """The text bytes of every id in [0, size) (token_bytes), None for special tokens and ids past the tokenizer
    (a model's head is often padded beyond len(tokenizer))."""
    strings = TokenStrings(tokenizer)
    size = len(tokenizer) if size is None else size
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(size, len(tokenizer)))))
    out: list[bytes | None] = []
    for idx, token in enumerate(tokens):
        out.append(None if idx in strings.special_ids or token is None else token_bytes(token, strings.kind))
    return out + [None] * (size - len(out)), strings


def word_start_mask(tokenizer, size: int | None = None) -> Tensor:
    """bool [size]: True where the token's text starts with a space, tab or newline (after decoding its marker:
    "Ġthe", "▁the", a WordPiece word "the") or the token is special (EOS), as tokenkit's
    `get_space_mask(tokenizer, "space+tab+newline+special")` on its byte-level view of the vocabulary.
    Ids past the tokenizer (padded heads) are False. ALM's debiasing sums the next-token probabilities over it."""
    texts, strings = _vocab_bytes(tokenizer, size)
    mask = torch.zeros(len(texts), dtype=torch.bool)
    for idx, text in enumerate(texts):
        if idx < len(tokenizer) and (idx in strings.special_ids or (text and text[0] in WORD_START_BYTES)):
            mask[idx] = True
    return mask


def blank_mask(tokenizer, size: int | None = None) -> Tensor:
    """bool [size]: True for tokens whose text is only whitespace ("Ġ", "Ċ", "▁"): they carry no character a
    boundary can be matched on (special tokens are not blank)."""
    texts, _ = _vocab_bytes(tokenizer, size)
    return torch.tensor([t is not None and not t.strip(WHITESPACE) for t in texts], dtype=torch.bool)


@dataclass(frozen=True)
class NextTextEvents:
    """Two vocabularies mapped onto one set of events "the next token's text starts with e" (prefix-kd).

    teacher [Vt], student [Vs]: the event id of each token, -1 for tokens outside every event (whitespace-only,
    special tokens other than EOS, padded head rows); names[e]: the event's bytes (b"" = the end of the text, EOS).
    """

    teacher: Tensor
    student: Tensor
    names: tuple[bytes, ...]

    @property
    def size(self) -> int:
        return len(self.names)


def _prefixes(text: bytes | None, chars: int) -> list[bytes]:
    """A token's event candidates: its text without whitespace, cut to 1..chars bytes (longest last)."""
    if text is None:
        return []
    core = bytes(b for b in text if b not in WHITESPACE)
    return [core[:j] for j in range(1, min(chars, len(core)) + 1)]


def next_text_events(teacher_tok, student_tok, chars: int = 1, teacher_size: int | None = None,
                     student_size: int | None = None) -> NextTextEvents:
    """The events both vocabularies can be summed onto: each token's text with its whitespace and markers dropped
    ("Ġsunny", "▁sunny" and WordPiece "sunny" all read b"sunny"), cut to its first `chars` bytes; an event is a cut
    that is the longest such cut of some token on BOTH sides; a token goes to the longest of its own cuts that is an
    event (with chars = 1: its first byte, which both sides nearly always share). EOS of each side is the event b""
    (the text ends). Whitespace-only tokens, other special tokens and padded head rows belong to no event (-1).

    Whitespace is dropped because tokenizers disagree on where it goes (byte-level glues a space to the next word,
    WordPiece drops it, a newline is a token of its own): after a shared boundary the next non-space bytes are
    what both models predict. Built once per tokenizer pair (a pass over both vocabularies).
    """
    if chars < 1:
        raise AlignmentError(f"chars must be >= 1, found {chars}.")
    t_texts, t_strings = _vocab_bytes(teacher_tok, teacher_size)
    s_texts, s_strings = _vocab_bytes(student_tok, student_size)
    t_cuts = [_prefixes(text, chars) for text in t_texts]
    s_cuts = [_prefixes(text, chars) for text in s_texts]
    shared = {c for cuts in t_cuts for c in cuts} & {c for cuts in s_cuts for c in cuts}

    def assign(cuts: list[list[bytes]], eos_id: int) -> list[bytes | None]:
        out: list[bytes | None] = []
        for idx, own in enumerate(cuts):
            out.append(b"" if idx == eos_id else next((c for c in reversed(own) if c in shared), None))
        return out

    # An event must be the longest shared cut of some token on BOTH sides (else one side has no mass on it):
    # drop the ones that are not and assign again, until every event has tokens on both sides.
    while True:
        t_ev, s_ev = assign(t_cuts, t_strings.eos_id), assign(s_cuts, s_strings.eos_id)
        supported = set(t_ev) & set(s_ev)
        if shared <= supported:
            break
        shared &= supported
    names = (b"",) + tuple(sorted(shared))
    index = {name: i for i, name in enumerate(names)}

    def table(events: list[bytes | None]) -> Tensor:
        return torch.tensor([-1 if e is None else index[e] for e in events], dtype=torch.long)

    return NextTextEvents(table(t_ev), table(s_ev), names)
