"""bench/step_breakdown.py in its smallest form: one method's step split into parts that add up to the step."""
import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_parts_add_up_to_the_step(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "step_breakdown.py"), "--teacher-shape", "tiny-qwen2",
                           "--student-shape", "tiny-gpt2", "--methods", "dskd-cma", "--limit", "4", "--max-length",
                           "64", "--micro-batch-size", "2", "--steps", "1", "--same-process", "--work",
                           str(tmp_path / "work"), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "step_breakdown-cpu-tiny-qwen2_tiny-gpt2.json").read_text())["methods"]["dskd-cma"]
    assert math.isclose(sum(r["parts_s"].values()), r["step_s"], rel_tol=1e-2, abs_tol=1e-3)
    assert r["parts_s"]["student_forward"] > 0 and r["parts_s"]["backward"] > 0
    assert r["inside_loss_s"]["teacher_logits_from_head"] > 0 and r["inside_loss_s"]["projections"] > 0
