"""Small real tokenizers trained on a corpus with the `tokenizers` library, saved as ordinary HF tokenizer folders.

The quality benchmark (`dskd-pipe recipe quality`) gives its teacher and students two tokenizations of different
families, each trained on the benchmark's own training text with a small vocabulary (CPU speed):
    bpe        byte-level BPE with GPT-2's pre-tokenizer (the GPT-2 / Qwen / Llama-3 family)
    wordpiece  WordPiece with "##" continuations behind BERT's whitespace/punctuation split (the BERT family)
(tokenizers' Unigram trainer was tried and left out: on this small, repetitive text it kept pieces such as
"Response:\nThe" and split "is" and "and" into letters, and two runs on the same text differed.)
Each has one special token, its EOS (also the pad), so the project's sequences (spec/dskd.md) apply unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

KINDS = ("bpe", "wordpiece")
EOS = {"bpe": "<|endoftext|>", "wordpiece": "[SEP]"}
UNK = "[UNK]"


def wordpiece_vocab(words: dict[str, int], vocab_size: int, specials: tuple[str, ...]) -> list[str]:
    """A WordPiece vocabulary learned with the WordPiece criterion, deterministically.

    Start from the characters (a word's first character as is, the others as "##c"); repeatedly merge the adjacent
    pair (a, b) with the highest count(ab) / (count(a) count(b)) over the word counts (the likelihood gain of the
    WordPiece paper, Schuster & Nakajima 2012), ties broken by the pair's text, until `vocab_size` entries.
    (tokenizers' WordPieceTrainer counts pairs like BPE and orders its "##" alphabet by hash, so two runs of it on
    the same text can give different vocabularies.)
    """
    splits = {w: [w[0]] + [f"##{c}" for c in w[1:]] for w in words}
    vocab = list(specials) + sorted({p for parts in splits.values() for p in parts})
    while len(vocab) < vocab_size:
        unit, pair = {}, {}
        for w, parts in splits.items():
            n = words[w]
            for k, p in enumerate(parts):
                unit[p] = unit.get(p, 0) + n
                if k + 1 < len(parts):
                    key = (p, parts[k + 1])
                    pair[key] = pair.get(key, 0) + n
        if not pair:
            break
        a, b = max(pair, key=lambda k: (pair[k] / (unit[k[0]] * unit[k[1]]), k[0], k[1]))
        merged = a + b.removeprefix("##")
        vocab.append(merged)
        for w, parts in splits.items():
            k, out = 0, []
            while k < len(parts):
                if k + 1 < len(parts) and parts[k] == a and parts[k + 1] == b:
                    out.append(merged)
                    k += 2
                else:
                    out.append(parts[k])
                    k += 1
            splits[w] = out
    return vocab


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, out: str | Path):
    """Train a `kind` tokenizer of `vocab_size` entries on `texts` and save it (tokenizer.json and its config) to
    `out`; returns it loaded as a transformers PreTrainedTokenizerFast. The same texts give the same files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    texts = list(texts)
    if kind == "bpe":
        # tokenizers' BPE trainer is deterministic: its alphabet is sorted and ties go to the lower pair ids.
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS[kind]], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
    else:
        pre = pre_tokenizers.BertPreTokenizer()
        words: dict[str, int] = {}
        for text in texts:
            for w, _ in pre.pre_tokenize_str(text):
                words[w] = words.get(w, 0) + 1
        vocab = wordpiece_vocab(words, vocab_size, (EOS[kind], UNK))
        tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(vocab)}, unk_token=UNK))
        tok.pre_tokenizer = pre
        tok.decoder = decoders.WordPiece()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS[kind], pad_token=EOS[kind],
                                   unk_token=UNK if kind == "wordpiece" else None, clean_up_tokenization_spaces=False)
    fast.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"kind": kind, "vocab_size": vocab_size,
                                                   "texts": len(texts)}, indent=1) + "\n")
    return fast


def end_offset_agreement(tok_a, tok_b, texts: Iterable[str]) -> float:
    """Share of tok_a's tokens (over `texts`) whose character end offset is also an end offset of tok_b's tokens
    of the same text: 1.0 for the same tokenization, lower the more the two cut words differently."""
    hit = total = 0
    for text in texts:
        ends_a = [e for _, e in tok_a(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
        ends_b = {e for _, e in tok_b(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]}
        hit += sum(e in ends_b for e in ends_a)
        total += len(ends_a)
    return hit / max(1, total)
