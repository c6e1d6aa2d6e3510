"""One student of the quality benchmark, trained and scored on held-out NLL: the piecewise runs of BENCHMARKS.md
"The quality benchmark" (the recipe, `dskd-pipe recipe quality`, trains every method x seed; this trains one, with
any DistillConfig keys, to compare settings on dev).

    python bench/quality_student.py '{"root": "runs/w24", "name": "kd-bpe", "method": "kd", "tok": "tok_bpe",
                                      "init": "runs/w24/base-bpe", "kd_rate": 0.9, "kd_temperature": 1.0}'

ROOT holds data/{student_train,dev,test}.jsonl (pipeline/world.write_world_files), the trained tokenizers (`tok`,
default tok_wp) and teacher.zarr (`cache`, for methods other than sft). `init`: the student to start from (default: a
fresh d128 x 2 Llama with `tok`, built once as ROOT/init-TOK-d128L2). Every other key is a DistillConfig key over
the benchmark's shared settings below. The result (spec, train seconds, dev and test NLL per token and per character)
is appended to ROOT/results.jsonl.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from dskd_pipe.pipeline.config import DistillConfig
from dskd_pipe.pipeline.data import load_examples
from dskd_pipe.pipeline.likelihood import response_nll
from dskd_pipe.pipeline.models import load_causal_lm, load_tokenizer, save_tiny_model
from dskd_pipe.stages import distill

SHARED = dict(epochs=10, micro_batch_size=32, grad_accum=1, lr=3e-3, projector_lr=3e-3, warmup_steps=30, min_lr=3e-4,
              weight_decay=0.01, num_workers=0, dtype="float32", max_prompt_length=64, max_length=192, progress=False)


def main(argv: list[str]) -> dict:
    torch.set_num_threads(1)  # two runs share the two cores
    spec = json.loads(argv[0])
    root, name = Path(spec.pop("root")), spec.pop("name")
    tok = spec.pop("tok", "tok_wp")
    init = spec.pop("init", None)
    if init is None:
        init = root / f"init-{tok}-d128L2"
        if not init.exists():
            save_tiny_model(init, "llama", load_tokenizer(str(root / tok)), d_model=128, layers=2, heads=2, seed=0)
    data = root / spec.pop("data", "data/student_train.jsonl")
    cfg = {**SHARED, "method": "sft", "student": str(init), "data": str(data),
           "out": str(root / "runs" / name), "dev_data": str(root / "data" / "dev.jsonl"), **spec}
    if cfg["method"] != "sft":
        cfg.setdefault("cache", str(root / "teacher.zarr"))
    t0 = time.perf_counter()
    out = distill.run(DistillConfig(**cfg))
    seconds = time.perf_counter() - t0
    model, tokenizer = load_causal_lm(str(out), dtype=torch.float32, device="cpu"), load_tokenizer(str(out))
    lengths = (cfg["max_prompt_length"], cfg["max_length"])
    result = {"name": name, "spec": cfg, "train_s": seconds,
              **{split: response_nll(model, tokenizer, load_examples(str(root / "data" / f"{split}.jsonl")),
                                     *lengths, 32) for split in ("dev", "test")}}
    with open(root / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"{name}: train {seconds:.0f} s, dev {result['dev']['per_char']:.4f}, test {result['test']['per_char']:.4f} "
          "nats/char")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
