"""bench/fp8_distill.py at its smallest: the exact store, the fp8 store and the other seed, one step each,
compared; the distill runs go through the command line in this process (the script's own subprocess path is
checked to start)."""
import json
import subprocess

import dskd_pipe as dp
from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model


def test_exact_fp8_and_other_seed_runs_are_compared(bench, tmp_path, monkeypatch, cli_in_process, no_curves):
    module = bench("fp8_distill")
    assert subprocess.run(module.CLI + ["--version"], capture_output=True).returncode == 0  # the command it runs

    def run_distill(args, out):
        cli_in_process([*args, "--out", str(out)])
        return 0.0

    monkeypatch.setattr(module, "run_distill", run_distill)
    teacher = save_tiny_model(tmp_path / "teacher", "llama", load_tokenizer(str(bench.tok / "llama2")), d_model=32,
                              layers=1)
    student = save_tiny_model(tmp_path / "student", "llama", load_tokenizer(str(bench.tok / "gpt2")), d_model=16,
                              layers=1)
    stores = {kind: dp.cache_teacher(teacher=str(teacher), data=str(bench.data), out=str(tmp_path / f"{kind}.zarr"),
                                     limit=4, max_length=48, device="cpu", progress=False, hidden_storage=kind)
              for kind in ("exact", "fp8")}
    out = tmp_path / "fp8_distill.json"
    result = module.main(["--exact", str(stores["exact"]), "--fp8", str(stores["fp8"]), "--student", str(student),
                          "--data", str(bench.data), "--dev-data", str(bench.data), "--work", str(tmp_path / "runs"),
                          "--out", str(out), "--", "--method", "dskd-cma", "--limit", "4", "--max-length", "48",
                          "--micro-batch-size", "2", "--grad-accum", "1", "--max-steps", "1", "--num-workers", "0",
                          "--device", "cpu", "--dev-limit", "2"])
    assert json.loads(out.read_text()) == result
    assert [r["steps"] for r in result["runs"].values()] == [1, 1, 1]
    for pair in ("exact_vs_fp8", "exact_vs_other_seed"):
        assert result[pair]["weights_rel_diff"] >= 0 and "loss" in result[pair]["max_rel_step_diff"], pair
    # reading the same runs again compares without running anything
    again = module.main(["--exact", str(stores["exact"]), "--fp8", str(stores["fp8"]), "--student", str(student),
                         "--data", str(bench.data), "--dev-data", str(bench.data), "--work", str(tmp_path / "runs"),
                         "--out", str(tmp_path / "again.json"), "--reuse"])
    assert again["exact_vs_fp8"] == result["exact_vs_fp8"]
