"""cache-teacher end to end: kill and resume equals one clean run; shards; refusals and bad inputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from dskd_pipe.cache.reader import open_store
from dskd_pipe.stages.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DATA = FIXTURES / "data" / "dolly_train_40.jsonl"
COMMON = ["--chunk-tokens", "8", "--shard-tokens", "256", "--batch-tokens", "512", "--device", "cpu"]
DSKD = str(Path(sys.executable).with_name("dskd-pipe"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("t") / "llama", "llama",
                           load_tokenizer(str(FIXTURES / "tokenizers" / "llama2")), d_model=32)


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def cache_args(teacher, out, data=DATA, *extra):
    return ["cache-teacher", "--teacher", teacher, "--data", data, "--out", out, *COMMON, *extra]


@pytest.fixture(scope="module")
def clean_store(teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "t.zarr"
    r = cli(*cache_args(teacher, out))
    assert r.exit_code == 0, r.output
    return out


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of a store (locks and temp files aside), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("lock", "create.lock", "finalize.lock") and not p.name.endswith(".tmp")}


def assert_same_bytes(a: Path, b: Path) -> None:
    """Two stores of the same inputs and split hold the same files, byte for byte (manifest and config aside,
    which name their own --out)."""
    fa, fb = store_files(a), store_files(b)
    assert sorted(fa) == sorted(fb)
    differ = [k for k in fa if fa[k] != fb[k] and k not in ("manifest.json", "manifest.partial.json", "config.json")]
    assert differ == []


def assert_same_examples(a: Path, b: Path) -> None:
    """Example by example, every stored byte equal (hidden rows exactly, not up to rounding), however split."""
    ra, rb = open_store(str(a)), open_store(str(b))
    assert len(ra) == len(rb) == 40
    assert ra.manifest.totals["tokens"] == rb.manifest.totals["tokens"]  # no duplicated rows
    for i in range(len(ra)):
        x, y = ra.read(i), rb.read(i)
        np.testing.assert_array_equal(x["ids"], y["ids"])
        np.testing.assert_array_equal(x["offsets"], y["offsets"])
        assert (x["prompt_len"], x["prompt"], x["response"]) == (y["prompt_len"], y["prompt"], y["response"])
        assert x["hidden"].numpy().tobytes() == y["hidden"].numpy().tobytes(), i


def test_die_after_flushes_then_resume_equals_clean_run(teacher, clean_store, tmp_path):
    out = tmp_path / "t.zarr"
    env = dict(os.environ, DSKD_PIPE_TEST_DIE_AFTER_FLUSHES="2")
    p = subprocess.run([DSKD, *map(str, cache_args(teacher, out))], env=env, capture_output=True, text=True)
    assert p.returncode == 137, p.stderr
    assert (out / "manifest.partial.json").exists() and not (out / "manifest.json").exists()
    with pytest.raises(Exception, match="unfinished store"):
        open_store(str(out))
    r = cli(*cache_args(teacher, out))  # the same command again
    assert r.exit_code == 0, r.output
    assert_same_bytes(out, clean_store)
    again = cli(*cache_args(teacher, out))
    assert again.exit_code == 0 and "already complete" in again.output


def test_sigkill_then_resume_equals_clean_run(teacher, clean_store, tmp_path):
    out = tmp_path / "t.zarr"
    p = subprocess.Popen([DSKD, *map(str, cache_args(teacher, out))], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    progress = out / "parts" / "part-00000" / "progress.json"
    deadline = time.time() + 60
    while not progress.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = cli(*cache_args(teacher, out))  # the stale lock of the dead pid is replaced
    assert r.exit_code == 0, r.output
    assert_same_bytes(out, clean_store)


def test_second_process_on_same_part_refused(teacher, tmp_path):
    out = tmp_path / "t.zarr"
    env = dict(os.environ, DSKD_PIPE_TEST_DIE_AFTER_FLUSHES="1")
    assert subprocess.run([DSKD, *map(str, cache_args(teacher, out))], env=env).returncode == 137
    lock = out / "parts" / "part-00000" / "lock"
    import socket
    r0 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live "writer"
    try:
        lock.write_text(f"{r0.pid}@{socket.gethostname()}")
        r = cli(*cache_args(teacher, out))
    finally:
        r0.kill()
        r0.wait()
    assert r.exit_code == 2
    assert f"is being written by process {r0.pid} on host" in r.output and "lock file" in r.output
    r = cli(*cache_args(teacher, out))  # its pid is dead now: a stale lock, replaced
    assert r.exit_code == 0, r.output


def test_other_data_or_teacher_refused(teacher, clean_store, tmp_path):
    r = cli(*cache_args(teacher, clean_store, FIXTURES / "data" / "dolly_test_20.jsonl"))
    assert r.exit_code == 2
    assert "was built from" in r.output and "not" in r.output and "Pass the same --data" in r.output
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model
    other = save_tiny_model(tmp_path / "other", "llama", load_tokenizer(str(FIXTURES / "tokenizers" / "llama2")),
                            d_model=32, seed=1)
    r = cli(*cache_args(other, clean_store))
    assert r.exit_code == 2 and "Pass the same --teacher" in r.output


def test_bad_inputs(teacher, tmp_path):
    r = cli(*cache_args(teacher, tmp_path / "a.zarr", tmp_path / "missing.jsonl"))
    assert r.exit_code == 2 and "missing.jsonl: no such file or folder." in r.output
    bad = tmp_path / "bad.jsonl"
    lines = DATA.read_text().splitlines()[:4]
    bad.write_text("\n".join([lines[0], "{not json", lines[1], '{"instruction": "x", "answer": "y"}', lines[2]])
                   + "\n")
    r = cli(*cache_args(teacher, tmp_path / "b.zarr", bad))
    assert r.exit_code == 2 and f"{bad} line 2: not valid JSON" in r.output
    r = cli(*cache_args(teacher, tmp_path / "c.zarr", bad, "--skip-bad"))
    assert r.exit_code == 0, r.output
    assert f"{bad} line 4: no 'output' field (found: answer, instruction)" in r.output
    assert f"skipped 2 bad record(s) in {bad}" in r.output
    assert len(open_store(str(tmp_path / "c.zarr"))) == 3
    r = cli("cache-teacher", "--data", DATA)
    assert r.exit_code == 2 and "missing required option(s): --teacher, --out" in r.output
    r = cli(*cache_args(teacher, tmp_path / "d.zarr", DATA, "--shard", "2/2"))
    assert r.exit_code == 2 and "--shard '2/2'" in r.output


def test_out_checked_before_any_model_is_loaded(teacher, tmp_path, monkeypatch):
    """A bad --out (its parent a file) or a store started with other settings is refused at once, before the
    teacher is loaded (which takes seconds to minutes for a real one)."""
    from dskd_pipe.stages import cache_teacher

    def no_loading(*a, **k):
        raise AssertionError("the teacher was loaded before the output was checked")

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(cache_teacher, "load_causal_lm", no_loading)
    r = cli(*cache_args(teacher, tmp_path / "file" / "t.zarr"))
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0 and r.output.startswith("error: ")
    assert f"--out {tmp_path}/file/t.zarr: {tmp_path}/file is a file, not a folder" in r.output
    monkeypatch.undo()
    out = tmp_path / "s.zarr"
    env = dict(os.environ, DSKD_PIPE_TEST_DIE_AFTER_FLUSHES="1")
    p = subprocess.run([DSKD, *map(str, cache_args(teacher, out))], env=env, capture_output=True, text=True)
    assert p.returncode == 137, p.stderr
    monkeypatch.setattr(cache_teacher, "load_causal_lm", no_loading)
    r = cli(*cache_args(teacher, out, DATA, "--chunk-tokens", "16"))
    assert r.exit_code == 2 and "was started with chunk_tokens=8, not 16. Pass the same --chunk-tokens" in r.output
    r = cli(*cache_args(teacher, out, DATA, "--limit", "39"))
    assert r.exit_code == 2 and "Pass the same --limit" in r.output


def test_disk_full_while_writing_head_and_embeddings(teacher, clean_store, tmp_path, monkeypatch):
    """ENOSPC in the shared arrays: one line naming the file and the space needed, no shared.json (nothing
    half-written counted as done), and the same command finishes the store later, equal to a clean run."""
    import errno

    from dskd_pipe.cache import shards

    real = shards._write

    def full_in_head(fd, views):
        if "/embed/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, views)

    monkeypatch.setattr(shards, "_write", full_in_head)
    out = tmp_path / "t.zarr"
    r = cli(*cache_args(teacher, out))
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "Traceback" not in r.output, r.output
    assert f"{out}/embed/" in errors[0]
    assert "no space left on the disk while writing the LM head, embeddings and tokenizer: it needs about" in r.output
    assert "Free space, then run the same cache-teacher command again" in r.output
    assert not (out / "shared.json").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    r = cli(*cache_args(teacher, out))
    assert r.exit_code == 0, r.output
    assert_same_bytes(out, clean_store)


def test_progress_line_cut_examples_and_no_library_bars(teacher, tmp_path):
    """Issue 16: one progress line (examples, tokens written), no transformers bars; issue 14: examples cut at
    --max-length are counted."""
    r = cli(*cache_args(teacher, tmp_path / "a.zarr", DATA, "--limit", "10", "--max-length", "96",
                        "--max-prompt-length", "48"))
    assert r.exit_code == 0, r.output
    assert "Loading weights" not in r.output and "it/s]" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("cache-teacher part 0/1")]
    assert lines and lines[-1].startswith("cache-teacher part 0/1  ex 10/10 100%  |  ")
    tokens = open_store(str(tmp_path / "a.zarr")).manifest.totals["tokens"]
    assert f"  {tokens} tok (" in lines[-1] and " ex/s  in " in lines[-1]
    from dskd_pipe.pipeline.data import build_sequence, load_examples
    from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer

    tok = load_tokenizer(str(teacher))
    examples = load_examples(str(DATA), 10)
    seqs = [build_sequence(tok, e.prompt, e.response, eos_token_id(tok), 48, 96) for e in examples]
    whole = [build_sequence(tok, e.prompt, e.response, eos_token_id(tok), 512, 512) for e in examples]
    assert all(s.tokens_cut == 0 and s.prompt_tokens_cut == 0 for s in whole)
    n_cut, n_prompt = sum(s.tokens_cut > 0 for s in seqs), sum(s.prompt_tokens_cut > 0 for s in seqs)
    assert 0 < n_cut < 10 and 0 < n_prompt < 10
    assert (f"warning: {n_cut} of 10 examples cut at --max-length 96 (" in r.stderr
            and f"; {n_prompt} prompt(s) cut at --max-prompt-length 48. Raise the limits" in r.stderr)
    quiet = cli(*cache_args(teacher, tmp_path / "b.zarr", DATA, "--limit", "10", "--quiet", "--max-length", "512",
                            "--max-prompt-length", "512"))
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout.count("\n") == 1 and "10 examples" in quiet.stdout


def test_device_map_auto_writes_the_same_store(teacher, clean_store, tmp_path):
    """--device-map auto (accelerate's dispatch; on this CPU-only machine every layer lands on the CPU): the inputs
    go to the dispatched model's first device and the store equals the plain run's."""
    pytest.importorskip("accelerate")
    out = tmp_path / "t.zarr"
    r = cli(*cache_args(teacher, out, DATA, "--device-map", "auto"))
    assert r.exit_code == 0, r.output
    assert_same_examples(out, clean_store)
    r = cli(*cache_args(teacher, tmp_path / "u.zarr", DATA, "--device-map", "balanced"))
    assert r.exit_code == 2 and "--device-map 'balanced': choose one of '' (the default), auto." in r.output


def test_each_torchrun_process_takes_its_own_gpu_and_device_map_runs_alone(monkeypatch):
    """Under torchrun, cuda means this process's GPU (cuda:LOCAL_RANK), not GPU 0 for all; --device-map auto (one
    teacher over every GPU) with several processes is refused before anything is loaded."""
    from dataclasses import replace

    from dskd_pipe.cache.format import StoreError
    from dskd_pipe.pipeline.config import CacheConfig
    from dskd_pipe.stages.cache_teacher import check_settings, teacher_device

    cfg = CacheConfig(device="cuda")
    assert teacher_device(cfg) == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert [teacher_device(replace(cfg, device=d)) for d in ("cuda", "cuda:1", "cpu")] == ["cuda:3", "cuda:1", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(StoreError, match=r"^--device-map auto spreads one teacher over all the node's GPUs: run it "
                                         r"as one process"):
        check_settings(CacheConfig(device_map="auto"))
    check_settings(CacheConfig())


@pytest.mark.slow
def test_torchrun_ranks_write_disjoint_parts_of_one_store(teacher, clean_store, tmp_path):
    """Under torchrun each rank writes its own part (RANK/WORLD_SIZE, no --shard); the finished store equals one
    process's. CI sets torchrun's variables for two runs in this process; DSKD_PIPE_FULL_TRIALS=1 launches torchrun
    with 2 processes (several seconds of imports each)."""
    out = tmp_path / "t.zarr"
    if os.environ.get("DSKD_PIPE_FULL_TRIALS") == "1":
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "dskd_pipe", *map(str, cache_args(teacher, out))],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    else:
        for rank in (1, 0):
            r = CliRunner().invoke(main, [*map(str, cache_args(teacher, out))],
                                   env={"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"})
            assert r.exit_code == 0, r.output
            assert f"part {rank}/2" in r.output
    store = open_store(str(out))
    assert store.manifest.n_parts == 2 and {store.locate(i)[0] for i in range(40)} == {0, 1}
    assert_same_examples(out, clean_store)
