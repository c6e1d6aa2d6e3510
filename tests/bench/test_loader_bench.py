"""bench/loader.py at its smallest: one store, the DataLoader with no worker against a CPU step, the wait share."""
import json


def test_one_configuration_is_measured(bench, tmp_path):
    result = bench("loader").main(["--device", "cpu", "--kb-per-token", "0.125", "--step-ms", "1", "--workers", "0",
                                   "--tokens-per-step", "64", "--micro-batch-size", "2", "--max-length", "64",
                                   "--steps", "2", "--warmup", "0", "--dir", str(tmp_path / "stores"),
                                   "--out", str(tmp_path)])
    assert json.loads((tmp_path / "loader-cpu.json").read_text())["summary"] == result["summary"]
    (row,) = result["rows"]
    assert row["workers"] == 0 and row["d_model"] == 64 and 0 <= row["wait_share"] <= 1
    assert result["worker_cpu"]["0.125KB"]["per_micro_batch_ms"]["total"] > 0
