"""stages/demo.py (configs/demo.toml through stages/recipe.py): the whole job at --size tiny (< 60 s on a 2-core
CPU), its reuse on a rerun, its config checks."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from dskd_pipe.pipeline.cli import main
from dskd_pipe.pipeline.config import ConfigError
from dskd_pipe.stages import demo


def test_tokenizers_ship_with_the_package():
    from dskd_pipe.pipeline.models import load_tokenizer

    assert len(load_tokenizer(str(demo.shipped("tokenizers", "gpt2")))) == 50257
    assert len(load_tokenizer(str(demo.shipped("tokenizers", "qwen2")))) == 151669
    assert demo.shipped("tokenizers", "SOURCES.md").is_file()


def test_demo_tiny_end_to_end_then_reuses_finished_steps(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--size", "tiny", "--no-progress"])
    assert result.exit_code == 0, result.output
    for line in ("| teacher | student-init | sft | cma-ga |", "where everything lies:", str(out / "teacher.zarr")):
        assert line in result.output
    report = json.loads((out / "score" / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student-init", "sft", "cma-ga"}
    for folder in ("models/teacher-init", "models/student-init", "teacher", "students/sft", "students/cma-ga"):
        assert (out / folder / "model.safetensors").is_file(), folder
    # The cma-ga student learnt from the Qwen-tokenised store: its projectors and discriminator are saved.
    assert (out / "students" / "cma-ga" / "discriminator.safetensors").is_file()
    assert json.loads((out / "teacher" / "distill_config.json").read_text())["config"]["method"] == "sft"

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = CliRunner().invoke(main, ["demo", "--out", str(out), "--size", "tiny", "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "finished before, kept" in again.output and "already complete" in again.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes


def test_other_size_in_the_same_folder_is_refused(tmp_path):
    (tmp_path / "recipe.json").write_text(json.dumps({"config": "demo.toml", "size": "tiny", "settings": {}}))
    with pytest.raises(ConfigError, match=r"holds a run with other settings \(demo.toml, size tiny\)\. Pass --fresh"):
        demo.run(tmp_path, size="small")


def test_demo_config_problems_are_reported_together(tmp_path):
    bad = tmp_path / "demo.toml"
    bad.write_text((demo.shipped("demo.toml")).read_text()
                   + '\n[odd.models]\nteacher_d_model = 0\n[odd.distill]\nout = "x"\nlr = "fast"\n')
    with pytest.raises(ConfigError) as e:
        demo.load_demo_config("odd", bad)
    msg = str(e.value)
    assert "[odd.models] teacher_d_model: expected a positive integer, found 0." in msg
    assert "[odd.distill] 'out' is set by the recipe; remove it." in msg
    assert "[odd.distill] key 'lr': expected a number, found 'fast'." in msg
