"""The README's commands are real: every `dskd-pipe ...` line parses against the CLI (options and choices exist), and
its Python runs."""
import json
import re
import shlex
from pathlib import Path

import pytest

from dskd_pipe.stages.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
DATA = str(README.parent / "tests" / "fixtures" / "data" / "dolly_train_40.jsonl")


def readme_commands() -> list[list[str]]:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("dskd-pipe "):
                commands.append(shlex.split(line)[1:])
    return commands


def test_readme_commands_parse():
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"cache-teacher", "cache-info", "cache-verify", "distill", "score"}
    for args in commands:
        sub = main.commands[args[0]]
        ctx = sub.make_context(args[0], args[1:], resilient_parsing=False)  # raises on an unknown option/choice
        assert ctx.params is not None


def test_readme_test_command_is_the_ci_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = "python -m pytest -q -n 2"
    assert command in README.read_text() and command in ci.splitlines()


def readme_python() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture()
def tiny(tiny_store):
    """A tiny GPT-2 teacher's store and a tiny GPT-2 student: the README's names stand for them."""
    return tiny_store("gpt2", "gpt2")


def test_readme_python_runs(tiny, monkeypatch):
    """The store and training snippets run as written (on a tiny store and student), and the plugin method of
    "Methods from your own package" trains with its option through `distill`, as an installed one would."""
    import dskd_pipe as dp
    from dskd_pipe.pipeline import methods

    store_code, train_code, plugin_code = readme_python()
    namespace: dict = {}
    exec(store_code.replace("runs/qwen-dolly.zarr", tiny["store"]), namespace)  # noqa: S102
    assert namespace["log_p"].shape == (8, 50257) and namespace["values"].shape == (namespace["ex"].ids.shape[0], 5)
    assert namespace["first"] and namespace["first"] in namespace["ex"].response
    assert sum(len(e) for e in namespace["entropy"]) == namespace["ex"].ids.shape[0]
    exec(train_code.replace('"gpt2"', repr(tiny["student"])), namespace)  # noqa: S102
    assert namespace["batch"]["student_chunk"].shape[0] == 6 and namespace["student"].transformer.h[0].attn.c_attn.weight.grad \
        is None  # a step was taken and the gradients cleared

    plugin: dict = {}
    exec(plugin_code, plugin)  # noqa: S102
    monkeypatch.setitem(methods.METHODS, "skewed-kd", plugin["SKEWED_KD"])  # what the entry point would add
    out = dp.distill(cache=tiny["store"], student=tiny["student"], method="skewed-kd", method_options=["alpha=0.2"],
                     data=DATA, out=str(tiny["tmp"] / "skewed"), limit=6, max_length=48, micro_batch_size=3,
                     grad_accum=1, max_steps=1, num_workers=0, device="cpu", progress=False)
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["kd"] > 0 and record["ce_student"] > 0


def test_readme_option_tables_are_the_declarations():
    """README "Options" is generated from the config fields (docs/build_options.py): it may not drift."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_options", README.parent / "docs" / "build_options.py")
    build_options = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_options)
    assert build_options.tables() in README.read_text(), "README option tables are stale: python docs/build_options.py"
    assert "| `--ga-mode` | `paper` | `paper`, `released` |" in README.read_text()
