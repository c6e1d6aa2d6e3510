"""The README's commands are real: every `dskd-pipe ...` line parses against the CLI (options and choices exist)."""
import re
import shlex
from pathlib import Path

from dskd_pipe.pipeline.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


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
