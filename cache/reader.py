"""Reading a finished teacher-state store: read-only, version and fingerprints checked, record i on demand.

Memory: the index (4 int64 per example) is loaded at open; each part's `tokens` (12 bytes per token) and texts are
loaded on the first read from that part, i.e. about 0.3% of the hidden bytes at d=2048 bf16. Hidden rows of one
example are one read: on local stores, uncompressed arrays are read from their chunk files directly, one pread per
chunk straight into the output, crc32c verified (Zarr's per-call overhead, ~1 ms, dominates warm reads:
spec/store_measurements.md); otherwise one Zarr slice. The tokens of a part load in one pass of the same kind.
"""
from __future__ import annotations

import json
import os
import warnings

import fsspec
import google_crc32c
import numpy as np
import torch
import zarr

from dskd_pipe.cache.format import (EXAMPLES, HIDDEN, INDEX_FIELDS, LOGSUMEXP, MANIFEST, PARTIAL_MANIFEST,
                                    TOKENIZER_GROUP, TOKENS, TOPK_INDICES, TOPK_VALUES, Manifest, StoreError,
                                    check_compatible, part_name)

_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux >= 4.14: a read that fails rather than wait on the disk
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def from_storage(arr: np.ndarray, logical: str) -> torch.Tensor:
    """The stored numpy array as a tensor of its logical dtype (bf16 from uint16 raw bits, zero-copy)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if logical == "bfloat16":
        return t.view(torch.int16).view(torch.bfloat16) if t.dtype != torch.int16 else t.view(torch.bfloat16)
    return t


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def read_manifest(url: str) -> Manifest:
    """The finished manifest of a store, or StoreError saying why there is none."""
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(_join(root, MANIFEST)):
        m = Manifest.from_dict(json.loads(fs.cat(_join(root, MANIFEST))), where=_join(url, MANIFEST))
        if m.complete:
            return m
    if fs.exists(_join(root, PARTIAL_MANIFEST)):
        raise StoreError(f"{url}: unfinished store: run the same cache-teacher command again to finish it.")
    if not fs.exists(root):
        raise StoreError(f"{url}: no such store. Build it with dskd-pipe cache-teacher.")
    raise StoreError(f"{url}: not a teacher-state store (no {MANIFEST}).")


def open_store(path_or_url: str, expected: dict | None = None, verify: bool = True) -> "StoreReader":
    """Open a finished store read-only; `expected` fingerprints (see format.check_compatible) must match.

    `verify=False` skips the crc32c check of each read on local stores (about 10-20% of a warm read's time).
    """
    reader = StoreReader(str(path_or_url), verify=verify)
    if expected:
        check_compatible(reader.manifest, expected, store=str(path_or_url))
    return reader


class StoreReader:
    """Record i of a store as numpy arrays / tensors. Picklable: each process opens its own handles lazily."""

    def __init__(self, url: str, verify: bool = True):
        self.url = url
        self.verify = verify  # False skips the per-read crc32c of direct reads (cache-verify still checks all)
        self.prefetch = True  # queue all chunk reads of a cold example at once (see _rows)
        self.manifest = read_manifest(url)
        self.logical_dtype = self.manifest.hidden_dtype
        self._handles = None

    # -- lazily opened, per process --
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = None
        return state

    def _h(self) -> dict:
        if self._handles is None or self._handles["pid"] != os.getpid():
            group = zarr.open_group(self.url, mode="r")
            index = group["index"]
            fs, root = fsspec.core.url_to_fs(self.url)
            self._handles = {
                "pid": os.getpid(), "group": group, "fs": fs, "root": root,
                "index": {name: np.asarray(index[name][:]) for name in INDEX_FIELDS},
                "parts": {},
                # Direct chunk reads need a local folder (then an uncompressed chunk = raw bytes + crc32c).
                "direct": (getattr(fs, "protocol", None) in ("file", ("file", "local"))
                           or "file" in getattr(fs, "protocol", ())),
                "verify": self.verify,
            }
        return self._handles

    def _part(self, p: int) -> dict:
        h = self._h()
        if p not in h["parts"]:
            g = h["group"][part_name(p)]
            texts = [json.loads(line) for line in h["fs"].cat(_join(h["root"], part_name(p), EXAMPLES)).splitlines()]
            part = h["parts"][p] = {
                "group": g, "name": part_name(p), "root": _join(h["root"], part_name(p)), "scratch": {},
                "texts": {e["token_start"]: (e["prompt"], e["response"]) for e in texts},
            }
            tokens = g[TOKENS]
            # One bulk load: through Zarr this costs ~0.1 ms a chunk, i.e. seconds for small chunks.
            part["tokens"] = self._rows(part, TOKENS, 0, tokens.shape[0]) if tokens.shape[0] else np.asarray(tokens[:])
        return h["parts"][p]

    def __len__(self) -> int:
        return self.manifest.totals["examples"]

    def locate(self, i: int) -> tuple[int, int, int, int]:
        """(part, token_start, n_tokens, prompt_len) of example i."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range: {self.url} holds {len(self)} examples.")
        idx = self._h()["index"]
        return tuple(int(idx[name][i]) for name in INDEX_FIELDS)

    def _is_direct(self, name: str) -> bool:
        # Compression applies to hidden and topk_values only (writer.PartWriter._open); the rest is always raw.
        return self._h()["direct"] and (self.manifest.compression == "none" or name not in (HIDDEN, TOPK_VALUES))

    def _rows(self, part: dict, name: str, start: int, n: int) -> np.ndarray:
        """Rows [start, start + n) of array `name` of a part, checksums verified.

        Direct path: one pread per chunk file straight into the output (rows of an edge chunk that the example does
        not cover go to a scratch buffer; the crc32c is extended over the pieces in order), so each byte is copied
        once, as with a memmap slice. All chunk files of the call are opened and their reads queued first
        (POSIX_FADV_WILLNEED), so cold reads of small chunks overlap instead of waiting one by one.
        """
        if not self._is_direct(name):
            return np.asarray(part["group"][name][start:start + n])
        layout = part.get(name)
        if layout is None:
            arr = part["group"][name]
            tail, dtype = tuple(arr.shape[1:]), np.dtype(arr.dtype)
            row_bytes = int(np.prod(tail, dtype=np.int64)) * dtype.itemsize
            suffix = "/0" * len(tail)  # chunk key c/<i>/0 for [N, d] arrays, c/<i> for [N]
            layout = part[name] = (tail, dtype, row_bytes, f"{part['root']}/{name}/c", suffix)
        tail, dtype, row_bytes, cdir, suffix = layout
        c = self.manifest.chunk_tokens
        chunk_bytes = c * row_bytes  # an edge chunk is still stored at full size
        out = np.empty((n,) + tail, dtype=dtype)
        if n == 0:
            return out
        out_bytes = memoryview(out.reshape(-1).view(np.uint8))
        scratch = part["scratch"].get(chunk_bytes)
        if scratch is None:
            scratch = part["scratch"][chunk_bytes] = memoryview(bytearray(chunk_bytes + 4))
        crc_tail = scratch[chunk_bytes:]
        verify = self._h()["verify"]
        first, last = start // c, (start + n - 1) // c
        fds = []
        try:
            for chunk in range(first, last + 1):
                try:
                    fds.append(os.open(f"{cdir}/{chunk}{suffix}", os.O_RDONLY))
                except FileNotFoundError:
                    raise StoreError(f"{self.url}: chunk file {cdir}/{chunk}{suffix} is missing. Run dskd-pipe "
                                     "cache-verify.") from None
            # Cold reads of small chunks one by one wait on the disk each time; if the first chunk is not all in the
            # page cache (a non-blocking read comes back short), queue every chunk's read at once so they overlap.
            # Warm reads skip the fadvise calls (~5 us each, ~10% of a warm read).
            queued = last == first or not self.prefetch
            for fd, chunk in zip(fds, range(first, last + 1)):
                a, b = max(start, chunk * c), min(start + n, (chunk + 1) * c)  # rows of this example in the chunk
                lo, hi = (a - chunk * c) * row_bytes, (b - chunk * c) * row_bytes  # their bytes in the chunk
                bufs = ([scratch[:lo]] if lo else []) + [out_bytes[(a - start) * row_bytes:(b - start) * row_bytes]]
                if hi < chunk_bytes:
                    bufs.append(scratch[hi:chunk_bytes])
                bufs.append(crc_tail)
                got = -1
                if not queued:
                    queued = True
                    try:
                        got = os.preadv(fd, bufs, 0, _RWF_NOWAIT)
                    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: no RWF_NOWAIT here
                        pass
                    if got != chunk_bytes + 4:
                        for f in fds:
                            os.posix_fadvise(f, 0, 0, os.POSIX_FADV_WILLNEED)
                        got = -1
                if got < 0:
                    got = os.preadv(fd, bufs, 0)
                path = f"{cdir}/{chunk}{suffix}"
                if got != chunk_bytes + 4:
                    raise StoreError(f"{self.url}: {part['name']}/{name} chunk {chunk} ({path}) has {got} bytes, "
                                     f"expected {chunk_bytes + 4}. Run dskd-pipe cache-verify, then rebuild the store.")
                if verify:
                    crc = 0
                    for buf in bufs[:-1]:
                        crc = google_crc32c.extend(crc, np.frombuffer(buf, np.uint8))  # it takes no memoryview
                    if crc != int.from_bytes(crc_tail, "little"):
                        raise StoreError(f"{self.url}: {part['name']}/{name} chunk {chunk} ({path}) is corrupt "
                                         "(crc32c mismatch). Run dskd-pipe cache-verify, then rebuild the store.")
        finally:
            for fd in fds:
                os.close(fd)
        return out

    def read(self, i: int) -> dict:
        """Example i: ids [T] int64, prompt_len, offsets [T, 2] int64, hidden [T, d] tensor (logical dtype),
        prompt, response, and with top-k: topk_values [T, k] float32, topk_indices [T, k] int64, logsumexp [T]."""
        p, start, n, prompt_len = self.locate(i)
        part = self._part(p)
        tokens = part["tokens"][start:start + n].astype(np.int64)  # [T, 3]
        prompt, response = part["texts"][start]
        rec = {
            "example_id": i, "ids": tokens[:, 0], "prompt_len": prompt_len, "offsets": tokens[:, 1:],
            "hidden": from_storage(self._rows(part, HIDDEN, start, n), self.logical_dtype),
            "prompt": prompt, "response": response,
        }
        if self.manifest.topk:
            rec["topk_values"] = self._rows(part, TOPK_VALUES, start, n)
            rec["topk_indices"] = self._rows(part, TOPK_INDICES, start, n).astype(np.int64)
            rec["logsumexp"] = self._rows(part, LOGSUMEXP, start, n)
        return rec

    def read_many(self, indices) -> list[dict]:
        return [self.read(int(i)) for i in indices]

    def _tensor(self, arr) -> torch.Tensor:
        return from_storage(np.asarray(arr[...]), arr.attrs.get("dtype", "float32"))

    def head(self) -> dict:
        """{"weight": [V, d], "bias": [V] or None, "logit_scale", "final_logit_softcap"} in the teacher's dtype."""
        g = self._h()["group"]["head"]
        return {"weight": self._tensor(g["weight"]), "bias": self._tensor(g["bias"]) if "bias" in g else None,
                "logit_scale": g.attrs["logit_scale"], "final_logit_softcap": g.attrs["final_logit_softcap"]}

    def embeddings(self) -> dict:
        """{"weight": [V, d] input embedding table, "embed_scale": float}."""
        g = self._h()["group"]["embed"]
        return {"weight": self._tensor(g["weight"]), "embed_scale": g.attrs["embed_scale"]}

    def tokenizer_files(self) -> dict[str, bytes]:
        g = self._h()["group"][TOKENIZER_GROUP]
        with warnings.catch_warnings():  # zarr warns about the store's JSON side files
            warnings.simplefilter("ignore")
            arrays = list(g.arrays())
        return {name: np.asarray(arr[...]).tobytes() for name, arr in arrays}

    def tokenizer(self):
        """The teacher's tokenizer rebuilt from the stored files (no teacher download needed)."""
        import tempfile

        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name, data in self.tokenizer_files().items():
                if name != "teacher_config.json":
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(data)
            return AutoTokenizer.from_pretrained(tmp)

    def teacher_config(self) -> dict:
        return json.loads(self.tokenizer_files()["teacher_config.json"])
