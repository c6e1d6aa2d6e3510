"""distill on several processes: tokens/s of N processes against 1 with the same global batch, and the peak memory
of one process under DDP and under FSDP2, in one run.

Each configuration runs `dskd-pipe distill` as its own command (one process, or torchrun --standalone with N):
1 process with micro-batch b x accumulation N*k, N processes x b x k under DDP, the same under FSDP2 (--fsdp). The
student is a random-weight GPT-2 of the chosen size with the GPT-2 tokenizer, the teacher a tiny Qwen2 behind a
teacher-state store built once by cache-teacher (method dskd-cma: cross-tokenizer, projectors trained too).
tokens/s: the median of the run's per-step tokens_per_s (metrics.jsonl: all processes' tokens / step wall time),
warm-up steps left out. Memory: the peak resident set (ru_maxrss) of the largest process of the command, which on
CPU holds the weights, gradients, AdamW states and activations. Writes JSON.

CPU (2 cores here, so 2 processes cannot reach 2x):
    python bench/distributed.py --student-size 200m --nproc 2 --out bench/results/distributed-cpu-200m.json
GPU node:
    python bench/distributed.py --student-size 200m --nproc 8 --device cuda --micro-batch-size 4 --steps 10
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / "tests" / "fixtures" / "tokenizers"
DATA = ROOT / "configs" / "data" / "dolly_train_200.jsonl"
# GPT-2 shapes: (d_model, layers, heads); parameters with the tied 50,257 x d embedding.
SIZES = {"tiny": (64, 2, 4), "124m": (768, 12, 12), "200m": (1024, 12, 16), "355m": (1024, 24, 16)}

_PEAK = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
         "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def build(tmp: Path, size: str, n_examples: int, max_length: int,
          teacher_tokenizer: str = "qwen2") -> tuple[Path, Path]:
    """(student folder, store) for the run; the tiny teacher has the fixture tokenizer `teacher_tokenizer`."""
    from dskd_pipe.pipeline.config import CacheConfig
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model
    from dskd_pipe.stages.cache_teacher import run as cache

    d, layers, heads = SIZES[size]
    student = save_tiny_model(tmp / f"student-{size}", "gpt2", load_tokenizer(str(TOK / "gpt2")), d_model=d,
                              layers=layers, heads=heads, seed=1)
    cfg = json.loads((student / "config.json").read_text())
    cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # one function: the runs compare exactly
    (student / "config.json").write_text(json.dumps(cfg))
    teacher = save_tiny_model(tmp / "teacher", "qwen2", load_tokenizer(str(TOK / teacher_tokenizer)), d_model=64,
                              layers=2)
    store = cache(CacheConfig(teacher=str(teacher), data=str(DATA), out=str(tmp / "store"), limit=n_examples,
                              max_length=max_length, device="cpu"))
    return student, Path(store)


def run_one(name: str, nproc: int, fsdp: bool, args, student: Path, store: Path, tmp: Path) -> dict:
    accum = args.grad_accum * (args.nproc if nproc == 1 else 1)
    out = tmp / name
    flags = ["distill", "--cache", str(store), "--student", str(student), "--data", str(DATA), "--out", str(out),
             "--method", "dskd-cma", "--limit", str(args.limit), "--max-length", str(args.max_length),
             "--micro-batch-size", str(args.micro_batch_size), "--grad-accum", str(accum), "--epochs", "1",
             "--max-steps", str(args.warmup + args.steps), "--num-workers", "0", "--device", args.device,
             "--seed", "0", "--no-progress"] + (["--fsdp"] if fsdp else [])
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
              if nproc > 1 else [sys.executable])
    cmd = [sys.executable, "-c", _PEAK, *launch, "-m", "dskd_pipe", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                     "OMP_NUM_THREADS": str(args.threads)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    peak_kb = int(proc.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    steps = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    timed = steps[args.warmup:]
    return {"processes": nproc, "engine": "fsdp" if fsdp else "ddp" if nproc > 1 else "none",
            "micro_batch_size": args.micro_batch_size, "grad_accum": accum,
            "global_batch": args.micro_batch_size * accum * nproc,
            "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
            "step_s": statistics.median(m["step_s"] for m in timed), "losses": [m["loss"] for m in steps],
            "peak_rss_gib_largest_process": peak_kb / 2**20, "wall_s": wall}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student-size", choices=sorted(SIZES), default="200m")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1, help="per process; the one-process run takes nproc x this")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process (torchrun's default is 1)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    args.limit = args.micro_batch_size * args.grad_accum * args.nproc * (args.warmup + args.steps)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        student, store = build(tmp, args.student_size, args.limit, args.max_length)
        n_params = sum(v.numel() for v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(student / "model.safetensors")).values())
        runs = {"one": run_one("one", 1, False, args, student, store, tmp),
                "ddp": run_one("ddp", args.nproc, False, args, student, store, tmp),
                "fsdp": run_one("fsdp", args.nproc, True, args, student, store, tmp)}
    one = runs["one"]
    result = {
        "command": " ".join(["python", "bench/distributed.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(), "torch": torch.__version__,
                    "device": args.device},
        "student": {"size": args.student_size, "parameters": n_params},
        "runs": runs,
        "ratios": {f"{k}_tokens_per_s_vs_one": runs[k]["tokens_per_s"] / one["tokens_per_s"] for k in ("ddp", "fsdp")}
        | {"fsdp_peak_rss_vs_ddp": runs["fsdp"]["peak_rss_gib_largest_process"]
           / runs["ddp"]["peak_rss_gib_largest_process"]},
        "max_loss_rel_diff_vs_one": {k: max(abs(a - b) / abs(b) for a, b in zip(runs[k]["losses"], one["losses"]))
                                     for k in ("ddp", "fsdp")},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
