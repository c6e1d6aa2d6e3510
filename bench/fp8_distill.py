"""What fp8 hidden states do to one distillation run: the same run from an exact and an fp8 store, same seed.

Runs `dskd-pipe distill` three times, each its own process as a user would type it: the exact store with seed S,
the fp8 store (`cache-teacher --hidden-storage fp8`, the same teacher and data) with seed S, and the exact store
with seed S+1 as the yardstick (how far two equally good runs land apart). Then compares, per pair:

    the per-step training losses (total and each term),  max |a - b| / |a| over steps
    the held-out loss (distill's --dev-data loss at the end),  |a - b|
    the final student weights,  ||w_a - w_b|| / ||w_a|| over all parameters

fp8 is harmless for a run when exact-vs-fp8 is far below exact-vs-other-seed on every line.

    python bench/fp8_distill.py --exact EXACT.zarr --fp8 FP8.zarr --student STUDENT --data TRAIN.jsonl \
        --dev-data DEV.jsonl --work /tmp/fp8_distill -- --method dskd-cma --limit 32 --max-length 128 ...

Arguments after `--` go to every distill run unchanged. `--reuse` compares the run folders already in --work.
Writes bench/results/fp8_distill.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

CLI = [sys.executable, "-c", "from dskd_pipe.stages.cli import main; main()"]
TERMS = ("loss", "ce_student", "ce_t2s", "kd_t2s", "kd_s2t")


def run_distill(args: list[str], out: Path) -> float:
    start = time.perf_counter()
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        rc = subprocess.run(CLI + args + ["--out", str(out)], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "TQDM_DISABLE": "1"}).returncode
    if rc != 0:
        sys.exit(f"distill --out {out} failed (exit {rc}); its output:\n{log.read_text()[-4000:]}")
    return time.perf_counter() - start


def read_run(folder: Path) -> dict:
    """(per-step training metrics, the last dev loss, the final weights) of one distill output folder."""
    steps, dev = [], None
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "dev_loss" in rec:
            dev = rec["dev_loss"]
        elif "loss" in rec:
            steps.append(rec)
    return {"steps": steps, "dev_loss": dev, "weights": load_file(str(folder / "model.safetensors"))}


def compare(a: dict, b: dict) -> dict:
    terms = {}
    for term in TERMS:
        pairs = [(x[term], y[term]) for x, y in zip(a["steps"], b["steps"]) if term in x and term in y]
        if pairs:
            terms[term] = max(abs(x - y) / max(abs(x), 1e-12) for x, y in pairs)
    num = sum(float((a["weights"][k].double() - b["weights"][k].double()).pow(2).sum()) for k in a["weights"])
    den = sum(float(a["weights"][k].double().pow(2).sum()) for k in a["weights"])
    return {"max_rel_step_diff": terms,
            "dev_loss": [a["dev_loss"], b["dev_loss"]],
            "dev_loss_abs_diff": None if a["dev_loss"] is None else abs(a["dev_loss"] - b["dev_loss"]),
            "weights_rel_diff": (num / den) ** 0.5}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exact", required=True, help="A store with exact hidden states.")
    p.add_argument("--fp8", required=True, help="The same store built with --hidden-storage fp8.")
    p.add_argument("--student", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--dev-data", required=True, help="Held-out examples: distill's dev loss at the end.")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work", required=True, help="Folder for the three runs.")
    p.add_argument("--reuse", action="store_true", help="Compare the runs already in --work; run nothing.")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "fp8_distill.json"))
    args = p.parse_args(own)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = ["distill", "--student", args.student, "--data", args.data, "--dev-data", args.dev_data,
              "--no-progress", *extra]
    runs = {"exact": (args.exact, args.seed), "fp8": (args.fp8, args.seed), "exact_other_seed":
            (args.exact, args.seed + 1)}
    seconds = {}
    for name, (store, seed) in runs.items():
        if not args.reuse:
            seconds[name] = round(run_distill([*common, "--cache", store, "--seed", str(seed)], work / name), 1)
            print(f"{name}: {seconds[name]} s", file=sys.stderr)
    got = {name: read_run(work / name) for name in runs}
    result = {
        "runs": {name: {"store": store, "seed": seed, "seconds": seconds.get(name),
                        "steps": len(got[name]["steps"]), "dev_loss": got[name]["dev_loss"],
                        "loss_per_step": [s["loss"] for s in got[name]["steps"]]}
                 for name, (store, seed) in runs.items()},
        "distill_args": common[1:],
        "exact_vs_fp8": compare(got["exact"], got["fp8"]),
        "exact_vs_other_seed": compare(got["exact"], got["exact_other_seed"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("exact_vs_fp8", "exact_vs_other_seed")}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
