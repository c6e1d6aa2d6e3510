"""The benchmarks in bench/ as importable modules: each test runs a script's own `main` at tiny size, writing under
tmp_path (never into bench/results)."""
import importlib
import sys
from pathlib import Path

import pytest


class Benches:
    """bench("capture") -> the module bench/capture.py, imported with bench/ on sys.path as when a script runs."""

    root = Path(__file__).resolve().parents[2]
    dir = root / "bench"
    tok = root / "tests" / "fixtures" / "tokenizers"
    data = root / "tests" / "fixtures" / "data" / "dolly_train_40.jsonl"

    def __call__(self, name: str):
        return sys.modules[name] if name in sys.modules else importlib.import_module(name)


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(Benches.dir))
    return Benches()


def run_cli_in_process(args: list[str]) -> None:
    """`dskd-pipe ARGS` in this process, through the installed entry point (wherever the command line lives): the
    benches that time whole CLI processes run their commands this way in tests, ~4 s of imports less per command."""
    from importlib.metadata import entry_points

    (entry,) = entry_points(group="console_scripts", name="dskd-pipe")
    entry.load().main(args=list(args), prog_name="dskd-pipe", standalone_mode=False)


@pytest.fixture
def cli_in_process():
    return run_cli_in_process


@pytest.fixture
def no_curves(monkeypatch):
    """distill without its curves.png (matplotlib: ~1.7 s a run here; the picture is tested in tests/pipeline)."""
    from dskd_pipe.pipeline import curves

    monkeypatch.setattr(curves, "plot_paths", lambda *args, **kwargs: None)
