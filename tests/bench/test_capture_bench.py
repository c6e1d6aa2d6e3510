"""bench/capture.py at its smallest: the stage's own capture loop (`cache_batches`) timed against the bare forward,
the result written where --results says."""
import json
import math

from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model


def test_capture_and_bare_forward_are_timed(bench, tmp_path):
    # a model already in --work is reused: a 1-layer Llama (32k vocabulary) builds in a fraction of the Qwen one's time
    save_tiny_model(tmp_path / "work" / "teacher-tiny", "llama", load_tokenizer(str(bench.tok / "llama2")),
                    d_model=32, layers=1)
    result = bench("capture").main(["--teacher-shape", "tiny", "--device", "cpu", "--examples", "6", "--repeats", "1",
                                    "--max-length", "64", "--data", str(bench.data), "--work", str(tmp_path / "work"),
                                    "--results", str(tmp_path)])
    assert json.loads((tmp_path / "capture-cpu-tiny.json").read_text()) == result
    assert result["examples"] == 6 and result["tokens"] > 0 and result["stored_bytes"] > 0
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert len(result["bare_seconds"]) == len(result["capture_seconds"]) == 1
