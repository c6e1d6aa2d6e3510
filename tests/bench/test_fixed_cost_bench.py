"""bench/fixed_cost.py in its smallest form: one profiled `dskd-pipe distill --cache` run, its time split into
phases that cover it."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_phases_cover_the_run(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "fixed_cost.py"), "--teacher-shape", "tiny-qwen2",
                           "--student-shape", "tiny-gpt2", "--runs", "0", "--limit", "2", "--max-length", "64",
                           "--micro-batch-size", "2", "--work", str(tmp_path / "work"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "fixed_cost-cpu-tiny-qwen2_tiny-gpt2.json").read_text())
    phases = result["profiled_phases_s"]
    assert phases["steps"] > 0 and phases["store"] > 0 and phases["student"] > 0 and phases["start"] > 0
    parts = sum(v for k, v in phases.items() if k not in ("profiled_total", "imports_all"))
    assert abs(parts - phases["profiled_total"]) < 1e-2 and min(phases.values()) >= 0
    assert result["runs"] == [] and result["fixed_s_median"] is None
