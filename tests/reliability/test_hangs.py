"""Nothing hangs on a remote that does not answer (issue 24): an S3 endpoint that accepts connections and never
replies held cache-info and cache-teacher --out for over 150 s; a hub id without a network took 51 s. Every remote
request now has a timeout and a few tries (cache/remote.py: DSKD_PIPE_REMOTE_TIMEOUT / _TRIES) and fails in one line
naming the URL and what to check. Each command runs in a thread, so a hang fails the test instead of stalling it."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from reliability_helpers import DATA, invoke, one_error_line


@pytest.fixture()
def silent_endpoint():
    """http://127.0.0.1:PORT of a server that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


@pytest.fixture()
def short_limits(monkeypatch):
    """1 s per request, 2 tries; a fresh s3fs client (fsspec keeps one per set of options)."""
    monkeypatch.setenv("DSKD_PIPE_REMOTE_TIMEOUT", "1")
    monkeypatch.setenv("DSKD_PIPE_REMOTE_TRIES", "2")
    s3fs = pytest.importorskip("s3fs")
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def _within(seconds: float, *args):
    """invoke(*args) in a thread; (result, seconds taken), or a failure if it has not returned by then."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", invoke(*args)), daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert "result" in box, f"dskd-pipe {' '.join(map(str, args))} still running after {seconds} s"
    return box["result"], time.monotonic() - t0


def test_an_s3_endpoint_that_never_answers_fails_in_seconds(models, silent_endpoint, short_limits, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_endpoint)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for args in (("cache-info", "s3://bucket/store"),
                 ("cache-teacher", "--teacher", models["teacher"], "--data", DATA, "--out", "s3://bucket/store",
                  "--device", "cpu")):
        result, took = _within(40, *args)
        line = one_error_line(result)
        assert line.startswith(f"error: s3://bucket/store (endpoint {silent_endpoint}): the object store failed ("), \
            line
        assert "no answer within 1 s, 2 tries: check the endpoint (AWS_ENDPOINT_URL) and the network" in line
        assert took < 30, took


def test_a_hub_that_never_answers_fails_in_seconds(silent_endpoint, short_limits, monkeypatch):
    """A hub id with the hub unreachable: one probe with a timeout, not transformers' retries of every file."""
    from huggingface_hub import constants

    from dskd_pipe.pipeline.models import hub_reachable

    monkeypatch.setattr(constants, "ENDPOINT", silent_endpoint)  # as HF_ENDPOINT sets them at import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        silent_endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    hub_reachable.cache_clear()
    repo = "nobody-here/no-such-model-24"
    result, took = _within(40, "cache-teacher", "--teacher", repo, "--data", DATA, "--out", "unused.zarr",
                           "--device", "cpu")
    hub_reachable.cache_clear()
    line = one_error_line(result)
    assert line.startswith(f"error: {repo}: not a local folder, and the hub did not answer at {silent_endpoint}/{repo}"
                           "/resolve/main/config.json ("), line
    assert "2 tries, 1 s each). Check the network, a proxy or HF_ENDPOINT" in line
    assert took < 30, took
