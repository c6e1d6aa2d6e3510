"""Where the cross-tokenizer gap sits: held-out NLL per character split by kind of position (issue 22).

The response text of every held-out example is cut into ground-truth chunks (pipeline/probes.chunk_ids: the
shortest stretches both tokenizations end on). Each chunk is one of two kinds:
    "1:1"    one token on each side: both tokenizers cut that piece of text the same way
    "split"  several tokens on one side or both: the tokenizations differ there
and, by the teacher's entropy (nats) of its next-token distribution at the chunk's first position:
    "sure"   below --unsure-nats        "unsure"   at or above it (the answers the teacher spreads its mass over)
A model's NLL of a chunk is the sum of its token NLLs inside it (the mean over its folders when several training
seeds are given) (chunk ends are token ends of both tokenizers, so
the sum is exact for students of either tokenizer); chars: the chunk's characters (the text's end counts as one).

For every kind the report gives each model's nats/char and the gains: a cross-tokenizer method against `sft`
(the student tokenizer's baseline) and `kd@teacher-tok` against `sft@teacher-tok`, and the share of KD's gain
each method recovers there, so the gap can be placed (e.g. "all of it on split chunks where the teacher is
unsure").

    python bench/gap_by_position.py --recipe RUN --model sft=RUN/students/sft-seed1/best \\
        --model alm+prefix-kd=RUN/students/alm+prefix-kd-seed1/best \\
        --teacher-tok-model sft@teacher-tok=... --teacher-tok-model kd@teacher-tok=... --out gap.json

RUN is a `dskd-pipe recipe` output folder (data/, tokenizers/, teacher/best); --split test (default) or dev.
Writes JSON (per kind: chars, nats/char per model, gains, recovered share) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dskd_pipe.pipeline.data import build_sequence, load_examples
from dskd_pipe.pipeline.models import eos_token_id, load_causal_lm, load_tokenizer
from dskd_pipe.pipeline.probes import chunk_ids, label_offsets

KINDS = ("1:1 sure", "1:1 unsure", "split sure", "split unsure")


def _sequences(tokenizer, examples, max_prompt_length: int, max_length: int) -> list:
    eos = eos_token_id(tokenizer)
    return [build_sequence(tokenizer, ex.prompt, ex.response, eos, max_prompt_length, max_length)
            for ex in examples]


@torch.no_grad()
def position_nll(model, seqs, want_entropy: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per example: (NLL of each label position [L-1] (0 where no label), the next-token entropy [L-1] or None)."""
    model.eval()
    out = []
    for seq in seqs:
        inputs, labels = seq.inputs_and_labels()
        logits = model(torch.tensor([inputs])).logits[0].float()  # [L-1, V]
        lab = torch.tensor(labels)
        logp = torch.log_softmax(logits, -1)
        nll = -logp.gather(-1, lab.clamp_min(0)[:, None]).squeeze(-1) * (lab != -100)
        ent = -(logp.exp() * logp).sum(-1) if want_entropy else None
        out.append((nll, ent))
    return out


def chunk_table(teacher_seqs, student_seqs, teacher_entropy, unsure_nats: float) -> list[dict]:
    """Per example, per chunk: its kind, characters, and the label positions on each side."""
    rows = []
    for t_seq, s_seq, (_, ent) in zip(teacher_seqs, student_seqs, teacher_entropy):
        t_lab = torch.tensor(t_seq.inputs_and_labels()[1])
        s_lab = torch.tensor(s_seq.inputs_and_labels()[1])
        t_off, s_off = label_offsets(t_seq.offsets), label_offsets(s_seq.offsets)
        t_chunk, s_chunk = chunk_ids(t_off, s_off, t_lab != -100, s_lab != -100)
        chunks = []
        for c in range(int(t_chunk.max()) + 1 if t_chunk.numel() else 0):
            t_pos = torch.nonzero(t_chunk == c).flatten()
            s_pos = torch.nonzero(s_chunk == c).flatten()
            start, end = int(t_off[t_pos[0], 0]), int(t_off[t_pos[-1], 1])
            split = len(t_pos) > 1 or len(s_pos) > 1
            sure = float(ent[t_pos[0]]) < unsure_nats
            chunks.append({"kind": f"{'split' if split else '1:1'} {'sure' if sure else 'unsure'}",
                           "chars": max(1, end - start), "t_pos": t_pos, "s_pos": s_pos})
        rows.append(chunks)
    return rows


def per_kind(chunks: list[list[dict]], nll: list, side: str) -> dict:
    """{kind: (nats, chars)} of one model; side "t" or "s": which positions of the chunk are the model's."""
    sums = {k: [0.0, 0] for k in KINDS}
    for example, (values, _) in zip(chunks, nll):
        for ch in example:
            sums[ch["kind"]][0] += float(values[ch[f"{side}_pos"]].sum())
            sums[ch["kind"]][1] += ch["chars"]
    return {k: {"nats": v[0], "chars": v[1]} for k, v in sums.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True, help="A `dskd-pipe recipe` output folder.")
    p.add_argument("--model", action="append", default=[], help="NAME=FOLDER[,FOLDER...], a student with the "
                   "student tokenizer (several folders: training seeds, averaged); one must be named sft.")
    p.add_argument("--teacher-tok-model", action="append", default=[], help="NAME=FOLDER[,...], a student with "
                   "the teacher's tokenizer (sft@teacher-tok and kd@teacher-tok give KD's gain).")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--unsure-nats", type=float, default=0.5)
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = Path(a.recipe)
    examples = load_examples(str(run / "data" / f"{a.split}.jsonl"), limit=a.limit)
    t_tok = load_tokenizer(str(run / "tokenizers" / "teacher"))
    s_tok = load_tokenizer(str(run / "tokenizers" / "student"))
    t_seqs = _sequences(t_tok, examples, a.max_prompt_length, a.max_length)
    s_seqs = _sequences(s_tok, examples, a.max_prompt_length, a.max_length)
    teacher = load_causal_lm(str(run / "teacher" / "best"), dtype=torch.float32, device="cpu")
    t_nll = position_nll(teacher, t_seqs, want_entropy=True)
    chunks = chunk_table(t_seqs, s_seqs, t_nll, a.unsure_nats)
    models = {"teacher": per_kind(chunks, t_nll, "t")}
    for spec, side, seqs in [(m, "s", s_seqs) for m in a.model] + [(m, "t", t_seqs) for m in a.teacher_tok_model]:
        name, folders = spec.split("=", 1)
        runs = [per_kind(chunks, position_nll(load_causal_lm(f, dtype=torch.float32, device="cpu"), seqs), side)
                for f in folders.split(",")]  # several training seeds: their mean
        models[name] = {k: {"nats": sum(r[k]["nats"] for r in runs) / len(runs), "chars": runs[0][k]["chars"]}
                        for k in KINDS}
    total_chars = sum(v["chars"] for v in models["teacher"].values())
    report = {"recipe": str(run), "split": a.split, "examples": len(examples), "unsure_nats": a.unsure_nats,
              "kinds": {}}
    for kind in (*KINDS, "all"):
        kinds = KINDS if kind == "all" else (kind,)
        chars = sum(models["teacher"][k]["chars"] for k in kinds)
        rate = {name: sum(m[k]["nats"] for k in kinds) / max(1, chars) for name, m in models.items()}
        row = {"chars": chars, "char_share": chars / max(1, total_chars), "nats_per_char": rate}
        if "sft@teacher-tok" in rate and "kd@teacher-tok" in rate:
            kd_gain = rate["sft@teacher-tok"] - rate["kd@teacher-tok"]
            row["kd_gain"] = kd_gain
            row["gain_vs_sft"] = {n: rate["sft"] - r for n, r in rate.items() if n in dict(m.split("=", 1)
                                                                                         for m in a.model)}
            row["recovered"] = {n: g / kd_gain if kd_gain else None for n, g in row["gain_vs_sft"].items()}
        report["kinds"][kind] = row
    names = list(models)
    lines = ["| kind | chars | " + " | ".join(names) + " | KD gain | " +
             " | ".join(f"{n} recovers" for n in dict(m.split("=", 1) for m in a.model) if n != "sft") + " |",
             "|---|---:|" + "---:|" * (len(names) + 1 + len(a.model) - 1)]
    for kind, row in report["kinds"].items():
        rec = row.get("recovered", {})
        lines.append(f"| {kind} | {row['char_share']:.1%} | " +
                     " | ".join(f"{row['nats_per_char'][n]:.4f}" for n in names) +
                     f" | {row.get('kd_gain', float('nan')):.4f} | " +
                     " | ".join(f"{rec[n]:.0%}" if rec.get(n) is not None else "-" for n in rec if n != "sft") + " |")
    report["table"] = "\n".join(lines)
    print(report["table"])
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
