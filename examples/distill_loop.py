"""Distil a student from a teacher-state store in a plain PyTorch loop, with the project's ALM loss (chunk
likelihood matching: any two tokenizers), next to SFT from the same start on the same batches; prints both held-out
losses.

    dskd-pipe cache-teacher --teacher Qwen/Qwen1.5-1.8B --data dolly/train.jsonl --out runs/qwen-dolly.zarr
    python examples/distill_loop.py --store runs/qwen-dolly.zarr --student gpt2 --steps 500

The last --holdout examples of the store are kept out of training and scored: the student's cross-entropy per
supervised token on their gold responses (lower is better; no teacher involved).
"""
from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

import dskd_pipe as dp


def alm_loss(student, batch: dict, store, kd_rate: float, word_starts: tuple) -> torch.Tensor:
    """(1 - kd_rate) CE per supervised student token + kd_rate ALM (a mean over chunks, tokenkit's published form:
    binarisation temperature 100, chunks merged and closed on a word start); kd_rate 0 is plain SFT."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, S, Vs]
    ce = dp.losses.cross_entropy_sum(logits, batch["labels"]) / (batch["labels"] != -100).sum().clamp_min(1)
    if kd_rate == 0.0:
        return ce
    word_start_t, word_start_s = word_starts  # which tokens start a word, per vocabulary (ALM's debiasing)
    out = dp.losses.alm_loss(logits, batch["labels"], dp.teacher_hidden(batch), batch["teacher_labels"], store.head,
                             batch["student_chunk"], batch["teacher_chunk"], student_word_start=word_start_s,
                             teacher_word_start=word_start_t)
    return (1.0 - kd_rate) * ce + kd_rate * out.loss


def train(student, store, data, collate, args, kd_rate: float, word_starts: tuple) -> None:
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(args.seed)  # the same batches for every student
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=collate, generator=order)
    student.train()
    step = 0
    while step < args.steps:
        for batch in loader:
            batch = {k: v.to(args.device) for k, v in batch.items()}
            loss = alm_loss(student, batch, store, kd_rate, word_starts)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == args.steps:
                return


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="a teacher-state store (folder or fsspec URL)")
    parser.add_argument("--student", required=True, help="the student to start from (hub id or folder)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--kd-rate", type=float, default=0.5, help="lambda in (1 - lambda) CE + lambda ALM")
    parser.add_argument("--holdout", type=int, default=100, help="the store's last N examples: scored, not trained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="save the two students here (OUT/sft, OUT/alm)")
    args = parser.parse_args(argv)

    store = dp.open_store(args.store, device=args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    n_train = len(store) - args.holdout
    train_data = dp.StoreDataset(store, tokenizer, indices=range(n_train))
    held_out = dp.StoreDataset(store, tokenizer, indices=range(n_train, len(store)))
    collate = dp.store_collate(store, tokenizer, method="alm")  # + the chunk of every label on both sides

    losses = {}
    for name, kd_rate in (("sft", 0.0), ("alm", args.kd_rate)):
        torch.manual_seed(args.seed)
        student = AutoModelForCausalLM.from_pretrained(args.student).to(args.device)
        word_starts = (dp.losses.word_start_mask(store.tokenizer(), store.head.weight.shape[0]).to(args.device),
                       dp.losses.word_start_mask(tokenizer, student.get_output_embeddings().weight.shape[0]))
        train(student, store, train_data, collate, args, kd_rate, word_starts)
        losses[name] = dp.held_out_loss(student, DataLoader(held_out, batch_size=args.batch_size, collate_fn=collate))
        if args.out:
            student.save_pretrained(f"{args.out}/{name}")
            tokenizer.save_pretrained(f"{args.out}/{name}")
    print(f"held-out loss (nats per student token, {len(held_out)} examples): "
          f"sft {losses['sft']:.4f}  alm {losses['alm']:.4f}")
    return losses


if __name__ == "__main__":
    main()
