"""The fixed cost of one `dskd-pipe distill --cache` run: what a run pays besides its optimizer steps.

A run of a few steps is made R times as a fresh process (the CLI, exactly as a user types it), timed from spawn
to exit; each run is also profiled once (cProfile around the CLI's `main`, in the same kind of fresh process) and its
time split into phases by the functions that do them (cumulative times; cProfile counts a recursive function's
outermost calls only, so the imports are not counted twice):
    interpreter  start of Python alone (`python -c pass`, spawned the same way)
    start        before the stage's run(): imports (torch, transformers, the stage) and argument parsing
    store        opening the store and reading its head and embedding table (open_teacher)
    student      loading the student and its tokenizer (build_student, load_tokenizer)
    data check   re-reading --data for the length report (report_cut_examples)
    parts        the method's parts and the optimizer (build_parts)
    steps        the optimizer steps (accumulate_gradients, optimizer.step)
    checkpoints  one per epoch end (save_checkpoint)
    outputs      the student, projectors, model card and curves.png (save_outputs, write_documents)
The phases run one after the other (each includes the imports it triggers, e.g. transformers' model classes);
"other" is the rest of run() (checks, the loader's set-up); "imports_all" is every import wherever made.
Wall times come from the unprofiled runs (the profiler slows Python-heavy phases, not torch's kernels).

    python bench/fixed_cost.py            # the bench/whole_runs.py CPU pair, uld, 1 step, 5 runs
Before / after a change, interleaved: an earlier commit unpacked with a folder `dskd_pipe` whose `pipeline`,
`cache`, `stages` and `configs` point at its folders (the installed layout), then
    python bench/fixed_cost.py --before-root /tmp/before/pkgroot
Writes bench/results/fixed_cost-<device>-<teacher>_<student>[-TAG].json.
"""
from __future__ import annotations

import argparse
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import whole_runs  # noqa: E402  (the CPU shapes)
import distill_offline_vs_online as dovo  # noqa: E402
from results_file import write_result  # noqa: E402

PROFILED = """
import cProfile, sys
prof = cProfile.Profile()
prof.enable()
try:
    try:
        from dskd_pipe.stages.cli import main
    except ImportError:  # an earlier version (--before-root): the command line lived in pipeline/
        from dskd_pipe.pipeline.cli import main
    main(sys.argv[1:])
except SystemExit as e:
    if e.code not in (0, None):
        raise
finally:
    prof.disable()
    prof.dump_stats({path!r})
"""
# phase -> functions (file suffix, name) whose cumulative time it is; each runs inside the stage's run(), one after
# the other, so they do not overlap; each includes the imports it triggers (transformers' model classes, matplotlib).
# Each function is named where it lives now (pipeline/teacher.py, student.py, step.py, run_folder.py) and where an
# earlier version had it (stages/distill.py), so --before-root measures older code alike.
PHASES = {
    "store": [("pipeline/teacher.py", "open_teacher"), ("stages/distill.py", "open_teacher")],
    "student": [("pipeline/student.py", "build_student"), ("stages/distill.py", "build_student"),
                ("pipeline/models.py", "load_tokenizer")],
    "data_check": [("stages/distill.py", "report_cut_examples")],
    "parts": [("pipeline/methods.py", "build_parts")],
    "steps": [("pipeline/step.py", "accumulate_gradients"), ("stages/distill.py", "accumulate_gradients"),
              ("torch/optim/optimizer.py", "wrapper")],
    "checkpoints": [("pipeline/training.py", "save_checkpoint")],
    "outputs": [("pipeline/student.py", "save_outputs"), ("stages/distill.py", "save_outputs"),
                ("pipeline/run_folder.py", "write_documents"), ("stages/distill.py", "write_documents")],
}
RUN = [("stages/distill.py", "run")]
IMPORTS = [("<frozen importlib._bootstrap>", "_find_and_load")]


def cumulative(stats: dict, funcs) -> float:
    return sum(ct for (file, _, name), (_, _, _, ct, _) in stats.items()
               if any(name == f and file.endswith(s) for s, f in funcs))


def phase_times(prof_path: Path) -> dict:
    """Seconds per phase. start = everything before the stage's run() (imports of the command line, the stage,
    torch and transformers; argument parsing); other = the rest of run(); imports_all: every import, wherever
    made (it overlaps the phases)."""
    stats = pstats.Stats(str(prof_path)).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    total = max(ct for (_, _, _, ct, _) in stats.values())
    run = cumulative(stats, RUN)
    out = {"start": total - run}
    out.update({phase: cumulative(stats, funcs) for phase, funcs in PHASES.items()})
    out["other"] = run - sum(out[p] for p in PHASES)
    out["profiled_total"] = total
    out["imports_all"] = cumulative(stats, IMPORTS)
    return out


def interpreter_start(n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-shape", default="cpu-qwen2-51m", choices=sorted(dovo.SHAPES))
    p.add_argument("--student-shape", default="cpu-gpt2-3m", choices=sorted(dovo.SHAPES))
    p.add_argument("--method", default="uld")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--runs", type=int, default=5, help="Unprofiled runs (the wall-time median); 0: the profiled "
                   "run alone.")
    p.add_argument("--tag", default="", help="Appended to the result's name.")
    p.add_argument("--before-root", default="", help="A folder where `import dskd_pipe` finds an earlier version "
                   "(through PYTHONPATH): its runs are interleaved with this version's, for a before/after.")
    p.add_argument("--work", default="")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        teacher = dovo.build_model(args.teacher_shape, work / "teacher")
        student = dovo.build_model(args.student_shape, work / "student")
        from transformers import AutoTokenizer

        toks = [AutoTokenizer.from_pretrained(teacher), AutoTokenizer.from_pretrained(student)]
        rows = whole_runs.fitting_examples(dovo.DATA, toks, args.max_length, args.limit)
        data = work / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        dtype = "float32" if args.device == "cpu" else "bfloat16"
        common = ["--data", str(data), "--max-length", str(args.max_length), "--device", args.device]
        store = work / "store"
        if not store.exists():  # in this process: its time is not measured here
            import dskd_pipe as dp

            dp.cache_teacher(teacher=str(teacher), data=str(data), out=str(store), max_length=args.max_length,
                             device=args.device, dtype=dtype, progress=False, quiet=True)
        train = ["distill", "--cache", str(store), "--student", str(student), "--method", args.method, *common,
                 "--epochs", "1", "--micro-batch-size", str(args.micro_batch_size), "--grad-accum", "1",
                 "--num-workers", "0", "--no-progress", "--dtype", dtype]
        interp = interpreter_start()
        codes = {"now": None, **({"before": args.before_root} if args.before_root else {})}
        walls = {code: [] for code in codes}
        for k in range(args.runs):  # the codes interleaved: a change of load hits both alike
            for code, root in codes.items():
                env = {"PYTHONPATH": root} if root else None
                # cwd: the work folder, for both: in the repository's root, `python -c` would import its dskd_pipe/
                # ahead of PYTHONPATH and every "before" run would be this version
                run = whole_runs.measured([*whole_runs.CLI, *train, "--out", str(work / f"{code}-{k}")],
                                          work / f"{code}-{k}.log", env=env, cwd=work)
                rows_m = [json.loads(ln) for ln in (work / f"{code}-{k}" / "metrics.jsonl").read_text().splitlines()
                          if '"loss"' in ln]
                walls[code].append({**run, "steps_s": round(sum(r["step_s"] for r in rows_m), 3),
                                    "steps": len(rows_m)})
                print(f"run {k} {code}: {walls[code][-1]}", file=sys.stderr)
        by_code = {}
        for code, root in codes.items():
            prof = work / f"{code}.prof"
            whole_runs.measured([sys.executable, "-c", PROFILED.format(path=str(prof)), *train, "--out",
                                 str(work / f"{code}-profiled")], work / f"{code}-profiled.log",
                                env={"PYTHONPATH": root} if root else None, cwd=work)
            code_file = next(k[0] for k in pstats.Stats(str(prof)).stats if k[0].endswith("stages/distill.py"))
            if root and not code_file.startswith(root):
                sys.exit(f"the 'before' run imported {code_file}, not the code under {root}")
            phases = phase_times(prof)
            top = pstats.Stats(str(prof)).stats
            hot = [(f"{Path(k[0]).name}:{k[2]}", round(v[3], 3)) for k, v in
                   sorted(top.items(), key=lambda kv: -kv[1][3])[:60]]
            wall = statistics.median(r["wall_s"] for r in walls[code]) if walls[code] else None
            steps_s = statistics.median(r["steps_s"] for r in walls[code]) if walls[code] else None
            by_code[code] = {"wall_s_median": wall, "steps_s_median": steps_s,
                             "fixed_s_median": round(wall - steps_s, 2) if walls[code] else None, "runs": walls[code],
                             "profiled_phases_s": {k: round(v, 3) for k, v in phases.items()},
                             "top_cumulative_s": hot}
    result = {"device": f"cpu, {os.cpu_count()} cores" if args.device == "cpu" else torch.cuda.get_device_name(),
              "args": vars(args), "interpreter_s": round(interp, 3), **by_code["now"],
              "load_average_at_end": os.getloadavg()}
    if "before" in by_code:
        result["before"] = by_code["before"]
    if "before" in by_code and args.runs:
        result["fixed_before_over_now"] = round(by_code["before"]["fixed_s_median"] / by_code["now"]["fixed_s_median"],
                                                3)
    name = f"fixed_cost-{args.device.split(':')[0]}-{args.teacher_shape}_{args.student_shape}"
    write_result(args.out, name + (f"-{args.tag}" if args.tag else ""), result,
                 shown={k: v for k, v in result.items() if k not in ("top_cumulative_s", "before")})
    return result


if __name__ == "__main__":
    main()
