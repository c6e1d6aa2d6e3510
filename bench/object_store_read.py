"""Reads from a store on an object store (s3://) against the same store on local disk, in one run.

Starts moto's S3 server on loopback in its own process (`moto_server`, from `pip install "moto[server]"`), or uses
--endpoint (any S3-compatible server, e.g. a real bucket's endpoint with credentials in the environment). Writes one
synthetic store (bf16 hidden states, d 2048, 256-512 tokens per example) with the store's own writer twice: to a
local folder and to s3://BUCKET/PREFIX; then reads every example in one shuffled order through StoreReader (the
ranged reads of cache/shards.py: one fs.cat_ranges per example, crc32c checked) from each, and writes
bench/results/object_store_read.json with MiB/s of hidden states and the ratio s3 / local (local: warm page cache).

A loopback moto server is a Python process serving from memory: its number measures the client path (s3fs,
aiobotocore, HTTP, our ranged reads and checks), not S3's network; on a real bucket, run it with --endpoint.

    python bench/object_store_read.py --mib 256
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dskd_pipe.cache.format import Manifest, plan_store
from dskd_pipe.cache.reader import open_store
from dskd_pipe.cache.writer import PartWriter, finalize_store, open_for_writing, write_json

D = 2048


def build(out: str, lengths: list[int]) -> float:
    """A finished store of random bf16 rows at `out` (a folder or a URL); returns the writer's seconds."""
    plan = plan_store(lengths, [32] * len(lengths), 1 << 16, 1)
    m = Manifest(fingerprints={"data": {"n_examples": len(lengths)}}, hidden_dtype="bfloat16", d_model=D,
                 vocab_size=32000, eos_id=2, pad_id=2, batch_tokens=1 << 16, plan_sha256=plan.sha256())
    t0 = time.perf_counter()
    root, m = open_for_writing(out, m, {}, plan, [("prompt", "response")] * len(lengths))
    write_json(root / "shared.json", {"complete": True}, "bench")  # no head or embeddings needed to read rows
    pool = torch.randn(8192, D).bfloat16()
    w = PartWriter(root, 0, m, plan)
    for k, i in enumerate(plan.part_examples(0)):
        a = (k * 977) % (8192 - 512)
        w.add(i, list(range(lengths[i])), 32, [(j, j + 1) for j in range(lengths[i])], pool[a:a + lengths[i]])
    w.close()
    finalize_store(root)
    return time.perf_counter() - t0


def read_all(url: str, order) -> tuple[float, int]:
    store = open_store(url)
    store.read(int(order[0]))  # open the files, load the index and tokens
    t0 = time.perf_counter()
    n = sum(store.read(int(i))["hidden"].numel() * 2 for i in order)
    return time.perf_counter() - t0, n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=float, default=256, help="MiB of hidden states in the store.")
    p.add_argument("--endpoint", default="", help="An S3 endpoint to use instead of starting moto on loopback.")
    p.add_argument("--bucket", default="dskd-bench")
    p.add_argument("--dir", default="/tmp/object_store_bench")
    p.add_argument("--repeats", type=int, default=2, help="Passes per source, interleaved; the best counts.")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "object_store_read.json"))
    args = p.parse_args(argv)

    server = None
    if not args.endpoint:
        port = free_port()
        server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                                   str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        args.endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    try:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(f"s3://{args.bucket}")
        for _ in range(100):  # the server takes a moment to start
            try:
                if not fs.exists(args.bucket):
                    fs.mkdir(args.bucket)
                break
            except Exception:
                time.sleep(0.1)
        rng = np.random.default_rng(0)
        lengths, total = [], 0
        while total * D * 2 < args.mib * 2**20:
            lengths.append(int(rng.integers(256, 513)))
            total += lengths[-1]
        local, url = Path(args.dir) / "local.zarr", f"s3://{args.bucket}/bench-{os.getpid()}.zarr"
        shutil.rmtree(local, ignore_errors=True)
        write_local, write_s3 = build(str(local), lengths), build(url, lengths)
        order = rng.permutation(len(lengths))
        best = {"local": float("inf"), "s3": float("inf")}
        for _ in range(args.repeats):
            for name, src in (("local", str(local)), ("s3", url)):
                seconds, nbytes = read_all(src, order)
                best[name] = min(best[name], seconds)
        mib = nbytes / 2**20
        result = {"endpoint": "moto_server on loopback" if server else args.endpoint, "examples": len(lengths),
                  "tokens": total, "hidden_mib": round(mib, 1),
                  "write_mib_s": {"local": round(mib / write_local, 1), "s3": round(mib / write_s3, 1)},
                  "read_mib_s": {k: round(mib / v, 1) for k, v in best.items()},
                  "read_s3_over_local": round(best["local"] / best["s3"], 3),
                  "machine": f"cpu, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"}
        fs.rm(url, recursive=True)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
