"""Stores on an object store (s3:// against moto's S3 server on loopback): cache-teacher writes there and resumes
after kill -9, distill and cache-verify read there, every byte equal to the same store on a local disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
from click.testing import CliRunner

from dskd_pipe.cache.format import StoreError
from dskd_pipe.cache.reader import open_store
from dskd_pipe.cache.remote import RemotePath, store_root
from dskd_pipe.cache.verify import store_info, verify_store
from dskd_pipe.cache.writer import acquire_lock, release_lock
from dskd_pipe.stages.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA = FIXTURES / "data" / "dolly_train_40.jsonl"
COMMON = ["--limit", "16", "--chunk-tokens", "8", "--shard-tokens", "128", "--batch-tokens", "512", "--device", "cpu"]
DSKD = str(Path(sys.executable).with_name("dskd-pipe"))
SKIP = ("manifest.json", "config.json")  # name their own --out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("t") / "llama", "llama",
                           load_tokenizer(str(FIXTURES / "tokenizers" / "llama2")), d_model=32)


def cache_args(teacher, out, *extra):
    return ["cache-teacher", "--teacher", str(teacher), "--data", str(DATA), "--out", str(out), *COMMON, *extra]


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


@pytest.fixture(scope="module")
def local_store(teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "t.zarr"
    r = cli(*cache_args(teacher, out))
    assert r.exit_code == 0, r.output
    return out


def files_of(url: str) -> dict[str, bytes]:
    """Every file of a store (locks aside) by relative path, local or remote."""
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {p[len(root.rstrip("/")) + 1:]: fs.cat_file(p) for p in sorted(fs.find(root))
            if p.rsplit("/", 1)[-1] not in ("lock", "create.lock", "finalize.lock")}


def assert_same_store(url: str, local: Path) -> None:
    remote, here = files_of(url), files_of(str(local))
    assert sorted(remote) == sorted(here)
    assert [k for k in remote if remote[k] != here[k] and k not in SKIP] == []
    a, b = open_store(url), open_store(str(local))
    assert len(a) == len(b) == 16
    for i in range(16):
        x, y = a.read(i), b.read(i)
        np.testing.assert_array_equal(x["ids"], y["ids"])
        assert x["hidden"].numpy().tobytes() == y["hidden"].numpy().tobytes()
        assert x["prompt"] == y["prompt"]


def test_cache_teacher_writes_to_s3_the_same_bytes_and_everything_reads_there(teacher, local_store, s3_server):
    url = f"{s3_server}/same.zarr"
    r = cli(*cache_args(teacher, url))
    assert r.exit_code == 0, r.output
    assert url in r.output  # the summary names the URL
    assert_same_store(url, local_store)
    report = verify_store(url)
    assert report["ok"] and report["problems"] == []
    assert store_info(url)["tokens"] == open_store(str(local_store)).manifest.totals["tokens"]
    again = cli(*cache_args(teacher, url))
    assert again.exit_code == 0 and "already complete" in again.output


def test_kill_then_resume_on_s3_equals_one_clean_run(teacher, local_store, s3_server):
    url = f"{s3_server}/killed.zarr"
    env = dict(os.environ, DSKD_PIPE_TEST_DIE_AFTER_FLUSHES="2")  # exit like kill -9 after 2 committed shards
    p = subprocess.run([DSKD, *cache_args(teacher, url)], env=env, capture_output=True, text=True)
    assert p.returncode == 137, p.stdout + p.stderr
    root = store_root(url)
    assert (root / "manifest.partial.json").is_file() and not (root / "manifest.json").exists()
    assert (root / "parts/part-00000/lock").is_file()  # left behind by the killed writer
    with pytest.raises(StoreError, match="unfinished store"):
        open_store(url)
    r = cli(*cache_args(teacher, url))  # the same command: the dead pid's lock is replaced, the rest resumes
    assert r.exit_code == 0, r.output
    assert_same_store(url, local_store)


def test_distill_reads_the_store_from_s3(teacher, local_store, s3_server, tmp_path):
    from dskd_pipe.pipeline.config import DistillConfig
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model
    from dskd_pipe.stages import distill

    url = f"{s3_server}/distill.zarr"
    assert cli(*cache_args(teacher, url)).exit_code == 0
    student = save_tiny_model(tmp_path / "s", "gpt2", load_tokenizer(str(FIXTURES / "tokenizers" / "gpt2")),
                              d_model=32, layers=1)
    losses = []
    for name, cache in (("remote", url), ("local", str(local_store))):
        out = distill.run(DistillConfig(cache=cache, student=str(student), method="dskd-cma", data=str(DATA),
                                        limit=16, out=str(tmp_path / name), micro_batch_size=2, grad_accum=2,
                                        max_steps=2, num_workers=1, progress=False, device="cpu", seed=0))
        losses.append([json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()
                       if '"loss"' in ln])
    assert len(losses[0]) == 2 and losses[0] == losses[1]  # the same bytes read: the same steps


def test_locks_on_s3_are_exclusive_and_name_their_url(s3_server):
    lock = store_root(f"{s3_server}/locks/part-lock")
    assert isinstance(lock, RemotePath)
    assert lock.create_exclusive(b"a") and not lock.create_exclusive(b"b")  # a conditional PUT, not check-then-write
    assert lock.read_bytes() == b"a"
    lock.unlink()
    acquire_lock(lock, "part 0 of the test store")
    assert lock.read_text().startswith(f"{os.getpid()}@")
    with pytest.raises(StoreError) as e:  # a live owner: refused, the URL to delete named
        acquire_lock(lock, "part 0 of the test store")
    assert str(e.value).startswith(f"part 0 of the test store is being written by process {os.getpid()} on host ")
    assert f"(lock file {s3_server}/locks/part-lock)" in str(e.value)
    release_lock(lock)
    assert not lock.exists()
    lock.write_bytes(f"{2**22 + 12345}@{os.uname().nodename}".encode())  # a dead pid on this host: stale
    acquire_lock(lock, "part 0 of the test store")
    assert lock.read_text().startswith(f"{os.getpid()}@")
    release_lock(lock)


def test_damaged_shard_on_s3_is_named(teacher, s3_server):
    url = f"{s3_server}/damaged.zarr"
    assert cli(*cache_args(teacher, url)).exit_code == 0
    fs, root = fsspec.core.url_to_fs(url)
    shard = f"{root}/parts/part-00000/hidden/c/0/0"
    data = bytearray(fs.cat_file(shard))
    data[100] ^= 0x01
    fs.pipe_file(shard, bytes(data))
    with pytest.raises(StoreError, match=r"parts/part-00000/hidden shard 0 inner chunk \d+ .*is corrupt"):
        [open_store(url).read(i) for i in range(16)]
    report = verify_store(url)
    assert not report["ok"] and any("hidden shard 0 inner chunk" in p for p in report["problems"])


def test_unreachable_url_is_one_line(teacher, s3_server):
    r = cli(*cache_args(teacher, "s3://no-such-bucket-here/t.zarr"))
    assert r.exit_code != 0
    line = r.output.strip().splitlines()[-1]
    assert "s3://no-such-bucket-here/t.zarr" in line and "Traceback" not in r.output, r.output
