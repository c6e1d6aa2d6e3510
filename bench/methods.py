"""Per method: seconds per optimizer step and peak memory relative to `dskd-cma` on the same batches, in one run
(issue 5; DWA-KD reports about 1.3x the time of DSKD, the goal is to stay under that).

Every method of `pipeline.methods.METHODS` (the table is iterated, so a new method is picked up without editing this
file) runs through the distill stage's own code: `open_teacher`, `build_student`, the method's parts and collate
extras, `accumulate_gradients` (-> `micro_batch_loss`), gradient clipping, AdamW and the schedule.
All methods see the same examples in the same order, the same teacher-state store (built once per pair by the real
`cache-teacher` stage) and the same student initialisation. Each method runs in its own spawned processes.

Two pairs: "cross" (a Qwen2-architecture teacher with the Qwen tokenizer -> a GPT-2 student) for every method that
handles different vocabularies, and "same" (a larger GPT-2 teacher with the student's tokenizer) for the
same-vocabulary methods (`Method.same_vocabulary`: kd, dskd, dskd-v2). `dskd-cma` runs on both pairs, and every ratio is
taken against `dskd-cma` on the pair the method ran on (the JSON names the pair of each ratio).

Per method and pair:
- time: forward + backward + clip + optimizer step of one optimizer step (`grad_accum` micro-batches, batches
  moved to the device inside the step, CUDA synchronised). The steps cycle over `--batches` distinct step batches
  (the first ones of the stage's seeded order; lengths differ a lot between batches, so each batch's median over
  its timed steps is taken, then the mean over the batches). `--timing paired` (default): the method and dskd-cma
  are set up side by side in one process (each exactly as alone) and their steps interleave on the same batch
  (A B, B A, ...) after `--warmup` steps each; the ratio is the median over steps of t_method / t_dskd-cma, so a
  change of load on a shared machine hits both alike. `--timing isolated`: the method's own process against the
  baseline's. The collate (incl. a method's extras such as alignments, which DataLoader workers build off the
  training loop in real runs) is timed apart: `collate_s_per_step`.
- memory: CUDA: `torch.cuda.max_memory_allocated()` over the warm-up and timed steps, minus what was allocated after
  set-up (student, teacher head and embeddings, projectors); the absolute peak is kept as well. CPU: the process's
  resident-set high-water mark (VmHWM) during the steps minus its RSS after set-up. Before the steps, the heap is
  trimmed (glibc `malloc_trim(0)`, so set-up garbage sitting in malloc's free lists is not silently re-used by the
  steps) and the high-water mark is reset to the current RSS by writing 5 to /proc/self/clear_refs (Linux >= 4.0),
  so set-up peaks (store reads, MinED's token map) are not mistaken for step peaks. The step peak therefore
  includes the gradients and the AdamW states created at the first step, like the CUDA figure.
- CPU allocator: glibc unmaps every freed buffer above 32 MiB, so each [chunk, Vt] fp32 buffer of the
  full-vocabulary terms is page-faulted in anew (most of a CPU step's time is then system time). `--cpu-malloc keep`
  runs the methods with glibc keeping freed memory for re-use, as CUDA's caching allocator does on a GPU; its ratios
  are the closer guide to GPU ratios, the default shows `dskd-pipe distill` on a CPU as it runs today.

CPU, tiny models (default; a few minutes on 2 cores; the first run also builds MinED's Qwen -> GPT-2 token map,
~35 s, cached in ~/.cache/dskd-pipe):
    python bench/methods.py
    python bench/methods.py --cpu-malloc keep      # freed memory re-used (see above)
GPU, random-weight models of the published shapes (Qwen1.5-1.8B -> GPT-2; GPT-2 1.5B -> GPT-2), batch 4 x 512:
    python bench/methods.py --shape gpu --device cuda --timing isolated    # (bench/gpu_run.sh methods)

Writes bench/results/methods_<device>_<shape>[_malloc-keep].json, rewritten after every method ("complete": false
until the end), so a run stopped by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from itertools import islice
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_offline_vs_online import SHAPES as PUBLISHED_SHAPES  # noqa: E402  (issue 3's bench: real shapes)

ROOT = Path(__file__).resolve().parents[1]
TOK = ROOT / "configs" / "tokenizers"  # the tokenizers shipped with the package (GPT-2, Qwen)
DATA = ROOT / "configs" / "data" / "dolly_train_200.jsonl"
BASELINE = "dskd-cma"

# shape -> (architecture, tokenizer folder in configs/tokenizers, sizes). Sizes with "d_model" build a tiny model
# through pipeline.models.save_tiny_model; other sizes are published configs (random weights, bf16 on disk).
SHAPES = {
    "qwen1.5-1.8b": PUBLISHED_SHAPES["qwen1.5-1.8b"],
    "gpt2": PUBLISHED_SHAPES["gpt2"],
    # GPT-2 1.5B (gpt2-xl), the paper's same-vocabulary teacher (configs/gpt2-1.5b_gpt2_dskd.toml).
    "gpt2-xl": ("gpt2", "gpt2", dict(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257)),
    "cpu-qwen2-200m": PUBLISHED_SHAPES["cpu-qwen2-200m"],
    "tiny-qwen2-d128": ("qwen2", "qwen2", dict(d_model=128, layers=2, heads=4)),
    "tiny-gpt2-d128": ("gpt2", "gpt2", dict(d_model=128, layers=2, heads=4)),
    "tiny-gpt2": ("gpt2", "gpt2", dict(d_model=64, layers=2, heads=4)),
    "test-qwen2": ("qwen2", "qwen2", dict(d_model=32, layers=1, heads=4)),
    "test-gpt2-d48": ("gpt2", "gpt2", dict(d_model=48, layers=1, heads=4)),
    "test-gpt2": ("gpt2", "gpt2", dict(d_model=32, layers=1, heads=4)),
}

# --shape presets: the models of each pair and the batch. A step = grad_accum micro-batches of micro_batch_size.
PRESETS = {
    # 2-core CPU: teacher d 128 -> student d 64, batch 4 x <= 256 tokens; a few minutes for all methods.
    "cpu": dict(teacher="tiny-qwen2-d128", same_teacher="tiny-gpt2-d128", student="tiny-gpt2",
                micro_batch_size=4, grad_accum=1, max_length=256, batches=2, warmup=1, steps=4, repeats=1),
    # GPU: the paper's pairs and micro-batch (4 x 512 tokens).
    "gpu": dict(teacher="qwen1.5-1.8b", same_teacher="gpt2-xl", student="gpt2",
                micro_batch_size=4, grad_accum=1, max_length=512, batches=2, warmup=2, steps=6, repeats=1),
    # The smallest form, for tests/bench/test_methods_bench.py.
    "test": dict(teacher="test-qwen2", same_teacher="test-gpt2-d48", student="test-gpt2",
                 micro_batch_size=2, grad_accum=1, max_length=64, batches=1, warmup=0, steps=1, repeats=1),
}
# --cpu-malloc keep: glibc keeps freed memory in its heap instead of unmapping every buffer > 32 MiB, so the
# [chunk, Vt] fp32 buffers of the full-vocabulary terms are re-used instead of page-faulted in anew each time
# (what CUDA's caching allocator does on a GPU). Set in the spawned processes' environment, read by glibc at start.
KEEP_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
                   "MALLOC_TOP_PAD_": str(1 << 30)}
# The divergence each method is published with (README "Methods"); the others use the config default (fkl).
PUBLISHED_DIVERGENCE = {"dwa-kd": "srkl"}


# ---------------------------------------------------------------------------------------------------------------
# Set-up in the parent: models and stores
# ---------------------------------------------------------------------------------------------------------------

def build_model(shape: str, folder: Path, seed: int) -> Path:
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

    arch, tok_name, sizes = SHAPES[shape]
    tok = load_tokenizer(str(TOK / tok_name))
    if "d_model" in sizes:
        return save_tiny_model(folder, arch, tok, seed=seed, **sizes)
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    cls = GPT2Config if arch == "gpt2" else Qwen2Config
    cfg = cls(eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, **sizes)
    torch.manual_seed(seed)
    # bf16 on disk for the GPU shapes; the CPU shape stays fp32 (CPU bf16 matmuls are slow)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if shape.startswith("cpu-") else torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def plan_runs(methods: list[str], all_pairs: bool) -> list[tuple[str, str]]:
    """(method, pair) in METHODS order: same-vocabulary methods on "same", the others on "cross" (every method on
    both with `all_pairs`); the baseline on every pair that another method uses (on "cross" when alone)."""
    from dskd_pipe.pipeline.methods import METHODS

    def pairs(m):
        return ["cross", "same"] if all_pairs else ["same"] if METHODS[m].same_vocabulary else ["cross"]

    used = {pair for m in methods if m != BASELINE for pair in pairs(m)} or {"cross"}
    return [(m, pair) for m in methods for pair in (sorted(used) if m == BASELINE else pairs(m))]


# ---------------------------------------------------------------------------------------------------------------
# One method in its own process
# ---------------------------------------------------------------------------------------------------------------

def _proc_status() -> dict:
    """VmRSS and VmHWM of this process in bytes (Linux), {} elsewhere."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when this kernel/sandbox does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MethodRun:
    """One method set up exactly as `distill.run` does (store, student, method parts, collate with its extras,
    optimizer, schedule), with its step batches collated; `step(which)` runs one optimizer step on batch `which`."""

    def __init__(self, spec: dict):
        from dskd_pipe.pipeline.loader import Collate, DistillDataset, Side, make_loader
        from dskd_pipe.pipeline.config import DistillConfig
        from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer, pad_token_id
        from dskd_pipe.pipeline.training import cosine_schedule, param_groups, seed_everything
        from dskd_pipe.pipeline import methods
        from dskd_pipe.pipeline.distributed import Processes
        from dskd_pipe.stages import distill
        from dskd_pipe.pipeline import step
        from dskd_pipe.pipeline.step import Trainee
        from dskd_pipe.pipeline.student import build_student, hf_model
        from dskd_pipe.pipeline.teacher import open_teacher

        if spec.get("token_map_cache"):
            methods.TOKEN_MAP_CACHE = Path(spec["token_map_cache"])
        self.step_module = step
        self.cuda = spec["device"].startswith("cuda")
        self.n_steps = spec["warmup"] + spec["steps"]
        cfg = self.cfg = DistillConfig(
            cache=spec["cache"], student=spec["student"], method=spec["method"], data=str(DATA), out=spec["out"],
            limit=spec["limit"], max_length=spec["max_length"], micro_batch_size=spec["micro_batch_size"],
            grad_accum=spec["grad_accum"], max_steps=self.n_steps, epochs=1000, device=spec["device"], num_workers=0,
            progress=False, seed=0, divergence=spec["divergence"])
        distill.check_config(cfg)
        cfg = self.cfg = methods.resolve(cfg)
        self.device = device = cfg.device
        t_setup = time.perf_counter()
        seed_everything(cfg.seed)  # as distill.run: the same student and projector init for every method
        self.teacher, source = open_teacher(cfg, device)
        tok = load_tokenizer(cfg.student)
        side = Side(tok, eos_token_id(tok), pad_token_id(tok), cfg.max_prompt_length, cfg.max_length)
        self.student = build_student(cfg, device)
        t_parts = time.perf_counter()
        self.parts = methods.build_parts(cfg, self.teacher, tok, hf_model(self.student), device)
        self.parts_s = time.perf_counter() - t_parts
        collate = Collate(side.pad_id, self.teacher.pad_id, methods.collate_extras(cfg, self.teacher, tok))
        self.projectors = self.parts.projectors
        extra = [(self.projectors, cfg.projector_lr)] if self.projectors is not None else []
        self.trainee = Trainee(self.student, self.parts)
        self.procs = Processes(device=device)
        self.optimizer = torch.optim.AdamW(param_groups(self.student, cfg.lr, cfg.weight_decay, extra), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        adversary = methods.METHODS[cfg.method].adversary
        self.adversary = adversary
        self.adversary_opt = adversary.optimizer(cfg, self.parts.discriminator) if adversary is not None else None
        self.scheduler = cosine_schedule(self.optimizer, self.n_steps, cfg.warmup_steps, cfg.min_lr)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

        # The step batches, in the stage's (seed, epoch 0) order: identical for every method of a pair.
        t_collate = time.perf_counter()
        loader = make_loader(DistillDataset(source, side, cfg.seed, 0), cfg.micro_batch_size, collate)
        n_batches = spec["batches"]
        micro = list(islice(loader, n_batches * cfg.grad_accum))
        self.collate_s_per_step = (time.perf_counter() - t_collate) / n_batches
        if len(micro) < n_batches * cfg.grad_accum:
            raise ValueError(f"only {len(micro)} micro-batches in the store, {n_batches * cfg.grad_accum} needed")
        self.batches = [micro[k * cfg.grad_accum:(k + 1) * cfg.grad_accum] for k in range(n_batches)]
        self.supervised_tokens = [sum(int((b["labels"] != -100).sum()) for b in d) for d in self.batches]
        self.setup_s = time.perf_counter() - t_setup
        self.k = 0

    def step(self, which: int) -> tuple[float, float, float]:
        """(wall s, process CPU s, loss) of one optimizer step on step batch `which`."""
        cfg = self.cfg
        if self.cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        batches = [{name: v.to(self.device, non_blocking=True) for name, v in b.items()} for b in self.batches[which]]
        adversary_step = self.adversary is not None and self.adversary.steps_at(cfg, self.k)
        sums, n_step = self.step_module.accumulate_gradients(cfg, batches, self.trainee, self.teacher, self.procs,
                                                             step=self.k, progress=self.k / self.n_steps,
                                                             adversary_step=adversary_step, total_steps=self.n_steps)
        self.k += 1
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.adversary_opt is not None:
            if adversary_step:
                self.adversary_opt.step()
            self.adversary_opt.zero_grad(set_to_none=True)
        loss = float(sums["loss"] / n_step)  # a device sync as well
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, loss


def _step_order(spec: dict) -> tuple[list[int], list[int]]:
    """(warm-up, timed) step batch indices: step k uses batch k % B."""
    b = spec["batches"]
    return [k % b for k in range(spec["warmup"])], [k % b for k in range(spec["steps"])]


def _per_batch_mean(values: list[float], order: list[int]) -> tuple[float, list[float]]:
    """(mean over the distinct batches of each batch's median, those medians)."""
    medians = [statistics.median(v for v, b in zip(values, order) if b == which) for which in sorted(set(order))]
    return statistics.fmean(medians), medians


def measure_method(spec: dict) -> dict:
    """The method alone in this process: time per step and the peak memory of its steps."""
    run = MethodRun(spec)
    warm, timed_order = _step_order(spec)
    gc.collect()
    if run.cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        measure = "torch.cuda.max_memory_allocated over the steps, minus memory_allocated after set-up"
    else:
        _malloc_trim()
        base = _proc_status().get("VmRSS", 0)
        if _reset_peak_rss() and base:
            measure = "VmHWM during the steps minus VmRSS after set-up (malloc_trim, then clear_refs=5)"
        else:  # no /proc control: the lifetime peak, which may hold a set-up peak
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            measure = "ru_maxrss growth over the steps (lifetime high-water mark; set-up peaks may hide step peaks)"
    steps = [run.step(which) for which in warm + timed_order]
    if run.cuda:
        peak = int(torch.cuda.max_memory_allocated())
    elif "VmHWM" in measure:
        peak = _proc_status().get("VmHWM", 0)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed = steps[len(warm):]
    s_per_step, medians = _per_batch_mean([t[0] for t in timed], timed_order)
    cpu_s_per_step, _ = _per_batch_mean([t[1] for t in timed], timed_order)
    return {"method": spec["method"], "divergence": run.cfg.divergence,
            # the mean over the distinct step batches of each batch's median step time (wall clock)
            "s_per_step": s_per_step, "median_s_per_batch": medians,
            # the same in CPU seconds of the process (all its threads; kernel time included)
            "cpu_s_per_step": cpu_s_per_step,
            "step_s": [t[0] for t in timed], "step_cpu_s": [t[1] for t in timed], "step_batch": timed_order,
            "warmup_step_s": [t[0] for t in steps[:len(warm)]], "collate_s_per_step": run.collate_s_per_step,
            "setup_s": run.setup_s, "method_parts_s": run.parts_s, "losses": [t[2] for t in steps],
            "supervised_tokens_per_batch": run.supervised_tokens,
            "trainable_params": sum(p.numel() for p in run.trainable),
            "peak_bytes": int(peak), "base_bytes": int(base), "step_peak_bytes": int(peak - base),
            "memory_measure": measure}


def measure_paired(spec: dict, base_spec: dict) -> dict:
    """The method and the baseline set up side by side in this process, their steps interleaved on the same batch
    (A B, then B A, ...): a load change on the machine hits both alike. Ratio = median over steps of t_m / t_base."""
    base = MethodRun(base_spec)
    run = MethodRun(spec)
    warm, timed_order = _step_order(spec)
    for which in warm:
        base.step(which)
        run.step(which)
    t_m, t_b = [], []
    for k, which in enumerate(timed_order):
        if k % 2 == 0:
            b, m = base.step(which), run.step(which)
        else:
            m, b = run.step(which), base.step(which)
        t_m.append(m)
        t_b.append(b)
    return {"paired_time_ratio": statistics.median(m[0] / b[0] for m, b in zip(t_m, t_b)),
            "paired_cpu_time_ratio": statistics.median(m[1] / b[1] for m, b in zip(t_m, t_b)),
            "paired_s_per_step": _per_batch_mean([m[0] for m in t_m], timed_order)[0],
            "paired_baseline_s_per_step": _per_batch_mean([b[0] for b in t_b], timed_order)[0],
            "paired_cpu_s_per_step": _per_batch_mean([m[1] for m in t_m], timed_order)[0],
            "paired_baseline_cpu_s_per_step": _per_batch_mean([b[1] for b in t_b], timed_order)[0],
            "paired_step_s": [m[0] for m in t_m], "paired_baseline_step_s": [b[0] for b in t_b]}


def _inline(fn, *args) -> dict:
    """fn(*args), or the error it raised (recorded in the JSON; the other methods still run)."""
    try:
        return fn(*args)
    except Exception as e:
        return {"method": args[0]["method"], "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=-6)}


def _child(fn, args, conn) -> None:
    conn.send(_inline(fn, *args))
    conn.close()


def run_isolated(fn, args: tuple, timeout_s: float, env: dict | None = None) -> dict:
    """fn(*args) (measure_method or measure_paired) in a fresh spawned process: its peaks are its own; an error,
    a crash or an OOM kill is recorded. `env`: extra environment variables of that process only."""
    method = args[0]["method"]
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, child), daemon=True)
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    child.close()
    result = None
    try:
        if parent.poll(timeout_s):
            result = parent.recv()
    except EOFError:
        pass
    if result is None and proc.is_alive():
        proc.kill()
        result = {"method": method, "error": f"no result within {timeout_s:.0f} s (killed)"}
    proc.join()
    if result is None:
        result = {"method": method,
                  "error": f"the process exited with code {proc.exitcode} before reporting (killed for memory?)"}
    return result


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------

def _ratio(a, b):
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _median_ratio(results, bases, key):
    """Median over repeats of result / baseline of the same repeat (both measured minutes apart at most)."""
    ratios = [_ratio(r.get(key), b.get(key)) for r, b in zip(results, bases) if "error" not in r and "error" not in b]
    ratios = [x for x in ratios if x is not None]
    return statistics.median(ratios) if ratios else None


def aggregate(results: list[dict]) -> dict:
    """One record from a method's repeats: the first successful repeat's details, medians of the measures."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return dict(results[0], repeats=len(results))
    agg = dict(ok[0], repeats=len(results))
    for key in ("s_per_step", "cpu_s_per_step", "step_peak_bytes", "peak_bytes", "paired_time_ratio",
                "paired_cpu_time_ratio", "paired_s_per_step", "paired_cpu_s_per_step"):
        values = [r[key] for r in ok if key in r]
        if not values:
            continue
        agg[key] = statistics.median(values) if "bytes" not in key else int(statistics.median(values))
        if len(results) > 1:
            agg[f"repeat_{key}"] = values
    if len(ok) < len(results):
        agg["errors_in_repeats"] = [r["error"] for r in results if "error" in r]
    return agg


def add_ratios(raw: dict, plan: list[tuple[str, str]], timing: str = "paired") -> tuple[dict, list[dict]]:
    """(runs {method: {pair: aggregated record with its ratios}}, a flat table in plan (METHODS) order).

    Ratios are to the baseline of the method's pair. Time, paired: the median over repeats of the interleaved
    ratio (measure_paired); isolated: per repeat the method's process against the baseline's, then the median.
    Memory: always the isolated processes, per repeat, then the median."""
    runs, table = {}, []
    for method, pair in plan:
        results = raw.get((method, pair))
        if not results:
            continue
        bases = raw.get((BASELINE, pair), [])
        r = aggregate(results)
        runs.setdefault(method, {})[pair] = r
        row = {"method": method, "pair": pair, "baseline": f"{BASELINE} on the {pair} pair"}
        if "error" in r:
            row["error"] = r["error"]
        else:
            if bases and all("error" in b for b in bases):
                row["error"] = f"baseline failed: {bases[0]['error']}"
            if timing == "isolated":
                r["time_ratio"] = _median_ratio(results, bases, "s_per_step")
                r["cpu_time_ratio"] = _median_ratio(results, bases, "cpu_s_per_step")
            elif method == BASELINE:  # its s/step: the median of its interleaved steps beside every method
                r["time_ratio"] = r["cpu_time_ratio"] = 1.0
                beside = [x["paired_baseline_s_per_step"] for (m, pr), rs in raw.items() if pr == pair
                          for x in rs if "paired_baseline_s_per_step" in x]
                r["s_per_step"] = statistics.median(beside) if beside else None
                beside = [x["paired_baseline_cpu_s_per_step"] for (m, pr), rs in raw.items() if pr == pair
                          for x in rs if "paired_baseline_cpu_s_per_step" in x]
                r["cpu_s_per_step"] = statistics.median(beside) if beside else None
            else:  # the method's own s/step is then the one measured interleaved with the baseline
                r["time_ratio"] = r.get("paired_time_ratio")
                r["cpu_time_ratio"] = r.get("paired_cpu_time_ratio")
                r["s_per_step"] = r.get("paired_s_per_step")
                r["cpu_s_per_step"] = r.get("paired_cpu_s_per_step")
                if r["time_ratio"] is None:
                    row["error"] = f"paired timing failed: {r.get('paired_error', '?')}"
            r["step_memory_ratio"] = _median_ratio(results, bases, "step_peak_bytes")
            r["peak_memory_ratio"] = _median_ratio(results, bases, "peak_bytes")
            r["ratio_baseline"] = row["baseline"]
            row.update({k: r[k] for k in ("s_per_step", "time_ratio", "cpu_s_per_step", "cpu_time_ratio",
                                          "step_peak_bytes", "step_memory_ratio", "peak_bytes", "peak_memory_ratio",
                                          "collate_s_per_step")})
        table.append(row)
    return runs, table


def markdown_table(table: list[dict]) -> str:
    lines = ["| method | pair | s / step | time vs dskd-cma | CPU s / step | CPU time vs dskd-cma | step peak | "
             "memory vs dskd-cma | absolute peak |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        if "s_per_step" not in r:
            lines.append(f"| `{r['method']}` | {r['pair']} | error: {r['error'][:80]} | | | | | | |")
            continue
        f = (lambda x, d=2: "n/a" if x is None else f"{x:.{d}f}")
        lines.append(f"| `{r['method']}` | {r['pair']} | {f(r['s_per_step'], 3)} | {f(r['time_ratio'])} | "
                     f"{f(r['cpu_s_per_step'], 3)} | {f(r['cpu_time_ratio'])} | "
                     f"{r['step_peak_bytes'] / 2**20:,.0f} MiB | {f(r['step_memory_ratio'])} | "
                     f"{r['peak_bytes'] / 2**20:,.0f} MiB |")
    return "\n".join(lines)


def write_result(path: Path, args, preset, n_examples, methods, pairs, raw, plan, t_start, complete) -> dict:
    """The JSON, rewritten after every method so that a run stopped by a time limit keeps what it measured."""
    runs, table = add_ratios(raw, plan, args.timing)
    dwa = runs.get("dwa-kd", {}).get("cross", {})
    goal = {"what": "DWA-KD time per step / DSKD-CMA time per step on the cross pair (wall clock)",
            "target_at_most": 1.3, "dwa_kd_time_ratio": dwa.get("time_ratio"),
            "dwa_kd_cpu_time_ratio": dwa.get("cpu_time_ratio")}
    goal["met"] = None if goal["dwa_kd_time_ratio"] is None else goal["dwa_kd_time_ratio"] <= 1.3
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"cpu, {torch.get_num_threads()} threads")
    result = {"bench": "methods", "complete": complete, "device": device, "torch": torch.__version__,
              "args": vars(args), "preset": preset, "examples": n_examples, "methods": list(methods),
              "pairs": {name: {k: v for k, v in pair.items() if k != "store"} for name, pair in pairs.items()},
              "baseline": BASELINE, "runs": runs, "table": table, "dwa_kd_goal": goal,
              "wall_s": time.perf_counter() - t_start}
    if args.cpu_malloc == "keep" and not args.device.startswith("cuda"):
        result["memory_note"] = ("--cpu-malloc keep: freed memory stays resident, so RSS peaks include heap "
                                 "fragmentation; use the default run's memory figures")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="cpu", choices=sorted(PRESETS), help="Models and batch preset.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="", help="Comma list (default: all of pipeline.methods.METHODS); "
                   f"{BASELINE} is always added as the baseline.")
    p.add_argument("--all-pairs", action="store_true", help="Run every method on both pairs (errors recorded).")
    p.add_argument("--steps", type=int, help="Timed optimizer steps; default from the preset.")
    p.add_argument("--batches", type=int, help="Distinct step batches the steps cycle over; a method's s/step is "
                   "the mean over them of each one's median step time. Default from the preset.")
    p.add_argument("--warmup", type=int, help="Steps left out of the timing; default from the preset.")
    p.add_argument("--repeats", type=int, help="Run the whole plan this many times, round-robin (each method a "
                   "fresh process each time); ratios are the median over repeats of the ratio within a repeat, "
                   "which tames a machine whose load changes. Default from the preset.")
    p.add_argument("--micro-batch-size", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--divergence", default="", help="One divergence for every method (default: each method's "
                   "published one, fkl unless stated in PUBLISHED_DIVERGENCE).")
    p.add_argument("--isolation", default="spawn", choices=("spawn", "inline"),
                   help="spawn (default): each method in a fresh process, its peaks its own; inline: all in this "
                   "process (a quick smoke run, e.g. the test: memory figures then share one heap).")
    p.add_argument("--timing", default="paired", choices=("paired", "isolated"),
                   help="paired (default): each method's time comes from a process that runs it and dskd-cma side "
                   "by side, their steps interleaved on the same batches (robust to a machine whose load changes); "
                   "isolated: from the method's own process, against the baseline's process.")
    p.add_argument("--cpu-malloc", default="glibc", choices=("glibc", "keep"),
                   help="glibc (default): the allocator as `dskd-pipe distill` runs today (large buffers unmapped "
                   "on free, page-faulted in again); keep: freed memory stays in the heap for re-use (spawned "
                   "processes only; see KEEP_MALLOC_ENV).")
    p.add_argument("--method-timeout", type=float, default=900.0, help="Seconds per method before it is killed.")
    p.add_argument("--token-map-cache", default="", help="MinED token-map cache (default: the distill stage's).")
    p.add_argument("--work", default="", help="Folder for models/stores (default: a temporary folder).")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    from dskd_pipe.pipeline.config import CacheConfig
    from dskd_pipe.stages.cache_teacher import run as cache_teacher
    from dskd_pipe.pipeline.methods import METHODS

    preset = dict(PRESETS[args.shape])
    for key in ("steps", "batches", "warmup", "repeats", "micro_batch_size", "grad_accum", "max_length"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()] or list(METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; pipeline.methods.METHODS has {', '.join(METHODS)}")
    methods = [m for m in METHODS if m in chosen or m == BASELINE]  # METHODS order
    plan = plan_runs(methods, args.all_pairs)
    if args.cpu_malloc == "keep" and args.isolation != "spawn":
        p.error("--cpu-malloc keep needs --isolation spawn (glibc reads its settings when a process starts)")
    if min(preset["steps"], preset["batches"], preset["repeats"]) < 1 or preset["warmup"] < 0:
        p.error("--steps, --batches and --repeats must be >= 1, --warmup >= 0")
    n_examples = preset["batches"] * preset["micro_batch_size"] * preset["grad_accum"]
    teachers = {"cross": preset["teacher"], "same": preset["same_teacher"]}

    t_start = time.perf_counter()
    suffix = "_malloc-keep" if args.cpu_malloc == "keep" and not args.device.startswith("cuda") else ""
    path = Path(args.out) / f"methods_{args.device.split(':')[0]}_{args.shape}{suffix}.json"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        student = build_model(preset["student"], work / "student", seed=2)
        pairs = {}
        for pair in sorted({pair for _, pair in plan}):
            teacher = build_model(teachers[pair], work / f"teacher-{pair}", seed=1)
            t0 = time.perf_counter()
            store = cache_teacher(CacheConfig(teacher=str(teacher), data=str(DATA), out=str(work / f"store-{pair}"),
                                              limit=n_examples, max_length=preset["max_length"], device=args.device))
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()  # the methods run in other processes: leave them the GPU's memory
            pairs[pair] = {"teacher": teachers[pair], "teacher_tokenizer": SHAPES[teachers[pair]][1],
                           "student": preset["student"], "student_tokenizer": SHAPES[preset["student"]][1],
                           "baseline": BASELINE, "cache_teacher_s": time.perf_counter() - t0, "store": str(store)}
        raw: dict[tuple[str, str], list[dict]] = {}
        # The baseline first, so that a run cut short (a time limit) still has ratios for what it finished; with
        # --repeats the whole plan runs again in the same order, and each ratio is taken within one repeat.
        order = sorted(plan, key=lambda mp: mp[0] != BASELINE)
        for rep, (method, pair) in ((rep, mp) for rep in range(preset["repeats"]) for mp in order):
            spec = {"method": method, "cache": pairs[pair]["store"], "student": str(student),
                    "out": str(work / f"run-{method}-{pair}"), "limit": n_examples,
                    "max_length": preset["max_length"], "micro_batch_size": preset["micro_batch_size"],
                    "grad_accum": preset["grad_accum"], "warmup": preset["warmup"], "steps": preset["steps"],
                    "batches": preset["batches"],
                    "device": args.device, "divergence": args.divergence or PUBLISHED_DIVERGENCE.get(method, "fkl"),
                    "token_map_cache": args.token_map_cache}
            paired = args.timing == "paired"
            if paired:  # the memory process: one step per batch; the time comes from measure_paired
                mem_spec = dict(spec, warmup=0, steps=preset["batches"])
            t0 = time.perf_counter()
            env = KEEP_MALLOC_ENV if args.cpu_malloc == "keep" else None
            if args.isolation == "spawn":
                r = run_isolated(measure_method, (mem_spec if paired else spec,), args.method_timeout, env)
            else:
                r = _inline(measure_method, mem_spec if paired else spec)
            if paired and "error" not in r:  # its s/step had no warm-up: not the time figure
                r["memory_process_s_per_step"] = r.pop("s_per_step")
                r.pop("cpu_s_per_step")
            if paired and "error" not in r and method != BASELINE:
                base_spec = dict(spec, method=BASELINE, out=str(work / f"run-{BASELINE}-{pair}-paired"),
                                 divergence=args.divergence or PUBLISHED_DIVERGENCE.get(BASELINE, "fkl"))
                spec["out"] += "-paired"
                pr = (run_isolated(measure_paired, (spec, base_spec), args.method_timeout, env)
                      if args.isolation == "spawn" else _inline(measure_paired, spec, base_spec))
                if "error" in pr:
                    r["paired_error"] = pr["error"]
                else:
                    r.update(pr)
            r["process_wall_s"] = time.perf_counter() - t0
            raw.setdefault((method, pair), []).append(r)
            if "error" in r:
                summary = r["error"].splitlines()[0]
            elif "paired_time_ratio" in r:
                summary = (f"{r['paired_s_per_step']:.3f} s/step, x{r['paired_time_ratio']:.2f} the time of "
                           f"{BASELINE} interleaved, step peak {r['step_peak_bytes'] / 2**20:,.0f} MiB")
            elif "s_per_step" in r:
                summary = (f"{r['s_per_step']:.3f} s/step ({r['cpu_s_per_step']:.3f} CPU s), step peak "
                           f"{r['step_peak_bytes'] / 2**20:,.0f} MiB")
            else:
                summary = f"step peak {r['step_peak_bytes'] / 2**20:,.0f} MiB"
                if "paired_error" in r:
                    summary += f"; paired timing failed: {r['paired_error']}"
            print(f"[methods] {rep + 1}/{preset['repeats']} {method:>18} on {pair:>5}: {summary}", file=sys.stderr,
                  flush=True)
            write_result(path, args, preset, n_examples, methods, pairs, raw, plan, t_start, False)
    result = write_result(path, args, preset, n_examples, methods, pairs, raw, plan, t_start, True)
    table, goal = result["table"], result["dwa_kd_goal"]
    print(markdown_table(table))
    print(f"DWA-KD / DSKD-CMA time: {goal['dwa_kd_time_ratio']} (goal <= 1.3: {goal['met']}); "
          f"CPU time: {goal['dwa_kd_cpu_time_ratio']}")
    print(f"wrote {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
