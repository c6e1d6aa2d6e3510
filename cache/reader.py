"""Reading a finished teacher-state store: read-only, version, fingerprints and checksums checked, record i on demand.

Every array is read through cache/shards.py: the shard index once, then one positioned read per contiguous byte
range (os.preadv into the output on a local disk, fs.cat_ranges on an fsspec URL), the crc32c of every inner chunk
checked; metadata files are checked against the sha256 the final manifest lists. So every byte a student trains on
(hidden rows, ids, offsets, texts, head, embeddings, tokenizer) is checked, and any damage is a StoreError naming the
store, the array, the chunk, its rows and the examples in them.

Memory: the index (6 int64 per example) is loaded at open; each part's `tokens` (12 bytes per token) on the first
read from that part, the texts on the first read; about 0.3% of the hidden bytes at d=2048 bf16.
"""
from __future__ import annotations

import bisect
import json
import os

import numpy as np
import torch

from dskd_pipe.cache.format import (EMBED_GROUP, HEAD_GROUP, HIDDEN, HIDDEN_SCALE, INDEX, INDEX_FIELDS,
                                    LOGSUMEXP, MANIFEST, PARTIAL_MANIFEST, TEXTS, TOKENIZER_GROUP, TOKENS,
                                    TOPK_INDICES, TOPK_VALUES, Manifest, StoreError, check_compatible, part_name,
                                    sha256_hex)
from dskd_pipe.cache.paths import bad_name, leaves
from dskd_pipe.cache.remote import filesystem
from dskd_pipe.cache.shards import FsspecFiles, LocalFiles, ShardedArray, layout_from_metadata


_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def from_storage(arr: np.ndarray, logical: str) -> torch.Tensor:
    """The stored numpy array as a tensor of its logical dtype (bf16 from uint16 raw bits, zero-copy)."""
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if logical == "bfloat16":
        return t.view(torch.int16).view(torch.bfloat16) if t.dtype != torch.int16 else t.view(torch.bfloat16)
    return t


def decode_fp8(bits: np.ndarray, scale: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Hidden states [L, d] of `dtype` from float8 e4m3 bits [L, d] (uint8) and a scale per token [L] (float32):
    h = q * s in fp32, then the teacher's dtype (see cache.writer.encode_fp8)."""
    q = torch.from_numpy(np.ascontiguousarray(bits)).view(torch.float8_e4m3fn).float()  # [L, d]
    s = torch.from_numpy(np.asarray(scale, dtype=np.float32))  # [L]
    return (q * s[:, None]).to(dtype)


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _is_local(fs) -> bool:
    protocol = getattr(fs, "protocol", ())
    return "file" in ((protocol,) if isinstance(protocol, str) else protocol)


def damaged_manifest_help(url: str) -> str:
    return (f"Run the same cache-teacher command again: it checks the parts and writes {MANIFEST} anew (or build a "
            "new store).")


def read_manifest(url: str) -> Manifest:
    """The finished manifest of a store, or StoreError saying why there is none and what to do."""
    fs, root = filesystem(url)
    if _is_local(fs) and os.path.isfile(root):
        raise StoreError(f"{url}: a file, not a store (a store is a folder holding {MANIFEST}). Pass the store's "
                         "folder.")
    try:
        data = fs.cat(_join(root, MANIFEST))
    except FileNotFoundError:
        data = None
    if data is not None:
        try:
            m = Manifest.from_json(data, where=_join(url, MANIFEST))
        except StoreError as e:
            raise StoreError(f"{e} {damaged_manifest_help(url)}") from None
        if m.complete:
            return m
    if fs.exists(_join(root, PARTIAL_MANIFEST)):
        raise StoreError(f"{url}: unfinished store: run the same cache-teacher command again to finish it "
                         "(dskd-pipe cache-info shows its progress).")
    if not fs.exists(root):
        raise StoreError(f"{url}: no such store. Build it with dskd-pipe cache-teacher.")
    raise StoreError(f"{url}: not a teacher-state store (no {MANIFEST}).")


def open_store(path_or_url: str, expected: dict | None = None, verify: bool = True) -> "StoreReader":
    """Open a finished store read-only; `expected` fingerprints (see format.check_compatible) must match.

    `verify=False` skips the crc32c check of each read (cache-verify still checks everything).
    """
    reader = StoreReader(str(path_or_url), verify=verify)
    if expected:
        check_compatible(reader.manifest, expected, store=str(path_or_url))
    return reader


class StoreFiles:
    """The arrays of one store (finished or not) as ShardedArrays; metadata checked against `sha256` when given."""

    def __init__(self, url: str, sha256: dict | None = None, verify: bool = True):
        self.url = url
        self.fs, self.root = filesystem(url)
        self.files = LocalFiles(self.root) if _is_local(self.fs) else FsspecFiles(self.fs)
        self.sha256 = sha256
        self.verify = verify

    def metadata(self, rel: str) -> dict:
        """A JSON metadata file of the store (zarr.json, ...), its sha256 checked against the manifest."""
        where = _join(self.url, rel)
        self.check_inside(rel)
        try:
            data = self.fs.cat(_join(self.root, rel))
        except FileNotFoundError:
            raise StoreError(f"{where} is missing. Run dskd-pipe cache-verify {self.url}, then rebuild the "
                             "store.") from None
        if self.sha256 is not None:
            want = self.sha256.get(rel)
            if want is None or sha256_hex(data) != want:
                what = "is not listed in the manifest" if want is None else "is damaged (sha256 mismatch)"
                raise StoreError(f"{where} {what}. Run dskd-pipe cache-verify {self.url}, then rebuild the store.")
        try:
            return json.loads(data)
        except ValueError as e:
            raise StoreError(f"{where} is damaged (not JSON: {str(e)[:60]}). Rebuild the store.") from None

    def check_inside(self, rel: str) -> None:
        """StoreError unless `rel`, a path the store names, stays inside the store (and, on a local disk, is no link
        out of it)."""
        why = bad_name(rel)
        if why is None and _is_local(self.fs) and leaves(self.root, _join(self.root, rel)):
            why = "a link to outside the store"
        if why is not None:
            raise StoreError(f"{self.url}: the store names {rel!r}, {why}: a store only names its own files. "
                             f"Do not use this store (dskd-pipe cache-verify {self.url} lists every such path).")

    def array(self, rel: str, describe=None) -> tuple[ShardedArray, dict]:
        layout, attrs = layout_from_metadata(self.metadata(f"{rel}/zarr.json"), _join(self.url, rel, "zarr.json"))
        return ShardedArray(self.files, _join(self.root, rel), layout, rel, self.url, describe, self.verify), attrs


def read_index(url: str) -> np.ndarray:
    """[n_examples, 6] index of a store, finished or not (written at its creation), checksums checked."""
    arr, _ = StoreFiles(url).array(INDEX)
    return arr.read(0, arr.shape[0]) if arr.shape[0] else np.zeros((0, len(INDEX_FIELDS)), np.int64)


def examples_in_rows(starts: list[int], ids: list[int], ends: list[int], a: int, b: int) -> list[int]:
    """Ids of the examples whose rows [start, end) overlap rows [a, b) (starts sorted)."""
    k = max(0, bisect.bisect_right(starts, a) - 1)
    out = []
    while k < len(starts) and starts[k] < b:
        if ends[k] > a:
            out.append(ids[k])
        k += 1
    return out


def _name_examples(ids: list[int], limit: int = 8) -> str:
    shown = ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")
    return f", examples [{shown}]" if ids else ""


class StoreReader:
    """Record i of a store as numpy arrays / tensors. Picklable: each process opens its own handles lazily.
    Not for concurrent use from several threads (each array reuses a scratch buffer)."""

    def __init__(self, url: str, verify: bool = True):
        self.url = url
        self.verify = verify  # False skips the per-read crc32c (cache-verify still checks all)
        self.manifest = read_manifest(url)
        outside = [rel for rel in self.manifest.files if bad_name(rel) is not None]
        if outside:
            raise StoreError(f"{url}: the manifest names {outside[0]!r}, {bad_name(outside[0])}, ({len(outside)} such "
                             "path(s)): a store only names its own files. Do not use this store (dskd-pipe "
                             f"cache-verify {url} lists them).")
        self.logical_dtype = self.manifest.hidden_dtype
        self._handles = None

    # -- lazily opened, per process --
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = None
        return state

    def _h(self) -> dict:
        if self._handles is None or self._handles["pid"] != os.getpid():
            files = StoreFiles(self.url, self.manifest.files, self.verify)
            index_arr, _ = files.array(INDEX, lambda a, b: f", examples {a}..{b - 1}")
            index = index_arr.read(0, index_arr.shape[0])
            if index.shape != (self.manifest.totals["examples"], len(INDEX_FIELDS)):
                raise StoreError(f"{self.url}: the index holds {index.shape[0]} examples, the manifest says "
                                 f"{self.manifest.totals['examples']}. Run dskd-pipe cache-verify {self.url}.")
            self._handles = {"pid": os.getpid(), "files": files, "index": index, "parts": {}, "texts": None}
        return self._handles

    def _part_rows(self, p: int) -> tuple[list[int], list[int], list[int]]:
        """(token starts, example ids, ends) of part p in row order."""
        idx = self._h()["index"]
        ids = np.nonzero(idx[:, 0] == p)[0]
        order = ids[np.argsort(idx[ids, 1], kind="stable")]
        starts = idx[order, 1]
        return starts.tolist(), order.tolist(), (starts + idx[order, 2]).tolist()

    def describe_part(self, p: int):
        starts, ids, ends = self._part_rows(p)
        return lambda a, b: _name_examples(examples_in_rows(starts, ids, ends, a, b))

    def part_arrays(self, p: int) -> dict[str, ShardedArray]:
        h = self._h()
        if p not in h["parts"]:
            describe = self.describe_part(p)
            names = ([HIDDEN, TOKENS] + ([HIDDEN_SCALE] if self.manifest.hidden_storage == "fp8" else [])
                     + ([TOPK_VALUES, TOPK_INDICES, LOGSUMEXP] if self.manifest.topk else []))
            arrays = {name: h["files"].array(f"{part_name(p)}/{name}", describe)[0] for name in names}
            tokens = arrays[TOKENS]
            h["parts"][p] = {"arrays": arrays, "tokens": tokens.read(0, tokens.shape[0])}
        return h["parts"][p]["arrays"]

    def _texts(self) -> np.ndarray:
        h = self._h()
        if h["texts"] is None:
            idx = h["index"]
            order = np.argsort(idx[:, 4], kind="stable")
            starts, ends = idx[order, 4].tolist(), (idx[order, 4] + idx[order, 5]).tolist()
            describe = (lambda a, b: _name_examples(examples_in_rows(starts, order.tolist(), ends, a, b)))
            arr, _ = h["files"].array(TEXTS, describe)
            h["texts"] = arr.read(0, arr.shape[0])
        return h["texts"]

    def __len__(self) -> int:
        return self.manifest.totals["examples"]

    def locate(self, i: int) -> tuple[int, int, int, int]:
        """(part, token_start, n_tokens, prompt_len) of example i."""
        if not 0 <= i < len(self):
            raise IndexError(f"example {i} out of range: {self.url} holds {len(self)} examples.")
        row = self._h()["index"][i]
        return int(row[0]), int(row[1]), int(row[2]), int(row[3])

    def text(self, i: int) -> tuple[str, str]:
        """(prompt, response) of example i."""
        _, _, _, _, start, n = (int(x) for x in self._h()["index"][i])
        raw = self._texts()[start:start + n].tobytes()
        try:
            d = json.loads(raw)
            return d["prompt"], d["response"]
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"{self.url}: the text of example {i} (texts bytes {start}..{start + n}) does not "
                             "decode, though its checksum holds: the store was written wrongly. Rebuild it.") from None

    def read(self, i: int) -> dict:
        """Example i: ids [T] int64, prompt_len, offsets [T, 2] int64, hidden [T, d] tensor (logical dtype),
        prompt, response, and with top-k: topk_values [T, k] float32, topk_indices [T, k] int64, logsumexp [T]."""
        p, start, n, prompt_len = self.locate(i)
        arrays = self.part_arrays(p)
        tokens = self._h()["parts"][p]["tokens"][start:start + n].astype(np.int64)  # [T, 3]
        prompt, response = self.text(i)
        rec = {
            "example_id": i, "ids": tokens[:, 0], "prompt_len": prompt_len, "offsets": tokens[:, 1:],
            "hidden": self._hidden(arrays, start, n),
            "prompt": prompt, "response": response,
        }
        if self.manifest.topk:
            rec["topk_values"] = arrays[TOPK_VALUES].read(start, start + n)
            rec["topk_indices"] = arrays[TOPK_INDICES].read(start, start + n).astype(np.int64)
            rec["logsumexp"] = arrays[LOGSUMEXP].read(start, start + n)
        return rec

    def _hidden(self, arrays: dict, start: int, n: int) -> torch.Tensor:
        if self.manifest.hidden_storage == "fp8":
            return decode_fp8(arrays[HIDDEN].read(start, start + n), arrays[HIDDEN_SCALE].read(start, start + n),
                              _TORCH_DTYPES[self.logical_dtype])
        return from_storage(arrays[HIDDEN].read(start, start + n), self.logical_dtype)

    def prefetch(self, indices) -> None:
        """Queue the disk reads of these examples' rows at once (ShardedArray.prefetch), before reading them one by
        one: a DataLoader worker does this for each micro-batch, so a cold store is read with many requests in
        flight rather than one example's at a time (BENCHMARKS.md, store reads)."""
        for i in indices:
            p, start, n, _ = self.locate(int(i))
            for arr in self.part_arrays(p).values():
                arr.prefetch(start, start + n)

    def read_many(self, indices) -> list[dict]:
        return [self.read(int(i)) for i in indices]

    def _tensor(self, rel: str) -> torch.Tensor:
        """A whole array, read once (head, embeddings): its files are unmapped after (ShardedArray.release)."""
        arr, attrs = self._h()["files"].array(rel)
        rows = arr.read(0, arr.shape[0])
        arr.release()
        return from_storage(rows, attrs.get("dtype", "float32"))

    def _group_attrs(self, rel: str) -> dict:
        return self._h()["files"].metadata(f"{rel}/zarr.json").get("attributes", {})

    def head(self) -> dict:
        """{"weight": [V, d], "bias": [V] or None, "logit_scale", "final_logit_softcap"} in the teacher's dtype."""
        attrs = self._group_attrs(HEAD_GROUP)
        has_bias = f"{HEAD_GROUP}/bias/zarr.json" in self.manifest.files
        return {"weight": self._tensor(f"{HEAD_GROUP}/weight"),
                "bias": self._tensor(f"{HEAD_GROUP}/bias") if has_bias else None,
                "logit_scale": attrs["logit_scale"], "final_logit_softcap": attrs["final_logit_softcap"]}

    def embeddings(self) -> dict:
        """{"weight": [V, d] input embedding table, "embed_scale": float}."""
        return {"weight": self._tensor(f"{EMBED_GROUP}/weight"), "embed_scale": self.embed_scale()}

    def embed_scale(self) -> float:
        """The factor the teacher multiplies its input embeddings by (Gemma: sqrt(d); 1.0 for most), without reading
        the [V, d] table."""
        return float(self._group_attrs(EMBED_GROUP)["embed_scale"])

    def tokenizer_names(self) -> list[str]:
        """The tokenizer's file names the store lists: plain names (they are written into a folder), else
        StoreError."""
        names = self._group_attrs(TOKENIZER_GROUP).get("files", [])
        for name in names:
            if (why := bad_name(name, plain=True)) is not None:
                raise StoreError(f"{self.url}: the store's tokenizer names the file {name!r}, {why}: a store only "
                                 f"names its own files. Do not use this store (dskd-pipe cache-verify {self.url}).")
        return list(names)

    def tokenizer_files(self) -> dict[str, bytes]:
        out = {}
        for name in self.tokenizer_names():
            arr, _ = self._h()["files"].array(f"{TOKENIZER_GROUP}/{name}")
            out[name] = arr.read(0, arr.shape[0]).tobytes()
        return out

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

    def arrays(self) -> dict[str, ShardedArray]:
        """Every array of the store by path (for cache-verify), part arrays naming their examples."""
        h = self._h()
        out = {}
        for rel in sorted(self.manifest.files):
            if not rel.endswith("/zarr.json"):
                continue
            meta = h["files"].metadata(rel)
            if meta.get("node_type") != "array":
                continue
            path = rel.removesuffix("/zarr.json")
            describe = None
            if path.startswith("parts/"):
                describe = self.describe_part(int(path.split("/")[1].removeprefix("part-")))
            elif path == INDEX:
                describe = lambda a, b: f", examples {a}..{b - 1}"  # noqa: E731
            out[path] = h["files"].array(path, describe)[0]
        return out
