"""Helpers of the reliability trials (imported by path: tests run with --import-mode=importlib)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA = FIXTURES / "data" / "dolly_train_40.jsonl"
DSKD = str(Path(sys.executable).with_name("dskd-pipe"))
# CI runs the slow trials in a smaller form (fewer examples); DSKD_PIPE_FULL_TRIALS=1 runs the full size.
FULL = os.environ.get("DSKD_PIPE_FULL_TRIALS") == "1"


def cache_args(teacher: Path, out: Path, *extra, limit: int = 40) -> list[str]:
    return ["cache-teacher", "--teacher", str(teacher), "--data", str(DATA), "--out", str(out), "--limit", str(limit),
            "--chunk-tokens", "8", "--shard-tokens", "128", "--batch-tokens", "512", "--device", "cpu", *extra]


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a store (locks and temp files aside), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("lock", "create.lock", "finalize.lock") and not p.name.endswith(".tmp")}


def differing_files(a: Path, b: Path) -> list[str]:
    """Files that differ between two stores of the same inputs (config and manifests name their own --out)."""
    fa, fb = store_files(a), store_files(b)
    names = sorted(set(fa) | set(fb))
    return [k for k in names if fa.get(k) != fb.get(k)
            and k not in ("manifest.json", "manifest.partial.json", "config.json")]


def example_bytes(root: Path) -> dict[int, tuple]:
    """Example id -> every stored byte of it (ids, offsets, texts, hidden rows, top-k), whatever the split."""
    from dskd_pipe.cache.reader import open_store

    store = open_store(str(root))
    out = {}
    for i in range(len(store)):
        r = store.read(i)
        out[i] = (r["ids"].tobytes(), r["offsets"].tobytes(), r["prompt_len"], r["prompt"], r["response"],
                  r["hidden"].numpy().tobytes(), *(r[k].tobytes() for k in ("topk_values", "topk_indices", "logsumexp")
                                                   if k in r))
    return out


def invoke(*args):
    """`dskd-pipe ARGS` in this process (click's runner); the result's output holds stdout and stderr."""
    from click.testing import CliRunner

    from dskd_pipe.stages.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def distill_args(models: dict, out: Path, *extra, method: str = "sft", steps: int = 4) -> list[str]:
    """A tiny distill run of the reliability student: 8 examples, 2 per step, `steps` steps, on the CPU."""
    return ["distill", "--student", str(models["student"]), "--method", method, "--data", str(DATA), "--out", str(out),
            "--limit", "8", "--max-length", "64", "--micro-batch-size", "2", "--grad-accum", "1", "--max-steps",
            str(steps), "--num-workers", "0", "--device", "cpu", "--seed", "0", "--no-progress", *map(str, extra)]


def one_error_line(result) -> str:
    """The single `error:` line of a failed command that printed no traceback."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code not in (0, None) and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(errors) == 1, result.output
    return errors[0]
