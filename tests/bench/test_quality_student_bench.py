"""bench/quality_student.py at its smallest: one sft student of a tiny world, trained and scored, its line appended."""
import json
import shutil

import torch

from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model


def test_one_student_is_trained_scored_and_recorded(bench, tmp_path, no_curves):
    lines = bench.data.read_text().splitlines(keepends=True)
    (tmp_path / "data").mkdir()
    for split, part in (("student_train", lines[:4]), ("dev", lines[4:6]), ("test", lines[6:8])):
        (tmp_path / "data" / f"{split}.jsonl").write_text("".join(part))
    shutil.copytree(bench.tok / "gpt2", tmp_path / "tok_wp")
    init = save_tiny_model(tmp_path / "init", "llama", load_tokenizer(str(bench.tok / "gpt2")), d_model=16, layers=1)
    spec = {"root": str(tmp_path), "name": "sft-tiny", "init": str(init), "epochs": 1, "micro_batch_size": 2,
            "warmup_steps": 0, "max_prompt_length": 32, "max_length": 64}
    threads = torch.get_num_threads()
    try:
        result = bench("quality_student").main([json.dumps(spec)])
    finally:
        torch.set_num_threads(threads)  # the script takes one thread (two runs share two cores)
    (line,) = (tmp_path / "results.jsonl").read_text().splitlines()
    assert json.loads(line)["name"] == result["name"] == "sft-tiny"
    assert (tmp_path / "runs" / "sft-tiny" / "model.safetensors").is_file()
    for split in ("dev", "test"):
        assert result[split]["per_char"] > 0, split
