"""Capture throughput of `cache-teacher` against the teacher's bare forward, same batches and dtype, in one run.

bare:    for each length-sorted batch, forward + last hidden state (`teacher_states`), nothing leaves the device.
capture: the stage's own loop (`stages.cache_teacher.cache_batches`): the same forwards, rows copied to the host,
         `PartWriter.add` with its background write thread, then `close()` (the last flush is on disk) -- the
         tokens/s a `cache-teacher` run gets, less the one-off model load, tokenisation and shared-part write.
Both modes alternate `--repeats` times after a warm-up; CUDA is synchronised around every timing. The best repeat of
each mode is compared (ratio = capture / bare tokens/s; goal >= 0.90). Writes
bench/results/capture-<device>-<shape>.json (or into --results).

CPU, tiny random model (checks the script, numbers mean little):
    python bench/capture.py --teacher-shape tiny --examples 200
GPU, random weights of a real shape (no download: config only, tokenizer from the test fixtures):
    python bench/capture.py --teacher-shape qwen1.5-1.8b --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from dskd_pipe.cache.format import Manifest, part_name, plan_store
from dskd_pipe.cache.writer import PartWriter, open_for_writing
from dskd_pipe.pipeline.config import CacheConfig, config_to_dict
from dskd_pipe.pipeline.data import TEMPLATE_ID, build_sequence, load_examples
from dskd_pipe.pipeline.models import (eos_token_id, head_parts, load_causal_lm, load_tokenizer, pad_token_id,
                                       save_tiny_model)
from dskd_pipe.pipeline.progress import Console
from dskd_pipe.stages.cache_teacher import cache_batches, teacher_states

from results_file import write_result  # bench/ is on sys.path when a benchmark runs as a script

ROOT = Path(__file__).resolve().parents[1]
QWEN_TOK = ROOT / "tests" / "fixtures" / "tokenizers" / "qwen2"
DATA = ROOT / "tests" / "fixtures" / "data" / "dolly_train_40.jsonl"

# Published shapes (config.json of the real checkpoints), random weights, Qwen2 architecture.
SHAPES = {
    "tiny": None,
    "qwen1.5-0.5b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, tie_word_embeddings=False, vocab_size=151936),
    "qwen1.5-1.8b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, tie_word_embeddings=False, vocab_size=151936),
    "qwen1.5-4b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=40, num_attention_heads=20,
                       num_key_value_heads=20, tie_word_embeddings=False, vocab_size=151936),
}


def build_model(shape: str, folder: Path) -> Path:
    tok = load_tokenizer(str(QWEN_TOK))
    sizes = SHAPES[shape]
    if sizes is None:
        return save_tiny_model(folder, "qwen2", tok, d_model=64, layers=2)
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, max_position_embeddings=4096,
                      **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def repeat_data(src: Path, n: int, dst: Path) -> Path:
    """`src` repeated (cyclically) to n records: same length mix, any size."""
    lines = [ln for ln in src.read_text().splitlines() if ln.strip()]
    dst.write_text("".join(lines[k % len(lines)] + "\n" for k in range(n)))
    return dst


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def padded_batch(seqs, batch, pad) -> tuple[torch.Tensor, torch.Tensor]:
    """The stage's right-padded batch (same construction as `cache_batches`)."""
    lens = [len(seqs[i].ids) for i in batch]
    ids = torch.full((len(batch), max(lens)), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), max(lens)), dtype=torch.long)
    for b, i in enumerate(batch):
        ids[b, :lens[b]] = torch.tensor(seqs[i].ids)
        mask[b, :lens[b]] = 1
    return ids, mask


def time_bare(model, seqs, batches, pad, device) -> float:
    sync(device)
    start = time.perf_counter()
    for batch in batches:
        ids, mask = padded_batch(seqs, batch, pad)
        teacher_states(model, ids.to(device), mask.to(device))  # [B, T, d], dropped
    sync(device)
    return time.perf_counter() - start


def time_capture(model, tok, examples, seqs, plan, head, cfg: CacheConfig, out: Path) -> dict:
    eos, pad = eos_token_id(tok), pad_token_id(tok)
    dtype = next(model.parameters()).dtype
    manifest = Manifest(
        fingerprints={"teacher": {"bench": "random weights"}, "tokenizer": "bench", "template": TEMPLATE_ID,
                      "data": {"path": cfg.data, "n_examples": len(examples)}},
        hidden_dtype=str(dtype).removeprefix("torch."), d_model=int(head["weight"].shape[1]),
        vocab_size=int(head["weight"].shape[0]), eos_id=eos, pad_id=pad, topk=cfg.topk,
        chunk_tokens=cfg.chunk_tokens, shard_tokens=cfg.shard_tokens, batch_tokens=cfg.batch_tokens,
        compression=cfg.compression, n_parts=1, plan_sha256=plan.sha256())
    if out.exists():
        shutil.rmtree(out)
    root, on_disk = open_for_writing(str(out), manifest, config_to_dict(cfg), plan,
                                     [(e.prompt, e.response) for e in examples])
    writer = PartWriter(root, 0, on_disk, plan)
    batches = [plan.batches[b] for b in plan.part_batches(0)]
    sync(cfg.device)
    start = time.perf_counter()
    try:
        cache_batches(model, writer, seqs, batches, head, pad, cfg, cfg.device, 0, 1, Console("off", quiet=True))
        sync(cfg.device)
        loop = time.perf_counter() - start
        writer.close(complete=True)
    except BaseException:
        writer.close(complete=False)
        raise
    total = time.perf_counter() - start
    stored = sum(f.stat().st_size for f in (root / part_name(0)).rglob("*") if f.is_file())
    return {"seconds": total, "loop_seconds_before_close": loop, "stored_bytes": stored}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--data", default=str(DATA), help="jsonl records, repeated cyclically to --examples.")
    p.add_argument("--examples", type=int, default=0, help="Records (default: 2000 on cuda, 200 on cpu).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="", choices=["", "bfloat16", "float16", "float32"],
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--batch-tokens", type=int, default=CacheConfig.batch_tokens)
    p.add_argument("--max-length", type=int, default=CacheConfig.max_length)
    p.add_argument("--chunk-tokens", type=int, default=CacheConfig.chunk_tokens)
    p.add_argument("--topk", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="bare/capture pairs after the warm-up; the best counts.")
    p.add_argument("--out-dir", default="", help="Store folder (default: in a temporary folder, deleted after).")
    p.add_argument("--work", default="", help="Folder for the model and data (default: a temporary folder).")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    a.examples = a.examples or (2000 if a.device.startswith("cuda") else 200)

    tmp = tempfile.TemporaryDirectory(prefix="bench_capture_")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out_dir) if a.out_dir else work / "store"
    t0 = time.perf_counter()
    model_dir = work / f"teacher-{a.teacher_shape}"
    if not (model_dir / "config.json").exists():
        build_model(a.teacher_shape, model_dir)
    data = repeat_data(Path(a.data), a.examples, work / "data.jsonl")
    cfg = CacheConfig(teacher=str(model_dir), data=str(data), out=str(out), device=a.device, dtype=a.dtype,
                      batch_tokens=a.batch_tokens, max_length=a.max_length, chunk_tokens=a.chunk_tokens,
                      topk=a.topk)
    tok = load_tokenizer(cfg.teacher)
    model = load_causal_lm(cfg.teacher, dtype=getattr(torch, a.dtype) if a.dtype else None,
                           device=cfg.device)
    eos, pad = eos_token_id(tok), pad_token_id(tok)
    head = head_parts(model)
    examples = load_examples(cfg.data)
    seqs = [build_sequence(tok, e.prompt, e.response, eos, cfg.max_prompt_length, cfg.max_length)
            for e in examples]
    plan = plan_store([len(s.ids) for s in seqs], [s.prompt_len for s in seqs], cfg.batch_tokens, 1)
    batches = [list(b) for b in plan.batches]
    tokens = sum(len(s.ids) for s in seqs)
    padded = sum(len(b) * max(len(seqs[i].ids) for i in b) for b in batches)
    setup_s = time.perf_counter() - t0
    print(f"{a.teacher_shape} on {a.device} ({next(model.parameters()).dtype}): {len(examples)} examples, "
          f"{tokens} tokens ({padded} padded) in {len(batches)} batches; setup {setup_s:.1f} s")

    time_bare(model, seqs, batches[:1] + batches[-1:], pad, cfg.device)  # warm-up: shortest and longest batch
    bare, capture = [], []
    for r in range(a.repeats):
        bare.append(time_bare(model, seqs, batches, pad, cfg.device))
        capture.append(time_capture(model, tok, examples, seqs, plan, head, cfg, out))
        print(f"repeat {r}: bare {tokens / bare[-1]:.0f} tok/s, capture {tokens / capture[-1]['seconds']:.0f} tok/s "
              f"(ratio {bare[-1] / capture[-1]['seconds']:.3f})")
    best_bare = min(bare)
    best_cap = min(capture, key=lambda c: c["seconds"])
    dev = torch.device(a.device)
    result = {
        "bench": "capture", "teacher_shape": a.teacher_shape, "device": a.device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "torch": torch.__version__,
        "python": platform.python_version(), "examples": len(examples), "tokens": tokens, "padded_tokens": padded,
        "batches": len(batches), "batch_tokens": cfg.batch_tokens, "max_length": cfg.max_length,
        "chunk_tokens": cfg.chunk_tokens, "topk": cfg.topk, "repeats": a.repeats,
        "bare_seconds": bare, "capture_seconds": [c["seconds"] for c in capture],
        "capture_loop_seconds_before_close": [c["loop_seconds_before_close"] for c in capture],
        "bare_tokens_per_s": tokens / best_bare, "capture_tokens_per_s": tokens / best_cap["seconds"],
        "ratio": best_bare / best_cap["seconds"], "goal_ratio": 0.90,
        "stored_bytes": best_cap["stored_bytes"], "store_write_MB_per_s": best_cap["stored_bytes"] / 1e6 /
        best_cap["seconds"], "setup_seconds": setup_s,
        "command": "python bench/capture.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
            if v not in ("", None) and k != "results" and not (k == "data" and v == str(DATA))),
    }
    write_result(a.results, f"capture-{dev.type}-{a.teacher_shape}", result)
    if not a.out_dir:
        shutil.rmtree(out, ignore_errors=True)
    tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
