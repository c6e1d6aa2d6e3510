"""Store read/write throughput against a numpy memmap of the same raw bytes (spec/store_measurements.md).

Writes a synthetic store (bf16-like hidden states, d=2048, 256-512 tokens per example) with the real writer (the
plan, PartWriter: sharded arrays, fsync per shard), plus a flat raw file of the same rows in the same order; then
reads whole examples in one shuffled order, cold and warm, in one and two processes, and writes
bench/results/store_read.json.

    python bench/store_read.py --gb 1.0 --dir /tmp/store_bench --chunk-tokens 32,64,256 --repeats 3

Readers: memmap (the reference), store (default options: crc32c of every inner chunk read), store_noverify (no
per-read crc32c), store_c<N> (another inner-chunk size), store_mapcold (cold ranges read through the map after a
posix_fadvise, not with preadv), store_batch16 (16 examples' reads queued at once, then read one by one: what a
DataLoader worker does for a micro-batch). Ratios are best-of-repeats wall-time ratios in one run; warm
reads also get CPU-time ratios (no I/O is waited for, so they stand for an unshared machine's wall-time ratios when
other jobs share the cores). The write rate is the store's alone (bytes of hidden states
per second through PartWriter, fsync of every shard included) against the raw file's (written in 32 MiB pieces,
fsynced), and the writer's own ceiling on tmpfs (/dev/shm: no disk).
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

from dskd_pipe.cache.format import Manifest, part_name, plan_store
from dskd_pipe.cache.reader import open_store
from dskd_pipe.cache.writer import PartWriter, finalize_store, open_for_writing, write_json

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


def lengths_for(gb: float, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    lengths, total = [], 0
    while total * D * 2 < gb * 2**30:
        n = int(rng.integers(256, 513))
        lengths.append(n)
        total += n
    return lengths


def rows_of(pool: torch.Tensor, pos: int, n: int) -> torch.Tensor:
    a = pos % (pool.shape[0] - 512)
    return pool[a:a + n]


def build(root: Path, raw: Path | None, lengths: list[int], chunk_tokens: int, shard_tokens: int,
          pool: torch.Tensor) -> tuple[list[tuple[int, int]], float, float]:
    """The store (and the raw file, rows in the store's order); returns (spans of the examples in the raw file,
    seconds the store's writer took, seconds the raw file took: written in 32 MiB pieces, fsynced at the end)."""
    plan = plan_store(lengths, [64] * len(lengths), 1 << 20, 1)
    m = Manifest(fingerprints={"data": {"n_examples": len(lengths)}}, hidden_dtype="bfloat16", d_model=D,
                 vocab_size=32000, eos_id=2, pad_id=2, chunk_tokens=chunk_tokens, shard_tokens=shard_tokens,
                 batch_tokens=1 << 20, plan_sha256=plan.sha256())
    root_path, m = open_for_writing(str(root), m, {}, plan, [("p", "r")] * len(lengths))
    write_json(root_path / "shared.json", {"complete": True}, "bench")  # no head/embeddings needed here
    spans = [(0, 0)] * len(lengths)
    order = plan.part_examples(0)
    pos = 0
    for i in order:
        spans[i] = (pos, lengths[i])
        pos += lengths[i]
    raw_s = 0.0
    if raw is not None:
        data = [rows_of(pool, spans[i][0], lengths[i]).view(torch.int16).numpy() for i in order]
        t0 = time.perf_counter()
        with open(raw, "wb") as fraw:
            piece, size = [], 0
            for a in data + [None]:
                if a is None or size >= 32 << 20:
                    fraw.write(b"".join(piece))
                    piece, size = [], 0
                if a is not None:
                    piece.append(a.tobytes())
                    size += a.nbytes
            os.fsync(fraw.fileno())
        raw_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    w = PartWriter(root_path, 0, m, plan)
    for i in order:
        n = lengths[i]
        w.add(i, list(range(n)), 64, [(k, k + 1) for k in range(n)], rows_of(pool, spans[i][0], n))
    w.close()
    elapsed = time.perf_counter() - t0
    finalize_store(root_path)
    return spans, elapsed, raw_s


def read_store(url: str, order, verify: bool = True, pread_cold: bool = True, batch: int = 1) -> tuple[int, float]:
    """(hidden bytes read, CPU seconds of this process) for whole examples in `order`, through the reader; with
    batch > 1, each run of `batch` examples is queued at once first (StoreReader.prefetch), as a loader worker does
    for a micro-batch."""
    from dskd_pipe.cache.shards import ShardedArray

    ShardedArray.pread_cold = pread_cold
    c0 = time.process_time()
    store = open_store(url, verify=verify)
    nbytes = 0
    for g in range(0, len(order), batch):
        group = order[g:g + batch]
        if batch > 1:
            store.prefetch(group)
        for i in group:
            nbytes += store.read(int(i))["hidden"].numel() * 2
    return nbytes, time.process_time() - c0


def read_memmap(raw: str, spans, order) -> tuple[int, float]:
    c0 = time.process_time()
    mm = np.memmap(raw, dtype=np.uint16, mode="r").reshape(-1, D)
    nbytes = 0
    for i in order:
        s, n = spans[i]
        nbytes += np.array(mm[s:s + n]).nbytes
    return nbytes, time.process_time() - c0


def memory_rates(mib: int = 256, block: int = 128 << 10) -> dict:
    """This core's crc32c and copy rates over `block`-sized pieces of a buffer larger than the CPU's caches: what a
    checked warm read pays twice (the check reads every byte once more) and a memmap once."""
    from dskd_pipe.cache.shards import crc32c

    src = np.random.default_rng(0).integers(0, 256, mib << 20, dtype=np.uint8)
    dst = np.ones_like(src)  # touched, so the copy pays no page faults
    mv = memoryview(src)
    best = {"crc32c_gb_s": 0.0, "copy_gb_s": 0.0}
    for _ in range(3):
        t0 = time.perf_counter()
        for o in range(0, len(src), block):
            crc32c(mv[o:o + block])
        t1 = time.perf_counter()
        for o in range(0, len(src), block):
            dst[o:o + block] = src[o:o + block]
        t2 = time.perf_counter()
        best["crc32c_gb_s"] = max(best["crc32c_gb_s"], round(len(src) / (t1 - t0) / 1e9, 1))
        best["copy_gb_s"] = max(best["copy_gb_s"], round(len(src) / (t2 - t1) / 1e9, 1))
    return best


def timed_2proc(fn, args_for) -> tuple[float, float]:
    """(MiB/s over wall time, MiB/s by CPU time: each process's bytes / its CPU seconds, summed)."""
    ctx = mp.get_context("fork")
    t0 = time.perf_counter()
    with ctx.Pool(2) as pool:
        got = pool.starmap(fn, [args_for(0), args_for(1)])
    wall = time.perf_counter() - t0
    return sum(n for n, _ in got) / 2**20 / wall, sum(n / 2**20 / max(c, 1e-9) for n, c in got)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/store_bench")
    ap.add_argument("--chunk-tokens", default="32",
                    help="Comma-separated inner-chunk rows; a store per size. The first is the headline.")
    ap.add_argument("--shard-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=1, help="Timed passes per reader, interleaved; the best counts.")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "store_read.json"))
    args = ap.parse_args(argv)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sizes = [int(x) for x in args.chunk_tokens.split(",")]
    raw = work / "raw.bin"
    roots, write_s, raw_write_s = {}, {}, 0.0
    lengths = lengths_for(args.gb)
    pool = torch.randn(1 << 15, D).to(torch.bfloat16)  # 128 MiB of bf16 rows, reused cyclically
    for k, c in enumerate(sizes):
        roots[c] = work / f"store-c{c}.zarr"
        spans, write_s[c], raw_s = build(roots[c], raw if k == 0 else None, lengths, c, args.shard_tokens, pool)
        raw_write_s = raw_s if k == 0 else raw_write_s
    tmpfs = Path("/dev/shm")
    write_tmpfs_s = None
    if tmpfs.is_dir() and shutil.disk_usage(tmpfs).free > 3 * args.gb * 2**30:
        shm = tmpfs / f"store_read_bench_{os.getpid()}"
        shutil.rmtree(shm, ignore_errors=True)
        shm.mkdir()
        _, write_tmpfs_s, _ = build(shm / "s.zarr", None, lengths, sizes[0], args.shard_tokens, pool)
        shutil.rmtree(shm, ignore_errors=True)
    total_mb = sum(n for _, n in spans) * D * 2 / 2**20
    order = np.random.default_rng(1).permutation(len(spans))
    halves = [order[0::2], order[1::2]]
    head = sizes[0]
    res = {"examples": len(spans), "hidden_mib": round(total_mb, 1), "d_model": D, "chunk_tokens": head,
           "mean_tokens_per_example": round(sum(n for _, n in spans) / len(spans), 1),
           "command": "python bench/store_read.py " + " ".join(a for a in sys.argv[1:]),
           "shard_tokens": args.shard_tokens,
           "write_mib_s_store": round(total_mb / write_s[head], 1),
           "write_mib_s_raw_file_fsync": round(total_mb / raw_write_s, 1),
           "write_ratio_store_vs_raw": round(raw_write_s / write_s[head], 2),
           "write_mib_s_store_tmpfs": round(total_mb / write_tmpfs_s, 1) if write_tmpfs_s else None,
           "bytes_on_disk_store": sum(p.stat().st_size for p in roots[head].rglob("*") if p.is_file()),
           "bytes_raw": raw.stat().st_size,
           "note": "store reads verify crc32c unless the key says noverify; ratio = store / memmap, same run",
           **memory_rates()}
    for c in sizes[1:]:
        res[f"write_mib_s_store_c{c}"] = round(total_mb / write_s[c], 1)
    for c in sizes:  # bytes of the inner chunks an example touches / its own bytes (what a checked read must read)
        touched = sum(((s + n - 1) // c - s // c + 1) * c for s, n in spans)
        res[f"read_amplification_c{c}"] = round(touched / sum(n for _, n in spans), 3)
    # name -> (fn, args); "store" is the headline reader: default options, first chunk size.
    readers = {"memmap": (read_memmap, (str(raw), spans))}
    for c in sizes:
        tag = "" if c == head else f"_c{c}"
        readers[f"store{tag}"] = (read_store, (str(roots[c]),))
    readers["store_noverify"] = (read_store, (str(roots[head]),), {"verify": False})
    readers["store_mapcold"] = (read_store, (str(roots[head]),), {"pread_cold": False})
    readers["store_batch16"] = (read_store, (str(roots[head]),), {"batch": 16})
    paths = [raw, *roots.values()]

    def call(name, idx):
        fn, a, *kw = readers[name]
        return fn(*a, idx, **(kw[0] if kw else {}))

    for mode in ("cold", "warm"):
        if mode == "warm":
            for name in readers:
                call(name, order)  # the page cache can hold every file of a modest run
        best, best_cpu = {}, {}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the shared machine hits every reader
            for name in readers:
                if mode == "cold":
                    res["cache_drop"] = drop_caches(paths)
                t0 = time.perf_counter()
                nbytes, cpu = call(name, order)
                best[name] = max(best.get(name, 0), nbytes / 2**20 / (time.perf_counter() - t0))
                best_cpu[name] = max(best_cpu.get(name, 0), nbytes / 2**20 / cpu)
            for name in ("memmap", "store"):
                if mode == "cold":
                    drop_caches(paths)
                fn, a = readers[name][:2]
                key = f"2proc_{name}"
                wall, cpu = timed_2proc(fn, lambda k, a=a: (*a, halves[k]))
                best[key], best_cpu[key] = max(best.get(key, 0), wall), max(best_cpu.get(key, 0), cpu)
        for name, v in best.items():
            if name.startswith("2proc_"):
                continue
            res[f"{mode}_1proc_{name}_mib_s"] = round(v, 1)
            if name != "memmap":
                res[f"{mode}_1proc_ratio" + name.removeprefix("store")] = round(v / best["memmap"], 2)
        res[f"{mode}_2proc_memmap_mib_s"] = round(best["2proc_memmap"], 1)
        res[f"{mode}_2proc_store_mib_s"] = round(best["2proc_store"], 1)
        res[f"{mode}_2proc_ratio"] = round(best["2proc_store"] / best["2proc_memmap"], 2)
        if mode == "warm":  # warm reads do no I/O: CPU time is what an idle machine's wall time would be
            for name, v in best_cpu.items():
                if name not in ("memmap", "2proc_memmap"):
                    ref = best_cpu["2proc_memmap" if name.startswith("2proc") else "memmap"]
                    tag = "2proc" if name.startswith("2proc") else "1proc"
                    res[f"warm_{tag}_cpu_time_ratio" + name.removeprefix("2proc_").removeprefix("store")] = round(
                        v / ref, 2)
    # Zarr's own reader on the same store (any Zarr v3 reader can open it), one slice per example, warm.
    import zarr
    arr = zarr.open_array(str(roots[head] / part_name(0) / "hidden"), mode="r")
    t0 = time.perf_counter()
    nbytes = sum(arr[spans[i][0]:spans[i][0] + spans[i][1]].nbytes for i in order[:200])
    res["warm_1proc_zarr_api_mib_s"] = round(nbytes / 2**20 / (time.perf_counter() - t0), 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return res


if __name__ == "__main__":
    main()
