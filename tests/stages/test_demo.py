"""stages/demo.py (configs/quality.toml through stages/recipe.py): the quality benchmark's `ci` size end to end
(generated world, trained tokenizers, teacher SFT, cache, students across and within tokenizers, NLL and ROUGE-L,
paired comparison, plots), the benchmark's teacher beating the student it starts from, reuse on a rerun, and the
config checks."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dskd_pipe.stages.cli import main
from dskd_pipe.pipeline.config import ConfigError
from dskd_pipe.stages import demo


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "ci"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--size", "ci", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.slow  # an end-to-end run in its reduced (CI) size
def test_ci_size_end_to_end(ci_run):
    out, output = ci_run
    for line in ("| sft@teacher-tok | bpe-300 |", "| kd@teacher-tok | bpe-300 |", "| dskd-cma | wordpiece-320 |",
                 "| alm+prefix-kd | wordpiece-320 |",
                 "where everything lies:", str(out / "teacher.zarr"), str(out / "dev_curves.png")):
        assert line in output, line
    for folder in ("data", "tokenizers/teacher", "tokenizers/student", "teacher", "models/student-init@teacher-tok",
                   "student-base/student", "student-base/teacher-tok"):
        assert (out / folder).is_dir(), folder
    # Five students x two seeds, each from the pretrained base of its tokenizer, with its method's settings.
    settings = {"kd@teacher-tok": (0.9, 1.0), "alm+prefix-kd": (0.5, 1.0)}
    for method, base in (("sft", "student"), ("alm+prefix-kd", "student"), ("dskd-cma", "student"),
                         ("sft@teacher-tok", "teacher-tok"), ("kd@teacher-tok", "teacher-tok")):
        for seed in (1, 2):
            cfg = json.loads((out / "students" / f"{method}-seed{seed}" / "distill_config.json").read_text())["config"]
            assert cfg["student"].startswith(str(out / "student-base" / base)) and cfg["seed"] == seed
            assert cfg["method"] == method.split("@")[0]
            assert (cfg["kd_rate"], cfg["kd_temperature"]) == settings.get(method, (0.5, 2.0))
    agreement = json.loads((out / "tokenizers" / "agreement.json").read_text())
    assert 0.3 < agreement["student_tokens_ending_on_a_teacher_end"] < 1.0  # really two tokenizations
    summary = json.loads((out / "summary.json").read_text())
    kd = summary["rows"]["kd@teacher-tok"]
    assert kd["baseline"] == "sft@teacher-tok" and set(kd["metrics"]["nll_char/test"]["per_seed"]) == {"1", "2"}
    diff = kd["vs_baseline"]["nll_char/test"]
    sft_nll = summary["rows"]["sft@teacher-tok"]["metrics"]["nll_char/test"]["per_seed"]
    assert diff["per_seed"] == pytest.approx([kd["metrics"]["nll_char/test"]["per_seed"][s] - sft_nll[s]
                                              for s in ("1", "2")])
    nll = json.loads((out / "score" / "nll.json").read_text())
    assert nll["teacher"]["test"]["examples"] == 16 and nll["teacher"]["test"]["truncated"] == 0
    assert (out / "scores.png").is_file() and (out / "dev_curves.png").is_file()
    # --quiet went to every stage (their saved configs say so) and left the recipe's own step lines out.
    assert "[recipe" not in output and "tok/s" not in output and "ex/s" not in output  # no progress lines
    saved = [*out.glob("students/*/distill_config.json"), *out.glob("student-base/*/distill_config.json"),
             out / "teacher" / "distill_config.json", out / "score" / "config.json", out / "teacher.zarr" / "config.json"]
    assert len(saved) == 15 and all(json.loads(p.read_text())["config"]["quiet"] is True for p in saved)
    # A finished run keeps its model, best/ and last/, not the resume state the recipe never reads again.
    finished = [p.parent for p in out.rglob("distill_done.json")]
    assert len(finished) == 13 and not [f for f in finished if (f / "checkpoints").exists()]
    assert all((f / "model.safetensors").is_file() for f in finished)


def test_the_benchmark_teacher_beats_the_student_it_starts_from(ci_run):
    """The benchmark means nothing if its teacher does not know more than the students start with: held-out NLL
    per character (comparable across the two tokenizers) of the SFT'd teacher must be below both initial students
    and every trained student."""
    out, _ = ci_run
    rows = json.loads((out / "summary.json").read_text())["rows"]
    teacher = rows["teacher"]["metrics"]["nll_char/test"]["mean"]
    for name, row in rows.items():
        if name != "teacher":
            assert teacher < row["metrics"]["nll_char/test"]["mean"], name


def test_rerun_reuses_every_finished_step(ci_run):
    out, _ = ci_run
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = CliRunner().invoke(main, ["demo", "--out", str(out), "--size", "ci", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert again.output.count("finished before, kept") == 13  # the teacher, 2 student bases and 10 students
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    rerun = timings[max(i for i, t in enumerate(timings) if t["step"] == "data"):]
    assert [t["step"] for t in rerun if not t["reused"]] == ["score", "summary"]  # scores are re-read from disk


def test_other_size_in_the_same_folder_is_refused(tmp_path):
    (tmp_path / "recipe.json").write_text(json.dumps({"config": "quality.toml", "size": "ci", "settings": {}}))
    with pytest.raises(ConfigError, match=r"holds a run with other settings \(quality.toml, size ci\)\. Pass --fresh"):
        demo.run(tmp_path, size="demo")


def test_demo_config_problems_are_reported_together(tmp_path):
    bad = tmp_path / "q.toml"
    bad.write_text(demo.shipped("quality.toml").read_text()
                   + '\n[odd]\nmethods = ["sft"]\nsame_tokenizer_methods = ["kd"]\n[odd.models]\nteacher = "tiny"\n'
                   'teacher_arch = "llama"\nteacher_d_model = 0\nteacher_layers = 1\nteacher_heads = 1\n'
                   'teacher_tokenizer = "gpt2"\nstudent = "tiny"\nstudent_arch = "llama"\nstudent_d_model = 8\n'
                   'student_layers = 1\nstudent_heads = 1\n[odd.world]\nn_towns = 20\nteacher_train = 10\n'
                   'student_train = 20\ndev = 4\ntest = 4\n[odd.tokenizers]\nteacher = "sentencepiece"\n'
                   'teacher_vocab = 10\nstudent = "wordpiece"\nstudent_vocab = 300\n[odd.distill]\nout = "x"\n'
                   'lr = "fast"\n[odd.student_pretrain]\nepochs = 1\n')
    with pytest.raises(ConfigError) as e:
        demo.load_demo_config("odd", bad)
    msg = str(e.value)
    for line in ("[odd.models] teacher_d_model: expected a positive integer, found 0.",
                 "[odd.models] teacher_tokenizer: the [tokenizers] table trains this tokenizer; remove it.",
                 "[odd.world] student_train (20) must be <= teacher_train (10)",
                 "[odd.tokenizers] teacher: expected one of bpe, wordpiece, found 'sentencepiece'.",
                 "[odd.tokenizers] teacher_vocab: expected an integer >= 64, found 10.",
                 "[odd.student_pretrain] needs pretraining data: [world] pretrain = N or [data] pretrain = FILE.",
                 "[odd.distill] 'out' is set by the recipe; remove it.",
                 "[odd.distill] key 'lr': expected a number, found 'fast'."):
        assert line in msg, line


@pytest.mark.slow  # reuses the ci run
def test_gap_by_position_bench_on_the_ci_run(ci_run, tmp_path):
    """bench/gap_by_position.py on the ci run's students: the kinds partition the characters, and each model's
    per-kind NLL adds up to its NLL of the whole test set as the recipe scores it."""
    import importlib.util
    from pathlib import Path

    out, _ = ci_run
    path = Path(__file__).resolve().parents[2] / "bench" / "gap_by_position.py"
    spec = importlib.util.spec_from_file_location("gap_by_position", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    s = out / "students"
    report = bench.main(["--recipe", str(out), "--model", f"sft={s / 'sft-seed1'}",
                         "--model", f"alm+prefix-kd={s / 'alm+prefix-kd-seed1'}",
                         "--teacher-tok-model", f"sft@teacher-tok={s / 'sft@teacher-tok-seed1'}",
                         "--teacher-tok-model", f"kd@teacher-tok={s / 'kd@teacher-tok-seed1'}",
                         "--out", str(tmp_path / "gap.json")])
    kinds = report["kinds"]
    assert sum(kinds[k]["char_share"] for k in bench.KINDS) == pytest.approx(1.0)
    nll = json.loads((out / "score" / "nll.json").read_text())
    for name in ("sft", "alm+prefix-kd", "kd@teacher-tok"):
        whole = nll[f"{name}-seed1"]["test"]
        assert kinds["all"]["nats_per_char"][name] * kinds["all"]["chars"] == pytest.approx(whole["nll"], rel=1e-4)
    assert "alm+prefix-kd" in kinds["all"]["recovered"] and (tmp_path / "gap.json").is_file()
