"""Offline (cached teacher states) vs online (teacher in memory) distillation on the same pair and batch, in one run.

Per mode: seconds per optimizer step (after warm-up steps), peak memory (torch.cuda.max_memory_allocated on GPU,
peak RSS on CPU; each mode runs in its own fresh process, so each peak is that mode's own), and the loader-wait
fraction. Writes bench/results/distill_offline_vs_online-<device>-<shapes>.json.

CPU, tiny models (default):
    python bench/distill_offline_vs_online.py
GPU, random-weight models of real shapes (no download: configs only, the tokenizers from the test fixtures):
    python bench/distill_offline_vs_online.py --teacher-shape qwen1.5-1.8b --student-shape gpt2 --device cuda \
        --limit 256 --max-length 512 --micro-batch-size 4 --grad-accum 8 --steps 6
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import torch

from dskd_pipe.pipeline.config import CacheConfig, DistillConfig
from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

from results_file import write_result  # bench/ is on sys.path when a benchmark runs as a script

TOK = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizers"
DATA = Path(__file__).resolve().parents[1] / "configs" / "data" / "dolly_train_200.jsonl"

# Published shapes (from the models' config.json files), random weights.
SHAPES = {
    "qwen1.5-1.8b": ("qwen2", "qwen2", dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                                            num_attention_heads=16, num_key_value_heads=16,
                                            tie_word_embeddings=False, vocab_size=151936)),
    "gpt2": ("gpt2", "gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)),
    # A CPU-sized stand-in for "the teacher is much larger than the student": Qwen2 architecture, 12 layers,
    # d 768 (~200M parameters with the Qwen vocabulary), so the online teacher forward is a real share of a step.
    "cpu-qwen2-200m": ("qwen2", "qwen2", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                              num_attention_heads=12, num_key_value_heads=12,
                                              tie_word_embeddings=True, vocab_size=151669)),
    "tiny-qwen2": ("qwen2", "qwen2", None),
    "tiny-gpt2": ("gpt2", "gpt2", None),
}


def build_model(shape: str, folder: Path) -> Path:
    arch, tok_name, sizes = SHAPES[shape]
    tok = load_tokenizer(str(TOK / tok_name))
    if sizes is None:
        return save_tiny_model(folder, arch, tok, d_model=64, layers=2)
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    cls = GPT2Config if arch == "gpt2" else Qwen2Config
    cfg = cls(eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, **sizes)
    torch.manual_seed(0)
    # bf16 on disk for the GPU shapes; the CPU shape stays fp32 (CPU bf16 matmuls are slow)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if shape.startswith("cpu-") else torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def peak_memory(device: str) -> dict:
    if device.startswith("cuda"):
        return {"peak_gpu_bytes": int(torch.cuda.max_memory_allocated())}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_bytes": int(rss_kib * 1024)}


def time_mode(cfg: DistillConfig, warmup: int) -> dict:
    from dskd_pipe.stages import distill

    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = distill.run(cfg)
    wall = time.perf_counter() - start
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]
    timed = rows[warmup:] or rows
    step_s = [r["step_s"] for r in timed]
    return {"steps": len(rows), "timed_steps": len(timed), "s_per_step": sum(step_s) / len(step_s),
            "loader_wait_frac": sum(r["loader_wait_frac"] for r in timed) / len(timed),
            "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed), "wall_s_incl_load": wall,
            "final_loss": rows[-1]["loss"], **peak_memory(cfg.device)}


def _time_mode_to_file(cfg: DistillConfig, warmup: int, path: str) -> None:
    Path(path).write_text(json.dumps(time_mode(cfg, warmup)))


def in_own_process(cfg: DistillConfig, warmup: int) -> dict:
    """time_mode in a fresh process, so that peak RSS (CPU) and peak allocated memory (GPU) are the mode's own. A
    plain (non-daemonic) process: a Pool's daemonic workers may not start the run's DataLoader workers."""
    result = Path(cfg.out).with_suffix(".result.json")
    proc = multiprocessing.get_context("spawn").Process(target=_time_mode_to_file, args=(cfg, warmup, str(result)))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not result.exists():
        raise SystemExit(f"the {'offline' if cfg.cache else 'online'} run failed (exit code {proc.exitcode}); its "
                         "error is printed above")
    return json.loads(result.read_text())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-shape", default="tiny-qwen2", choices=sorted(SHAPES))
    p.add_argument("--student-shape", default="tiny-gpt2", choices=sorted(SHAPES))
    p.add_argument("--method", default="dskd-cma")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=48)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="Steps left out of the timing.")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--work", default="", help="Folder for models/store/runs (default: a temporary folder).")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    from dskd_pipe.stages.cache_teacher import run as cache_teacher

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        teacher = build_model(args.teacher_shape, work / "teacher")
        student = build_model(args.student_shape, work / "student")
        t0 = time.perf_counter()
        store = cache_teacher(CacheConfig(teacher=str(teacher), data=str(DATA), out=str(work / "store"),
                                          limit=args.limit, max_length=args.max_length, device=args.device))
        cache_s = time.perf_counter() - t0
        common = dict(student=str(student), method=args.method, data=str(DATA), limit=args.limit,
                      max_length=args.max_length, micro_batch_size=args.micro_batch_size,
                      grad_accum=args.grad_accum, max_steps=args.steps, epochs=1000, device=args.device,
                      num_workers=args.num_workers, progress=False, seed=0)
        offline = in_own_process(DistillConfig(cache=str(store), out=str(work / "offline"), **common), args.warmup)
        online = in_own_process(DistillConfig(teacher=str(teacher), out=str(work / "online"), **common), args.warmup)
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"cpu, {torch.get_num_threads()} threads")
    result = {"device": device,
              "args": vars(args), "cache_teacher_s": cache_s, "offline": offline, "online": online,
              "online_over_offline_step_time": online["s_per_step"] / offline["s_per_step"]}
    write_result(args.out, f"distill_offline_vs_online-{args.device.split(':')[0]}-{args.teacher_shape}_"
                           f"{args.student_shape}", result)
    return result


if __name__ == "__main__":
    main()
