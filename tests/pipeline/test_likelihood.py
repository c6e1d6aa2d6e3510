"""pipeline/likelihood.py: the NLL of gold responses equals the model's own cross-entropy over the response tokens
and EOS, per token and per character (the end counting as one), chunked or not, and truncation is counted."""
from __future__ import annotations

import torch

from dskd_pipe.pipeline import likelihood
from dskd_pipe.pipeline.data import Example, build_sequence, shifted_labels
from dskd_pipe.pipeline.models import load_tokenizer, tiny_causal_lm

FIXTURES = "tests/fixtures"


def test_response_nll_equals_the_cross_entropy_of_the_response(monkeypatch):
    tok = load_tokenizer(f"{FIXTURES}/tokenizers/gpt2")
    model = tiny_causal_lm("gpt2", tok, d_model=32, layers=1, heads=2, seed=1)
    examples = [Example("Say hi.\n", ("Hello there, friend.",), "x"), Example("Count:\n", ("one two three",), "y")]
    total = tokens = 0
    for ex in examples:
        seq = build_sequence(tok, ex.prompt, ex.response, tok.eos_token_id)
        ids = torch.tensor([seq.ids[:-1]])
        labels = torch.tensor([shifted_labels(seq.ids, seq.prompt_len)])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        total += float(torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100, reduction="sum"))
        tokens += int((labels != -100).sum())
    r = likelihood.response_nll(model, tok, examples, batch_size=2)
    assert r["tokens"] == tokens and r["chars"] == len("Hello there, friend.") + 1 + len("one two three") + 1
    assert abs(r["nll"] - total) < 1e-3
    assert abs(r["per_char"] - total / r["chars"]) < 1e-6 and r["truncated"] == 0
    monkeypatch.setattr(likelihood, "ROWS_PER_CHUNK", 3)  # chunks of 3 rows: the same sum
    assert abs(likelihood.response_nll(model, tok, examples, batch_size=1)["nll"] - total) < 1e-3
    cut = likelihood.response_nll(model, tok, examples, max_length=6)  # both prompts are < 6 tokens
    assert cut["truncated"] == 2 and cut["tokens"] < tokens
    # Only the characters of the kept tokens count: "Hello there" of ex 1 (4-token prompt + 2 response tokens),
    # "one two three" minus its EOS of ex 2 (3 + 3 tokens).
    kept = [build_sequence(tok, e.prompt, e.response, tok.eos_token_id, max_length=6) for e in examples]
    assert cut["chars"] == sum(s.offsets[-1][1] - len(e.prompt) for s, e in zip(kept, examples)) == 11 + 13
