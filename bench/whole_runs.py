"""Whole runs against what users would pick instead: TRL's GOLD trainer (ULD across tokenizers, teacher online),
our online mode, and cache-teacher once + distill from the store; 1..N students of the same pair.

Every run is a fresh process timed from start to exit (interpreter, imports, model loading, every epoch, the
per-epoch checkpoints and the final save), its peak resident set read from the kernel for that process alone
(os.wait4). Student k of each mode runs back to back with student k of the others (TRL k, online k, store k, ...),
so a change of load on a shared machine hits all three alike.
    (a) TRL GOLD online: `GOLDTrainer` with use_uld_loss, lmbda 0 (off-policy: the data's completions, as ours);
    (b) ours online: `dskd-pipe distill --teacher T --method uld`;
    (c) ours from the store: `dskd-pipe cache-teacher` once, then `dskd-pipe distill --cache S --method uld`.
For n = 1..N: a(n) = the first n TRL runs, b(n) = the first n online runs, c(n) = cache-teacher + the first n
store runs; the ratios a/c and b/c, and the break-even n (measured, and from the per-run means).

Equal in all three: models and their initial weights, tokenizers, examples (only those whose prompt + completion
+ EOS fit --max-length in both tokenizers, so neither truncates), epochs, micro-batch, accumulation, optimizer
steps, AdamW (lr, weight decay 0.01, clipping at 1.0, betas, eps), a cosine schedule without warm-up, fp32,
dropout on, no DataLoader workers, a checkpoint at every epoch end keeping the last 2, the final model saved. The
loss is ULD (bench/trl_gold_parity.py shows the two ULD terms equal with this TRL config) plus the student's CE,
half and half. What cannot be equal: TRL normalises each example by its own length and averages examples, ours
divides the step's token sum by its supervised tokens; the student side of TRL is tokenised as one string through
a chat template (here a template that writes the Alpaca prompt and the completion as they are, then EOS),
ours as prompt and completion apart (the same ids on this data); the shuffling order; our cosine ends at 1e-7,
TRL's at 0.

CPU (default: a ~51M-parameter Qwen2-shaped teacher with Qwen's tokenizer, a ~3.4M GPT-2-shaped student with
GPT-2's, random weights: 15x, the published Qwen1.5-1.8B -> GPT-2 ratio):
    python bench/whole_runs.py
GPU (the published shapes, random weights):
    python bench/whole_runs.py --teacher-shape qwen1.5-1.8b --student-shape gpt2 --device cuda --limit 256 \
        --max-length 512 --epochs 20
Writes bench/results/whole_runs-<device>-<teacher>_<student>.json. Needs trl (pip install -e ".[bench]").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_offline_vs_online as dovo  # noqa: E402
from results_file import write_result  # noqa: E402

# The CPU pair: teacher ~15x the student's parameters (the published Qwen1.5-1.8B : GPT-2 124M is 14.8x).
dovo.SHAPES.setdefault("cpu-qwen2-51m", ("qwen2", "qwen2", dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=8,
    tie_word_embeddings=True, vocab_size=151669)))
dovo.SHAPES.setdefault("cpu-gpt2-3m", ("gpt2", "gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=50257)))

CLI = [sys.executable, "-m", "dskd_pipe"]
# A chat template that renders the Alpaca prompt and the completion as they are (GPT-2 has none): the same text
# our stage tokenises.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
                  "{% endif %}{% endfor %}")
PUBLISHED_EPOCHS = 20  # configs/ and DSKD's GPT-2 scripts: 20 epochs on Dolly (DistillConfig.epochs default)


def n_params(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def measured(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Wall seconds and peak RSS of one process (its own, from wait4); a failure stops the benchmark."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, "TQDM_DISABLE": "1", **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[-40:])} failed (exit {proc.returncode}); its output:\n{log.read_text()[-4000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": int(usage.ru_maxrss) * 1024}


def fitting_examples(data: Path, tokenizers, max_length: int, limit: int) -> list[dict]:
    """The first `limit` records whose prompt + completion + EOS fit max_length tokens in every tokenizer."""
    out = []
    for line in data.read_text().splitlines():
        r = json.loads(line)
        if all(len(t(r["prompt"], add_special_tokens=False)["input_ids"])
               + len(t(r["output"], add_special_tokens=False)["input_ids"]) + 1 <= max_length for t in tokenizers):
            out.append(r)
        if len(out) == limit:
            break
    return out


def trl_run(spec: dict) -> None:
    """One TRL GOLD run (in its own process): ULD across tokenizers, teacher online, off-policy."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    torch.set_num_threads(spec["threads"]) if spec["threads"] else None
    tok = AutoTokenizer.from_pretrained(spec["student"])
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.chat_template = PLAIN_TEMPLATE
    rows = [json.loads(ln) for ln in Path(spec["data"]).read_text().splitlines()]
    data = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["output"]}]} for r in rows])
    cfg = GOLDConfig(
        output_dir=spec["out"], report_to="none", use_cpu=spec["device"] == "cpu", seed=spec["seed"],
        num_train_epochs=spec["epochs"], per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["grad_accum"], learning_rate=spec["lr"], weight_decay=0.01,
        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, max_length=spec["max_length"],
        bf16=spec["device"] != "cpu", dataloader_num_workers=0, disable_dropout=False,
        save_strategy="epoch", save_total_limit=2, logging_steps=1, log_completions=False,
        lmbda=0.0, max_completion_length=spec["max_length"] // 2, use_vllm=False, use_uld_loss=True,
        teacher_tokenizer_name_or_path=spec["teacher"],
        # the ULD term as the paper and ours compute it (bench/trl_gold_parity.py "closest"), half and half with CE
        use_extended_uld=False, uld_token_merge_strategy="bayesian", uld_skip_student_eos=False,
        uld_skip_teacher_eos=False, uld_use_hybrid_loss=False, uld_crossentropy_weight=0.5,
        uld_distillation_weight=0.5,
        model_init_kwargs={"dtype": spec["dtype"]}, teacher_model_init_kwargs={"dtype": spec["dtype"]},
    )
    trainer = GOLDTrainer(model=spec["student"], teacher_model=spec["teacher"], args=cfg, train_dataset=data,
                          processing_class=tok)
    out = trainer.train()
    trainer.save_model(spec["out"])
    Path(spec["out"], "bench_train.json").write_text(json.dumps(
        {"train_runtime_s": out.metrics["train_runtime"], "steps": out.global_step,
         "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}))


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["trl-run"]:
        trl_run(json.loads(argv[1]))
        return {}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-shape", default="cpu-qwen2-51m", choices=sorted(dovo.SHAPES))
    p.add_argument("--student-shape", default="cpu-gpt2-3m", choices=sorted(dovo.SHAPES))
    p.add_argument("--method", default="uld", help="Ours; TRL's is always ULD.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10, help=f"Published: {PUBLISHED_EPOCHS}.")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--students", type=int, default=3)
    p.add_argument("--modes", default="trl,online,store")
    p.add_argument("--work", default="", help="Folder for models, data, store and runs (default: temporary).")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    modes = args.modes.split(",")

    import torch
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        teacher = dovo.build_model(args.teacher_shape, work / "teacher")
        student = dovo.build_model(args.student_shape, work / "student")
        sizes = {"teacher_params": n_params(teacher), "student_params": n_params(student)}
        toks = [AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)]
        rows = fitting_examples(dovo.DATA, toks, args.max_length, args.limit)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        dtype = "float32" if args.device == "cpu" else "bfloat16"
        common = ["--data", str(data), "--max-length", str(args.max_length), "--device", args.device]
        train = ["distill", "--student", str(student), "--method", args.method, *common, "--epochs",
                 str(args.epochs), "--micro-batch-size", str(args.micro_batch_size), "--grad-accum",
                 str(args.grad_accum), "--lr", str(args.lr), "--weight-decay", "0.01", "--warmup-steps", "0",
                 "--max-grad-norm", "1.0", "--kd-rate", "0.5", "--num-workers", "0", "--no-progress",
                 "--dtype", dtype]
        cache = None
        if "store" in modes:
            cache = measured([*CLI, "cache-teacher", "--teacher", str(teacher), "--out", str(work / "store"),
                              *common, "--dtype", dtype], work / "cache.log")
            print(f"cache-teacher: {cache}", file=sys.stderr)
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for k in range(args.students):
            for mode in modes:
                out = work / f"{mode}-{k}"
                if mode == "trl":
                    spec = dict(student=str(student), teacher=str(teacher), data=str(data), out=str(out), seed=k,
                                epochs=args.epochs, micro_batch_size=args.micro_batch_size,
                                grad_accum=args.grad_accum, lr=args.lr, max_length=args.max_length,
                                device=args.device, dtype=dtype, threads=0)
                    run = measured([sys.executable, str(Path(__file__).resolve()), "trl-run", json.dumps(spec)],
                                   work / f"{mode}-{k}.log")
                    info = json.loads((out / "bench_train.json").read_text())
                    run.update(steps=info["steps"], train_loop_s=round(info["train_runtime_s"], 2),
                               final_loss=info["loss"][-1] if info["loss"] else None)
                else:
                    source = ["--teacher", str(teacher)] if mode == "online" else ["--cache", str(work / "store")]
                    run = measured([*CLI, *train, *source, "--seed", str(k), "--out", str(out)],
                                   work / f"{mode}-{k}.log")
                    rows_m = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()
                              if '"loss"' in ln]
                    run.update(steps=len(rows_m), train_loop_s=round(sum(r["step_s"] for r in rows_m), 2),
                               final_loss=rows_m[-1]["loss"])
                run["fixed_s"] = round(run["wall_s"] - run["train_loop_s"], 2)
                runs[mode].append(run)
                print(f"student {k} {mode}: {run}", file=sys.stderr)

    def total(mode: str, n: int) -> float:
        return sum(r["wall_s"] for r in runs[mode][:n]) + (cache["wall_s"] if mode == "store" else 0.0)

    by_n, break_even = {}, {}
    for n in range(1, args.students + 1):
        row = {f"{m}_s": round(total(m, n), 1) for m in modes}
        if "store" in modes:
            for m in ("trl", "online"):
                if m in modes:
                    row[f"{m}_over_store"] = round(total(m, n) / total("store", n), 3)
        by_n[str(n)] = row
    if "store" in modes:
        mean = {m: sum(r["wall_s"] for r in runs[m]) / len(runs[m]) for m in modes}
        for m in ("trl", "online"):
            if m not in modes:
                continue
            measured_n = next((n for n in range(1, args.students + 1) if total("store", n) < total(m, n)), None)
            saving = mean[m] - mean["store"]
            break_even[m] = {"measured_n": measured_n, "saving_per_student_s": round(saving, 1),
                             "from_means_n": (cache["wall_s"] / saving) if saving > 0 else None}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {os.cpu_count()} cores"
    import transformers
    import trl

    result = {"device": device, "args": vars(args), "published_epochs": PUBLISHED_EPOCHS,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "trl": trl.__version__},
              **sizes, "teacher_over_student_params": round(sizes["teacher_params"] / sizes["student_params"], 1),
              "examples": len(rows), "load_average_at_end": os.getloadavg(),
              "cache_teacher": cache, "runs": runs, "by_n": by_n, "break_even": break_even}
    write_result(args.out, f"whole_runs-{args.device.split(':')[0]}-{args.teacher_shape}_{args.student_shape}",
                 result)
    return result


if __name__ == "__main__":
    main()
