"""`cache-verify` and `cache-info`: check every stored byte of a store and its index; summarise a store (its progress
while unfinished)."""
from __future__ import annotations

import json

import numpy as np

from dskd_pipe.cache.format import (HIDDEN, MANIFEST, PARTIAL_MANIFEST, PROGRESS, SHARED, TOKENS, Manifest,
                                    StoreError, part_name, sha256_hex)
from dskd_pipe.cache.paths import bad_name, links_leaving
from dskd_pipe.cache.reader import StoreFiles, StoreReader, _is_local, _join, read_manifest
from dskd_pipe.cache.remote import filesystem


def verify_store(url: str) -> dict:
    """Check the manifest, every metadata file (sha256), every shard index and inner chunk of every array (crc32c,
    size, decoding), the texts and the index against the parts, and that every path the store names (and, on a local
    disk, every link in it) stays inside it. Returns {"ok", "problems", "chunks", ...}."""
    url = str(url)
    m = read_manifest(url)
    fs, root = filesystem(url)
    problems = [f"{rel}: the manifest names a path outside the store ({why})" for rel in sorted(m.files)
                if (why := bad_name(rel)) is not None]
    if _is_local(fs):
        problems += [f"{rel}: a link to outside the store" for rel in links_leaving(root)]
    if problems:  # nothing it names is read: a crafted name could point anywhere
        return _report(m, problems, 0)
    for rel, want in sorted(m.files.items()):
        try:
            data = fs.cat(_join(root, rel))
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        if sha256_hex(data) != want:
            problems.append(f"{rel}: damaged (sha256 mismatch)")
    if problems:  # damaged metadata: the arrays cannot be trusted to be read as described
        return _report(m, problems, 0)
    reader = StoreReader(url, verify=True)
    try:
        reader.tokenizer_names()
        arrays = reader.arrays()
    except StoreError as e:
        return _report(m, [str(e).removeprefix(f"{url}: ")], 0)
    n_chunks = 0
    for path, arr in arrays.items():
        problems += arr.check()
        n_chunks += sum(arr.n_chunks_in(k) for k in range(arr.layout.n_shards))
    if not problems:
        problems += _check_index(reader)
    return _report(m, problems, n_chunks)


def _report(m: Manifest, problems: list[str], n_chunks: int) -> dict:
    return {"ok": not problems, "problems": problems, "chunks": n_chunks, "examples": m.totals["examples"],
            "tokens": m.totals["tokens"]}


def _check_index(reader: StoreReader) -> list[str]:
    """The index against the parts and texts: each part's rows tiled exactly by its examples, every text decodes,
    every token id inside the vocabulary, the counts the manifest and fingerprints give."""
    m, problems = reader.manifest, []
    index = reader._h()["index"]
    n_expected = m.fingerprints.get("data", {}).get("n_examples")
    if n_expected is not None and index.shape[0] != n_expected:
        problems.append(f"index holds {index.shape[0]} examples, the data had {n_expected}")
    for p in range(m.n_parts):
        starts, ids, ends = reader._part_rows(p)
        pos = 0
        for s, i, e in zip(starts, ids, ends):
            if s != pos:
                problems.append(f"{part_name(p)}: example {i} starts at row {s}, expected {pos}")
            pos = e
        arrays = reader.part_arrays(p)
        if pos != arrays[HIDDEN].shape[0]:
            problems.append(f"{part_name(p)}: examples cover {pos} rows, hidden has {arrays[HIDDEN].shape[0]}")
        tokens = reader._h()["parts"][p]["tokens"]
        bad = np.nonzero((tokens[:, 0] < 0) | (tokens[:, 0] >= m.vocab_size))[0]
        if len(bad):
            problems.append(f"{part_name(p)}/{TOKENS}: {len(bad)} token id(s) outside the vocabulary (first at row "
                            f"{int(bad[0])})")
    for i in range(index.shape[0]):
        try:
            reader.text(i)
        except StoreError as e:
            problems.append(str(e).removeprefix(f"{reader.url}: "))
    return problems


def store_sizes(url: str) -> dict:
    """Bytes on disk: in all, per token (the parts: hidden states, ids, offsets, top-k) and once per store (head,
    embeddings, tokenizer, texts, index, manifests), so that bytes/token says what a longer data set costs."""
    fs, root = filesystem(str(url))
    total = fs.du(root)
    parts = fs.du(f"{root}/parts") if fs.exists(f"{root}/parts") else 0
    if not isinstance(total, int) or not isinstance(parts, int):
        raise StoreError(f"{url}: cannot measure the size on disk.")
    return {"bytes_on_disk": total, "bytes_per_example_data": parts, "bytes_once_per_store": total - parts}


def store_info(url: str) -> dict:
    """What is inside a store: shapes, dtypes, fingerprints, size on disk, bytes per token; for an unfinished store,
    its settings and progress (rows and examples on disk per part)."""
    url = str(url)
    fs, root = filesystem(url)
    if not fs.exists(_join(root, MANIFEST)) and fs.exists(_join(root, PARTIAL_MANIFEST)):
        return progress_info(url)
    m = read_manifest(url)
    sizes = store_sizes(url)
    stored = "float8 e4m3 with a scale per token" if m.hidden_storage == "fp8" else m.storage_dtype
    return {"store": url, "status": "complete", "format_version": m.format_version,
            "examples": m.totals["examples"], "tokens": m.totals["tokens"], **sizes,
            "bytes_per_token": round(sizes["bytes_per_example_data"] / max(1, m.totals["tokens"]), 1),
            "hidden": f"{m.hidden_dtype} (stored as {stored}), d_model {m.d_model}",
            "vocab_size": m.vocab_size, "eos_id": m.eos_id, "pad_id": m.pad_id, "topk": m.topk,
            "chunk_tokens": m.chunk_tokens, "shard_tokens": m.shard_tokens, "batch_tokens": m.batch_tokens,
            "compression": m.compression, "parts": m.n_parts, "fingerprints": m.fingerprints}


def progress_info(url: str) -> dict:
    """An unfinished store: what is on disk so far, part by part, and what finishes it."""
    fs, root = filesystem(url)
    where = _join(url, PARTIAL_MANIFEST)
    try:
        m = Manifest.from_json(fs.cat(_join(root, PARTIAL_MANIFEST)), where=where)
    except StoreError as e:
        raise StoreError(f"{e} The store cannot be resumed; build a new one.") from None
    info = {"store": url, "status": "unfinished", "settings": {k: getattr(m, k) for k in Manifest.SETTINGS},
            "fingerprints": m.fingerprints, "created": m.created}
    if not m.created:
        info["next"] = "run the same cache-teacher command again: it was stopped while creating the store"
        return info
    files = StoreFiles(url)
    index = files.array("index")[0]
    index = index.read(0, index.shape[0])
    parts, rows_done, rows_all, ex_done = [], 0, 0, 0
    for p in range(m.n_parts):
        try:
            progress = json.loads(fs.cat(_join(root, part_name(p), PROGRESS)))
        except FileNotFoundError:
            progress = {"rows": 0, "complete": False}
        mine = index[index[:, 0] == p]
        total = int(mine[:, 2].sum())
        done = int(progress.get("rows", 0))
        committed = int(((mine[:, 1] + mine[:, 2]) <= done).sum())
        parts.append({"part": p, "rows": f"{done}/{total}", "examples": f"{committed}/{len(mine)}",
                      "complete": bool(progress.get("complete"))})
        rows_done, rows_all, ex_done = rows_done + done, rows_all + total, ex_done + committed
    info.update({"examples_written": f"{ex_done}/{index.shape[0]}", "tokens_written": f"{rows_done}/{rows_all}",
                 "percent": round(100 * rows_done / max(1, rows_all), 1),
                 "shared_written": fs.exists(_join(root, SHARED)), "parts": parts,
                 "next": "run the same cache-teacher command again (one per unfinished part with --shard I/N) to "
                         "finish it"})
    return info
