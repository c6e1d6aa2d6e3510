"""pipeline/tokenizer_training.py: both kinds train deterministically into loadable HF folders with their EOS,
the WordPiece criterion on a hand-counted example, and the end-offset agreement."""
from __future__ import annotations

import hashlib

import pytest

from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer, pad_token_id
from dskd_pipe.pipeline.tokenizer_training import end_offset_agreement, train_tokenizer, wordpiece_vocab

TEXTS = ["The river Velmar flows through Stonegate.", "Try the apple cake in Velmarford!",
         "It is rainy in Stonegate today.", "Velmarford lies close to Stonegate and Brightwick."] * 20


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_trained_tokenizer_is_deterministic_and_round_trips(tmp_path, kind):
    size = 300 if kind == "bpe" else 120  # a byte-level BPE starts from 256 bytes + EOS
    a = train_tokenizer(kind, TEXTS, size, tmp_path / "a")
    train_tokenizer(kind, TEXTS, size, tmp_path / "b")
    digest = [hashlib.sha256((tmp_path / x / "tokenizer.json").read_bytes()).hexdigest() for x in ("a", "b")]
    assert digest[0] == digest[1]
    tok = load_tokenizer(str(tmp_path / "a"))
    assert len(tok) == len(a) <= size
    assert eos_token_id(tok) == pad_token_id(tok) == 0
    for text in TEXTS[:4]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids


def test_wordpiece_merges_the_pair_with_the_highest_likelihood_gain():
    # counts: "ab" x4, "ac" x1. Units a:5, ##b:4, ##c:1; pairs (a,##b): 4/(5*4)=0.2, (a,##c): 1/(5*1)=0.2 -> tie,
    # broken by the pair's text: ("a", "##c") > ("a", "##b"), so "ac" first, then "ab" (now 4/(4*4)=0.25).
    vocab = wordpiece_vocab({"ab": 4, "ac": 1}, 6, ("[SEP]",))
    assert vocab == ["[SEP]", "##b", "##c", "a", "ac", "ab"]


def test_end_offset_agreement(tmp_path):
    bpe = train_tokenizer("bpe", TEXTS, 300, tmp_path / "bpe")
    wp = train_tokenizer("wordpiece", TEXTS, 60, tmp_path / "wp")
    assert end_offset_agreement(bpe, bpe, TEXTS[:4]) == 1.0
    share = end_offset_agreement(wp, bpe, TEXTS[:4])
    ends = lambda tok, t: [e for _, e in tok(t, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    hits = sum(e in set(ends(bpe, t)) for t in TEXTS[:4] for e in ends(wp, t))
    assert share == hits / sum(len(ends(wp, t)) for t in TEXTS[:4]) and share < 1.0
