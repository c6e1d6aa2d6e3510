"""Negative log-likelihood of gold responses: the low-variance held-out metric of the quality benchmark.

Each example is tokenised as in training (spec/dskd.md "Sequences": prompt and response tokenised separately, EOS
appended to the response), and the model's NLL is summed over the response tokens and that EOS. Two rates:
    per_token  nats per supervised token of THIS model's tokenizer (what training minimises; not comparable
               across tokenizers, which cut the same text into different numbers of tokens)
    per_char   nats per character of the responses, the end of each response counting as one character
               (comparable across tokenizers: the same text costs the same number of characters)
Only the first reference of an example is scored (Example.response). Sequences longer than max_length are cut as in
training; then only the characters the kept tokens cover count (the end only when EOS is kept), and `truncated`
counts the examples that lost response tokens, so a too-small max_length is visible.
"""
from __future__ import annotations

import torch

from dskd_pipe.pipeline.data import Example, build_sequence, shifted_labels
from dskd_pipe.pipeline.models import eos_token_id, last_hidden_state, logit_transform, pad_token_id


ROWS_PER_CHUNK = 1024  # [1024, V] fp32 logits at a time: 1 GB at Gemma-3's 262k vocabulary


@torch.no_grad()
def response_nll(model, tokenizer, examples: list[Example], max_prompt_length: int = 256, max_length: int = 512,
                 batch_size: int = 16, device: str = "cpu") -> dict:
    """{"nll", "tokens", "chars", "per_token", "per_char", "examples", "truncated"} of `model` on `examples`.

    The logits are built from the last hidden state only at supervised positions, in chunks of rows, with the
    model's own head and logit transform (scale, soft-cap), so a large vocabulary never needs a [B, S, V] tensor.
    """
    eos, pad = eos_token_id(tokenizer), pad_token_id(tokenizer)
    rows, truncated, chars = [], 0, 0
    for ex in examples:
        seq = build_sequence(tokenizer, ex.prompt, ex.response, eos, max_prompt_length, max_length)
        full_len = len(build_sequence(tokenizer, ex.prompt, ex.response, eos, max_prompt_length, 1 << 30).ids)
        if len(seq.ids) < full_len:
            truncated += 1
            if len(seq.ids) > seq.prompt_len:  # the response characters its kept tokens cover
                chars += max(0, seq.offsets[len(seq.ids) - 1][1] - len(ex.prompt))
        else:
            chars += len(ex.response) + 1  # + the end (EOS)
        rows.append((seq.ids[:-1], shifted_labels(seq.ids, seq.prompt_len)))
    was = model.training
    model.eval()
    head = model.get_output_embeddings()
    scale, cap = logit_transform(model)
    total, tokens = 0.0, 0
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        batch = [rows[i] for i in order[start:start + batch_size]]
        width = max(len(x) for x, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, (x, y) in enumerate(batch):
            ids[b, :len(x)], labels[b, :len(y)], mask[b, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        hidden = last_hidden_state(model, ids.to(device), mask.to(device))  # [B, S, d]
        keep = labels.to(device) != -100
        h, y = hidden[keep], labels.to(device)[keep]  # [N, d], [N]
        for c in range(0, h.shape[0], ROWS_PER_CHUNK):
            z = head(h[c:c + ROWS_PER_CHUNK]).float()  # [c, V]
            if scale != 1.0:
                z = z * scale
            if cap is not None:
                z = cap * torch.tanh(z / cap)
            total += float(torch.nn.functional.cross_entropy(z, y[c:c + ROWS_PER_CHUNK], reduction="sum"))
        tokens += int(y.numel())
    model.train(was)
    return {"nll": total, "tokens": tokens, "chars": chars, "per_token": total / max(1, tokens),
            "per_char": total / max(1, chars), "examples": len(examples), "truncated": truncated}
