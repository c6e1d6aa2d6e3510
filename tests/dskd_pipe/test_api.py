"""dskd_pipe/__init__.py, the public surface: every public name resolves and is documented, `import dskd_pipe` stays
light, the version is the installed one, the stages run as functions of their config (options checked as flags
are), and methods() lists the table."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import dskd_pipe as dp

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA = str(FIXTURES / "data" / "dolly_train_40.jsonl")
DEV = str(FIXTURES / "data" / "dolly_test_20.jsonl")


def test_every_public_name_resolves_and_is_documented():
    assert len(dp.__all__) == len(set(dp.__all__))
    for name in dp.__all__:
        value = getattr(dp, name)
        if name != "__version__":
            assert inspect.getdoc(value), f"{name} has no docstring"
    for name in dp.losses.__all__:
        assert inspect.getdoc(getattr(dp.losses, name)), f"losses.{name} has no docstring"
    assert set(dp.__all__) <= set(dir(dp))
    with pytest.raises(AttributeError, match="module 'dskd_pipe' has no attribute 'reader' \\(its public names: "):
        dp.reader  # noqa: B018


def test_import_is_light_and_the_version_is_the_installed_one():
    from importlib.metadata import version

    from click.testing import CliRunner

    from dskd_pipe.stages.cli import main

    code = "import sys, dskd_pipe; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    assert dp.__version__ == version("dskd-pipe")
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"dskd-pipe {version('dskd-pipe')}\n"


def test_methods_is_a_copy_of_the_table():
    from dskd_pipe.pipeline.methods import METHODS

    table = dp.methods()
    assert list(table) == list(METHODS) and table["alm"] is METHODS["alm"]
    table.pop("alm")
    assert "alm" in METHODS


@pytest.fixture(scope="module")
def tiny(tiny_store, tmp_path_factory):
    """A store written by cache_teacher() from a config file and options, of the shared tiny Qwen2 teacher."""
    models, tmp = tiny_store("qwen2", "qwen2"), tmp_path_factory.mktemp("api")
    config = tmp / "cache.toml"
    config.write_text(f'teacher = "{models["teacher"]}"\ndata = "{DATA}"\nlimit = 6\nmax_length = 48\n')
    store = dp.cache_teacher(config, out=str(tmp / "store"), device="cpu", progress=False)
    return {"tmp": tmp, "store": store, "student": models["student"]}


def test_the_stages_take_their_config_and_options(tiny):
    tmp = tiny["tmp"]
    assert (Path(tiny["store"]) / "manifest.json").is_file()
    assert json.loads((Path(tiny["store"]) / "config.json").read_text())["config"]["limit"] == 6  # from the file
    cfg = dp.DistillConfig(cache=str(tiny["store"]), student=tiny["student"], method="alm", data=DATA, limit=6,
                           max_length=48, micro_batch_size=2, grad_accum=1, dev_limit=None, num_workers=0,
                           device="cpu", progress=False, out=str(tmp / "unused"))
    out = dp.distill(cfg, out=str(tmp / "alm"), max_steps="2", quiet=True)  # options checked and coerced as flags
    saved = json.loads((out / "distill_config.json").read_text())["config"]
    assert out == tmp / "alm" and saved["max_steps"] == 2 and saved["method"] == "alm"
    assert saved["dev_limit"] is None  # what the given config says stays, not the default
    again = dp.distill(out / "distill_config.json", out=str(tmp / "again"))  # a run's resolved config repeats it
    assert json.loads((again / "distill_config.json").read_text())["config"] == {**saved, "out": str(tmp / "again")}
    with pytest.raises(dp.ConfigError) as e:
        dp.distill(cfg, max_stepz=1, lr="fast")
    assert str(e.value).splitlines() == [
        "command line: unknown key 'max_stepz' for DistillConfig (known: " + ", ".join(
            sorted(f.name for f in dp.DistillConfig.__dataclass_fields__.values())) + ").",
        "command line: key 'lr': expected a number, found 'fast'."]
    with pytest.raises(TypeError, match="expected a DistillConfig, a config file or None, found CacheConfig"):
        dp.distill(dp.CacheConfig())
    report = dp.score(models=(f"alm={out}",), data=(f"dev={DEV}",), limit=2, seeds=(10,), max_new_tokens=2,
                      batch_size=2, device="cpu", out=str(tmp / "score"), progress=False)
    scores = json.loads((report / "report.json").read_text())
    assert scores["models"]["alm"]["sets"]["dev"]["n"] == 2
    assert json.loads((report / "config.json").read_text())["config"]["no_repeat_ngram_size"] == 6  # published
    assert replace(cfg, out="x").out == "x"  # configs stay plain frozen dataclasses
