"""Peak memory and time of the s2t term (forward KL over the full teacher vocabulary): chunked vs one [N, Vt] pass.

The s2t term of DSKD builds teacher logits Zt = Ht Wt^T and student-in-teacher-space logits Zs2t = Hs2t Wt^T over
the teacher's whole vocabulary (152k for Qwen, 262k for Gemma-3). Unchunked, autograd keeps several [N, Vt] fp32
tensors; `chunked_fkl_over_head` never holds more than `chunk_tokens` rows of them. Both give the same value and
gradient (tests/pipeline/objectives/test_dskd.py); this script measures what the chunking saves.

    python bench/s2t_memory.py --device cuda --tokens 16384 --vocab 151936 --d-teacher 2048
    python bench/s2t_memory.py            # CPU, small: peak RSS growth instead of CUDA max allocated

Writes bench/results/s2t_memory-<device>.json.
"""
from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from dskd_pipe.pipeline.objectives.divergences import forward_kl
from dskd_pipe.pipeline.objectives.dskd import TeacherHead, chunked_fkl_over_head, teacher_logits

from results_file import write_result  # bench/ is on sys.path when a benchmark runs as a script


def unchunked(ht, hs, head, mask, tau):
    """The straightforward form: full [N, Vt] logits on both sides, autograd keeps them."""
    z_t = teacher_logits(ht, head)  # [N, Vt]
    z_s2t = hs.float() @ head.weight.detach().float().T  # [N, Vt]
    return forward_kl(z_s2t, z_t, mask, tau=tau)


def measure(fn, device, *args):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = fn(*args)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return float(loss.detach()), seconds, peak


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=2048, help="supervised teacher positions in the step")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--d-teacher", type=int, default=2048)
    ap.add_argument("--chunk-tokens", type=int, default=1024)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.vocab, args.d_teacher, generator=g) * 0.02).to(device, torch.bfloat16)
    head = TeacherHead(weight=weight)
    ht = torch.randn(args.tokens, args.d_teacher, generator=g).to(device, torch.bfloat16)
    hs0 = torch.randn(args.tokens, args.d_teacher, generator=g).to(device, torch.bfloat16)
    mask = torch.ones(args.tokens, dtype=torch.bool, device=device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(args)}
    # On CPU ru_maxrss is a process-wide high-water mark: run the chunked form first so its peak is its own.
    for name, fn in (("chunked", lambda h: chunked_fkl_over_head(ht, h, head, mask, 2.0, args.chunk_tokens)),
                     ("unchunked", lambda h: unchunked(ht, h, head, mask, 2.0))):
        hs = hs0.clone().requires_grad_(True)
        try:
            loss, seconds, peak = measure(fn, device, hs)
            results[name] = {"loss": loss, "seconds": seconds, "peak_bytes": peak}
        except torch.OutOfMemoryError:
            results[name] = {"error": "out of memory"}
        print(name, results[name], flush=True)
    if "peak_bytes" in results["chunked"] and "peak_bytes" in results["unchunked"]:
        results["peak_saved_bytes"] = results["unchunked"]["peak_bytes"] - results["chunked"]["peak_bytes"]
        results["peak_ratio_chunked_over_unchunked"] = results["chunked"]["peak_bytes"] / results["unchunked"]["peak_bytes"]
    write_result(args.out, f"s2t_memory-{device.type}", results,
                 shown={k: v for k, v in results.items() if k != "args"})
    return results


if __name__ == "__main__":
    main()
