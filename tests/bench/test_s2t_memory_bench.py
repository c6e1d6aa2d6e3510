"""bench/s2t_memory.py at its smallest: the chunked and the one-pass s2t KL measured, equal in value."""
import json
import math


def test_chunked_and_unchunked_are_measured_alike(bench, tmp_path):
    result = bench("s2t_memory").main(["--device", "cpu", "--tokens", "16", "--vocab", "64", "--d-teacher", "8",
                                       "--chunk-tokens", "4", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "s2t_memory-cpu.json").read_text())["chunked"] == result["chunked"]
    assert math.isclose(result["chunked"]["loss"], result["unchunked"]["loss"], rel_tol=1e-4)
    assert result["chunked"]["peak_bytes"] > 0 and result["peak_ratio_chunked_over_unchunked"] > 0
