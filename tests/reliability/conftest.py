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


@pytest.fixture(scope="session")
def small_store(models, tmp_path_factory) -> Path:
    """A finished store of the tiny teacher over 8 examples (read-only: copy it to change it)."""
    from click.testing import CliRunner

    from dskd_pipe.stages.cli import main
    from reliability_helpers import cache_args

    out = tmp_path_factory.mktemp("small_store") / "t.zarr"
    r = CliRunner().invoke(main, cache_args(models["teacher"], out, "--max-length", "64", limit=8))
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def checkpointed_run(models, tmp_path_factory) -> Path:
    """A finished 4-step sft run of the dropout student with checkpoints at steps 2 and 4 (read-only: copy it)."""
    from reliability_helpers import distill_args, invoke

    out = tmp_path_factory.mktemp("checkpointed") / "run"
    r = invoke(*distill_args(models, out, "--save-every", "2"))
    assert r.exit_code == 0, r.output
    return out
