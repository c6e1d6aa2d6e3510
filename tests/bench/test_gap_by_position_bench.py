"""bench/gap_by_position.py at its smallest: a recipe-shaped folder of tiny models, every kind of chunk reported."""
import json
import shutil

from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model


def test_gains_by_kind_of_position(bench, tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "test.jsonl").write_text("".join(bench.data.read_text().splitlines(keepends=True)[:3]))
    shutil.copytree(bench.tok / "llama2", run / "tokenizers" / "teacher")
    shutil.copytree(bench.tok / "gpt2", run / "tokenizers" / "student")
    t_tok, s_tok = load_tokenizer(str(bench.tok / "llama2")), load_tokenizer(str(bench.tok / "gpt2"))
    save_tiny_model(run / "teacher" / "best", "llama", t_tok, d_model=16, layers=1)
    models = {name: save_tiny_model(tmp_path / name, "llama", tok, d_model=16, layers=1, seed=seed)
              for name, tok, seed in (("sft", s_tok, 1), ("alm", s_tok, 2), ("sft-t", t_tok, 3), ("kd-t", t_tok, 4))}
    out = tmp_path / "gap.json"
    report = bench("gap_by_position").main([
        "--recipe", str(run), "--model", f"sft={models['sft']}", "--model", f"alm={models['alm']},{models['sft']}",
        "--teacher-tok-model", f"sft@teacher-tok={models['sft-t']}", "--teacher-tok-model",
        f"kd@teacher-tok={models['kd-t']}", "--max-length", "64", "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["examples"] == 3
    whole = report["kinds"]["all"]
    assert whole["chars"] > 0 and set(whole["nats_per_char"]) == {"teacher", "sft", "alm", "sft@teacher-tok",
                                                                  "kd@teacher-tok"}
    assert set(whole["recovered"]) == {"sft", "alm"} and "| all |" in report["table"]
