"""Fixtures of the reliability trials: a tiny teacher and student with real tokenizers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # reliability_helpers, shared by the trial files

from reliability_helpers import FIXTURES  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

    root = tmp_path_factory.mktemp("reliability_models")
    tokenizers = FIXTURES / "tokenizers"
    return {"teacher": save_tiny_model(root / "teacher", "llama", load_tokenizer(str(tokenizers / "llama2")),
                                       d_model=32, layers=2),
            "student": save_tiny_model(root / "student", "gpt2", load_tokenizer(str(tokenizers / "gpt2")),
                                       d_model=32, layers=1, seed=2)}
