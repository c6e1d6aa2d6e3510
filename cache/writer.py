"""Writing a teacher-state store: shared parts once, one part per writer process, then the merged index.

Progress is recorded only after whole chunks are on disk, so a killed run never counts a half chunk; an example is
committed only when all its rows are. Each writer owns whole chunks of its own part (two processes writing rows of
one chunk lose data: spec/store_measurements.md), and a lock file refuses a second writer on the same part.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

from dskd_pipe.cache.format import (CONFIG, EXAMPLES, HIDDEN, INDEX_FIELDS, LOCK, LOGSUMEXP, MANIFEST,
                                    PARTIAL_MANIFEST, PROGRESS, TOKENIZER_GROUP, TOKENS, TOPK_INDICES, TOPK_VALUES,
                                    Manifest, StoreError, check_compatible, part_name)

FLUSH_CHUNKS = 32  # write in batches of 32 chunks (8k tokens at 256): few progress rewrites, bounded memory


def local_root(path_or_url: str) -> Path:
    """The local folder of a store given as a path or a file:// URL (writers need atomic rename and O_EXCL)."""
    s = str(path_or_url)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if "://" in s:
        raise StoreError(f"{s}: cache-teacher writes to a local folder or a file:// URL. Write locally, then copy "
                         "the folder to the object store; readers accept fsspec URLs.")
    return Path(s)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp file + fsync + rename, so readers see the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A tensor as the numpy array stored on disk: bf16 as its raw uint16 bits (exact, zero-copy)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def codecs(compression: str) -> list:
    """Compressors for an array: optional compression, then crc32c of the stored bytes so corruption raises."""
    if compression == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if compression == "blosc":  # measured best ratio for hidden states: zstd level 1, byte shuffle
        return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()]
    if compression != "none":
        raise StoreError(f"unknown compression '{compression}'; choose none, zstd or blosc.")
    return [Crc32cCodec()]


def create_array(group, name: str, shape: tuple, chunks: tuple, dtype, compression: str = "none"):
    # write_empty_chunks: an all-zero chunk must still exist on disk, so a missing file is always an error.
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, serializer=BytesCodec(),
                              compressors=codecs(compression), fill_value=0, overwrite=True,
                              config={"write_empty_chunks": True})


# --- store level ---------------------------------------------------------------------------------------------------

def read_manifest_file(path: Path) -> Manifest | None:
    if not path.exists():
        return None
    return Manifest.from_dict(json.loads(path.read_text()), where=str(path))


CREATE_LOCK = "create.lock"


def open_for_writing(out: str, manifest: Manifest, config: dict) -> tuple[Path, Manifest]:
    """Create the store or reopen an unfinished/finished one built from the same inputs and settings.

    Returns (root, manifest on disk). A finished store has `complete` True and needs no work.
    Shard processes started together on a new folder all pass through one creation lock: the first creates the
    store (manifest, root and part groups, config), the others wait for it and then open the same store; Zarr's
    group creation is not safe against a concurrent creator (ContainsGroupError), so nothing is created outside it.
    """
    root = local_root(out)
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root}: exists and is not a folder. Pass a new --out.")
    done = read_manifest_file(root / MANIFEST)
    if done is not None and done.complete:  # finished: nothing to create or lock (the folder may be read-only)
        return root, _same_settings(root, done, manifest)
    root.mkdir(parents=True, exist_ok=True)
    lock = root / CREATE_LOCK
    wait_for_lock(lock, f"the store {root}")
    try:
        existing = read_manifest_file(root / MANIFEST) or read_manifest_file(root / PARTIAL_MANIFEST)
        if existing is None:
            others = [p.name for p in root.iterdir() if p.name != CREATE_LOCK and not p.name.endswith(".tmp")]
            if others:
                raise StoreError(f"{root}: exists, is not empty and holds no store manifest. Pass a new --out.")
            atomic_write_json(root / PARTIAL_MANIFEST, manifest.to_dict())
            existing = manifest
        else:
            _same_settings(root, existing, manifest)
        if not existing.complete:
            # Idempotent: what a creator killed half-way did not write, the next process writes.
            if not (root / CONFIG).is_file():
                atomic_write_json(root / CONFIG, {"stage": "CacheConfig", "config": config})
            group = zarr.open_group(str(root), mode="a")
            for i in range(existing.n_parts):
                group.require_group(part_name(i))
    finally:
        release_lock(lock)
    return root, existing


def _same_settings(root: Path, existing: Manifest, manifest: Manifest) -> Manifest:
    """`existing` if the store on disk was started from the same inputs and settings, else a StoreError."""
    check_compatible(existing, manifest.fingerprints, store=str(root))
    for key in ("hidden_dtype", "d_model", "topk", "chunk_tokens", "compression", "n_parts"):
        if getattr(existing, key) != getattr(manifest, key):
            raise StoreError(f"{root} was started with {key}={getattr(existing, key)}, not {getattr(manifest, key)}. "
                             f"Pass the same setting to finish it, or build a new store.")
    return existing


def write_shared(root: Path, head: dict, embed: dict, tokenizer, teacher_config: dict,
                 compression: str = "none") -> None:
    """Head, embeddings and tokenizer files: once per store, by the writer of part 0."""
    group = zarr.open_group(str(root), mode="a")
    if group.attrs.get("shared_complete"):
        return
    for gname, parts, attrs in (("head", head, {"logit_scale": head["logit_scale"],
                                               "final_logit_softcap": head["final_logit_softcap"]}),
                                ("embed", embed, {"embed_scale": embed["embed_scale"]})):
        g = group.require_group(gname)
        for name in ("weight", "bias"):
            t = parts.get(name)
            if t is None:
                continue
            arr = to_storage(t)
            rows = max(1, (1 << 20) // max(1, arr[0:1].nbytes))  # ~1 MiB chunks
            a = create_array(g, name, arr.shape, (min(rows, arr.shape[0]),) + arr.shape[1:], arr.dtype, compression)
            a[...] = arr
            a.attrs["dtype"] = str(t.dtype).removeprefix("torch.")
        g.attrs.update(attrs)
    import tempfile

    tg = group.require_group(TOKENIZER_GROUP)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    files["teacher_config.json"] = json.dumps(teacher_config, indent=1, default=str).encode()
    for name, data in files.items():
        a = create_array(tg, name, (len(data),), (max(1, len(data)),), np.uint8)
        a[...] = np.frombuffer(data, dtype=np.uint8)
    group.attrs["shared_complete"] = True


# --- one part ------------------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(path: Path, what: str) -> None:
    """Create `path` exclusively with pid@host; a lock of a dead pid on this host is stale and replaced."""
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = path.read_text().strip() if path.exists() else ""
            pid, _, host = owner.partition("@")
            if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                path.unlink(missing_ok=True)  # stale: its writer died (kill -9) on this host
                continue
            raise StoreError(f"{what} is being written by process {pid or '?'} on host {host or '?'} "
                             f"(lock file {path}). Wait for it to finish; if that process is gone, delete the "
                             "lock file and run again.") from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return
    raise StoreError(f"{what}: could not take the lock file {path}.")


def wait_for_lock(path: Path, what: str, timeout_s: float = 300.0) -> None:
    """acquire_lock, waiting while a live process holds the lock (creation takes well under a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return acquire_lock(path, what)
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def release_lock(path: Path) -> None:
    try:
        if path.read_text().strip().startswith(f"{os.getpid()}@"):
            path.unlink()
    except FileNotFoundError:
        pass


class PartWriter:
    """Appends examples to one part of a store; resumable after a kill, chunk-aligned, one background write thread.

    Use: `w = PartWriter(root, i, manifest)`; skip `w.committed_ids`; `w.add(...)` per example; `w.close()`.
    """

    def __init__(self, root: Path, index: int, manifest: Manifest, background: bool = True):
        self.root, self.index, self.m = Path(root), index, manifest
        self.name = part_name(index)
        self.dir = self.root / self.name
        self.where = f"{self.root} part {index}"
        self.c = manifest.chunk_tokens
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = self.dir / LOCK
        acquire_lock(self.lock, f"part {index} of {self.root}")
        try:
            self._open()
        except BaseException:
            release_lock(self.lock)
            raise
        self._pool = ThreadPoolExecutor(max_workers=1) if background else None
        self._pending: list[Future] = []
        self._flushes = 0
        self._failed = False
        self._die_after = int(os.environ.get("DSKD_PIPE_TEST_DIE_AFTER_FLUSHES", "0") or 0)

    # Arrays: name -> (trailing shape, dtype)
    def _fields(self) -> dict:
        f = {HIDDEN: ((self.m.d_model,), np.dtype(self.m.storage_dtype)), TOKENS: ((3,), np.dtype(np.int32))}
        if self.m.topk:
            f[TOPK_VALUES] = ((self.m.topk,), np.dtype(np.float32))
            f[TOPK_INDICES] = ((self.m.topk,), np.dtype(np.int32))
            f[LOGSUMEXP] = ((), np.dtype(np.float32))
        return f

    def _open(self) -> None:
        group = zarr.open_group(str(self.root), mode="a").require_group(self.name)
        progress_path = self.dir / PROGRESS
        progress = json.loads(progress_path.read_text()) if progress_path.exists() else None
        self.arrays = {}
        for name, (tail, dtype) in self._fields().items():
            if progress is not None and name in group:
                self.arrays[name] = group[name]
            else:
                comp = self.m.compression if name in (HIDDEN, TOPK_VALUES) else "none"
                self.arrays[name] = create_array(group, name, (0,) + tail, (self.c,) + tail, dtype, comp)
        examples_path = self.dir / EXAMPLES
        self.entries: list[dict] = []
        written = 0
        if progress is not None:
            with open(examples_path, "r+b") as f:  # drop lines appended after the last progress record
                f.truncate(progress["examples_bytes"])
                self.entries = [json.loads(line) for line in f.read().splitlines()]
            written = progress["written_tokens"]
        else:
            examples_path.write_bytes(b"")
        self.complete = bool(progress and progress.get("complete"))
        self.examples_bytes = examples_path.stat().st_size
        self.committed_ids = {e["example_id"] for e in self.entries}
        end = max((e["token_start"] + e["n_tokens"] for e in self.entries), default=0)
        # Rows [end, written) belong to an example cut by the kill: dropped, it is recomputed. The committed rows of
        # the last partial chunk go back into the buffer so every later write stays chunk-aligned.
        self.buf_start = (end // self.c) * self.c
        self.buf = {name: [] for name in self.arrays}
        self.buf_rows = 0
        if end > self.buf_start and not self.complete:
            for name, arr in self.arrays.items():
                self.buf[name].append(np.asarray(arr[self.buf_start:end]))
            self.buf_rows = end - self.buf_start
        self.pending_entries: list[dict] = []
        self.next_start = end

    def add(self, example_id: int, ids, prompt_len: int, offsets, hidden: torch.Tensor, prompt: str,
            response: str, topk_values=None, topk_indices=None, logsumexp=None) -> None:
        """Buffer one example: ids [L], offsets [L, 2], hidden [L, d] (+ top-k [L, k], logsumexp [L])."""
        n = len(ids)
        if hidden.shape != (n, self.m.d_model):
            raise ValueError(f"hidden has shape {tuple(hidden.shape)}, expected ({n}, {self.m.d_model})")
        rows = {HIDDEN: to_storage(hidden),
                TOKENS: np.concatenate([np.asarray(ids, np.int32)[:, None],
                                        np.asarray(offsets, np.int32).reshape(n, 2)], axis=1)}
        if self.m.topk:
            rows[TOPK_VALUES] = to_storage(topk_values.float())
            rows[TOPK_INDICES] = to_storage(topk_indices.to(torch.int32))
            rows[LOGSUMEXP] = to_storage(logsumexp.float())
        for name, r in rows.items():
            self.buf[name].append(r)
        self.buf_rows += n
        self.pending_entries.append({"example_id": int(example_id), "token_start": self.next_start, "n_tokens": n,
                                     "prompt_len": int(prompt_len), "prompt": prompt, "response": response})
        self.next_start += n
        if self.buf_rows >= FLUSH_CHUNKS * self.c:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        n_write = self.buf_rows if final else (self.buf_rows // self.c) * self.c
        if n_write == 0 and not final:
            return
        start, end = self.buf_start, self.buf_start + n_write
        data = {}
        for name in self.buf:
            cat = np.concatenate(self.buf[name]) if self.buf[name] else None
            data[name] = cat[:n_write] if cat is not None else None
            self.buf[name] = [cat[n_write:]] if cat is not None and len(cat) > n_write else []
        self.buf_rows -= n_write
        self.buf_start = end
        done = [e for e in self.pending_entries if e["token_start"] + e["n_tokens"] <= end]
        self.pending_entries = self.pending_entries[len(done):]
        job = (start, end, data, done, final)
        if self._pool is None:
            self._write(*job)
        else:
            self._raise_errors(block=len(self._pending) >= 2)  # bounded queue: at most 2 flushes in flight
            self._pending.append(self._pool.submit(self._write, *job))

    def _write(self, start: int, end: int, data: dict, done: list, final: bool) -> None:
        try:
            for name, arr in self.arrays.items():
                if final or arr.shape[0] < end:
                    arr.resize((end,) + arr.shape[1:])
                if end > start:
                    arr[start:end] = data[name]
            lines = b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in done)
            with open(self.dir / EXAMPLES, "ab") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
            self.examples_bytes += len(lines)
            atomic_write_json(self.dir / PROGRESS, {"written_tokens": end, "examples_bytes": self.examples_bytes,
                                                    "n_examples": len(self.entries) + len(done), "complete": final})
            self.entries.extend(done)
        except OSError as e:
            self._failed = True
            hint = "the disk is full: free space, then" if e.errno == errno.ENOSPC else "fix the cause, then"
            raise StoreError(f"{self.where}: writing rows {start}..{end} failed ({e}). Progress up to row {start} "
                             f"is kept; {hint} run the same cache-teacher command again to resume.") from e
        self._flushes += 1
        if self._die_after and self._flushes >= self._die_after:
            os._exit(137)  # test hook: die like kill -9 right after a committed flush

    def _raise_errors(self, block: bool) -> None:
        while self._pending and (block or self._pending[0].done()):
            self._pending.pop(0).result()
            block = False

    def close(self, complete: bool = True) -> None:
        """Write what is buffered; with `complete`, mark the part finished. Always releases the lock."""
        try:
            if self._failed:  # a write failed: keep the last good progress, write nothing more
                complete = False
                for f in self._pending:
                    f.exception()
                self._pending = []
            elif complete and not self.complete:
                self._flush(final=True)
            else:
                self._flush(final=False)
            while self._pending:
                self._pending.pop(0).result()
            self.complete = self.complete or complete
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            release_lock(self.lock)


# --- finishing -----------------------------------------------------------------------------------------------------

def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def finalize_store(root: str | Path) -> Manifest | None:
    """If every part is complete, write the merged index and the final manifest; idempotent.

    Returns the final manifest, or None while parts are still unfinished.
    """
    root = local_root(str(root))
    done = read_manifest_file(root / MANIFEST)
    if done is not None and done.complete:
        return done
    m = read_manifest_file(root / PARTIAL_MANIFEST)
    if m is None:
        raise StoreError(f"{root}: no store manifest; not a teacher-state store.")
    entries = []
    for i in range(m.n_parts):
        pdir = root / part_name(i)
        progress_path = pdir / PROGRESS
        if not progress_path.exists() or not json.loads(progress_path.read_text()).get("complete"):
            return None
        for line in (pdir / EXAMPLES).read_bytes().splitlines():
            e = json.loads(line)
            entries.append((e["example_id"], i, e["token_start"], e["n_tokens"], e["prompt_len"]))
    if not zarr.open_group(str(root), mode="r").attrs.get("shared_complete"):
        return None
    lock = root / "finalize.lock"
    try:
        acquire_lock(lock, f"finalising {root}")
    except StoreError:
        return None  # another shard is finalising right now
    try:
        entries.sort()
        ids = [e[0] for e in entries]
        n_expected = m.fingerprints.get("data", {}).get("n_examples")
        if ids != list(range(len(ids))) or (n_expected is not None and len(ids) != n_expected):
            raise StoreError(f"{root}: parts hold example ids {ids[:5]}... ({len(ids)} examples), expected "
                             f"0..{n_expected}. The store is inconsistent; build a new one.")
        group = zarr.open_group(str(root), mode="a").require_group("index")
        cols = np.asarray([e[1:] for e in entries], dtype=np.int64).reshape(-1, 4)
        for k, name in enumerate(INDEX_FIELDS):
            a = create_array(group, name, (len(ids),), (max(1, min(len(ids), 1 << 16)),), np.int64)
            a[...] = cols[:, k]
        m.complete = True
        m.totals = {"examples": len(ids), "tokens": int(cols[:, 2].sum()), "bytes": 0}
        m.totals["bytes"] = _dir_bytes(root)
        atomic_write_json(root / MANIFEST, m.to_dict())
        (root / PARTIAL_MANIFEST).unlink(missing_ok=True)
        return m
    finally:
        release_lock(lock)
