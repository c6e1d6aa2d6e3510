"""bench/distill_offline_vs_online.py in its smallest form, with a DataLoader worker as on the GPU (each mode runs in
its own process, which must be allowed to start workers), and the two modes agreeing on the loss."""
import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_both_modes_run_with_loader_workers_and_agree(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "distill_offline_vs_online.py"), "--num-workers", "1",
                           "--steps", "2", "--warmup", "0", "--limit", "8", "--max-length", "64",
                           "--micro-batch-size", "2", "--grad-accum", "1", "--work", str(tmp_path / "work"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "distill_offline_vs_online-cpu-tiny-qwen2_tiny-gpt2.json").read_text())
    assert result["args"]["num_workers"] == 1
    for mode in ("offline", "online"):
        assert result[mode]["steps"] == 2 and result[mode]["s_per_step"] > 0
        assert 0 <= result[mode]["loader_wait_frac"] < 1 and result[mode]["peak_rss_bytes"] > 0
    # the same student, data order and teacher: cached teacher states give the online run's loss
    assert math.isclose(result["offline"]["final_loss"], result["online"]["final_loss"], rel_tol=1e-5)
    assert math.isfinite(result["online_over_offline_step_time"])
