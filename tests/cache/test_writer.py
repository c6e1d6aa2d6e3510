"""PartWriter on synthetic records: chunk-aligned resume, locks, disk-full errors."""
import errno
import json

import numpy as np
import pytest
import torch

from dskd_pipe.cache import writer as W
from dskd_pipe.cache.format import HIDDEN, PROGRESS, TOKENS, Manifest, StoreError, part_name


def _manifest(chunk=8, dtype="bfloat16"):
    return Manifest(fingerprints={"data": {"n_examples": 20}}, hidden_dtype=dtype, d_model=4, vocab_size=50,
                    eos_id=0, pad_id=0, chunk_tokens=chunk)


def _record(i):
    n = 3 + (i * 7) % 11
    g = torch.Generator().manual_seed(i)
    return dict(example_id=i, ids=list(range(i, i + n)), prompt_len=2, offsets=[(k, k + 1) for k in range(n)],
                hidden=torch.randn(n, 4, generator=g).to(torch.bfloat16), prompt=f"p{i}", response=f"r{i} é")


def _rows(root, arr_name):
    import zarr
    return np.asarray(zarr.open_group(str(root), mode="r")[part_name(0)][arr_name][:])


def _write(root, ids, flush_chunks=1, complete=True, monkeypatch=None):
    w = W.PartWriter(root, 0, _manifest(), background=False)
    for i in ids:
        if i not in w.committed_ids:
            w.add(**_record(i))
    w.close(complete=complete)
    return w


def test_resume_after_partial_commit_equals_clean_run(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "FLUSH_CHUNKS", 1)
    clean = tmp_path / "clean"
    clean.mkdir()
    _write(clean, range(20))
    # Interrupted: commit part of the examples (one lands across a flush boundary), then drop the buffer.
    part = tmp_path / "part"
    part.mkdir()
    w = W.PartWriter(part, 0, _manifest(), background=False)
    for i in range(9):
        w.add(**_record(i))
    W.release_lock(w.lock)  # as if the process died here: buffered rows are lost
    progress = json.loads((part / part_name(0) / PROGRESS).read_text())
    assert progress["written_tokens"] % 8 == 0 and 0 < progress["n_examples"] < 9
    w2 = _write(part, range(20))
    assert sorted(e["example_id"] for e in w2.entries) == list(range(20))
    for name in (HIDDEN, TOKENS):
        np.testing.assert_array_equal(_rows(part, name), _rows(clean, name))
    assert (part / part_name(0) / "examples.jsonl").read_bytes() == (clean / part_name(0) / "examples.jsonl").read_bytes()


def test_second_writer_on_same_part_refused(tmp_path):
    w = W.PartWriter(tmp_path, 0, _manifest(), background=False)
    with pytest.raises(StoreError, match=r"part 0 of .* is being written by process \d+ on host"):
        W.PartWriter(tmp_path, 0, _manifest(), background=False)
    w.close()
    W.PartWriter(tmp_path, 0, _manifest(), background=False).close()


def test_stale_lock_of_dead_pid_is_replaced(tmp_path):
    import socket
    (tmp_path / part_name(0)).mkdir(parents=True)
    (tmp_path / part_name(0) / "lock").write_text(f"999999999@{socket.gethostname()}")
    W.PartWriter(tmp_path, 0, _manifest(), background=False).close()


def test_disk_full_names_store_and_part_and_keeps_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "FLUSH_CHUNKS", 1)
    w = W.PartWriter(tmp_path, 0, _manifest(), background=True)
    for i in range(4):
        w.add(**_record(i))
    w._raise_errors(block=True)
    before = (tmp_path / part_name(0) / PROGRESS).read_text()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(W, "atomic_write_json", full)
    with pytest.raises(StoreError, match=r"part 0: writing rows \d+\.\.\d+ failed .*disk is full"):
        try:
            for i in range(4, 20):
                w.add(**_record(i))
            w.close()
        except StoreError:
            w.close(complete=False)  # what the stage does; must not raise again or write more
            raise
    assert (tmp_path / part_name(0) / PROGRESS).read_text() == before
    assert not (tmp_path / part_name(0) / "lock").exists()


def test_shard_processes_starting_together_share_one_new_store(tmp_path):
    """cache-teacher --shard i/N started at the same moment on a new --out: each creates or joins the same store.
    (A creator used to make the folder non-empty before its manifest existed, so a joiner found 'a folder that is
    not empty and holds no manifest' and quit.) Forked processes released together, many times over."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for attempt in range(12):
        root = tmp_path / f"s{attempt}.zarr"
        start = ctx.Barrier(4)
        results = ctx.Queue()

        def join(k):
            start.wait()
            try:
                _, m = W.open_for_writing(str(root), _manifest(), {"shard": k})
                results.put(("ok", m.to_dict()))
            except Exception as e:  # reported to the parent
                results.put(("error", f"{type(e).__name__}: {e}"))

        procs = [ctx.Process(target=join, args=(k,)) for k in range(4)]
        for p in procs:
            p.start()
        got = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        assert [r for r in got if r[0] == "error"] == []
        assert all(r[1] == _manifest().to_dict() for r in got)
        assert json.loads((root / "manifest.partial.json").read_text()) == _manifest().to_dict()
        assert (root / "zarr.json").is_file() and (root / "config.json").is_file()
        assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


def test_creator_killed_after_its_manifest_is_completed_by_the_next_run(tmp_path):
    """Only the partial manifest was written (a kill -9 right after it): the next open writes the rest."""
    root = tmp_path / "k.zarr"
    root.mkdir()
    W.atomic_write_json(root / "manifest.partial.json", _manifest().to_dict())
    _, m = W.open_for_writing(str(root), _manifest(), {"shard": 0})
    assert m.to_dict() == _manifest().to_dict()
    assert (root / "zarr.json").is_file() and (root / "config.json").is_file()
    assert (root / part_name(0) / "zarr.json").is_file()
    W.PartWriter(root, 0, m, background=False).close()
