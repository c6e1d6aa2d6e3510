"""Fixtures shared across test folders: tiny teacher stores with a tiny student, built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
DOLLY = str(FIXTURES / "data" / "dolly_train_40.jsonl")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """make(teacher_arch, teacher_tokenizer, d_model=32, limit=6, max_length=48) -> {"store", "teacher", "student",
    "tmp"}: a tiny teacher of that architecture over a fixture tokenizer, cached over the first `limit` Dolly
    fixture records, and a tiny GPT-2 student (d 16, 1 layer); each distinct request is built once."""
    from dskd_pipe.pipeline.config import CacheConfig
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model
    from dskd_pipe.stages.cache_teacher import run as cache

    built = {}

    def make(arch: str, tokenizer: str, d_model: int = 32, limit: int = 6, max_length: int = 48) -> dict:
        key = (arch, tokenizer, d_model, limit, max_length)
        if key not in built:
            tmp = tmp_path_factory.mktemp(f"tiny-{arch}-{tokenizer}")
            teacher = save_tiny_model(tmp / "teacher", arch, load_tokenizer(str(FIXTURES / "tokenizers" / tokenizer)),
                                      d_model=d_model, layers=1, heads=2)
            student = save_tiny_model(tmp / "student", "gpt2", load_tokenizer(str(FIXTURES / "tokenizers" / "gpt2")),
                                      d_model=16, layers=1, heads=2, seed=2)
            store = cache(CacheConfig(teacher=str(teacher), data=DOLLY, out=str(tmp / "store"), limit=limit,
                                      max_length=max_length, device="cpu", progress=False))
            built[key] = {"store": str(store), "teacher": teacher, "student": str(student), "tmp": tmp}
        return built[key]

    return make
