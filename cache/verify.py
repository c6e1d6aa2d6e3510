"""`cache-verify` and `cache-info`: read every chunk of a store (crc32c), check the index; summarise a store."""
from __future__ import annotations

import json
import warnings

import fsspec
import numpy as np
import zarr

from dskd_pipe.cache.format import EXAMPLES, INDEX_FIELDS, StoreError, part_name
from dskd_pipe.cache.reader import _join, read_manifest


def _arrays(group, prefix=""):
    with warnings.catch_warnings():  # zarr warns about our JSON side files (manifest, progress, examples)
        warnings.simplefilter("ignore")
        arrays, groups = list(group.arrays()), list(group.groups())
    for name, arr in arrays:
        yield f"{prefix}{name}", arr
    for name, sub in groups:
        yield from _arrays(sub, f"{prefix}{name}/")


def verify_store(url: str) -> dict:
    """Check completeness, every chunk of every array and the index. Returns {"ok", "problems", "chunks", ...}."""
    url = str(url)
    m = read_manifest(url)
    fs, root = fsspec.core.url_to_fs(url)
    group = zarr.open_group(url, mode="r")
    problems: list[str] = []
    part_examples: dict[int, list[dict]] = {}
    for p in range(m.n_parts):
        lines = fs.cat(_join(root, part_name(p), EXAMPLES)).splitlines()
        part_examples[p] = [json.loads(line) for line in lines]

    def ids_in_rows(path: str, a: int, b: int) -> str:
        for p in range(m.n_parts):
            if path.startswith(part_name(p) + "/"):
                ids = [e["example_id"] for e in part_examples[p]
                       if e["token_start"] < b and e["token_start"] + e["n_tokens"] > a]
                return f", example ids {ids}"
        return ""

    n_chunks = 0
    for path, arr in _arrays(group):
        c = arr.chunks[0]
        n_rows = arr.shape[0]
        for k in range(-(-n_rows // c)):
            n_chunks += 1
            key = "/".join(["c", str(k)] + ["0"] * (arr.ndim - 1))
            where = f"{path} chunk {k} (rows {k * c}..{min(n_rows, (k + 1) * c)}){ids_in_rows(path, k * c, (k + 1) * c)}"
            if not fs.exists(_join(root, path, key)):
                problems.append(f"{where}: chunk file missing")
                continue
            try:
                arr[k * c:(k + 1) * c]
            except Exception as e:  # zarr raises a plain ValueError-like error on a crc32c mismatch
                problems.append(f"{where}: unreadable ({type(e).__name__}: {e})")
    # Index consistency: the merged index agrees with the parts, rows tile each part exactly.
    index = {name: np.asarray(group["index"][name][:]) for name in INDEX_FIELDS}
    if len(index["part"]) != m.totals["examples"]:
        problems.append(f"index holds {len(index['part'])} examples, manifest says {m.totals['examples']}")
    for p, entries in part_examples.items():
        entries = sorted(entries, key=lambda e: e["token_start"])
        pos = 0
        for e in entries:
            if e["token_start"] != pos:
                problems.append(f"{part_name(p)}: example {e['example_id']} starts at row {e['token_start']}, "
                                f"expected {pos}")
            pos = e["token_start"] + e["n_tokens"]
            i = e["example_id"]
            if i >= len(index["part"]) or (int(index["part"][i]), int(index["token_start"][i]),
                                           int(index["n_tokens"][i])) != (p, e["token_start"], e["n_tokens"]):
                problems.append(f"index entry of example {i} disagrees with {part_name(p)}/{EXAMPLES}")
        n_rows = group[part_name(p)]["hidden"].shape[0]
        if pos != n_rows:
            problems.append(f"{part_name(p)}: examples cover {pos} rows, hidden has {n_rows}")
    return {"ok": not problems, "problems": problems, "chunks": n_chunks, "examples": m.totals["examples"],
            "tokens": m.totals["tokens"]}


def store_sizes(url: str) -> dict:
    """Bytes on disk: in all, per token (the parts: hidden states, ids, offsets, top-k, texts) and once per store
    (head, embeddings, tokenizer, manifests), so that bytes/token says what a longer data set costs."""
    fs, root = fsspec.core.url_to_fs(str(url))
    total = fs.du(root)
    parts = fs.du(f"{root}/parts") if fs.exists(f"{root}/parts") else 0
    if not isinstance(total, int) or not isinstance(parts, int):
        raise StoreError(f"{url}: cannot measure the size on disk.")
    return {"bytes_on_disk": total, "bytes_per_example_data": parts, "bytes_once_per_store": total - parts}


def store_info(url: str) -> dict:
    """What is inside a store: shapes, dtypes, fingerprints, size on disk, bytes per token."""
    url = str(url)
    m = read_manifest(url)
    sizes = store_sizes(url)
    return {"store": url, "format_version": m.format_version, "examples": m.totals["examples"],
            "tokens": m.totals["tokens"], **sizes,
            "bytes_per_token": round(sizes["bytes_per_example_data"] / max(1, m.totals["tokens"]), 1),
            "hidden": f"{m.hidden_dtype} (stored as {m.storage_dtype}), d_model {m.d_model}",
            "vocab_size": m.vocab_size, "eos_id": m.eos_id, "pad_id": m.pad_id, "topk": m.topk,
            "chunk_tokens": m.chunk_tokens, "compression": m.compression, "parts": m.n_parts,
            "fingerprints": m.fingerprints}
