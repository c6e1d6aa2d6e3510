"""PartWriter and store creation on synthetic records: shard-aligned resume, locks, disk-full errors, creation races."""
import errno
import json
import os
import re

import numpy as np
import pytest
import torch

from dskd_pipe.cache import shards
from dskd_pipe.cache import writer as W
from dskd_pipe.cache.format import PROGRESS, Manifest, StoreError, part_name, plan_store

N = 20


def _lengths():
    return [3 + (i * 7) % 11 for i in range(N)]


def _plan(n_parts=1, batch_tokens=40):
    lengths = _lengths()
    return plan_store(lengths, [2] * N, batch_tokens, n_parts)


def _manifest(plan, chunk=4, shard=8, dtype="bfloat16"):
    return Manifest(fingerprints={"data": {"n_examples": N}}, hidden_dtype=dtype, d_model=4, vocab_size=50,
                    eos_id=0, pad_id=0, chunk_tokens=chunk, shard_tokens=shard, batch_tokens=40,
                    n_parts=plan.n_parts, plan_sha256=plan.sha256())


def _record(i):
    n = _lengths()[i]
    g = torch.Generator().manual_seed(i)
    return dict(example_id=i, ids=list(range(i, i + n)), prompt_len=2, offsets=[(k, k + 1) for k in range(n)],
                hidden=torch.randn(n, 4, generator=g).to(torch.bfloat16))


def _texts():
    return [(f"p{i}", f"r{i} é") for i in range(N)]


def _store(root, plan=None):
    plan = plan or _plan()
    return W.open_for_writing(str(root), _manifest(plan), {}, plan, _texts()) + (plan,)


def _write(root, complete=True, background=False):
    root, m, plan = _store(root)
    w = W.PartWriter(root, 0, m, plan, background=background)
    for i in plan.part_examples(0):
        if i not in w.committed_ids:
            w.add(**_record(i))
    w.close(complete=complete)
    return w


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "lock"}


def test_resume_after_a_cut_equals_a_clean_run_byte_for_byte(tmp_path):
    clean = tmp_path / "clean"
    _write(clean)
    # Interrupted: some shards committed, one example cut across a shard boundary, the buffer lost.
    cut = tmp_path / "cut"
    root, m, plan = _store(cut)
    w = W.PartWriter(root, 0, m, plan, background=False)
    order = plan.part_examples(0)
    for i in order[:9]:
        w.add(**_record(i))
    W.release_lock(w.lock)  # as if the process died here: buffered rows are lost
    progress = json.loads((cut / part_name(0) / PROGRESS).read_text())
    starts = np.cumsum([0] + [plan.lengths[i] for i in order])
    assert progress["rows"] % 8 == 0 and progress["rows"] not in starts  # cut inside an example
    w2 = W.PartWriter(root, 0, m, plan, background=False)
    assert 0 < len(w2.committed_ids) < 9 and w2.skip > 0
    for i in order:
        if i not in w2.committed_ids:
            w2.add(**_record(i))
    w2.close()
    assert _files(cut) == _files(clean)


def test_examples_must_come_in_the_plans_order(tmp_path):
    root, m, plan = _store(tmp_path / "s")
    w = W.PartWriter(root, 0, m, plan, background=False)
    order = plan.part_examples(0)
    with pytest.raises(ValueError, match=f"example {order[1]} added out of the plan's order"):
        w.add(**_record(order[1]))
    with pytest.raises(StoreError, match="closed with 20 example"):
        w.close(complete=True)


def test_second_writer_on_same_part_refused(tmp_path):
    root, m, plan = _store(tmp_path / "s")
    w = W.PartWriter(root, 0, m, plan, background=False)
    with pytest.raises(StoreError, match=r"part 0 of .* is being written by process \d+ on host"):
        W.PartWriter(root, 0, m, plan, background=False)
    w.close(complete=False)
    W.PartWriter(root, 0, m, plan, background=False).close(complete=False)


def test_stale_lock_of_dead_pid_is_replaced(tmp_path):
    import socket
    root, m, plan = _store(tmp_path / "s")
    (root / part_name(0) / "lock").write_text(f"999999999@{socket.gethostname()}")
    W.PartWriter(root, 0, m, plan, background=False).close(complete=False)


def _full_after(monkeypatch, budget: int):
    """Simulate a disk with `budget` bytes left: writes fail with ENOSPC once it is spent (after a partial write)."""
    left = [budget]
    real = shards._write

    def write(fd, views):
        n = sum(len(v) for v in views)
        if n > left[0]:
            if left[0]:
                os.write(fd, bytes(views[0][:min(len(views[0]), left[0])]))
                left[0] = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        left[0] -= n
        return real(fd, views)

    monkeypatch.setattr(shards, "_write", write)


def test_disk_full_names_the_file_and_space_and_resumes(tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    _write(clean)
    root, m, plan = _store(tmp_path / "s")
    _full_after(monkeypatch, 300)
    w = W.PartWriter(root, 0, m, plan, background=True)
    with pytest.raises(StoreError) as e:
        try:
            for i in plan.part_examples(0):
                w.add(**_record(i))
            w.close()
        except StoreError:
            w.close(complete=False)  # what the stage does; must not raise again or write more
            raise
    msg = str(e.value)
    assert "\n" not in msg and "no space left on the disk while writing rows" in msg
    assert f"{root}/{part_name(0)}/" in msg and re.search(r"it needs about [\d.,]+ (bytes|KiB) more, [\d.,]+ \w+ are "
                                                           r"free", msg), msg
    assert "run the same cache-teacher command again to resume: rows up to" in msg
    assert not list(root.rglob("*.tmp")) and not (root / part_name(0) / "lock").exists()
    progress = W.read_progress(root / part_name(0))
    assert not progress["complete"]
    monkeypatch.undo()
    w = W.PartWriter(root, 0, m, plan, background=False)  # the same command again, with space
    for i in plan.part_examples(0):
        if i not in w.committed_ids:
            w.add(**_record(i))
    w.close()
    assert _files(tmp_path / "s") == _files(clean)


def test_disk_full_while_creating_the_store(tmp_path, monkeypatch):
    _full_after(monkeypatch, 100)
    with pytest.raises(StoreError, match=r"no space left on the disk while writing .*Free space, then run the same"):
        _store(tmp_path / "s")
    monkeypatch.undo()
    root, m, plan = _store(tmp_path / "s")  # the same command again: the creation is redone whole
    assert m.created


def test_shard_processes_starting_together_share_one_new_store(tmp_path):
    """cache-teacher --shard i/N started at the same moment on a new --out: each creates or joins the same store.
    Forked processes released together, many times over."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    plan = _plan(n_parts=4, batch_tokens=20)
    for attempt in range(8):
        root = tmp_path / f"s{attempt}.zarr"
        start = ctx.Barrier(4)
        results = ctx.Queue()

        def join(k):
            start.wait()
            try:
                _, m = W.open_for_writing(str(root), _manifest(plan), {"shard": k}, plan, _texts())
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
        want = {**_manifest(plan).to_dict(), "created": True}
        assert all(r[1] == want for r in got)
        assert (root / "zarr.json").is_file() and (root / "config.json").is_file()
        assert all((root / part_name(p) / "hidden" / "zarr.json").is_file() for p in range(4))
        assert not [p.name for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_creator_killed_after_its_manifest_is_completed_by_the_next_run(tmp_path):
    """Only the partial manifest was written (a kill -9 right after it): the next open writes the rest."""
    root = tmp_path / "k.zarr"
    root.mkdir()
    plan = _plan()
    W.write_manifest(root / "manifest.partial.json", _manifest(plan))
    _, m, _ = _store(root, plan)
    assert m.created
    assert (root / "zarr.json").is_file() and (root / "config.json").is_file()
    assert (root / part_name(0) / "hidden" / "zarr.json").is_file()
    W.PartWriter(root, 0, m, plan, background=False).close(complete=False)


def test_out_whose_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match=r"--out .*/f/s.zarr: .*/f is a file, not a folder"):
        W.check_out_path(str(tmp_path / "f" / "s.zarr"))
    with pytest.raises(StoreError, match=r"exists and is a file, not a folder"):
        W.check_out_path(str(tmp_path / "f"))
