"""Store read/write throughput against a numpy memmap of the same raw bytes (spec/store_measurements.md).

Writes a synthetic store (bf16-like hidden states, d=2048, 256-512 tokens per example) with the real PartWriter,
plus a flat raw file of the same rows; then reads whole examples in one shuffled order, warm and cold, in one and two
processes, and writes bench/results/store_read.json.

    python bench/store_read.py --gb 1.0 --dir /tmp/store_bench --chunk-tokens 256,64 --repeats 2

Readers: memmap (the reference), store (default options), store_noprefetch (no fadvise queueing of cold reads),
store_noverify (no per-read crc32c), store_c<N> (another chunk size).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dskd_pipe.cache.format import Manifest
from dskd_pipe.cache.reader import open_store
from dskd_pipe.cache.writer import PartWriter, finalize_store, open_for_writing

D = 2048


def drop_caches(paths: list[Path]) -> str:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for root in paths:
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            for p in files:
                fd = os.open(p, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        return "posix_fadvise"


def build(root: Path, raw: Path | None, gb: float, chunk_tokens: int = 256,
          seed: int = 0) -> tuple[list[tuple[int, int]], float]:
    rng = np.random.default_rng(seed)
    pool = torch.randn(1 << 15, D).to(torch.bfloat16)  # 128 MiB of bf16 rows, reused cyclically
    lengths = []
    total = 0
    while total * D * 2 < gb * 2**30:
        n = int(rng.integers(256, 513))
        lengths.append(n)
        total += n
    m = Manifest(fingerprints={"data": {"n_examples": len(lengths)}}, hidden_dtype="bfloat16", d_model=D,
                 vocab_size=32000, eos_id=2, pad_id=2, chunk_tokens=chunk_tokens)
    root_path, m = open_for_writing(str(root), m, {})
    import zarr
    zarr.open_group(str(root_path), mode="a").attrs["shared_complete"] = True  # no head/embeddings needed here
    spans, pos = [], 0
    t0 = time.perf_counter()
    w = PartWriter(root_path, 0, m)
    with open(raw if raw is not None else os.devnull, "wb") as fraw:
        for i, n in enumerate(lengths):
            a = (pos % (pool.shape[0] - 512))
            h = pool[a:a + n]
            w.add(i, list(range(n)), 64, [(k, k + 1) for k in range(n)], h, "p", "r")
            if raw is not None:
                fraw.write(h.view(torch.int16).numpy().tobytes())
            spans.append((pos, n))
            pos += n
        w.close()
    finalize_store(root_path)
    elapsed = time.perf_counter() - t0  # store and raw file writes together: a lower bound on the store's rate
    return spans, elapsed


def read_store(url: str, order, verify: bool = True, prefetch: bool = True) -> int:
    store = open_store(url, verify=verify)
    store.prefetch = prefetch
    nbytes = 0
    for i in order:
        nbytes += store.read(int(i))["hidden"].numel() * 2
    return nbytes


def read_memmap(raw: str, spans, order) -> int:
    mm = np.memmap(raw, dtype=np.uint16, mode="r").reshape(-1, D)
    nbytes = 0
    for i in order:
        s, n = spans[i]
        nbytes += np.array(mm[s:s + n]).nbytes
    return nbytes


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    nbytes = fn(*args)
    return nbytes / 2**20 / (time.perf_counter() - t0)


def timed_2proc(fn, args_for) -> float:
    ctx = mp.get_context("fork")
    t0 = time.perf_counter()
    with ctx.Pool(2) as pool:
        nbytes = sum(pool.starmap(fn, [args_for(0), args_for(1)]))
    return nbytes / 2**20 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/store_bench")
    ap.add_argument("--chunk-tokens", default="256",
                    help="Comma-separated; a store per size. The first is the headline (top-level keys).")
    ap.add_argument("--repeats", type=int, default=1, help="Timed passes per reader, interleaved; the best counts.")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "store_read.json"))
    args = ap.parse_args()
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sizes = [int(x) for x in args.chunk_tokens.split(",")]
    raw = work / "raw.bin"
    roots, write_s = {}, {}
    for k, c in enumerate(sizes):
        roots[c] = work / f"store-c{c}.zarr"
        spans, write_s[c] = build(roots[c], raw if k == 0 else None, args.gb, chunk_tokens=c)
    total_mb = sum(n for _, n in spans) * D * 2 / 2**20
    order = np.random.default_rng(1).permutation(len(spans))
    halves = [order[0::2], order[1::2]]
    head = sizes[0]
    res = {"examples": len(spans), "hidden_mib": round(total_mb, 1), "d_model": D, "chunk_tokens": head,
           "mean_tokens_per_example": round(sum(n for _, n in spans) / len(spans), 1),
           "command": "python bench/store_read.py " + " ".join(a for a in sys.argv[1:]),
           "write_mib_s_store_plus_raw": round(2 * total_mb / write_s[head], 1),
           "bytes_on_disk_store": sum(p.stat().st_size for p in roots[head].rglob("*") if p.is_file()),
           "bytes_raw": raw.stat().st_size,
           "note": "store reads verify crc32c unless the key says noverify; ratio = store / memmap, same run"}
    for c in sizes[1:]:
        res[f"write_mib_s_store_c{c}"] = round(total_mb / write_s[c], 1)
    # name -> (fn, args); "store" is the headline reader: default options, first chunk size.
    readers = {"memmap": (read_memmap, (str(raw), spans))}
    for c in sizes:
        tag = "" if c == head else f"_c{c}"
        readers[f"store{tag}"] = (read_store, (str(roots[c]),))
    readers["store_noprefetch"] = (read_store, (str(roots[head]),), {"prefetch": False})
    readers["store_noverify"] = (read_store, (str(roots[head]),), {"verify": False})
    paths = [raw, *roots.values()]

    def call(name, idx):
        fn, a, *kw = readers[name]
        return fn(*a, idx, **(kw[0] if kw else {}))

    for mode in ("cold", "warm"):
        if mode == "warm":
            for name in readers:
                call(name, order)  # the page cache can hold every file of a modest run
        best = {}
        for _ in range(args.repeats):
            for name in readers:
                if mode == "cold":
                    res["cache_drop"] = drop_caches(paths)
                t0 = time.perf_counter()
                nbytes = call(name, order)
                best[name] = max(best.get(name, 0), nbytes / 2**20 / (time.perf_counter() - t0))
        for name, v in best.items():
            res[f"{mode}_1proc_{name}_mib_s"] = round(v, 1)
            if name != "memmap":
                res[f"{mode}_1proc_ratio" + name.removeprefix("store")] = round(v / best["memmap"], 2)
        for name in ("memmap", "store"):
            if mode == "cold":
                drop_caches(paths)
            fn, a = readers[name][:2]
            res[f"{mode}_2proc_{name}_mib_s"] = round(timed_2proc(fn, lambda k, a=a: (*a, halves[k])), 1)
        res[f"{mode}_2proc_ratio"] = round(res[f"{mode}_2proc_store_mib_s"] / res[f"{mode}_2proc_memmap_mib_s"], 2)
    # The Zarr slice path, for comparison with the direct chunk reads the reader uses on local uncompressed stores.
    store = open_store(str(roots[head]))
    store._h()["direct"] = False
    t0 = time.perf_counter()
    nbytes = sum(store.read(int(i))["hidden"].numel() * 2 for i in order)
    res["warm_1proc_store_zarr_slice_mib_s"] = round(nbytes / 2**20 / (time.perf_counter() - t0), 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
