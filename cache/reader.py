"""Reading a finished teacher-state store: read-only, version and fingerprints checked, record i on demand.

Memory: the index (4 int64 per example) is loaded at open; each part's `tokens` (12 bytes per token) and texts are
loaded on the first read from that part, i.e. about 0.3% of the hidden bytes at d=2048 bf16. Hidden rows of one
example are one read: a direct read of the covering chunk files for local uncompressed stores (Zarr's per-call
overhead, ~1 ms, dominates warm reads: spec/store_measurements.md), else one Zarr slice.
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

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def from_storage(arr: np.ndarray, logical: str) -> torch.Tensor:
    """The stored numpy array as a tensor of its logical dtype (bf16 from uint16 raw bits, zero-copy)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if logical == "bfloat16":
        return t.view(torch.int16).view(torch.bfloat16) if t.dtype != torch.int16 else t.view(torch.bfloat16)
    return t


def logits_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       logit_scale: float = 1.0, final_logit_softcap: float | None = None) -> torch.Tensor:
    """z = (h W^T + b) * logit_scale, then softcap * tanh(z / softcap): the teacher's logits from its hidden state."""
    z = hidden @ weight.T  # [T, V]
    if bias is not None:
        z = z + bias
    if logit_scale != 1.0:
        z = z * logit_scale
    if final_logit_softcap:
        z = torch.tanh(z / final_logit_softcap) * final_logit_softcap
    return z


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


def open_store(path_or_url: str, expected: dict | None = None) -> "StoreReader":
    """Open a finished store read-only; `expected` fingerprints (see format.check_compatible) must match."""
    reader = StoreReader(str(path_or_url))
    if expected:
        check_compatible(reader.manifest, expected, store=str(path_or_url))
    return reader


class StoreReader:
    """Record i of a store as numpy arrays / tensors. Picklable: each process opens its own handles lazily."""

    def __init__(self, url: str):
        self.url = url
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
                # Direct chunk reads need a local folder and no compression (then a chunk = raw bytes + crc32c).
                "direct": (getattr(fs, "protocol", None) in ("file", ("file", "local"))
                           or "file" in getattr(fs, "protocol", ())) and self.manifest.compression == "none",
            }
        return self._handles

    def _part(self, p: int) -> dict:
        h = self._h()
        if p not in h["parts"]:
            g = h["group"][part_name(p)]
            texts = [json.loads(line) for line in h["fs"].cat(_join(h["root"], part_name(p), EXAMPLES)).splitlines()]
            h["parts"][p] = {
                "group": g, "hidden": g[HIDDEN], "tokens": np.asarray(g[TOKENS][:]),
                "texts": {e["token_start"]: (e["prompt"], e["response"]) for e in texts},
                "dir": _join(h["root"], part_name(p), HIDDEN, "c"),
                "name": part_name(p),
            }
        return h["parts"][p]

    def __len__(self) -> int:
        return self.manifest.totals["examples"]

    def locate(self, i: int) -> tuple[int, int, int, int]:
        """(part, token_start, n_tokens, prompt_len) of example i."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range: {self.url} holds {len(self)} examples.")
        idx = self._h()["index"]
        return tuple(int(idx[name][i]) for name in INDEX_FIELDS)

    def _hidden_rows(self, part: dict, start: int, n: int) -> np.ndarray:
        if not self._h()["direct"]:
            return np.asarray(part["hidden"][start:start + n])
        c, d = self.manifest.chunk_tokens, self.manifest.d_model
        dtype = np.dtype(self.manifest.storage_dtype)
        row_bytes = d * dtype.itemsize
        chunk_bytes = c * row_bytes  # an edge chunk is still stored at full size
        out = np.empty((n, d), dtype=dtype)
        out_bytes = memoryview(out.reshape(-1).view(np.uint8))
        tail = bytearray(4)
        for chunk in range(start // c, (start + n - 1) // c + 1):
            a, b = max(start, chunk * c), min(start + n, (chunk + 1) * c)  # rows of this example in the chunk
            path = f"{part['dir']}/{chunk}/0"
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise StoreError(f"{self.url}: chunk file {path} is missing. Run dskd-pipe cache-verify.") from None
            try:
                if b - a == c:  # fully covered: read straight into the output, one copy like a memmap slice
                    data = out_bytes[(a - start) * row_bytes:(b - start) * row_bytes]
                    got = os.preadv(fd, [data, tail], 0)
                else:  # partly covered: the checksum needs the whole chunk
                    if part.get("buf") is None:
                        part["buf"] = bytearray(chunk_bytes)
                    data = memoryview(part["buf"])
                    got = os.preadv(fd, [data, tail], 0)
            finally:
                os.close(fd)
            if got != chunk_bytes + 4 or google_crc32c.value(np.frombuffer(data, np.uint8)) != int.from_bytes(tail, "little"):
                raise StoreError(f"{self.url}: {part['name']}/hidden chunk {chunk} ({path}) is corrupt "
                                 "(crc32c mismatch). Run dskd-pipe cache-verify, then rebuild the store.")
            if b - a != c:
                rows = np.frombuffer(part["buf"], dtype=dtype).reshape(c, d)
                out[a - start:b - start] = rows[a - chunk * c:b - chunk * c]
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
            "hidden": from_storage(self._hidden_rows(part, start, n), self.logical_dtype),
            "prompt": prompt, "response": response,
        }
        if self.manifest.topk:
            g = part["group"]
            rec["topk_values"] = np.asarray(g[TOPK_VALUES][start:start + n])
            rec["topk_indices"] = np.asarray(g[TOPK_INDICES][start:start + n]).astype(np.int64)
            rec["logsumexp"] = np.asarray(g[LOGSUMEXP][start:start + n])
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
