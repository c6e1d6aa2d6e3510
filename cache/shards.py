"""Sharded arrays on bytes: the Zarr v3 `sharding_indexed` format, written and read without Zarr's per-call cost.

A shard file of an array with layout (shard_rows S, chunk_rows c) holds its inner chunks in row order, each stored as
its raw (or compressed) bytes followed by their crc32c (little-endian uint32), then the index: S/c pairs of uint64
(offset, length) with 2^64-1 for an inner chunk that is not stored, and the index's own crc32c. That is exactly what
Zarr writes for `shards=(S, ...), chunks=(c, ...), compressors=[..., Crc32cCodec()]`, so any Zarr v3 reader opens it
(tests/cache/test_shards.py reads every layout back through zarr).

Reading rows [a, b) takes the shard's index (read once, cached, its crc32c checked), then the inner chunks' bytes:
- local shards as our writer lays them out (chunks back to back): the shard file is memory-mapped once per process,
  each inner chunk's crc32c is checked on the mapped bytes and its rows copied out right after, so a warm read
  costs a memmap's copy plus the crc (an `os.preadv` into the output ran ~1.5x slower warm: the kernel's per-page
  copy). A range not in the page cache is first queued whole (posix_fadvise WILLNEED), so a cold read is one large
  disk request instead of a fault every few pages.
- any other shard (an fsspec URL, a layout Zarr wrote): one positioned read per contiguous byte range (os.preadv
  into the output, edge-chunk bytes to a scratch buffer; `fs.cat_ranges` on fsspec), then the crc32c of each chunk.
Any damage raises a StoreError naming the store, the array, the shard and inner chunk, their rows and (through
`describe`) the examples in them.
"""
from __future__ import annotations

import mmap
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import crc32c as _crc32c
import numpy as np

from dskd_pipe.cache.format import ArrayLayout, StoreError
from dskd_pipe.cache.paths import leaves

MISSING = np.uint64(2**64 - 1)
_IOV_MAX = min(getattr(os, "IOV_MAX", 1024), 1024)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux >= 4.14: a read that fails rather than wait on the disk


# crc32c of a bytes-like object, continuing from a value (the crc of the bytes before it). The `crc32c` package runs
# at ~15 GB/s here (SSE4.2, three streams), google_crc32c (Zarr's) at ~4 GB/s: checking every read costs ~0.1 ms per
# MiB instead of ~0.25, against ~0.2 for the copy itself (BENCHMARKS.md, store reads).
crc32c = _crc32c.crc32c


def index_nbytes(layout: ArrayLayout) -> int:
    return 16 * layout.chunks_per_shard + 4


def shard_key(k: int, ndim: int) -> str:
    """Zarr's default chunk key of shard k of an array sharded along its first axis only."""
    return "c/" + "/".join([str(k)] + ["0"] * (ndim - 1))


# --- compression ---------------------------------------------------------------------------------------------------

def _codec(compression: str):
    import numcodecs

    if compression == "zstd":
        return numcodecs.Zstd(level=3)
    if compression == "blosc":  # measured best ratio for hidden states: zstd level 1, byte shuffle
        return numcodecs.Blosc(cname="zstd", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=0)
    raise StoreError(f"unknown compression '{compression}'; choose none, zstd or blosc.")


def zarr_codecs(compression: str) -> list:
    """The Zarr codecs that describe our inner chunks (written into zarr.json): compression, then crc32c."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if compression == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if compression == "blosc":
        return [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()]
    if compression != "none":
        raise StoreError(f"unknown compression '{compression}'; choose none, zstd or blosc.")
    return [Crc32cCodec()]


def layout_from_metadata(meta: dict, where: str) -> tuple[ArrayLayout, dict]:
    """(layout, attributes) of an array's zarr.json, refusing any codec chain this reader does not implement."""
    try:
        (sharding,) = meta["codecs"]
        cfg = sharding["configuration"]
        inner = [c["name"] for c in cfg["codecs"]]
        ok = (meta["zarr_format"] == 3 and sharding["name"] == "sharding_indexed"
              and cfg.get("index_location", "end") == "end"
              and [c["name"] for c in cfg["index_codecs"]] == ["bytes", "crc32c"]
              and inner[0] == "bytes" and inner[-1] == "crc32c" and len(inner) in (2, 3)
              and meta["chunk_key_encoding"]["configuration"]["separator"] == "/"
              and all(c.get("configuration", {}).get("endian", "little") == "little" for c in cfg["codecs"][:1]))
        shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
        chunk = cfg["chunk_shape"]
        shape = meta["shape"]
        ok = ok and list(shard[1:]) == list(shape[1:]) == list(chunk[1:]) and shard[0] % chunk[0] == 0
        compression = inner[1] if len(inner) == 3 else "none"
        if not ok or compression not in ("none", "zstd", "blosc"):
            raise ValueError("not the layout dskd-pipe writes")
        layout = ArrayLayout(tuple(int(s) for s in shape), str(np.dtype(meta["data_type"])), int(shard[0]),
                             int(chunk[0]), compression)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{where}: unexpected array metadata ({e}). Rebuild the store with this dskd-pipe.") from None
    return layout, meta.get("attributes", {})


# --- writing -------------------------------------------------------------------------------------------------------

def encode_shard(rows: np.ndarray, layout: ArrayLayout) -> list:
    """The bytes of one shard file holding `rows` (at most shard_rows; fewer only in the last shard), as a list of
    buffers for writev: inner chunks (an edge chunk zero-padded to full size, as Zarr stores it) each followed by its
    crc32c, then the index and its crc32c. Inner chunks past the rows are not stored (index 2^64-1)."""
    n, c = rows.shape[0], layout.chunk_rows
    rows = np.ascontiguousarray(rows, dtype=np.dtype(layout.dtype))
    index = np.full((layout.chunks_per_shard, 2), MISSING, dtype="<u8")
    codec = None if layout.compression == "none" else _codec(layout.compression)
    buffers, pos = [], 0
    for j in range(-(-n // c)):
        piece = rows[j * c:(j + 1) * c]
        if piece.shape[0] < c:
            piece = np.concatenate([piece, np.zeros((c - piece.shape[0],) + piece.shape[1:], piece.dtype)])
        data = memoryview(piece.reshape(-1).view(np.uint8)) if codec is None else codec.encode(piece)
        buffers += [data, crc32c(data).to_bytes(4, "little")]
        index[j] = (pos, len(data) + 4)
        pos += len(data) + 4
    ib = index.tobytes()
    buffers += [ib, crc32c(ib).to_bytes(4, "little")]
    return buffers


def disk_full_error(path: Path, need: int, what: str, then: str) -> StoreError:
    free = shutil.disk_usage(_existing_parent(path)).free
    return StoreError(f"{path}: no space left on the disk while writing {what}: it needs about {_mib(need)} more, "
                      f"{_mib(free)} are free. Free space, then {then}.")


def _existing_parent(path: Path) -> Path:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _mib(n: int) -> str:
    """A byte count for people: 3.2 GiB, 41.0 MiB, 12.5 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} bytes"


def write_file(path: Path, buffers: list, sync: bool = True) -> None:
    """Write `buffers` to `path` through a temp file + fsync + rename: readers and a resumed writer see the whole
    file or none of it, never part of one. OSError (a full disk) leaves no temp file behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        views = [memoryview(b).cast("B") for b in buffers]
        views = [v for v in views if len(v)]
        while views:
            done = _write(fd, views[:_IOV_MAX])
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if done:
                views[0] = views[0][done:]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def _write(fd: int, views: list) -> int:
    """One writev (a seam for tests that simulate a full disk)."""
    return os.writev(fd, views)


def remove_temp_files(folder: Path) -> None:
    """Temp files of writes that a kill cut short: never renamed, so never part of the store."""
    for p in Path(folder).rglob(".*.tmp"):
        p.unlink(missing_ok=True)


# --- reading -------------------------------------------------------------------------------------------------------

class LocalFiles:
    """Reads of local files: positioned reads through a small per-process cache of open descriptors, and read-only
    memory maps of whole shard files for warm reads."""

    local = True

    def __init__(self, root: str | None = None, max_open: int = 128, max_mapped: int = 1024):
        self.max_open, self.max_mapped = max_open, max_mapped
        self.root = root  # the store's folder: no file is read through a link that leaves it
        self._reset()

    def _reset(self) -> None:
        self._probe = bytearray(1)
        self.fds: OrderedDict[str, int] = OrderedDict()
        self.maps: OrderedDict[str, tuple] = OrderedDict()
        self.pid = os.getpid()

    def fd(self, path: str) -> int | None:
        if self.pid != os.getpid():  # a forked DataLoader worker: the parent's descriptors are not ours to reuse
            self._reset()
        fd = self.fds.get(path)
        if fd is None:
            if self.root is not None and os.path.lexists(path) and leaves(self.root, path):
                raise StoreError(f"{path}: a link to outside the store {self.root}. A store only holds its own "
                                 f"files: do not use it (dskd-pipe cache-verify {self.root} lists every such link).")
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            self.fds[path] = fd
            if len(self.fds) > self.max_open:
                os.close(self.fds.popitem(last=False)[1])
        else:
            self.fds.move_to_end(path)
        return fd

    def map(self, path: str) -> tuple[memoryview, np.ndarray]:
        """(memoryview, uint8 array) of the whole file, mapped read-only once per process. A store is immutable
        once finished; the index of a shard is read (and its bounds checked) before any of its bytes are touched."""
        m = self.maps.get(path)
        if m is None or self.pid != os.getpid():
            fd = self.fd(path)
            mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            m = self.maps[path] = (memoryview(mm), np.frombuffer(mm, np.uint8))
            if len(self.maps) > self.max_mapped:
                self.maps.popitem(last=False)  # unmapped when the last view of it goes
        else:
            self.maps.move_to_end(path)
        return m

    def unmap(self, path: str) -> None:
        self.maps.pop(path, None)  # unmapped when the last view of it goes

    def cached(self, path: str, offset: int) -> bool:
        """Whether the byte at `offset` is in the page cache (a read that may not wait): a range's pages come and
        go together, so its first byte stands for it."""
        if not _RWF_NOWAIT:
            return False
        try:
            return os.preadv(self.fd(path), [self._probe], offset, _RWF_NOWAIT) == 1
        except OSError:  # EAGAIN: not cached (or no RWF_NOWAIT on this filesystem)
            return False

    def willneed(self, path: str, offset: int, n: int) -> None:
        """Queue the whole range's disk reads at once (a mapped read would otherwise fault them in a few pages at
        a time, as a numpy memmap does)."""
        os.posix_fadvise(self.fd(path), offset, n, os.POSIX_FADV_WILLNEED)

    def size(self, path: str) -> int | None:
        fd = self.fd(path)
        return None if fd is None else os.fstat(fd).st_size

    def read(self, path: str, offset: int, n: int) -> bytes:
        return os.pread(self.fd(path), n, offset)

    def read_into(self, requests: list) -> list[int]:
        """requests: [(path, offset, [buffers])] -> bytes read for each (fewer than asked: the file is short)."""
        # Queue every range's disk reads before waiting on the first: a plain read of a range not in the page cache
        # is fetched one readahead window (128 KiB) at a time, one request in flight (bench/store_read.py: cold
        # reads 0.80 of a memmap without this, against 1.11 for the same bytes queued whole and read through a map).
        for path, offset, bufs in requests:
            self.willneed(path, offset, sum(len(b) for b in bufs))
        got = []
        for path, offset, bufs in requests:
            fd, total = self.fd(path), 0
            for k in range(0, len(bufs), _IOV_MAX):
                part = bufs[k:k + _IOV_MAX]
                n = os.preadv(fd, part, offset + total)
                total += n
                if n < sum(len(b) for b in part):
                    break
            got.append(total)
        return got

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.maps.clear()

    def __del__(self):
        try:
            if self.pid == os.getpid():
                self.close()
        except Exception:
            pass


class FsspecFiles:
    """The same reads on an fsspec filesystem (s3://, gs://, memory://, ...): byte ranges via cat_ranges."""

    local = False

    def __init__(self, fs):
        self.fs = fs

    def size(self, path: str) -> int | None:
        try:
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def read(self, path: str, offset: int, n: int) -> bytes:
        return self.fs.cat_file(path, start=offset, end=offset + n)

    def read_into(self, requests: list) -> list[int]:
        lens = [sum(len(b) for b in bufs) for _, _, bufs in requests]
        datas = self.fs.cat_ranges([p for p, _, _ in requests], [o for _, o, _ in requests],
                                   [o + n for (_, o, _), n in zip(requests, lens)], on_error="return")
        got = []
        for (path, _, bufs), data in zip(requests, datas):
            if isinstance(data, BaseException):
                if isinstance(data, FileNotFoundError):
                    got.append(0)
                    continue
                raise data
            pos = 0
            for b in bufs:
                piece = data[pos:pos + len(b)]
                b[:len(piece)] = piece
                pos += len(piece)
            got.append(pos)
        return got


class ShardedArray:
    """Rows of one stored array, read with the layout above; every inner chunk read is checked unless verify=False.

    describe(a, b) -> ", examples [..]" names what rows [a, b) hold, for error messages.
    """

    # Local rows not in the page cache are read with preadv (one disk request per range, no page faults) rather
    # than through the map; bench/store_read.py turns this off to compare.
    pread_cold = True

    def __init__(self, files, folder: str, layout: ArrayLayout, name: str, store: str, describe=None,
                 verify: bool = True):
        self.files, self.folder, self.layout, self.name, self.store = files, folder.rstrip("/"), layout, name, store
        self.describe = describe or (lambda a, b: "")
        self.verify = verify
        self._indexes: dict[int, np.ndarray] = {}
        self._dense_shards: dict[int, bool] = {}
        self._views: dict[int, tuple] = {}  # shard -> (pid, memoryview, [chunks, c, *tail] rows) of its mapped file
        tail = layout.shape[1:]
        self.tail, self.dtype = tuple(tail), np.dtype(layout.dtype)
        self._S, self._c, self._rb = layout.shard_rows, layout.chunk_rows, layout.row_bytes  # ints: read's hot path
        self._scratch = memoryview(bytearray(2 * layout.chunk_rows * layout.row_bytes))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def shard_path(self, k: int) -> str:
        return f"{self.folder}/{shard_key(k, len(self.layout.shape))}"

    def _where(self, k: int, j: int | None = None) -> str:
        L = self.layout
        if j is None:
            a, b = k * L.shard_rows, min(L.shape[0], (k + 1) * L.shard_rows)
            return f"{self.name} shard {k} ({self.shard_path(k)}, rows {a}..{b}{self.describe(a, b)})"
        a = k * L.shard_rows + j * L.chunk_rows
        b = min(L.shape[0], a + L.chunk_rows)
        return f"{self.name} shard {k} inner chunk {j} (rows {a}..{b}{self.describe(a, b)}, {self.shard_path(k)})"

    def error(self, k: int, j: int | None, what: str) -> StoreError:
        return StoreError(f"{self.store}: {self._where(k, j)} {what}. Run dskd-pipe cache-verify {self.store} to "
                          "list every damaged chunk, then rebuild the store.")

    def n_chunks_in(self, k: int) -> int:
        """Inner chunks of shard k that hold rows of the array (the rest of the index is empty)."""
        L = self.layout
        rows = min(L.shard_rows, L.shape[0] - k * L.shard_rows)
        return -(-rows // L.chunk_rows)

    def index(self, k: int) -> np.ndarray:
        """[chunks_per_shard, 2] uint64 (offset, length) of shard k, its crc32c and bounds checked."""
        idx = self._indexes.get(k)
        if idx is not None:
            return idx
        path, n_idx = self.shard_path(k), index_nbytes(self.layout)
        size = self.files.size(path)
        if size is None:
            raise self.error(k, None, "is missing (no shard file)")
        if size < n_idx:
            raise self.error(k, None, f"is truncated ({size} bytes, its index alone takes {n_idx})")
        raw = self.files.read(path, size - n_idx, n_idx)
        if crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise self.error(k, None, "has a damaged index (crc32c mismatch)")
        idx = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
        used = self.n_chunks_in(k)
        stored = idx[:used]
        if (stored[:, 0] == MISSING).any():
            j = int(np.nonzero(stored[:, 0] == MISSING)[0][0])
            raise self.error(k, j, "is missing from its shard index")
        if (stored[:, 0] + stored[:, 1] > size - n_idx).any():
            j = int(np.nonzero(stored[:, 0] + stored[:, 1] > size - n_idx)[0][0])
            raise self.error(k, j, f"lies past the end of its shard file ({size} bytes)")
        self._indexes[k] = idx
        return idx

    def _dense(self, k: int) -> bool:
        """Whether shard k stores its inner chunks back to back at full size, as our writer does: then a run of
        chunks is one byte range found by arithmetic (checked once against the index)."""
        dense = self._dense_shards.get(k)
        if dense is None:
            idx = self.index(k)[:self.n_chunks_in(k)]
            stored = self.layout.chunk_rows * self.layout.row_bytes + 4
            dense = self._dense_shards[k] = bool(
                (idx[:, 1] == stored).all() and (idx[:, 0] == np.arange(len(idx), dtype=np.uint64) * stored).all())
        return dense

    def release(self) -> None:
        """Unmap this array's shard files (they are mapped again if read again). For arrays read whole once, such as
        the teacher's head and embeddings: a file kept mapped after its bytes were copied out counts its pages in
        the process's resident memory a second time (+0.94 GB peak RSS for a 152k x 768 fp32 head and embedding
        table, bench/distill_offline_vs_online.py)."""
        for k in list(self._views):
            self.files.unmap(self.shard_path(k))
        self._views.clear()

    def prefetch(self, a: int, b: int) -> None:
        """Queue the disk reads of rows [a, b) without waiting for them (posix_fadvise WILLNEED of each shard's byte
        range), so that the reads of several examples are in flight at once; a later read finds them in the page
        cache or on their way. Local dense shards only (the layout our writer makes): elsewhere nothing is done."""
        if b <= a or not self.files.local or self.layout.compression != "none":
            return
        stored = self._c * self._rb + 4
        for k, _, _, j0, j1 in self._segments(a, b):
            if self._dense(k):
                self.files.willneed(self.shard_path(k), j0 * stored, (j1 - j0 + 1) * stored)

    def _segments(self, a: int, b: int) -> list[tuple[int, int, int, int, int]]:
        """(shard k, its first and end row wanted, its first and last inner chunk touched) for each shard that rows
        [a, b) touch (rows counted within the shard)."""
        S, c = self._S, self._c
        out = []
        for k in range(a // S, (b - 1) // S + 1):
            lo, hi = max(a, k * S) - k * S, min(b, (k + 1) * S) - k * S
            out.append((k, lo, hi, lo // c, (hi - 1) // c))
        return out

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b) as a numpy array, every inner chunk touched checked (crc32c) unless verify is off."""
        L = self.layout
        out = np.empty((b - a,) + self.tail, dtype=self.dtype)
        if b <= a:
            return out
        if not 0 <= a < b <= L.shape[0]:
            raise IndexError(f"{self.name}: rows {a}..{b} outside 0..{L.shape[0]}")
        if L.compression != "none":
            return self._read_compressed(a, b, out)
        S, c, rb = self._S, self._c, self._rb
        cb, stored = c * rb, c * rb + 4
        segments = self._segments(a, b)
        if self.files.local and all(self._dense(k) for k, *_ in segments):
            warm = all(self.files.cached(self.shard_path(k), j0 * stored) for k, _, _, j0, _ in segments)
            if warm or not self.pread_cold:
                return self._read_mapped(a, segments, out)
        ob = memoryview(out.reshape(-1).view(np.uint8))
        scratch = self._scratch
        requests, checks = [], []
        for k, lo_row, hi_row, j0, j1 in segments:  # rows of shard k wanted, its inner chunks touched
            n = j1 - j0 + 1
            crcs = memoryview(bytearray(4 * n))
            bufs = []
            base = (k * S - a) * rb  # byte of `out` where shard k's row 0 would go
            for m, j in enumerate(range(j0, j1 + 1)):
                lo, hi = max(lo_row, j * c) - j * c, min(hi_row, (j + 1) * c) - j * c
                pieces = [ob[base + (j * c + lo) * rb:base + (j * c + hi) * rb]]
                if lo:
                    pieces.insert(0, scratch[:lo * rb])
                if hi < c:
                    pieces.append(scratch[cb + hi * rb:2 * cb])
                slot = crcs[4 * m:4 * m + 4]
                bufs += pieces
                bufs.append(slot)
                checks.append((k, j, pieces, slot))
            if self._dense(k):
                requests.append((self.shard_path(k), j0 * stored, bufs, k, j0))
            else:  # any valid Zarr shard: one range per inner chunk, where its index says
                idx = self.index(k)
                pos = 0
                for m, j in enumerate(range(j0, j1 + 1)):
                    if int(idx[j, 1]) != stored:
                        raise self.error(k, j, f"has {int(idx[j, 1])} bytes, expected {stored}")
                    width = len(checks[len(checks) - n + m][2]) + 1
                    requests.append((self.shard_path(k), int(idx[j, 0]), bufs[pos:pos + width], k, j))
                    pos += width
        got = self.files.read_into([(p, o, bb) for p, o, bb, _, _ in requests])
        for (path, off, bufs, k, j), n in zip(requests, got):
            want = sum(len(x) for x in bufs)
            if n != want:
                bad = j + (n // stored)  # the first inner chunk of the range that came back short
                raise self.error(k, bad, f"is cut short: the shard file ends inside it (read {n} of {want} bytes "
                                         f"from offset {off})")
        if self.verify:
            for k, j, pieces, slot in checks:
                crc = crc32c(pieces[0])
                for p in pieces[1:]:
                    crc = crc32c(p, crc)
                if crc != int.from_bytes(slot, "little"):
                    raise self.error(k, j, "is corrupt (crc32c mismatch)")
        return out

    def _mapped_rows(self, k: int) -> tuple[memoryview, np.ndarray]:
        """(memoryview of shard k's mapped file, its rows as a [chunks, c, *tail] view), once per process."""
        v = self._views.get(k)
        if v is None or v[0] != os.getpid():
            mv, raw = self.files.map(self.shard_path(k))
            n, stored, cb = self.n_chunks_in(k), self._c * self._rb + 4, self._c * self._rb
            rows = raw[:n * stored].reshape(n, stored)[:, :cb].view(self.dtype).reshape((n, self._c) + self.tail)
            v = self._views[k] = (os.getpid(), mv, rows)
        return v[1], v[2]

    def _read_mapped(self, a: int, segments: list, out: np.ndarray) -> np.ndarray:
        """Local, uncompressed, dense shards in the page cache: rows copied from the mapped file. Checked, each inner
        chunk's crc32c is computed on the mapped bytes and the chunk copied right after, while its bytes (128 KiB at
        d 2048) are still in the core's cache: the check reads them once from memory, the copy again from cache
        (0.52 -> 0.59 of a memmap, warm; BENCHMARKS.md). Unchecked, one numpy assignment per run of whole chunks.
        (With pread_cold off, a range not in the page cache is first queued whole.) `segments`: _segments(a, b)."""
        S, c, rb = self._S, self._c, self._rb
        cb, stored = c * rb, c * rb + 4
        for k, lo, hi, j0, j1 in segments:
            path = self.shard_path(k)
            if not self.pread_cold and not self.files.cached(path, j0 * stored):
                self.files.willneed(path, j0 * stored, (j1 - j0 + 1) * stored)
        for k, lo, hi, j0, j1 in segments:
            mv, rows = self._mapped_rows(k)
            base = k * S - a  # row of `out` where shard k's row 0 would go
            if self.verify:
                for j in range(j0, j1 + 1):
                    o = j * stored
                    if crc32c(mv[o:o + cb]) != int.from_bytes(mv[o + cb:o + stored], "little"):
                        raise self.error(k, j, "is corrupt (crc32c mismatch)")
                    r0, r1 = max(lo, j * c), min(hi, (j + 1) * c)
                    out[base + r0:base + r1] = rows[j, r0 - j * c:r1 - j * c]
                continue
            r = lo
            if lo % c:  # the first chunk, entered part-way
                r = min(hi, (j0 + 1) * c)
                out[base + lo:base + r] = rows[j0, lo - j0 * c:r - j0 * c]
            f1 = hi // c
            if r < f1 * c:  # whole chunks: one strided copy
                out[base + r:base + f1 * c].reshape((f1 - r // c, c) + self.tail)[...] = rows[r // c:f1]
                r = f1 * c
            if r < hi:  # the last chunk, left part-way
                out[base + r:base + hi] = rows[r // c, :hi - r]
        return out

    def _chunk_bytes(self, k: int, j: int) -> bytes:
        idx = self.index(k)
        off, length = int(idx[j, 0]), int(idx[j, 1])
        data = self.files.read(self.shard_path(k), off, length)
        if len(data) != length:
            raise self.error(k, j, f"is cut short: the shard file ends inside it ({len(data)} of {length} bytes)")
        if self.verify and crc32c(memoryview(data)[:-4]) != int.from_bytes(data[-4:], "little"):
            raise self.error(k, j, "is corrupt (crc32c mismatch)")
        return data

    def _decode(self, k: int, j: int, data: bytes) -> np.ndarray:
        L = self.layout
        try:
            raw = _codec(L.compression).decode(memoryview(data)[:-4]) if L.compression != "none" else data[:-4]
            rows = np.frombuffer(raw, dtype=self.dtype).reshape((L.chunk_rows,) + self.tail)
        except Exception as e:  # a codec error or a wrong size: the chunk is damaged either way
            raise self.error(k, j, f"cannot be decoded ({type(e).__name__}: {str(e)[:80]})") from None
        return rows

    def _read_compressed(self, a: int, b: int, out: np.ndarray) -> np.ndarray:
        L = self.layout
        S, c = L.shard_rows, L.chunk_rows
        for k in range(a // S, (b - 1) // S + 1):
            for j in range((max(a, k * S) - k * S) // c, (min(b, (k + 1) * S) - 1 - k * S) // c + 1):
                r0 = k * S + j * c
                lo, hi = max(a, r0), min(b, r0 + c)
                out[lo - a:hi - a] = self._decode(k, j, self._chunk_bytes(k, j))[lo - r0:hi - r0]
        return out

    def check(self) -> list[str]:
        """Every stored byte of the array: each shard's index and each inner chunk (crc32c, size, decoding).
        Returns one line per problem; reads a shard at a time."""
        problems = []
        verify, self.verify = self.verify, True
        try:
            for k in range(self.layout.n_shards):
                try:
                    self.index(k)
                except StoreError as e:
                    problems.append(_problem(e, self.store))
                    continue
                for j in range(self.n_chunks_in(k)):
                    try:
                        self._decode(k, j, self._chunk_bytes(k, j))
                    except StoreError as e:
                        problems.append(_problem(e, self.store))
        finally:
            self.verify = verify
        return problems


def _problem(e: StoreError, store: str) -> str:
    """A read error as one line of a cache-verify report (store prefix and the advice left out)."""
    text = str(e).removeprefix(f"{store}: ")
    return text.split(". Run dskd-pipe cache-verify")[0]
