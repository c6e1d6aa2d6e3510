"""bench/ce_memory.py at its smallest: both cross-entropy forms, each in its own process, give the same loss."""
import json


def test_both_forms_run_in_their_processes_and_agree(bench, tmp_path):
    out = tmp_path / "ce.json"
    assert bench("ce_memory").main(["--batch", "1", "--length", "8", "--vocab", "32", "--prompt", "2",
                                    "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"every_row", "labelled_rows"}
    assert result["loss_relative_difference"] < 1e-3
