"""bench/methods.py in its smallest form: two methods, one step each, the JSON's structure and finite ratios; and a
method that fails in its spawned process is recorded, not raised."""
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_two_methods_one_step_write_finite_ratios(tmp_path):
    # inline: everything in the bench process (a spawned process costs ~5 s of imports each)
    proc = subprocess.run([sys.executable, str(BENCH / "methods.py"), "--shape", "test", "--methods", "kd",
                           "--isolation", "inline", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "methods_cpu_test.json").read_text())

    assert result["methods"] == ["kd", "dskd-cma"]  # the baseline is always added, METHODS order kept
    assert result["baseline"] == "dskd-cma"
    assert set(result["pairs"]) == {"same"}  # kd needs the student's vocabulary: only the same-vocabulary pair
    assert result["pairs"]["same"]["teacher_tokenizer"] == result["pairs"]["same"]["student_tokenizer"] == "gpt2"
    assert [(r["method"], r["pair"]) for r in result["table"]] == [("kd", "same"), ("dskd-cma", "same")]
    for row in result["table"]:
        assert "error" not in row, row
        assert row["baseline"] == "dskd-cma on the same pair"
        for key in ("time_ratio", "cpu_time_ratio", "step_memory_ratio", "peak_memory_ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["method"], key, row[key])
        assert row["s_per_step"] > 0 and row["cpu_s_per_step"] > 0 and row["step_peak_bytes"] > 0
    base = result["runs"]["dskd-cma"]["same"]
    assert base["time_ratio"] == base["cpu_time_ratio"] == base["step_memory_ratio"] == 1.0
    run = result["runs"]["kd"]["same"]
    assert len(run["step_s"]) == 1 and len(run["losses"]) == 1 and math.isfinite(run["losses"][0])
    assert len(run["paired_step_s"]) == len(run["paired_baseline_step_s"]) == 1  # interleaved with the baseline
    assert run["time_ratio"] == run["paired_time_ratio"]
    assert result["complete"] and result["dwa_kd_goal"]["dwa_kd_time_ratio"] is None  # dwa-kd was not asked for


def test_a_failing_method_is_recorded_from_its_spawned_process(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    methods = importlib.import_module("methods")
    spec = {"method": "dskd-cma", "cache": str(tmp_path / "no-such-store"), "student": str(tmp_path / "none"),
            "out": str(tmp_path / "run"), "limit": 2, "max_length": 64, "micro_batch_size": 2, "grad_accum": 1,
            "warmup": 0, "steps": 1, "batches": 1, "device": "cpu", "divergence": "fkl", "token_map_cache": ""}
    result = methods.run_isolated(methods.measure_method, (spec,), timeout_s=60)
    assert result["method"] == "dskd-cma"
    assert "no-such-store" in result["error"]
