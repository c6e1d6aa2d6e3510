"""Shared fixtures for the store tests: tiny real-architecture teachers over the fixture tokenizers."""
from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA = FIXTURES / "data" / "dolly_train_40.jsonl"
TOKENIZERS = {"gpt2": "gpt2", "llama": "llama2", "qwen2": "qwen2", "gemma3": "gpt2"}


@pytest.fixture(scope="session")
def tiny_teacher_dirs(tmp_path_factory) -> dict[str, Path]:
    """arch -> folder of a tiny saved model (d=32, 2 layers) with a real tokenizer."""
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

    root = tmp_path_factory.mktemp("tiny_teachers")
    return {arch: save_tiny_model(root / arch, arch, load_tokenizer(str(FIXTURES / "tokenizers" / tok)),
                                  d_model=32, layers=2, heads=4)
            for arch, tok in TOKENIZERS.items()}


def _cache_cli(*args: str):
    from click.testing import CliRunner

    from dskd_pipe.pipeline.cli import main

    return CliRunner().invoke(main, ["cache-teacher", *map(str, args)])


@pytest.fixture(scope="session")
def cache_cli():
    """Run `dskd-pipe cache-teacher ...` in-process; returns the click Result."""
    return _cache_cli


@pytest.fixture(scope="session")
def dolly40() -> Path:
    return DATA
