"""Token normalisation, vocabulary overlap and the ETA walk on the real tokenizer fixtures (hand-checked pairs)."""

from pathlib import Path

import pytest
import torch

from dskd_pipe.pipeline.alignment import (
    AlignmentError,
    BYTE_LEVEL,
    SENTENCEPIECE,
    WORDPIECE,
    TokenStrings,
    eta_align,
    eta_pairs_for_batch,
    teacher_to_student_token_map,
    token_bytes,
    tokenizer_kind,
    vocab_overlap,
)
from dskd_pipe.pipeline.data import build_sequence
from dskd_pipe.pipeline.models import load_tokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizers"


@pytest.fixture(scope="module")
def toks():
    return {name: load_tokenizer(str(FIXTURES / name)) for name in ("gpt2", "llama2", "qwen2")}


def _eta(text, t_tok, s_tok):
    """ETA over the response `text` + EOS on both sides, as token strings."""
    t, s = TokenStrings(t_tok), TokenStrings(s_tok)
    t_ids = t_tok(text, add_special_tokens=False)["input_ids"] + [t.eos_id]
    s_ids = s_tok(text, add_special_tokens=False)["input_ids"] + [s.eos_id]
    return eta_align(t.eta(t_ids), s.eta(s_ids), t.eos, s.eos), t_tok.convert_ids_to_tokens(t_ids), \
        s_tok.convert_ids_to_tokens(s_ids)


def test_tokenizer_kind(toks):
    assert tokenizer_kind(toks["gpt2"]) == BYTE_LEVEL
    assert tokenizer_kind(toks["qwen2"]) == BYTE_LEVEL
    assert tokenizer_kind(toks["llama2"]) == SENTENCEPIECE


def test_token_bytes_by_hand():
    assert token_bytes("Ġthe", BYTE_LEVEL) == b" the"
    assert token_bytes("Ċ", BYTE_LEVEL) == b"\n"
    assert token_bytes("Ã©", BYTE_LEVEL) == "é".encode()
    assert token_bytes("▁the", SENTENCEPIECE) == b" the"
    assert token_bytes("<0x0A>", SENTENCEPIECE) == b"\n"
    assert token_bytes("<|endoftext|>", BYTE_LEVEL, special=True) == b"<|endoftext|>"


def test_eta_strings_drop_space_markers(toks):
    g, l = TokenStrings(toks["gpt2"]), TokenStrings(toks["llama2"])
    assert g.eta(toks["gpt2"]("Hello world\n", add_special_tokens=False)["input_ids"]) == [b"Hello", b"world", b"\n"]
    ids = toks["llama2"]("Hello world\n", add_special_tokens=False)["input_ids"]
    assert l.eta(ids) == [b"Hello", b"world", b"\n"]  # "▁Hello", "▁world", "<0x0A>"
    assert g.eos == b"<|endoftext|>" and l.eos == b"</s>"


def test_eta_gpt2_qwen_newline_and_digits(toks):
    pairs, t, s = _eta("Hello world.\nIt costs 1234 dollars.", toks["gpt2"], toks["qwen2"])
    assert t == ["Hello", "Ġworld", ".", "Ċ", "It", "Ġcosts", "Ġ12", "34", "Ġdollars", ".", "<|endoftext|>"]
    assert s == ["Hello", "Ġworld", ".Ċ", "It", "Ġcosts", "Ġ", "1", "2", "3", "4", "Ġdollars", ".", "<|im_end|>"]
    # "." / ".Ċ" and the digit runs differ; EOS aligns with EOS.
    assert pairs == [(0, 0), (1, 1), (4, 3), (5, 4), (8, 10), (9, 11), (10, 12)]


def test_eta_gpt2_llama_byte_fallback_and_markers(toks):
    pairs, t, s = _eta("Hello world.\nIt costs 1234 dollars.", toks["gpt2"], toks["llama2"])
    assert s == ["▁Hello", "▁world", ".", "<0x0A>", "It", "▁costs", "▁", "1", "2", "3", "4", "▁dollars", ".", "</s>"]
    assert pairs == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (8, 11), (9, 12), (10, 13)]


def test_eta_non_ascii(toks):
    text = "café – 東京\n"
    pairs, t, s = _eta(text, toks["gpt2"], toks["qwen2"])
    assert t == ["c", "af", "Ã©", "ĠâĢĵ", "Ġæ", "Ŀ", "±", "äº", "¬", "Ċ", "<|endoftext|>"]
    assert s == ["ca", "fÃ©", "ĠâĢĵ", "ĠæĿ", "±", "äº¬", "Ċ", "<|im_end|>"]
    # "–" (3,2), "±" = last byte of 東 (6,4), "\n" (9,6), EOS (10,7)
    assert pairs == [(3, 2), (6, 4), (9, 6), (10, 7)]
    pairs, t, s = _eta(text, toks["gpt2"], toks["llama2"])
    assert s == ["▁c", "afé", "▁–", "▁", "東", "京", "<0x0A>", "</s>"]
    assert pairs == [(0, 0), (3, 2), (9, 6), (10, 7)]


def test_eta_walk_rules_on_plain_strings():
    # same prefix, different tokens of one length: both advance; equal prefixes again -> align.
    assert eta_align([b"ab", b"c", b"E"], [b"a", b"b", b"c", b"F"], b"E", b"F") == [(1, 2), (2, 3)]
    # texts that differ: the prefixes never match again, nothing more aligns (EOS included).
    assert eta_align([b"ab", b"c", b"E"], [b"xy", b"c", b"F"], b"E", b"F") == []
    # one side runs out: stop
    assert eta_align([b"abc"], [b"a", b"b"], b"E", b"F") == []


def test_eta_pairs_for_batch_positions(toks):
    g, q = toks["gpt2"], toks["qwen2"]
    prompt, responses = "Q: say hi\nA:", ["Hello world.\nIt costs 1234 dollars.", "café – 東京\n"]
    t_rows, s_rows = [], []
    for r in responses:
        t_rows.append(build_sequence(g, prompt, r, g.eos_token_id).inputs_and_labels()[1])
        s_rows.append(build_sequence(q, prompt, r, q.eos_token_id).inputs_and_labels()[1])
    pairs = eta_pairs_for_batch(t_rows, s_rows, g, q)
    assert pairs.teacher_pos.shape == (2, 7) and pairs.mask.sum(1).tolist() == [7, 4]
    for b in range(2):
        t_first = next(k for k, v in enumerate(t_rows[b]) if v != -100)
        s_first = next(k for k, v in enumerate(s_rows[b]) if v != -100)
        want = _eta(responses[b], g, q)[0]
        got = [(int(i), int(j)) for i, j in zip(pairs.teacher_pos[b], pairs.student_pos[b]) if i >= 0]
        assert got == [(t_first + i, s_first + j) for i, j in want]
        # every aligned pair has the same token text on both sides
        for i, j in got:
            assert TokenStrings(g).eta_one(t_rows[b][i]) == TokenStrings(q).eta_one(s_rows[b][j]) or \
                (t_rows[b][i] == g.eos_token_id and s_rows[b][j] == q.eos_token_id)
    # padded label tensors give the same pairs
    width = max(map(len, t_rows))
    t_tensor = torch.full((2, width), -100)
    for b, row in enumerate(t_rows):
        t_tensor[b, : len(row)] = torch.tensor(row)
    s_width = max(map(len, s_rows))
    s_tensor = torch.full((2, s_width), -100)
    for b, row in enumerate(s_rows):
        s_tensor[b, : len(row)] = torch.tensor(row)
    again = eta_pairs_for_batch(t_tensor, s_tensor, TokenStrings(g), TokenStrings(q))
    assert torch.equal(again.teacher_pos, pairs.teacher_pos) and torch.equal(again.student_pos, pairs.student_pos)


def test_vocab_overlap_gpt2_llama(toks):
    g, l = toks["gpt2"], toks["llama2"]
    t_ids, s_ids = vocab_overlap(g, l)
    assert t_ids.dtype == torch.long and t_ids.shape == s_ids.shape
    pairs = dict(zip(t_ids.tolist(), s_ids.tolist()))
    the_g, the_l = g.get_vocab()["Ġthe"], l.get_vocab()["▁the"]
    assert pairs[the_g] == the_l
    assert g.convert_ids_to_tokens(t_ids[:3].tolist()) == l.convert_ids_to_tokens(s_ids[:3].tolist()) == ["!", '"', "#"]
    assert g.get_vocab()["Ċ"] not in pairs  # "string" match: "Ċ" is not "<0x0A>"
    t5, s5 = vocab_overlap(g, l, top_k=5)
    assert torch.equal(t5, t_ids[:5]) and torch.equal(s5, s_ids[:5])
    tb, sb = vocab_overlap(g, l, match="bytes")
    assert dict(zip(tb.tolist(), sb.tolist()))[g.get_vocab()["Ċ"]] == l.get_vocab()["<0x0A>"]


def test_token_map_never_unk(toks):
    g, l = toks["gpt2"], toks["llama2"]
    table = teacher_to_student_token_map(g, l)
    assert table.shape == (len(g),)
    assert table[g.eos_token_id] == l.eos_token_id
    assert table[g.get_vocab()["Ġthe"]] == l.get_vocab()["▁the"]
    assert table[g.get_vocab()["Ċ"]] == -1  # missing: -1, not Llama's unk id 0
    assert (table == l.unk_token_id).sum() == 0


def test_token_map_unk_option_is_the_released_lookup(toks):
    """Fidelity item 9: --eta-unmapped unk maps a teacher token with no student string to the student's unk id, as
    the released ETA code's convert_tokens_to_ids does (GPT-2: its EOS, 50256); "drop" (default) gives -1."""
    q, g = toks["qwen2"], toks["gpt2"]
    dropped = teacher_to_student_token_map(q, g)
    released = teacher_to_student_token_map(q, g, unmapped="unk")
    missing = dropped == -1
    assert missing.any() and (released[missing] == g.unk_token_id).all() and g.unk_token_id == g.eos_token_id
    assert torch.equal(released[~missing], dropped[~missing])
    # the released lookup, token by token, on a few missing and present ids
    for t_id in missing.nonzero()[:5, 0].tolist() + [q.get_vocab()["Ġthe"]]:
        want = g.convert_tokens_to_ids(q.convert_ids_to_tokens([t_id]))[0]
        assert released[t_id] == want
    # a student without an unk token (Qwen) keeps -1
    assert (teacher_to_student_token_map(g, q, unmapped="unk") == -1).any()
    with pytest.raises(AlignmentError, match="unknown unmapped='x'; expected one of: drop, unk"):
        teacher_to_student_token_map(q, g, unmapped="x")


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    from dskd_pipe.pipeline.tokenizer_training import train_tokenizer

    texts = ["Expect snowy weather tomorrow, then windy, then foggy.", "The weather in Velmar is sunny today."] * 30
    return train_tokenizer("wordpiece", texts, 60, tmp_path_factory.mktemp("wp"))


def test_wordpiece_tokens_as_text(wordpiece):
    assert tokenizer_kind(wordpiece) == WORDPIECE
    assert token_bytes("the", WORDPIECE) == b" the" and token_bytes("##e", WORDPIECE) == b"e"
    assert token_bytes(",", WORDPIECE) == b"," and token_bytes("##", WORDPIECE) == b"##"  # punctuation
    text = "Expect snowy weather tomorrow, then windy."
    ids = wordpiece(text, add_special_tokens=False)["input_ids"]
    strings = TokenStrings(wordpiece)
    assert b"".join(strings.token_bytes(i) for i in ids).strip() == text.encode()
    assert b"".join(strings.eta(ids)) == text.replace(" ", "").encode()


def test_eta_between_byte_level_and_wordpiece(toks, wordpiece):
    """ETA aligns the tokens whose text (spaces removed) and preceding text agree on both sides."""
    text = "Expect snowy weather tomorrow."
    pairs, g_tokens, w_tokens = _eta(text, toks["gpt2"], wordpiece)
    for i, j in pairs[:-1]:  # every aligned pair is the same piece of text
        assert g_tokens[i].replace("Ġ", "") == w_tokens[j].replace("##", "")
    assert pairs[-1] == (len(g_tokens) - 1, len(w_tokens) - 1)  # both EOS
    # "the" (a word) meets GPT-2's "Ġthe" by token string, "##e" meets "e".
    t_ids, s_ids = vocab_overlap(toks["gpt2"], wordpiece)
    pairs = {(toks["gpt2"].convert_ids_to_tokens(int(a)), wordpiece.convert_ids_to_tokens(int(b)))
             for a, b in zip(t_ids, s_ids)}
    assert ("e", "##e") in pairs and (".", ".") in pairs


# --- tables of the likelihood methods (issue 22) -----------------------------------------------------------------

def test_word_start_mask_is_tokenkits_space_mask_on_every_family(toks, wordpiece):
    """A token starts a word when its text starts with a space, tab or newline, or it is special (tokenkit's
    "space+tab+newline+special"), whatever marks the space: "Ġ", "Ċ", "▁", "<0x0A>", a WordPiece word."""
    from dskd_pipe.pipeline.alignment import word_start_mask

    g, l = toks["gpt2"], toks["llama2"]
    mg, ml, mw = word_start_mask(g), word_start_mask(l), word_start_mask(wordpiece, len(wordpiece) + 3)
    vg, vl, vw = g.get_vocab(), l.get_vocab(), wordpiece.get_vocab()
    assert mg[vg["Ġthe"]] and mg[vg["Ċ"]] and mg[vg["ĉ"]] and mg[g.eos_token_id] and not mg[vg["the"]]
    assert ml[vl["▁the"]] and ml[vl["<0x0A>"]] and ml[l.eos_token_id] and not ml[vl["the"]] and not ml[vl["<0x41>"]]
    assert mw[vw["today"]] and not mw[vw["##e"]] and not mw[vw[","]] and mw[wordpiece.eos_token_id]
    assert mw.shape == (len(wordpiece) + 3,) and not mw[len(wordpiece):].any()  # a padded head's extra rows


def test_next_text_events_between_byte_level_and_wordpiece(toks, wordpiece):
    """The WordPiece word "today", its piece "##e" and GPT-2's "Ġtoday" / "e" land on the events of their first
    byte; the padded rows of a head belong to none."""
    from dskd_pipe.pipeline.alignment import next_text_events

    g = toks["gpt2"]
    ev = next_text_events(g, wordpiece, 1, student_size=len(wordpiece) + 2)
    vg, vw = g.get_vocab(), wordpiece.get_vocab()
    assert ev.names[int(ev.student[vw["today"]])] == b"t" == ev.names[int(ev.teacher[vg["Ġtoday"]])]
    assert ev.student[vw["##e"]] == ev.teacher[vg["e"]] and ev.student[vw[","]] == ev.teacher[vg[","]]
    assert (ev.student[len(wordpiece):] == -1).all() and ev.student.shape == (len(wordpiece) + 2,)
