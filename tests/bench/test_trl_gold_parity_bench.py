"""bench/trl_gold_parity.py in its smallest form: our uld equals TRL GOLD's ULD loss (closest config) in value and
gradients. trl is a bench extra, not a test dependency: skipped without it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_closest_trl_config_gives_our_uld(tmp_path):
    pytest.importorskip("trl")
    proc = subprocess.run([sys.executable, str(BENCH / "trl_gold_parity.py"), "--examples", "2", "--max-chars", "80",
                           "--variants", "closest,observed", "--work", str(tmp_path / "work"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "trl_gold_parity-cpu.json").read_text())
    closest = result["variants"]["closest"]
    assert result["closest_equal"]
    assert closest["value_rel_diff"] < 1e-5 and closest["grad_params"]["max_abs"] < 1e-9
    assert set(result["variants"]) == {"closest", "observed"} and "observed" in result["differences"]
