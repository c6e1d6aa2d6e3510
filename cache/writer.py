"""Writing a teacher-state store: the plan's arrays at creation, shared parts once, one part per writer process,
then the final manifest.

Kill -9 safety: every file is written to a temp name, fsynced and renamed (on an object store: one PUT, which is
atomic; cache/remote.py), so no file is ever half-written under its real name, and nothing is rewritten once
committed. A part's progress moves only after whole shard files are on disk; a resumed writer starts at that shard
boundary, recomputing the batch of any example cut there (the plan fixes every batch, so the recomputed rows are the
same bytes). Each writer owns its part (two processes writing one shard lose data: spec/store_measurements.md), and
a lock file refuses a second writer on the same part.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dskd_pipe.cache import shards
from dskd_pipe.cache.format import (CONFIG, CREATE_LOCK, EMBED_GROUP, FINALIZE_LOCK, HEAD_GROUP, HIDDEN, HIDDEN_SCALE,
                                    INDEX, LOCK, LOGSUMEXP, MANIFEST, PARTIAL_MANIFEST, PROGRESS, SHARED, TEXTS,
                                    TOKENIZER_GROUP, TOKENS, TOPK_INDICES, TOPK_VALUES, ArrayLayout, Manifest, Plan,
                                    StoreError, check_same_settings, part_name, sha256_hex, shared_layout)
from dskd_pipe.cache.paths import check_out_location, describe_contents
from dskd_pipe.cache.remote import RemotePath, store_root

RESUME = "run the same cache-teacher command again to resume"


def check_out_path(out: str) -> Path | RemotePath:
    """The --out folder or URL, checked before anything is loaded: not a file, inside a folder, writable (a URL:
    reachable with the credentials at hand)."""
    root = store_root(out)
    if isinstance(root, RemotePath):
        try:
            bucket = root.path.split("/", 1)[0]
            try:  # info, not exists: exists answers False to a timeout too
                root.fs.info(bucket)
            except FileNotFoundError:
                raise StoreError(f"--out {root}: the bucket {bucket} does not exist (or these credentials cannot see "
                                 "it). Create it first, or check the URL and credentials.") from None
            if root.is_file():
                raise StoreError(f"--out {root}: an object, not a prefix. Pass a new URL for the store.")
        except StoreError:
            raise
        except Exception as e:  # credentials, a missing bucket, no network: the filesystem's own error says which
            raise StoreError(f"--out {root}: cannot reach it ({type(e).__name__}: {str(e)[:200]}). Check the URL "
                             "and the credentials (e.g. AWS_PROFILE, AWS_ENDPOINT_URL for S3).") from None
        return root
    return check_out_location(root, StoreError)


def to_storage(t: torch.Tensor) -> np.ndarray:
    """A tensor as the numpy array stored on disk: bf16 as its raw uint16 bits (exact, zero-copy)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


E4M3_MAX = 448.0  # the largest finite float8 e4m3 (fn) value


def encode_fp8(hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states [L, d] as float8 e4m3 with a scale per token: (bits uint8 [L, d], scale float32 [L]).

    h ~= q * s with s = max|h| / 448 (e4m3's largest value), q = h / s rounded to nearest e4m3: every element keeps
    e4m3's relative error (<= 2^-4), and each token's largest element, 448 after scaling, is exact. That matters on
    real teachers, whose few outlier dimensions carry much of each logit: on Gemma-3-270M states this scale gave
    27% less KL to the exact distributions than a power-of-two one, and a 6x smaller worst token (BENCHMARKS.md,
    "Half the bytes per token"), for 3 more bytes a token.
    """
    x = hidden.detach().float().cpu()
    scale = x.abs().amax(dim=-1) / E4M3_MAX  # [L]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zeros
    q = (x / scale[:, None]).to(torch.float8_e4m3fn)  # [L, d]; torch saturates at 448, never NaN
    return q.view(torch.uint8).numpy(), scale.numpy()


def _write(path: Path | RemotePath, buffers: list, what: str, need: int, then: str = RESUME) -> None:
    """shards.write_file (an object store: one PUT), a full disk turned into one line naming the file and the space
    needed, any other failure into one line naming the file."""
    if isinstance(path, RemotePath):
        try:
            path.write_bytes(b"".join(memoryview(b).cast("B") for b in buffers))
        except Exception as e:
            raise StoreError(f"{path}: writing {what} failed ({type(e).__name__}: {str(e)[:200]}). Fix the cause, "
                             f"then {then}.") from None
        return
    try:
        shards.write_file(path, buffers)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise shards.disk_full_error(path, need, what, then) from None
        raise StoreError(f"{path}: writing {what} failed ({e}). Fix the cause, then {then}.") from None


def write_json(path: Path, obj, what: str) -> None:
    data = (json.dumps(obj, indent=1) + "\n").encode()
    _write(path, [data], what, len(data))


def write_manifest(path: Path, m: Manifest) -> None:
    data = m.to_json()
    _write(path, [data], "the store manifest", len(data))


def read_manifest_file(path: Path) -> Manifest | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return Manifest.from_json(data, where=str(path))


# --- Zarr metadata -------------------------------------------------------------------------------------------------

def array_metadata(layout: ArrayLayout, attributes: dict | None = None) -> bytes:
    """The zarr.json of a sharded array, as Zarr itself writes it (made in memory, written by us atomically)."""
    import zarr
    from zarr.codecs import BytesCodec
    from zarr.storage import MemoryStore

    mem = MemoryStore()
    zarr.create_array(store=mem, shape=layout.shape, dtype=layout.dtype,
                      chunks=(layout.chunk_rows,) + layout.shape[1:], shards=(layout.shard_rows,) + layout.shape[1:],
                      serializer=BytesCodec(), compressors=shards.zarr_codecs(layout.compression), fill_value=0,
                      attributes=attributes or {})
    return mem._store_dict["zarr.json"].to_bytes()


def group_metadata(attributes: dict | None = None) -> bytes:
    return (json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}, indent=2)
            + "\n").encode()


def write_group(folder: Path, attributes: dict | None = None, what: str = "store metadata", need: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = group_metadata(attributes)
    _write(folder / "zarr.json", [data], what, max(need, len(data)))


def write_array(folder: Path, layout: ArrayLayout, data: np.ndarray | None, what: str, need: int,
                attributes: dict | None = None) -> None:
    """An array's zarr.json, then (with `data`) all its shards; whatever was stored there before is replaced."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = array_metadata(layout, attributes)
    _write(folder / "zarr.json", [meta], what, need)
    if data is None:
        return
    for k in range(layout.n_shards):
        rows = data[k * layout.shard_rows:(k + 1) * layout.shard_rows]
        path = folder / shards.shard_key(k, len(layout.shape))
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, shards.encode_shard(rows, layout), what, need)
        need -= rows.nbytes


# --- store level ---------------------------------------------------------------------------------------------------

def texts_blob(texts: list[tuple[str, str]]) -> tuple[np.ndarray, list[int]]:
    """(uint8 bytes of one JSON object per example, byte length of each)."""
    lines = [json.dumps({"prompt": p, "response": r}, ensure_ascii=False).encode() for p, r in texts]
    blob = np.frombuffer(b"".join(lines), dtype=np.uint8) if lines else np.zeros(0, np.uint8)
    return blob, [len(x) for x in lines]


def open_for_writing(out: str, manifest: Manifest, config: dict, plan: Plan,
                     texts: list[tuple[str, str]]) -> tuple[Path | RemotePath, Manifest]:
    """Create the store or reopen an unfinished/finished one started from the same inputs and settings.

    Returns (root, manifest on disk). A finished store has `complete` True and needs no work.
    Shard processes started together on a new folder all pass through one creation lock: the first creates the
    store (manifest, config, index, texts, every part's arrays); the others wait for it, then open the same store.
    """
    root = check_out_path(out)
    done = _finished_manifest(root)
    if done is not None:  # finished: nothing to create or lock (the folder may be read-only)
        check_same_settings(done, manifest, str(root))
        return root, done
    root.mkdir(parents=True, exist_ok=True)
    lock = root / CREATE_LOCK
    wait_for_lock(lock, f"the store {root}")
    try:
        existing = read_manifest_file(root / PARTIAL_MANIFEST)
        if existing is None:
            others = [p.name for p in root.iterdir() if p.name != CREATE_LOCK and not p.name.endswith(".tmp")]
            if others:
                raise StoreError(f"{root}: exists, is not empty and holds no store manifest: it holds "
                                 f"{describe_contents(root)}. Pass a new --out.")
            existing = Manifest(**{**manifest.__dict__, "created": False, "complete": False})
            write_manifest(root / PARTIAL_MANIFEST, existing)
        else:
            check_same_settings(existing, manifest, str(root))
        if not existing.created:
            # Idempotent: whatever a creator killed half-way wrote, this writes again in full.
            _create(root, existing, config, plan, texts)
            existing.created = True
            write_manifest(root / PARTIAL_MANIFEST, existing)
    finally:
        release_lock(lock)
    return root, existing


def _finished_manifest(root: Path) -> Manifest | None:
    """The manifest of a finished store; a damaged manifest.json of a store whose parts are all written is removed
    (with a note), so that this run checks the parts and writes it again."""
    try:
        done = read_manifest_file(root / MANIFEST)
    except StoreError as e:
        if not (root / PARTIAL_MANIFEST).is_file():
            raise StoreError(f"{e} Build a new store.") from None
        print(f"{e} The parts are checked and it is written again.", flush=True)
        (root / MANIFEST).unlink()
        return None
    return done if done is not None and done.complete else None


def _create(root: Path, m: Manifest, config: dict, plan: Plan, texts: list[tuple[str, str]]) -> None:
    write_json(root / CONFIG, {"stage": "CacheConfig", "config": config}, "the run's config")
    write_group(root)
    blob, text_bytes = texts_blob(texts)
    index = plan.index(text_bytes)
    write_array(root / INDEX, shared_layout(index.shape, "int64"), index, "the example index", index.nbytes)
    write_array(root / TEXTS, shared_layout(blob.shape, "uint8"), blob, "the example texts", blob.nbytes)
    write_group(root / "parts")
    for p in range(m.n_parts):
        folder = root / part_name(p)
        write_group(folder)
        for name, layout in m.row_layouts(plan.part_rows(p)).items():
            write_array(folder / name, layout, None, f"part {p} metadata", 1 << 12)


def write_shared(root: Path, manifest: Manifest, head: dict, embed: dict, tokenizer, teacher_config: dict) -> None:
    """Head, embeddings and tokenizer files: once per store, by the writer of part 0; shared.json marks them done."""
    if (root / SHARED).is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    files["teacher_config.json"] = json.dumps(teacher_config, indent=1, default=str).encode()
    arrays = []  # (folder, array, attributes)
    for group, parts in ((HEAD_GROUP, head), (EMBED_GROUP, embed)):
        for name in ("weight", "bias"):
            t = parts.get(name)
            if t is not None:
                arrays.append((root / group / name, to_storage(t), {"dtype": str(t.dtype).removeprefix("torch.")}))
    for name, data in files.items():
        arrays.append((root / TOKENIZER_GROUP / name, np.frombuffer(data, dtype=np.uint8), {}))
    need = sum(a.nbytes for _, a, _ in arrays)
    what = "the LM head, embeddings and tokenizer"
    write_group(root / HEAD_GROUP, {"logit_scale": head["logit_scale"],
                                    "final_logit_softcap": head["final_logit_softcap"]}, what, need)
    write_group(root / EMBED_GROUP, {"embed_scale": embed["embed_scale"]}, what, need)
    write_group(root / TOKENIZER_GROUP, {"files": sorted(files)}, what, need)
    for folder, data, attrs in arrays:
        layout = shared_layout(data.shape, str(data.dtype), manifest.compression if data.ndim == 2 else "none")
        write_array(folder, layout, data, what, need, attrs)
        need -= data.nbytes
    write_json(root / SHARED, {"complete": True, "arrays": [str(f.relative_to(root)) for f, _, _ in arrays]}, what)


# --- locks ---------------------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_owner(path: Path) -> str | None:
    """pid@host of a live writer holding `path`, or None (no lock, or a stale one of a dead pid on this host)."""
    try:
        owner = path.read_text().strip()
    except FileNotFoundError:
        return None
    pid, _, host = owner.partition("@")
    if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
        return None
    return owner


def _create_exclusive(path: Path | RemotePath, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists (O_EXCL; a conditional PUT on an object store)."""
    if isinstance(path, RemotePath):
        return path.create_exclusive(data)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(data.decode())
    return True


def acquire_lock(path: Path | RemotePath, what: str) -> None:
    """Create `path` exclusively with pid@host; a lock of a dead pid on this host is stale and replaced."""
    me = f"{os.getpid()}@{socket.gethostname()}"
    for _ in range(2):
        if not _create_exclusive(path, me.encode()):
            owner = lock_owner(path)
            if owner is None:
                path.unlink(missing_ok=True)  # stale: its writer died (kill -9) on this host
                continue
            pid, _, host = owner.partition("@")
            raise StoreError(f"{what} is being written by process {pid or '?'} on host {host or '?'} "
                             f"(lock file {path}). Wait for it to finish; if that process is gone, delete the "
                             "lock file and run again.") from None
        return
    raise StoreError(f"{what}: could not take the lock file {path}.")


def wait_for_lock(path: Path, what: str, timeout_s: float = 300.0) -> None:
    """acquire_lock, waiting while a live process holds the lock (creation takes seconds at most)."""
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


# --- one part ------------------------------------------------------------------------------------------------------

def read_progress(folder: Path) -> dict:
    try:
        return json.loads((folder / PROGRESS).read_text())
    except FileNotFoundError:
        return {"rows": 0, "complete": False}


class PartWriter:
    """Appends the examples of one part, in the plan's order; resumable after a kill, shard by shard, one background
    write thread.

    Use: `w = PartWriter(root, i, manifest, plan)`; skip `w.committed_ids`; `w.add(...)` per example in
    `plan.part_examples(i)` order; `w.close()`.
    """

    def __init__(self, root: Path | RemotePath, index: int, manifest: Manifest, plan: Plan, background: bool = True):
        self.root, self.index, self.m = store_root(root) if isinstance(root, str) else root, index, manifest
        self.dir = self.root / part_name(index)
        self.where = f"{self.root} part {index}"
        self.lock = self.dir / LOCK
        self.dir.mkdir(parents=True, exist_ok=True)
        acquire_lock(self.lock, f"part {index} of {self.root}")
        self.entries = []  # (example id, first row, rows) in row order
        start = 0
        for i in plan.part_examples(index):
            self.entries.append((i, start, plan.lengths[i]))
            start += plan.lengths[i]
        self.total_rows = start
        self.layouts = manifest.row_layouts(self.total_rows)
        self.S = manifest.shard_tokens
        if isinstance(self.dir, Path):  # an object store has no temp files (cache/remote.py)
            shards.remove_temp_files(self.dir)
        progress = read_progress(self.dir)
        self.complete = bool(progress.get("complete"))
        written = int(progress.get("rows", 0))
        self.committed_ids = {i for i, s, n in self.entries if s + n <= written}
        self.next = len(self.committed_ids)  # committed examples are a prefix of the row order
        # The rows on disk end at a shard boundary, maybe inside an example: its first rows are there already (the
        # same bytes: the plan recomputes it in the same batch), so they are dropped when it is added again.
        self.skip = written - self.entries[self.next][1] if self.next < len(self.entries) else 0
        self.buf_start = written  # first row of the shard being filled (a shard boundary)
        self.buf_rows = 0  # rows of it filled so far
        # Shard buffers, filled in place and recycled once written: at most 2 in flight + 1 filling per array.
        # (Concatenating per-example pieces into a fresh 32 MiB array each shard cost ~3x the copy: page faults.)
        self._free: list[dict] = []
        self.buf = self._new_buffers()
        self._pool = ThreadPoolExecutor(max_workers=1) if background else None
        self._pending: list[Future] = []
        self._flushes = 0
        self._failed = False
        # Test hooks: die like kill -9 after n committed shards; sleep before each shard write (kill trials).
        self._die_after = int(os.environ.get("DSKD_PIPE_TEST_DIE_AFTER_FLUSHES", "0") or 0)
        self._write_delay = float(os.environ.get("DSKD_PIPE_TEST_WRITE_DELAY_S", "0") or 0)

    def add(self, example_id: int, ids, prompt_len: int, offsets, hidden: torch.Tensor, topk_values=None,
            topk_indices=None, logsumexp=None) -> None:
        """Buffer one example: ids [L], offsets [L, 2], hidden [L, d] (+ top-k [L, k], logsumexp [L])."""
        if self.next >= len(self.entries) or self.entries[self.next][0] != example_id:
            want = self.entries[self.next][0] if self.next < len(self.entries) else None
            raise ValueError(f"{self.where}: example {example_id} added out of the plan's order (expected {want}).")
        n = len(ids)
        if n != self.entries[self.next][2] or hidden.shape != (n, self.m.d_model):
            raise ValueError(f"example {example_id}: hidden has shape {tuple(hidden.shape)}, the plan expects "
                             f"({self.entries[self.next][2]}, {self.m.d_model})")
        rows = {TOKENS: np.concatenate([np.asarray(ids, np.int32)[:, None],
                                        np.asarray(offsets, np.int32).reshape(n, 2)], axis=1)}
        if self.m.hidden_storage == "fp8":
            rows[HIDDEN], rows[HIDDEN_SCALE] = encode_fp8(hidden)
        else:
            rows[HIDDEN] = to_storage(hidden)
        if self.m.topk:
            rows[TOPK_VALUES] = to_storage(topk_values.float())
            rows[TOPK_INDICES] = to_storage(topk_indices.to(torch.int32))
            rows[LOGSUMEXP] = to_storage(logsumexp.float())
        skip, self.skip = self.skip, 0
        self.next += 1
        pos = skip
        while pos < n:
            take = min(n - pos, self.S - self.buf_rows)
            for name, r in rows.items():
                self.buf[name][self.buf_rows:self.buf_rows + take] = r[pos:pos + take]
            self.buf_rows += take
            pos += take
            if self.buf_rows == self.S:
                self._flush(final=False)

    def _new_buffers(self) -> dict:
        if self._free:
            return self._free.pop()
        return {name: np.empty((self.S,) + layout.shape[1:], layout.dtype) for name, layout in self.layouts.items()}

    def _flush(self, final: bool) -> None:
        """Hand the filled rows (a whole shard, or the last rows with `final`) to the write thread."""
        start, n = self.buf_start, self.buf_rows
        job = (start, start + n, self.buf, final)
        self.buf_start += n
        self.buf_rows = 0
        if self._pool is None:
            self._write(*job)
            self._free.append(job[2])
        else:
            self._raise_errors(block=len(self._pending) >= 2)  # bounded queue: at most 2 shards in flight
            self._pending.append(self._pool.submit(self._write, *job))
        self.buf = self._new_buffers()

    def _write(self, start: int, end: int, data: dict, final: bool) -> None:
        if self._failed:
            return
        row_bytes = sum(layout.row_bytes for layout in self.layouts.values())
        then = f"{RESUME}: rows up to {start} are kept"
        try:
            if self._write_delay:
                time.sleep(self._write_delay)
            if end > start:
                k = start // self.S
                for name, layout in self.layouts.items():
                    path = self.dir / name / shards.shard_key(k, len(layout.shape))
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _write(path, shards.encode_shard(data[name][:end - start], layout),
                           f"rows {start}..{end} of {self.where}", (self.total_rows - start) * row_bytes, then)
            _write(self.dir / PROGRESS, [(json.dumps({"rows": end, "complete": final}) + "\n").encode()],
                   f"the progress of {self.where}", 64, then)
        except BaseException:
            self._failed = True
            raise
        self._flushes += 1
        if self._pool is not None:
            self._free.append(data)  # recycled (list append and pop are atomic under the GIL)
        if self._die_after and self._flushes >= self._die_after:
            os._exit(137)  # test hook: die like kill -9 right after a committed shard

    def _raise_errors(self, block: bool) -> None:
        while self._pending and (block or self._pending[0].done()):
            self._pending.pop(0).result()
            block = False

    def close(self, complete: bool = True) -> None:
        """Write what is buffered; with `complete`, the last (partial) shard and the mark that the part is done.
        Without it, buffered rows short of a shard are dropped (recomputed on resume). Always releases the lock."""
        try:
            if self._failed:  # a write failed: keep the last good progress, write nothing more
                for f in self._pending:
                    f.exception()
                self._pending = []
            elif complete and not self.complete:
                if self.next < len(self.entries):
                    raise StoreError(f"{self.where}: closed with {len(self.entries) - self.next} example(s) of its "
                                     f"plan not written; {RESUME}.")
                self._flush(final=True)
            while self._pending:
                self._pending.pop(0).result()
            self.complete = self.complete or (complete and not self._failed)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            release_lock(self.lock)


# --- finishing -----------------------------------------------------------------------------------------------------

def metadata_files(root: Path) -> list[str]:
    """Every file of a store that is not an array shard, a lock, a temp file or manifest.json (relative paths)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if (p.is_file() and "/c/" not in f"/{rel}" and p.name not in (MANIFEST, LOCK, CREATE_LOCK, FINALIZE_LOCK)
                and not p.name.endswith(".tmp")):
            out.append(rel)
    return out


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def finalize_store(root: str | Path) -> Manifest | None:
    """If every part and the shared arrays are written, write the final manifest; idempotent.

    Returns the final manifest, or None while parts are still unfinished.
    """
    root = store_root(root) if isinstance(root, str) else root
    done = _finished_manifest(root)
    if done is not None:
        return done
    m = read_manifest_file(root / PARTIAL_MANIFEST)
    if m is None:
        raise StoreError(f"{root}: no store manifest; not a teacher-state store.")
    if not all(read_progress(root / part_name(i)).get("complete") for i in range(m.n_parts)):
        return None
    if not (root / SHARED).is_file():
        return None
    lock = root / FINALIZE_LOCK
    try:
        acquire_lock(lock, f"finalising {root}")
    except StoreError:
        return None  # another shard is finalising right now
    try:
        from dskd_pipe.cache.reader import read_index

        index = read_index(str(root))
        m.complete = True
        m.totals = {"examples": int(index.shape[0]), "tokens": int(index[:, 2].sum()), "bytes": _dir_bytes(root)}
        m.files = {rel: sha256_hex((root / rel).read_bytes()) for rel in metadata_files(root)}
        write_manifest(root / MANIFEST, m)
        return m
    finally:
        release_lock(lock)
