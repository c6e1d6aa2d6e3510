"""pipeline/methods.py's entry points end to end: a tiny package installed into the environment (its module and a
dist-info with METADATA and entry_points.txt on the path, as pip leaves them) adds a method with its own trained
part, collate extra, option and log terms; `dskd-pipe methods` lists it with where it comes from and what was left
out, `dskd-pipe distill --method` trains with it in a fresh process, and a recipe takes it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA = str(FIXTURES / "data" / "dolly_train_40.jsonl")

PLUGIN = '''"""toy-dskd-plugin: a distill method from outside dskd-pipe."""
import torch

from dskd_pipe import LossTerms, Method, MethodOption, MethodParts
from dskd_pipe.losses import cross_entropy_sum


def _parts(cfg, teacher, student_tokenizer, student, device):
    ds, dt = student.get_input_embeddings().weight.shape[1], teacher.head.weight.shape[1]
    return MethodParts(projectors=torch.nn.Linear(ds, dt, bias=False).to(device))


def _count_items(items, teacher_labels, student_labels):
    return {"n_items": torch.tensor(len(items))}


def _extras(teacher_tokenizer, student_tokenizer):
    return _count_items


def _loss(x):
    """CE plus beta times the squared distance of the mean projected student state to the mean teacher state."""
    ce = cross_entropy_sum(x.logits, x.labels)
    pull = ((x.parts.projectors(x.hidden.mean(1)) - x.teacher_hidden.mean(1)) ** 2).sum() * x.n_student
    beta = x.options["beta"]
    return LossTerms(ce + beta * pull, {"ce_student": ce.detach(), "pull": pull.detach(),
                                        "beta": beta * x.n_student.float(), "items": x.batch["n_items"].float()})


def _metrics(sums, n_step):
    return {"ce_student": sums["ce_student"] / n_step, "pull": sums["pull"] / n_step, "beta": sums["beta"] / n_step,
            "items": sums["items"]}


METHOD = Method("toy-pull", "CE and a pull towards the teacher's mean state", _loss, _metrics, build_parts=_parts,
                collate_extras=_extras, defaults={"projector_lr": 0.25},
                options={"beta": MethodOption(0.5, "weight of the pull")})
'''


def install_plugin(site: Path) -> Path:
    """toy-dskd-plugin 0.1 as an installed distribution in `site`: the package and its dist-info, plus an entry
    point whose object does not exist (a broken plugin, to be left out without harm)."""
    (site / "toy_dskd_plugin").mkdir(parents=True)
    (site / "toy_dskd_plugin" / "__init__.py").write_text(PLUGIN)
    info = site / "toy_dskd_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-dskd-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[dskd_pipe.methods]\ntoy-pull = toy_dskd_plugin:METHOD\n"
                                           "broken = toy_dskd_plugin:NOT_THERE\n")
    (info / "RECORD").write_text("")
    return site


@pytest.fixture(scope="module")
def env(tiny_store, tmp_path_factory):
    """A tiny Qwen2 teacher's store of 8 examples, a tiny GPT-2 student and the plugin's site folder."""
    tmp = tmp_path_factory.mktemp("plugins")
    return {**tiny_store("qwen2", "qwen2", limit=8, max_length=64), "tmp": tmp, "site": install_plugin(tmp / "site")}


def _cli(env, *args: str) -> subprocess.CompletedProcess:
    """`dskd-pipe ARGS` in a fresh process of this environment, with the plugin installed (its site on the path)."""
    path = os.pathsep.join([str(env["site"]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "dskd_pipe", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=300)


def test_methods_lists_the_installed_method_and_what_was_left_out(env):
    result = _cli(env, "methods")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    from dskd_pipe.pipeline.methods import BUILT_IN, METHODS

    n_built_in = sum(METHODS.origin(name) == BUILT_IN for name in METHODS)
    assert lines[0] == (f"{n_built_in} built-in method(s), 1 from installed packages (entry point group "
                        "dskd_pipe.methods):")
    row = lines.index(next(line for line in lines if line.startswith("  toy-pull ")))
    assert "any tokenizers  CE and a pull towards the teacher's mean state" in lines[row]
    assert lines[row + 1].strip() == "from toy-dskd-plugin 0.1 (entry point toy-pull = toy_dskd_plugin:METHOD)"
    assert lines[row + 2].strip() == "--method-option beta=0.5 (float): weight of the pull"
    assert lines[lines.index("left out:") + 1].startswith(
        "  toy-dskd-plugin 0.1 (entry point broken = toy_dskd_plugin:NOT_THERE) did not load (AttributeError")
    assert any(line.startswith("  alm ") for line in lines) and n_built_in == 18  # the built-in ones are all there


def test_distill_trains_with_the_installed_method_and_its_option(env):
    out = env["tmp"] / "toy-pull"
    result = _cli(env, "distill", "--cache", env["store"], "--student", env["student"], "--method", "toy-pull",
                  "--method-option", "beta=2.0", "--data", DATA, "--out", str(out), "--limit", "8", "--max-length",
                  "64", "--micro-batch-size", "2", "--grad-accum", "2", "--max-steps", "2", "--num-workers", "0",
                  "--device", "cpu", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # the option reached the loss; the collate extra ran in the loader; its part trained
        assert r["beta"] == pytest.approx(2.0) and r["items"] == 4 and r["pull"] > 0
    assert records[0]["projector_lr"] == 0.25  # the entry's default for an option left unset
    saved = json.loads((out / "distill_config.json").read_text())["config"]
    assert saved["method"] == "toy-pull" and saved["method_options"] == ["beta=2.0"]
    assert (out / "projectors.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "| method | `toy-pull`: CE and a pull towards the teacher's mean state (from toy-dskd-plugin 0.1 (entry " \
           "point toy-pull = toy_dskd_plugin:METHOD)) |" in card
    assert "| method options | beta 2 |" in card and "--method-option beta=2.0" in card
    bad = _cli(env, "distill", "--cache", env["store"], "--student", env["student"], "--method", "toy-pull",
               "--method-option", "beta=lots", "--data", DATA, "--out", str(env["tmp"] / "bad"), "--limit", "8")
    assert bad.returncode == 2 and "error: --method-option beta: expected a number, found 'lots'." in bad.stderr


def test_a_recipe_takes_the_installed_method(env, tmp_path, monkeypatch):
    """The recipe checks its methods against the same table (here a fresh one, reading the environment anew)."""
    from dskd_pipe.pipeline import methods
    from dskd_pipe.stages import recipe

    monkeypatch.syspath_prepend(str(env["site"]))
    table = methods.MethodTable({name: methods.METHODS[name] for name in ("sft", "alm")})
    monkeypatch.setattr(methods, "METHODS", table)
    config = tmp_path / "r.toml"
    config.write_text('[t]\nmethods = ["sft", "toy-pull"]\n[t.models]\nteacher = "t"\nstudent = "s"\n'
                      '[t.data]\ntrain = "a.jsonl"\neval = ["a=a.jsonl"]\n'
                      '[t.method_distill.toy-pull]\nmethod_options = ["beta=3"]\n')
    size, settings = recipe.load_recipe_config(config)
    assert settings["methods"] == ["sft", "toy-pull"] and table.origin("toy-pull").startswith("toy-dskd-plugin 0.1")
    assert settings["method_distill"] == {"toy-pull": {"method_options": ["beta=3"]}}
