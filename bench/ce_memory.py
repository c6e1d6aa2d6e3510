"""Peak memory of the student's cross-entropy (forward + backward) over a large vocabulary: the project's
`cross_entropy_sum` (only the labelled rows go to fp32) against the same loss over every row of the padded batch
(what it did before), each in its own process, CPU resident-set peak above the inputs.

    python bench/ce_memory.py --batch 4 --length 256 --vocab 151936 --prompt 128

Writes bench/results/ce_memory-cpu.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def one(kind: str, batch: int, length: int, vocab: int, prompt: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum

    torch.manual_seed(0)
    logits = torch.randn(batch, length, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, :prompt] = -100  # the prompt's rows carry no label
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "every_row":
        loss = F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1), ignore_index=-100,
                               reduction="sum")
    else:
        loss = cross_entropy_sum(logits, labels)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"kind": kind, "loss": loss.item(), "peak_above_inputs_mib": (peak - before) / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--prompt", type=int, default=128, help="Leading rows of each sequence without a label.")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one kind in this process
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ce_memory-cpu.json"))
    args = ap.parse_args(argv)
    shape = (args.batch, args.length, args.vocab, args.prompt)
    if args.one:
        print(json.dumps(one(args.one, *shape)))
        return 0
    runs = {}
    for kind in ("every_row", "labelled_rows"):
        proc = subprocess.run([sys.executable, __file__, "--one", kind, "--batch", str(args.batch), "--length",
                               str(args.length), "--vocab", str(args.vocab), "--prompt", str(args.prompt)],
                              capture_output=True, text=True, check=True)
        runs[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = {kind: run["peak_above_inputs_mib"] for kind, run in runs.items()}
    result = {"command": " ".join(["python bench/ce_memory.py", *(sys.argv[1:] if argv is None else argv)]),
              "shape": {"batch": args.batch, "length": args.length, "vocab": args.vocab, "prompt": args.prompt},
              "runs": runs,
              "memory_ratio": (peak["labelled_rows"] / peak["every_row"]
                               if peak["every_row"] > 0 else None),  # tiny shapes: no growth to compare
              # the same sum in another order: equal to fp32 rounding
              "loss_relative_difference": abs(runs["labelled_rows"]["loss"] / runs["every_row"]["loss"] - 1.0)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
