"""stages/recipe.py: a tiny recipe with two methods x two training seeds and two evaluation sets, its summary over
seeds and reuse on a rerun; data paths under --data-root; config problems reported together; the shipped recipes."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dskd_pipe.stages.cli import main
from dskd_pipe.pipeline.config import ConfigError
from dskd_pipe.stages import recipe

TINY = """
[t]
methods = ["sft", "dskd-cma"]
seeds = [1, 2]

[t.models]
teacher = "tiny"
teacher_arch = "llama"
teacher_tokenizer = "qwen2"
teacher_d_model = 32
teacher_layers = 1
teacher_heads = 2
student = "tiny"
student_arch = "gpt2"
student_tokenizer = "gpt2"
student_d_model = 32
student_layers = 1
student_heads = 2

[t.data]
train = "train.jsonl"
eval = ["dolly=dolly.jsonl", "other=other.jsonl"]

[t.cache]
limit = 4
max_prompt_length = 48
max_length = 64
batch_tokens = 512
dtype = "float32"

[t.distill]
limit = 4
max_prompt_length = 48
max_length = 64
epochs = 1
max_steps = 1
micro_batch_size = 4
grad_accum = 1
num_workers = 0
dtype = "float32"

[t.score]
limit = 2
seeds = [10, 20]
max_new_tokens = 4
max_prompt_length = 48
batch_size = 2
"""


@pytest.fixture()
def data_root(tmp_path):
    """--data-root with a train file and two evaluation sets, cut from the shipped Dolly slices."""
    root = tmp_path / "data"
    root.mkdir()
    train = recipe.shipped("data", "dolly_train_200.jsonl").read_text().splitlines()
    test = recipe.shipped("data", "dolly_test_50.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(train[:8]) + "\n")
    (root / "dolly.jsonl").write_text("\n".join(test[:4]) + "\n")
    (root / "other.jsonl").write_text("\n".join(test[10:14]) + "\n")
    return root


@pytest.mark.slow  # an end-to-end run in its reduced (CI) size
def test_tiny_recipe_trains_every_method_and_seed_then_reuses_them(tmp_path, data_root):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "run"
    args = ["recipe", str(config), "--out", str(out), "--data-root", str(data_root), "--no-progress"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # No [t.teacher_sft] table: the tiny teacher is cached as built.
    assert "no [t.teacher_sft] table: the teacher is used as given" in result.output
    assert not (out / "teacher").exists() and (out / "models" / "teacher-init" / "model.safetensors").is_file()
    for name in ("sft-seed1", "sft-seed2", "dskd-cma-seed1", "dskd-cma-seed2"):
        assert (out / "students" / name / "model.safetensors").is_file(), name
    seeds = {json.loads((out / "students" / n / "distill_config.json").read_text())["config"]["seed"]
             for n in ("dskd-cma-seed1", "dskd-cma-seed2")}
    assert seeds == {1, 2}
    report = json.loads((out / "score" / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student-init", "sft-seed1", "sft-seed2", "dskd-cma-seed1",
                                     "dskd-cma-seed2"}
    assert report["sets"] == ["dolly", "other"]

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["rows"]) == ["teacher", "student-init", "sft", "dskd-cma"] and summary["sets"] == [
        "dolly", "other"]
    cell = summary["rows"]["dskd-cma"]["metrics"]["rouge_l/dolly"]
    per_seed = [report["models"][f"dskd-cma-seed{s}"]["sets"]["dolly"]["mean"] for s in (1, 2)]
    assert cell["per_seed"] == {"1": per_seed[0], "2": per_seed[1]}
    assert cell["mean"] == pytest.approx(sum(per_seed) / 2)
    assert cell["std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2)
    teacher = summary["rows"]["teacher"]["metrics"]
    assert teacher["rouge_l/dolly"]["mean"] == report["models"]["teacher"]["sets"]["dolly"]["mean"]
    nll = json.loads((out / "score" / "nll.json").read_text())
    assert teacher["nll_char/other"]["mean"] == nll["teacher"]["other"]["per_char"]
    assert nll["teacher"]["other"]["examples"] == 4  # every example of the set
    # The student as it started: the row that distillation has to improve on.
    init = summary["rows"]["student-init"]["metrics"]["rouge_l/other"]
    assert (init["mean"], init["n"]) == (report["models"]["student-init"]["sets"]["other"]["mean"], 1)
    # dskd-cma against sft, seed by seed.
    diff = summary["rows"]["dskd-cma"]["vs_baseline"]["nll_char/dolly"]
    sft = summary["rows"]["sft"]["metrics"]["nll_char/dolly"]["per_seed"]
    ours = summary["rows"]["dskd-cma"]["metrics"]["nll_char/dolly"]["per_seed"]
    assert diff["per_seed"] == pytest.approx([ours[s] - sft[s] for s in ("1", "2")])
    assert "| model | tokenizer | NLL/char | Δ vs sft [95% CI] | NLL/token | ROUGE-L | Δ vs sft [95% CI] |" in \
        result.output
    assert "mean ± std over training seeds 1, 2" in (out / "summary.md").read_text()
    steps = [json.loads(line)["step"] for line in (out / "timings.jsonl").read_text().splitlines()]
    assert steps == ["models", "cache", "distill sft-seed1", "distill sft-seed2", "distill dskd-cma-seed1",
                     "distill dskd-cma-seed2", "score", "summary"]

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert "finished before, kept" not in result.output and "[recipe 7/9] distill sft-seed1" in result.output
    again = CliRunner().invoke(main, [*args, "--quiet"])
    assert again.exit_code == 0, again.output
    # --quiet: the same reuse (below), without the recipe's step lines or the stages' notes; the table stays, and
    # the score stage it ran again was told so
    assert "[recipe" not in again.output and "already complete" not in again.output
    assert "| model | tokenizer | NLL/char |" in again.output
    assert json.loads((out / "score" / "config.json").read_text())["config"]["quiet"] is True
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes
    rerun = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()][len(steps):]
    assert [(t["step"], t["reused"]) for t in rerun[1:-2]] == [(s, True) for s in steps[1:-2]]  # store, students
    # Another data root is another run: refused in the same folder.
    other = tmp_path / "elsewhere"
    other.mkdir()
    for f in data_root.iterdir():
        (other / f.name).write_text(f.read_text())
    refused = CliRunner().invoke(main, [*args[:4], "--data-root", str(other)])
    assert refused.exit_code == 2
    assert f"{out} holds a run with other settings (tiny.toml, size t). Pass --fresh" in refused.output


def test_missing_data_names_the_data_root(tmp_path, data_root):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    (data_root / "other.jsonl").unlink()
    with pytest.raises(ConfigError, match=rf"data file\(s\) not found under --data-root {data_root}: "
                                          rf"{data_root / 'other.jsonl'}\. Pass --data-root FOLDER"):
        recipe.run(config, out=tmp_path / "run", data_root=data_root)
    with pytest.raises(ConfigError, match=r"not found among the shipped files \(configs/data\)"):
        recipe.run(config, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_recipe_problems_are_reported_together(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("""
[x]
methods = ["sft", "magic"]
seeds = [1, 1]
extra = 3
[x.models]
teacher = "gemma3-270m"
teacher_layers = 2
student = "tiny"
student_arch = "rnn"
student_tokenizer = "gpt2"
student_d_model = 0
student_layers = 1
student_heads = 1
colour = "red"
[x.data]
eval = ["dolly.jsonl"]
[x.distill]
seed = 3
lr = "fast"
[x.score]
out = "here"
""")
    with pytest.raises(ConfigError) as e:
        recipe.load_recipe_config(bad, "x")
    msg = str(e.value)
    for line in (
        ": unknown key or table [x.extra] (known: methods, same_tokenizer_methods, seeds, jobs, models, data, world, "
        "tokenizers, nll, teacher_sft, student_pretrain, cache, distill, score, method_distill).",
        "[x] methods: expected a list of sft, ",
        "[x] seeds: expected a list of distinct integers, found [1, 1].",
        "[x.models] unknown key 'colour'",
        "[x.models] teacher_layers: only for teacher = \"tiny\"; remove it.",
        "[x.models] student_arch: expected one of gpt2, llama, qwen2, gemma3, found 'rnn'.",
        "[x.models] student_d_model: expected a positive integer, found 0.",
        "[x.data] train: expected a data file, found None.",
        "[x.data] eval: expected a list of \"NAME=FILE\", found ['dolly.jsonl'].",
        "[x.distill] 'seed' is set by the recipe; remove it.",
        "[x.distill] key 'lr': expected a number, found 'fast'.",
        "[x.score] 'out' is set by the recipe; remove it.",
    ):
        assert line in msg, line
    assert all(text.startswith(f"{bad}: ") for text in msg.splitlines())
    with pytest.raises(ConfigError, match=r"bad.toml: no \[gpu\] table \(found: x\)\. Choose --size x\."):
        recipe.load_recipe_config(bad, "gpu")
    with pytest.raises(ConfigError, match=r"nope: no such recipe file"):
        recipe.load_recipe_config("nope")


def test_method_distill_tables_are_checked_per_method(tmp_path):
    """[SIZE.method_distill.METHOD]: one method's distill keys over the shared table, checked like it."""
    base = """
[x]
methods = ["sft", "dskd-cma"]
same_tokenizer_methods = ["kd"]
[x.models]
teacher = "tiny"
teacher_arch = "llama"
teacher_tokenizer = "gpt2"
teacher_d_model = 8
teacher_layers = 1
teacher_heads = 1
student = "tiny"
student_arch = "llama"
student_tokenizer = "gpt2"
student_d_model = 8
student_layers = 1
student_heads = 1
[x.data]
train = "train.jsonl"
eval = ["dev=dev.jsonl"]
[x.distill]
kd_rate = 0.5
"""
    good = tmp_path / "good.toml"
    good.write_text(base + "[x.method_distill.kd]\nkd_rate = 0.9\nkd_temperature = 1.0\n")
    settings = recipe.load_recipe_config(good, "x")[1]
    assert settings["method_distill"] == {"kd": {"kd_rate": 0.9, "kd_temperature": 1.0}}
    bad = tmp_path / "bad.toml"
    bad.write_text(base + "[x.method_distill.kd]\nkd_rate = \"high\"\nseed = 2\n"
                   "[x.method_distill.uld]\nkd_rate = 0.2\n")
    with pytest.raises(ConfigError) as e:
        recipe.load_recipe_config(bad, "x")
    msg = str(e.value)
    for line in ("[x.method_distill.kd] 'seed' is set by the recipe; remove it.",
                 "[x.method_distill.kd] key 'kd_rate': expected a number, found 'high'.",
                 "[x.method_distill.uld]: expected a table for one of this size's methods (sft, dskd-cma, kd)."):
        assert line in msg, line


def test_shipped_recipes_load():
    assert recipe.config_path("real_gemma3_smollm2") == recipe.shipped("real_gemma3_smollm2.toml")
    size, cpu = recipe.load_recipe_config("real_gemma3_smollm2")
    # The instruction-tuned SmolLM2 teaches the base Gemma-3 (the reverse left the teacher below the student-init),
    # as given on a CPU and fine-tuned first on a GPU.
    assert size == "cpu" and cpu["teacher_sft"] is None
    assert (cpu["methods"], cpu["seeds"]) == (["sft", "dskd-cma", "cma-ga"], [1, 2, 3])
    assert (cpu["models"]["teacher"], cpu["models"]["student"]) == ("smollm2", "gemma3-270m")
    for value in (cpu["data"]["train"], *(s.split("=", 1)[1] for s in cpu["data"]["eval"])):
        assert recipe.shipped("data", value).is_file(), value
    _, gpu = recipe.load_recipe_config("real_gemma3_smollm2.toml", "gpu")
    assert gpu["data"]["train"] == "dolly-minillm/train.jsonl" and gpu["seeds"] == [1, 2, 3]
    assert gpu["teacher_sft"] is not None and gpu["models"]["teacher"] == "smollm2"
    # The published DSKD-CMA-GA optimisation (configs/qwen1.5-1.8b_gpt2_cma_ga.toml), batch 32.
    d = gpu["distill"]
    assert (d["lr"], d["projector_lr"], d["epochs"], d["micro_batch_size"] * d["grad_accum"]) == (5e-4, 1e-3, 20, 32)
    assert recipe.resolve_data("dolly-minillm/train.jsonl", "/data") == "/data/dolly-minillm/train.jsonl"
    assert recipe.resolve_data("/abs/train.jsonl", "/data") == "/abs/train.jsonl"
    for size in ("full", "demo", "ci", "gpu"):
        q = recipe.load_recipe_config("quality", size)[1]
        assert "sft" in q["methods"] and q["same_tokenizer_methods"][:2] == ["sft", "kd"] and len(q["seeds"]) >= 2
        assert q["world"]["student_train"] < q["world"]["teacher_train"]
    # the gpu size: larger than full in world, vocabularies and models, the full size's leading methods
    full, gpu = (recipe.load_recipe_config("quality", s)[1] for s in ("full", "gpu"))
    assert gpu["world"]["n_towns"] > full["world"]["n_towns"]
    assert gpu["tokenizers"]["student_vocab"] > full["tokenizers"]["student_vocab"]
    assert gpu["models"]["teacher_d_model"] > full["models"]["teacher_d_model"]
    assert set(gpu["methods"]) <= set(full["methods"])
