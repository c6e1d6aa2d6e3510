"""One cache, many students: cache-teacher once + N students from the store, against N online runs.

Everything runs as a user would type it: each `dskd-pipe cache-teacher` and `dskd-pipe distill` is its own fresh
process, timed from start to exit (interpreter start, model loading and writing the student included). The N
students are N training seeds of the same pair, method and data (a seed sweep); run k offline and run k online are
interleaved (offline 1, online 1, offline 2, ...) so that a change of load on a shared machine hits both modes alike.

For N = 1, 3, 10 (the first N runs of each mode):
    offline(N) = cache-teacher + sum of the first N offline runs;  online(N) = sum of the first N online runs
and the ratio online(N) / offline(N) (> 1: the store pays). `break_even_n` is the smallest N with offline faster.

CPU (default: a ~200M-parameter Qwen2-shaped teacher with Qwen's tokenizer, a tiny GPT-2 student):
    python bench/many_students.py
GPU (random weights, published shapes; configs only, no download):
    python bench/many_students.py --teacher-shape qwen1.5-1.8b --student-shape gpt2 --device cuda --limit 256 \
        --max-length 512 --micro-batch-size 8 --grad-accum 1 --students 10
Writes bench/results/many_students-<device>-<teacher>_<student>.json.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_offline_vs_online import DATA, SHAPES, build_model  # noqa: E402
from results_file import write_result  # noqa: E402

CLI = [sys.executable, "-c", "from dskd_pipe.stages.cli import main; main()"]


def timed_run(args: list[str], log: Path) -> float:
    """Wall seconds of one CLI process; its output goes to `log`; a failure stops the benchmark with that log."""
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(CLI + args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ,
                                                                                  "TQDM_DISABLE": "1"}).returncode
    elapsed = time.perf_counter() - start
    if rc != 0:
        sys.exit(f"{' '.join(args[:1])} failed (exit {rc}); its output:\n{log.read_text()[-4000:]}")
    return elapsed


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-shape", default="cpu-qwen2-200m", choices=sorted(SHAPES))
    p.add_argument("--student-shape", default="tiny-gpt2", choices=sorted(SHAPES))
    p.add_argument("--method", default="dskd-cma")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1, help="Epochs of each student run over the --limit examples.")
    p.add_argument("--students", type=int, default=10, help="Runs per mode; N = 1, 3 and this are reported.")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--work", default="", help="Folder for models, store and runs (default: a temporary folder); "
                   "a teacher/ or student/ model already there is used as it is, whatever the shapes say.")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        # a model already in --work is reused (reruns; tests put tiny ones there)
        teacher = work / "teacher" if (work / "teacher" / "config.json").is_file() else \
            build_model(args.teacher_shape, work / "teacher")
        student = work / "student" if (work / "student" / "config.json").is_file() else \
            build_model(args.student_shape, work / "student")
        dtype = [] if args.device.startswith("cuda") else ["--dtype", "float32"]
        common = ["--data", str(DATA), "--limit", str(args.limit), "--max-length", str(args.max_length),
                  "--device", args.device]
        cache_s = timed_run(["cache-teacher", "--teacher", str(teacher), "--out", str(work / "store"), *common,
                             *dtype], work / "cache.log")
        print(f"cache-teacher: {cache_s:.1f} s", file=sys.stderr)
        train = ["distill", "--student", str(student), "--method", args.method, *common, "--epochs",
                 str(args.epochs), "--micro-batch-size", str(args.micro_batch_size), "--grad-accum",
                 str(args.grad_accum), "--num-workers", str(args.num_workers), "--no-progress", *dtype]
        runs = {"offline": [], "online": []}
        for k in range(args.students):
            for mode, source in (("offline", ["--cache", str(work / "store")]),
                                 ("online", ["--teacher", str(teacher)])):
                out = work / f"{mode}-{k}"
                runs[mode].append(timed_run([*train, *source, "--seed", str(k), "--out", str(out)],
                                            work / f"{mode}-{k}.log"))
                print(f"student {k} {mode}: {runs[mode][-1]:.1f} s", file=sys.stderr)
        steps = sum(1 for ln in (work / "offline-0" / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln)
    table = {}
    for n in sorted({1, 3, args.students} & set(range(1, args.students + 1))):
        offline = cache_s + sum(runs["offline"][:n])
        online = sum(runs["online"][:n])
        table[str(n)] = {"offline_s": round(offline, 1), "online_s": round(online, 1),
                         "online_over_offline": round(online / offline, 3)}
    saved = [s - o for s, o in zip(runs["online"], runs["offline"])]
    per_student_saving = sum(saved) / len(saved)
    break_even = next((n for n in range(1, args.students + 1)
                       if cache_s + sum(runs["offline"][:n]) < sum(runs["online"][:n])), None)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {os.cpu_count()} cores"
    result = {"device": device, "args": vars(args), "optimizer_steps_per_student": steps,
              "cache_teacher_s": round(cache_s, 1), "offline_runs_s": [round(s, 1) for s in runs["offline"]],
              "online_runs_s": [round(s, 1) for s in runs["online"]], "by_n": table,
              "saving_per_student_s": round(per_student_saving, 1), "break_even_n": break_even}
    write_result(args.out, f"many_students-{args.device.split(':')[0]}-{args.teacher_shape}_{args.student_shape}",
                 result)
    return result


if __name__ == "__main__":
    main()
