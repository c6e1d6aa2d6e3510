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

    from dskd_pipe.stages.cli import main

    return CliRunner().invoke(main, ["cache-teacher", *map(str, args)])


@pytest.fixture(scope="session")
def cache_cli():
    """Run `dskd-pipe cache-teacher ...` in-process; returns the click Result."""
    return _cache_cli


@pytest.fixture(scope="session")
def dolly40() -> Path:
    return DATA


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on loopback (moto's server mode, in this process) and a bucket; yields the bucket URL.

    Credentials and the endpoint reach every client (s3fs here, subprocesses too) through the standard environment
    variables, as a user's would."""
    import logging

    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    with pytest.MonkeyPatch.context() as mp:  # session-scoped: the environment is restored after the last test
        for key, value in env.items():
            mp.setenv(key, value)
        fs, _ = fsspec.core.url_to_fs("s3://dskd-test")
        fs.mkdir("dskd-test")
        try:
            yield "s3://dskd-test"
        finally:
            server.stop()
