"""bench/many_students.py at its smallest: cache-teacher once, one offline and one online student, the table by N;
its commands go through the command line in this process (the script's own subprocess path is checked to start)."""
import json
import subprocess
import time

from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model


def test_one_student_each_way_gives_the_table(bench, tmp_path, monkeypatch, cli_in_process, no_curves):
    module = bench("many_students")
    assert subprocess.run(module.CLI + ["--version"], capture_output=True).returncode == 0  # the command it runs
    commands = []

    def timed_run(args, log):
        start = time.perf_counter()
        commands.append(args[0])
        cli_in_process(args)
        return time.perf_counter() - start

    monkeypatch.setattr(module, "timed_run", timed_run)
    # models already in --work are used: 1-layer Llamas build and load faster than the tiny shapes' Qwen vocabulary
    for name, tok, seed in (("teacher", "llama2", 0), ("student", "gpt2", 1)):
        save_tiny_model(tmp_path / "work" / name, "llama", load_tokenizer(str(bench.tok / tok)), d_model=16, layers=1,
                        seed=seed)
    result = module.main(["--teacher-shape", "tiny-qwen2", "--student-shape", "tiny-gpt2", "--students", "1",
                          "--limit", "2", "--max-length", "48", "--micro-batch-size", "2", "--grad-accum", "1",
                          "--work", str(tmp_path / "work"), "--out", str(tmp_path)])
    assert commands == ["cache-teacher", "distill", "distill"]
    assert json.loads((tmp_path / "many_students-cpu-tiny-qwen2_tiny-gpt2.json").read_text()) == result
    assert result["optimizer_steps_per_student"] == 1 and set(result["by_n"]) == {"1"}
    assert result["by_n"]["1"]["offline_s"] > 0 and result["by_n"]["1"]["online_s"] > 0
