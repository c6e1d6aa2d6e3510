"""bench/whole_runs.py in its smallest form: TRL GOLD online and cache-teacher + distill from the store, one
student of one epoch, each a timed process with its own peak RSS. trl is a bench extra: skipped without it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_trl_and_store_runs_are_timed_and_compared(tmp_path):
    pytest.importorskip("trl")
    proc = subprocess.run([sys.executable, str(BENCH / "whole_runs.py"), "--teacher-shape", "tiny-qwen2",
                           "--student-shape", "tiny-gpt2", "--modes", "trl,store", "--students", "1", "--epochs", "1",
                           "--limit", "2", "--max-length", "64", "--micro-batch-size", "2", "--work",
                           str(tmp_path / "work"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "whole_runs-cpu-tiny-qwen2_tiny-gpt2.json").read_text())
    assert result["examples"] == 2 and result["cache_teacher"]["wall_s"] > 0
    for mode in ("trl", "store"):
        run = result["runs"][mode][0]
        assert run["steps"] == 1 and run["wall_s"] > run["train_loop_s"] > 0 and run["peak_rss_bytes"] > 0
    assert result["by_n"]["1"]["trl_over_store"] > 0 and "trl" in result["break_even"]
