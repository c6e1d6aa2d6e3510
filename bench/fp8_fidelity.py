"""How close do hidden states stored in fewer bytes rebuild the teacher's full-vocabulary distributions?

Reads the exact hidden states of a finished store (e.g. the real-weight Gemma-3-270M store), passes every row
through each storage scheme (encode, then decode as a reader would), rebuilds the logits over the WHOLE vocabulary
with the store's own head (pipeline.objectives.dskd.teacher_logits: bias, logit scale, soft-cap), and compares the
distributions per token:

    KL(p_exact || p_scheme) = sum_v p_v (log p_v - log q_v),  p = softmax(z / tau), q = softmax(z' / tau)

at tau = 1 (the teacher's own distribution) and tau = 2 (the distillation temperature of the configs), the top-1
agreement (argmax z' == argmax z), the relative error of the hidden state ||h' - h|| / ||h|| and the largest logit
error. Every row of every example counts (the rows training reads are all but the last of each example).

Schemes: `fp8` is the store's own option (`cache-teacher --hidden-storage fp8`: e4m3 with an absmax/448 scale per
token, cache.writer.encode_fp8 / cache.reader.decode_fp8); the others are reference points: bf16 / fp16 (what a
half-precision store of an fp32 teacher costs), e4m3 with a power-of-two scale (the token's largest value lands
anywhere in (224, 448]), e5m2 with a power-of-two scale, int8 with an absmax/127 scale per token, and e4m3 without
any scale.

    python bench/fp8_fidelity.py --store /path/to/gemma.zarr --out bench/results/fp8_fidelity-gemma3-270m.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dskd_pipe.cache.reader import decode_fp8, open_store
from dskd_pipe.cache.writer import encode_fp8
from dskd_pipe.pipeline.objectives.dskd import TeacherHead, teacher_logits

E4M3_MAX = 448.0


def _fp8_roundtrip(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    return (x / scale).to(dtype).float() * scale


def scheme_fp8(h: torch.Tensor) -> torch.Tensor:
    q, e = encode_fp8(h)
    return decode_fp8(q, e, torch.float32)


def scheme_e4m3_pow2(h: torch.Tensor) -> torch.Tensor:
    amax = h.abs().amax(-1, keepdim=True).clamp_min(1e-30)  # [N, 1]
    scale = torch.exp2(torch.ceil(torch.log2(amax / E4M3_MAX)))
    scale = torch.where(amax / scale > E4M3_MAX, scale * 2, scale)  # log2 rounding
    return _fp8_roundtrip(h, torch.float8_e4m3fn, scale)


def scheme_e5m2_pow2(h: torch.Tensor) -> torch.Tensor:
    amax = h.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / 57344.0)))
    return _fp8_roundtrip(h, torch.float8_e5m2, scale)


def scheme_int8(h: torch.Tensor) -> torch.Tensor:
    scale = (h.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-30)
    return torch.round(h / scale).clamp(-127, 127) * scale


def scheme_e4m3_unscaled(h: torch.Tensor) -> torch.Tensor:
    return h.to(torch.float8_e4m3fn).float()


# name -> (rebuild function, bytes per token as a function of d_model)
SCHEMES = {
    "bf16": (lambda h: h.bfloat16().float(), lambda d: 2 * d),
    "fp16": (lambda h: h.half().float(), lambda d: 2 * d),
    "fp8": (scheme_fp8, lambda d: d + 4),
    "e4m3-pow2-scale": (scheme_e4m3_pow2, lambda d: d + 1),
    "e5m2-pow2-scale": (scheme_e5m2_pow2, lambda d: d + 1),
    "int8-absmax": (scheme_int8, lambda d: d + 4),
    "e4m3-no-scale": (scheme_e4m3_unscaled, lambda d: d),
}


def compare(z: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row KL(softmax(z / tau) || softmax(z2 / tau)) over the full vocabulary, fp64 accumulation. [N]"""
    logp = torch.log_softmax(z / tau, dim=-1)
    logq = torch.log_softmax(z2 / tau, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1, dtype=torch.float64).clamp_min(0.0)


def quantiles(x: torch.Tensor) -> dict:
    x = x.double()
    q = torch.quantile(x, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist() if x.numel() < 2**24 else [0, 0]
    return {"mean": float(x.mean()), "median": q[0], "p99": q[1], "max": float(x.max())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="A finished store with exact hidden states.")
    p.add_argument("--examples", type=int, default=0, help="Use the first N examples (0 = all).")
    p.add_argument("--rows", type=int, default=128, help="Rows per logits block (memory: rows x vocab x 4 B x 4).")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    reader = open_store(args.store)
    m = reader.manifest
    head_parts = reader.head()
    head = TeacherHead(head_parts["weight"].float(),
                       None if head_parts["bias"] is None else head_parts["bias"].float(),
                       head_parts["logit_scale"], head_parts["final_logit_softcap"])
    n = len(reader) if not args.examples else min(args.examples, len(reader))
    hidden = torch.cat([reader.read(i)["hidden"].float() for i in range(n)])  # [N, d]
    names = [s for s in args.schemes.split(",") if s]
    acc = {s: {"kl_tau1": [], "kl_tau2": [], "top1": [], "rel_err": [], "max_abs_logit_err": 0.0} for s in names}
    start = time.perf_counter()
    for a in range(0, hidden.shape[0], args.rows):
        h = hidden[a:a + args.rows]  # [R, d]
        z = teacher_logits(h, head)  # [R, V] fp32
        top = z.argmax(-1)
        for s in names:
            h2 = SCHEMES[s][0](h)
            z2 = teacher_logits(h2, head)
            r = acc[s]
            r["kl_tau1"].append(compare(z, z2, 1.0))
            r["kl_tau2"].append(compare(z, z2, 2.0))
            r["top1"].append(z2.argmax(-1) == top)
            r["rel_err"].append((h2 - h).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-30))
            r["max_abs_logit_err"] = max(r["max_abs_logit_err"], float((z2 - z).abs().max()))
        print(f"rows {a + h.shape[0]}/{hidden.shape[0]} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    table = {}
    for s in names:
        r = acc[s]
        top1 = torch.cat(r["top1"])
        table[s] = {"bytes_per_token_hidden": SCHEMES[s][1](m.d_model),
                    "kl_tau1": quantiles(torch.cat(r["kl_tau1"])), "kl_tau2": quantiles(torch.cat(r["kl_tau2"])),
                    "top1_agreement": float(top1.float().mean()), "top1_disagreements": int((~top1).sum()),
                    "hidden_rel_err": quantiles(torch.cat(r["rel_err"])),
                    "max_abs_logit_err": r["max_abs_logit_err"]}
    result = {"store": args.store, "hidden_dtype": m.hidden_dtype, "d_model": m.d_model, "vocab_size": m.vocab_size,
              "teacher": m.fingerprints.get("teacher", {}).get("name"), "examples": n,
              "tokens": int(hidden.shape[0]), "schemes": table}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
