"""Chaos trial: kill -9 each stage at random moments, run the same command again, and check nothing changed.

For each stage, a reference run goes through uninterrupted; then trials start the same command on a fresh output,
SIGKILL it at a moment drawn uniformly over the reference run's wall time (imports, model loading, creation, writes,
checkpoints, finalize: every phase can be hit), and start it again (distill with --resume), until a run finishes on
its own. Each finished trial is compared with the reference:

    cache-teacher: lost = reference examples whose stored bytes (ids, offsets, texts, hidden rows) are missing or
                   differ; duplicated = rows stored beyond the reference's token count; bytes identical = every file
                   of the store equal (manifests and config, which name their own folder, aside).
    distill:       lost = optimizer steps missing from metrics.jsonl; duplicated = steps logged twice; bytes
                   identical = the final model.safetensors equal to the reference's, byte for byte.

    python bench/chaos.py --kills 20 --stages cache-teacher,distill

Tiny random-weight models with the real test-fixture tokenizers (CPU); writes bench/results/chaos.json and prints
"N kills, L lost, D duplicated, bytes identical" per stage.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
DSKD = str(Path(sys.executable).with_name("dskd-pipe"))


def run_killed(cmd: list[str], moment: float) -> int:
    """Start `cmd`, SIGKILL it after `moment` seconds unless it ended; its return code (-9 when killed)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        p.wait(timeout=moment)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
    _, err = p.communicate()
    if p.returncode not in (0, -signal.SIGKILL):
        raise SystemExit(f"{' '.join(cmd[:3])}... failed on its own (exit {p.returncode}):\n{err[-3000:]}")
    return p.returncode


def timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"reference run failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return time.monotonic() - t0


def store_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("lock", "create.lock", "finalize.lock") and not p.name.endswith(".tmp")}


def compare_stores(out: Path, ref: Path) -> dict:
    from dskd_pipe.cache.reader import open_store

    a, b = open_store(str(out)), open_store(str(ref))
    lost = 0
    for i in range(len(b)):
        x = a.read(i) if i < len(a) else None
        y = b.read(i)
        same = x is not None and all(
            (x[k].numpy().tobytes() if hasattr(x[k], "numpy") else x[k].tobytes() if hasattr(x[k], "tobytes")
             else x[k]) == (y[k].numpy().tobytes() if hasattr(y[k], "numpy") else y[k].tobytes()
                            if hasattr(y[k], "tobytes") else y[k])
            for k in ("ids", "offsets", "prompt_len", "prompt", "response", "hidden"))
        lost += not same
    fa, fb = store_files(out), store_files(ref)
    differ = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)
              and k not in ("manifest.json", "manifest.partial.json", "config.json")]
    return {"lost": lost, "duplicated": max(0, a.manifest.totals["tokens"] - b.manifest.totals["tokens"]),
            "identical": not differ, "differing_files": differ[:5]}


def compare_runs(out: Path, ref: Path) -> dict:
    def steps(folder):
        return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()
                if "loss" in json.loads(line)]

    got, want = steps(out), steps(ref)
    return {"lost": len(set(want) - set(got)), "duplicated": len(got) - len(set(got)),
            "identical": (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()}


def chaos(stage: str, kills: int, work: Path, rng: random.Random, make_cmd, compare) -> dict:
    ref = work / f"{stage}-reference"
    seconds = timed(make_cmd(ref, resume=False))
    print(f"[chaos] {stage}: reference run {seconds:.1f} s", flush=True)
    done_kills, trials, moments = 0, [], []
    while done_kills < kills:
        out = work / f"{stage}-trial{len(trials)}"
        n_killed, first = 0, True
        while True:
            moment = rng.uniform(0.0, 1.0) * seconds
            rc = run_killed(make_cmd(out, resume=not first), moment)
            first = False
            if rc == 0:
                break
            n_killed += 1
            moments.append(round(moment / seconds, 3))
            if done_kills + n_killed >= kills:  # enough kills: finish this trial uninterrupted
                timed(make_cmd(out, resume=True))
                break
        result = compare(out, ref)
        result["kills"] = n_killed
        trials.append(result)
        done_kills += n_killed
        print(f"[chaos] {stage} trial {len(trials)}: {result}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    total = {"stage": stage, "kills": done_kills, "trials": len(trials),
             "lost": sum(t["lost"] for t in trials), "duplicated": sum(t["duplicated"] for t in trials),
             "bytes_identical": all(t["identical"] for t in trials), "reference_seconds": round(seconds, 2),
             "kill_moments_as_share_of_run": sorted(moments), "per_trial": trials}
    total["summary"] = (f"{total['kills']} kills, {total['lost']} lost, {total['duplicated']} duplicated, "
                        f"bytes {'identical' if total['bytes_identical'] else 'DIFFERENT'}")
    return total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="kills per stage")
    ap.add_argument("--stages", default="cache-teacher,distill")
    ap.add_argument("--limit", type=int, default=200, help="examples (configs/data/dolly_train_200.jsonl)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="", help="scratch folder (default: a temporary one, deleted after)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    a = ap.parse_args(argv)
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

    tmp = tempfile.TemporaryDirectory(prefix="chaos_")
    work = Path(a.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    teacher = save_tiny_model(work / "teacher", "llama", load_tokenizer(str(FIXTURES / "tokenizers" / "llama2")),
                              d_model=64, layers=2)
    student = save_tiny_model(work / "student", "gpt2", load_tokenizer(str(FIXTURES / "tokenizers" / "gpt2")),
                              d_model=32, layers=1, seed=2)
    data = ROOT / "configs" / "data" / "dolly_train_200.jsonl"

    def cache_cmd(out: Path, resume: bool) -> list[str]:
        return [DSKD, "cache-teacher", "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                "--limit", str(a.limit), "--max-length", "128", "--batch-tokens", "1024", "--chunk-tokens", "16",
                "--shard-tokens", "256", "--device", "cpu"]

    store = work / "store.zarr"
    if "distill" in a.stages.split(","):  # the students' store: only the distill stage reads it
        subprocess.run(cache_cmd(store, False), check=True, capture_output=True)

    def distill_cmd(out: Path, resume: bool) -> list[str]:
        return [DSKD, "distill", "--cache", str(store), "--student", str(student), "--method", "cma-ga",
                "--data", str(data), "--out", str(out), "--limit", str(a.limit), "--max-length", "128",
                "--micro-batch-size", "2", "--grad-accum", "1", "--max-steps", "12", "--save-every", "2",
                "--num-workers", "0", "--device", "cpu", "--seed", "0", "--no-progress"] + (["--resume"] if resume
                                                                                            else [])

    rng = random.Random(a.seed)
    # Stages run separately add to one results file.
    previous = json.loads(Path(a.out).read_text()) if Path(a.out).is_file() else {}
    results = {"stages": previous.get("stages", {}), "commands": previous.get("commands", {})}
    stages = {"cache-teacher": (cache_cmd, compare_stores), "distill": (distill_cmd, compare_runs)}
    for stage in a.stages.split(","):
        make_cmd, compare = stages[stage]
        results["stages"][stage] = chaos(stage, a.kills, work, rng, make_cmd, compare)
        results["commands"][stage] = "python bench/chaos.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")  # after each stage: a later failure keeps it
    for stage, r in results["stages"].items():
        print(f"{stage}: {r['summary']}")
    tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
