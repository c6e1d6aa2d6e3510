"""Does the DataLoader keep a GPU fed? The distill stage's own loader path against a simulated training step.

The path is the one `dskd-pipe distill` runs: StoreReader -> StoreSource -> DistillDataset (the student tokenizer on
each example's stored text) -> Collate (both views padded; the teacher's hidden rows packed, [N, d]) ->
pipeline.loader.make_loader (workers, prefetch, pinned memory when the device is a GPU), then `.to(device,
non_blocking=True)` per micro-batch and, on a GPU, the rows padded to [B, T, d] there, as the loop does. The
training step is simulated: the loop takes the step's micro-batches (the time spent waiting for them is the loader
wait), then the step itself takes --step-ms: a sleep on CPU, a GPU-side sleep kernel (torch.cuda._sleep, calibrated)
on a GPU followed by one synchronize, as the real loop synchronises once per step.

Stores: one per bytes-per-token (bf16 hidden states: d 1024 / 2048 / 4096 = 2 / 4 / 8 KB per token), written with
the store's own writer: real Dolly prompts and responses tokenised with the real Qwen2 tokenizer, random hidden
states. A step holds about --tokens-per-step real teacher tokens (16k by default: a GPU step of a ~120M student):
micro-batches of --micro-batch-size examples, as many as that takes. Reads are warm (the store fits the page cache:
the examples of the store are cycled); a cold read is bounded by the disk (bench/store_read.py).

Per configuration: the loader wait as a share of step time, steady state (the first --warmup steps, which include
starting the workers, are reported apart), and per (bytes/token, step time) the fewest workers with a share < 2%.
Per bytes-per-token also the CPU time a worker spends per micro-batch (read, student tokenisation, collate, handing
the batch over), measured as thread CPU time so that other load on a shared machine does not count:
ceil(CPU per step / step time) is the fewest workers that can keep up on this machine's cores when they are free.

    python bench/loader.py                                        # CPU: workers 0,1,2,4; 50 and 100 ms steps
    python bench/loader.py --device cuda --workers 0,1,2,4,8      # a GPU machine: pinned memory, real H2D copies
Writes bench/results/loader-<device>.json.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from dskd_pipe.pipeline import loader as streaming
from dskd_pipe.cache.format import Manifest, plan_store
from dskd_pipe.cache.reader import open_store
from dskd_pipe.pipeline.loader import Collate, DistillDataset, Side, StoreSource, make_loader
from dskd_pipe.cache.writer import PartWriter, finalize_store, open_for_writing, write_json
from dskd_pipe.pipeline.data import build_sequence, load_examples
from dskd_pipe.pipeline.models import load_tokenizer

from results_file import write_result  # bench/ is on sys.path when a benchmark runs as a script

REPO = Path(__file__).resolve().parents[1]
TOK = REPO / "tests" / "fixtures" / "tokenizers"
DATA = REPO / "configs" / "data" / "dolly_train_200.jsonl"
GOAL = 0.02


class CycledSource:
    """A source of `n` items cycling over a smaller store's examples: long runs over a store that stays warm."""

    def __init__(self, source, n: int):
        self.source, self.n, self.pad_id = source, n, source.pad_id

    def __len__(self) -> int:
        return self.n

    def item(self, i: int) -> dict:
        return self.source.item(i % len(self.source))


def build_store(root: Path, d_model: int, examples, teacher_tok, max_length: int) -> Path:
    """A finished store of the examples with random bf16 hidden states [L, d] (no head: the loader reads none)."""
    if (root / "manifest.json").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    eos = teacher_tok.eos_token_id
    seqs = [build_sequence(teacher_tok, e.prompt, e.response, eos, 256, max_length) for e in examples]
    plan = plan_store([len(s.ids) for s in seqs], [s.prompt_len for s in seqs], 1 << 16, 1)
    m = Manifest(fingerprints={"data": {"n_examples": len(seqs)}}, hidden_dtype="bfloat16", d_model=d_model,
                 vocab_size=len(teacher_tok), eos_id=eos, pad_id=eos, batch_tokens=1 << 16, plan_sha256=plan.sha256())
    root_path, m = open_for_writing(str(root), m, {}, plan, [(e.prompt, e.response) for e in examples])
    write_json(root_path / "shared.json", {"complete": True}, "bench")  # the loader needs no head or embeddings
    pool = torch.randn(max_length + 4096, d_model).bfloat16()
    w = PartWriter(root_path, 0, m, plan)
    for k, i in enumerate(plan.part_examples(0)):
        s = seqs[i]
        a = (k * 131) % 4096
        w.add(i, s.ids, s.prompt_len, s.offsets, pool[a:a + len(s.ids)])
    w.close()
    finalize_store(root_path)
    return root_path


def gpu_sleeper(device: str):
    """A function that keeps the GPU busy for `ms` (a sleep kernel, calibrated here) without using the CPU."""
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    per_ms = cycles / start.elapsed_time(end)
    return lambda ms: torch.cuda._sleep(int(per_ms * ms))


def worker_cpu_ms(reader, student: Side, micro_batch: int, n_batches: int = 12) -> dict:
    """CPU milliseconds one DataLoader worker spends per micro-batch, by stage, measured in this process as a worker
    runs it (one intra-op thread, the batch allocated in shared memory and pickled as the worker's queue does).
    Thread CPU time, so other load on the machine does not count: cost / step time is the fewest workers that can
    keep up, whatever the wall-clock shares say on a busy machine."""
    from multiprocessing.reduction import ForkingPickler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    real_worker_info = streaming.get_worker_info
    streaming.get_worker_info = lambda: True  # Collate allocates as in a worker (shared memory)
    try:
        dataset = DistillDataset(CycledSource(StoreSource(reader), (n_batches + 1) * micro_batch), student)
        collate = Collate(student.pad_id, int(reader.manifest.pad_id))
        costs = {"read": 0.0, "tokenize": 0.0, "collate": 0.0, "send": 0.0}
        clock = time.thread_time
        for k in range(n_batches + 1):
            items = []
            part = dict.fromkeys(costs, 0.0)
            for j in range(k * micro_batch, (k + 1) * micro_batch):
                t = clock()
                item = dataset.source.item(int(dataset.indices[j]))
                part["read"] += clock() - t
                t = clock()
                s = student.encode(item["prompt"], item["response"])
                item.update(student_ids=s.ids, student_prompt_len=s.prompt_len, student_offsets=s.offsets)
                part["tokenize"] += clock() - t
                items.append(item)
            t = clock()
            batch = collate(items)
            part["collate"] += clock() - t
            t = clock()
            ForkingPickler(io.BytesIO()).dump(batch)
            part["send"] += clock() - t
            if k:  # the first batch opens the store's files
                for name in costs:
                    costs[name] += part[name]
    finally:
        streaming.get_worker_info = real_worker_info
        torch.set_num_threads(threads)
    out = {name: round(1000 * v / n_batches, 2) for name, v in costs.items()}
    out["total"] = round(sum(out.values()), 2)
    return out


def run_config(reader, student: Side, micro_batch: int, accum: int, workers: int, prefetch: int, step_ms: float,
               steps: int, warmup: int, device: str, sleep_gpu) -> dict:
    n_items = (steps + warmup + 1) * accum * micro_batch
    dataset = DistillDataset(CycledSource(StoreSource(reader), n_items), student, seed=0, epoch=0)
    collate = Collate(student.pad_id, int(reader.manifest.pad_id))
    cuda = device.startswith("cuda")
    t_start = time.perf_counter()
    loader = make_loader(dataset, micro_batch, collate, workers, prefetch, pin_memory=cuda)
    batches = iter(loader)
    waits, totals, padded_rows, real_tokens = [], [], 0, 0
    first_batch_s = None
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        wait = 0.0
        micro = []
        for _ in range(accum):
            tw = time.perf_counter()
            b = next(batches)
            wait += time.perf_counter() - tw
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - t_start
            micro.append({k: v.to(device, non_blocking=True) for k, v in b.items()})
            if cuda:
                micro[-1]["teacher_hidden"] = streaming.teacher_hidden(micro[-1])  # as Teacher.hidden
        if cuda:
            sleep_gpu(step_ms)
            torch.cuda.synchronize(device)
        else:
            time.sleep(step_ms / 1000)
        if step >= warmup:
            waits.append(wait)
            totals.append(time.perf_counter() - t0)
            for b in micro:
                padded_rows += int(b["teacher_input_ids"].numel())
                real_tokens += int(b["teacher_attention_mask"].sum())
    del batches, loader
    share = sum(waits) / sum(totals)
    return {"workers": workers, "prefetch_factor": prefetch, "step_ms": step_ms, "wait_share": round(share, 4),
            "wait_ms_per_step": round(1000 * sum(waits) / len(waits), 2),
            "max_wait_ms": round(1000 * max(waits), 1), "first_batch_s": round(first_batch_s, 2),
            "real_tokens_per_step": real_tokens // steps, "padded_rows_per_step": padded_rows // steps}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--kb-per-token", default="2,4,8", help="bf16 hidden bytes per token in KiB (d = 512 x KiB).")
    p.add_argument("--step-ms", default="50,100")
    p.add_argument("--workers", default="0,1,2,4")
    p.add_argument("--prefetch", default="2", help="prefetch_factor values (batches in flight per worker).")
    p.add_argument("--tokens-per-step", type=int, default=16384)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=30, help="Timed steps per configuration.")
    p.add_argument("--warmup", type=int, default=3, help="Steps left out (workers starting, prefetch filling).")
    p.add_argument("--dir", default="/tmp/loader_bench", help="Where the stores are built (kept for reruns).")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    teacher_tok = load_tokenizer(str(TOK / "qwen2"))
    student_tok = load_tokenizer(str(TOK / "gpt2"))
    student = Side(student_tok, student_tok.eos_token_id, student_tok.eos_token_id, 256, args.max_length)
    examples = load_examples(str(DATA), report=lambda *a: None)
    sleep_gpu = gpu_sleeper(args.device) if args.device.startswith("cuda") else None
    rows, costs = [], {}
    load_before = os.getloadavg()[0]
    for kb in (float(x) for x in args.kb_per_token.split(",")):
        d = int(512 * kb)
        t0 = time.perf_counter()
        root = build_store(Path(args.dir) / f"d{d}", d, examples, teacher_tok, args.max_length)
        reader = open_store(str(root))
        mean_len = reader.manifest.totals["tokens"] / len(reader)
        accum = max(1, round(args.tokens_per_step / (args.micro_batch_size * mean_len)))
        cpu = worker_cpu_ms(reader, student, args.micro_batch_size)
        costs[f"{kb:g}KB"] = {"per_micro_batch_ms": cpu, "per_step_ms": round(cpu["total"] * accum, 1),
                              "micro_batches_per_step": accum}
        print(f"d {d} ({kb:g} KB/token): store ready in {time.perf_counter() - t0:.1f} s; "
              f"{args.micro_batch_size} x {accum} micro-batches per step; worker CPU per micro-batch {cpu}",
              file=sys.stderr)
        for step_ms in (float(x) for x in args.step_ms.split(",")):
            for prefetch in (int(x) for x in args.prefetch.split(",")):
                for workers in (int(x) for x in args.workers.split(",")):
                    if workers == 0 and prefetch != int(args.prefetch.split(",")[0]):
                        continue  # prefetch means nothing without workers
                    r = run_config(reader, student, args.micro_batch_size, accum, workers, prefetch, step_ms,
                                   args.steps, args.warmup, args.device, sleep_gpu)
                    r.update({"kb_per_token": kb, "d_model": d, "micro_batch_size": args.micro_batch_size,
                              "grad_accum": accum})
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr)
    summary = {}
    for r in rows:
        key = f"{r['kb_per_token']:g}KB/{r['step_ms']:g}ms"
        need = math.ceil(costs[f"{r['kb_per_token']:g}KB"]["per_step_ms"] / r["step_ms"]) if r["step_ms"] else None
        s = summary.setdefault(key, {"wait_share_by_workers": {}, "fewest_workers_under_2pct": None,
                                     "workers_to_keep_up_by_cpu_cost": need})
        s["wait_share_by_workers"][f"{r['workers']}w/p{r['prefetch_factor']}"] = r["wait_share"]
        if r["wait_share"] < GOAL and (s["fewest_workers_under_2pct"] is None
                                       or r["workers"] < s["fewest_workers_under_2pct"]):
            s["fewest_workers_under_2pct"] = r["workers"]
    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    else:
        machine = f"cpu, {os.cpu_count()} cores"
    machine += f", load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    result = {"machine": machine, "args": vars(args), "worker_cpu": costs, "summary": summary, "rows": rows}
    write_result(args.out, f"loader-{args.device.split(':')[0]}", result, shown=summary, indent=1)
    return result


if __name__ == "__main__":
    main()
