"""Why does (or does not) a DSKD-family student learn from its teacher? Measure it on a finished distill run.

    python bench/diagnose_dskd.py --run RUN --data TRAIN.jsonl [--batches 4] [--out bench/results/diag.json]

RUN is a `dskd-pipe distill` output folder of dskd-cma, cma-ga or chunk-attention trained with --save-every K and
--keep-checkpoints 0 (every checkpoint kept), or any finished one with `--steps final` (its saved student and
parts only). For each checkpoint, on the same fixed batches of the run's store (the
first --batches of epoch 0's order, seed 0), the script recomputes the loss terms with the checkpoint's student and
projectors and reports:
    grad_norm[term]        norm of the gradient each term sends into the student's parameters, as the loss weighs
                           it ((1-l) CE_s, l KD_t2s, l KD_s2t; per supervised student token), and its cosine with
                           the CE gradient; `kd_t2s_all_rows` is KD_t2s without the accuracy mask (what it would send)
    nll_per_char           the student's CE, the t2s target's CE (CE_t2s: how good the distribution KD_t2s pulls the
                           student to is on the gold tokens) and the teacher's own CE, each per character of the
                           responses, so the three are comparable
    t2s_acc, mask_kept     argmax(Zt2s) == gold: the share of rows the accuracy mask keeps for KD_t2s
    s2t_acc                argmax of the s2t logits == the teacher's label
    attention              entropy of a_t2s rows and the share of student tokens whose argmax attention falls inside
                           their ground-truth chunk (pipeline/probes.chunk_alignment), with the uniform baseline
    discriminator (cma-ga) D's accuracy on response keys / queries and the mean L2 norm of both
and from metrics.jsonl every logged step's terms (ce_student, kd_t2s, kd_s2t, ce_t2s, t2s_acc, s2t_acc, attention
entropy, and for cma-ga l_d, l_g, d_acc_real, d_acc_fake). The JSON goes to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dskd_pipe.pipeline.loader import Collate, DistillDataset, Side, teacher_hidden
from dskd_pipe.pipeline.config import DistillConfig, load_config
from dskd_pipe.pipeline.methods import chunk_extras, resolve
from dskd_pipe.pipeline.models import eos_token_id, load_causal_lm, load_tokenizer, pad_token_id
from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum, get_divergence
from dskd_pipe.pipeline.objectives.dskd import (build_projectors, cross_model_attention, dskd_cma_loss,
                                                teacher_logits)
from dskd_pipe.pipeline.probes import alignment_counts
from dskd_pipe.pipeline.training import list_checkpoints, load_safetensors
from dskd_pipe.pipeline.run_folder import RESOLVED_CONFIG
from dskd_pipe.pipeline.step import Trainee
from dskd_pipe.pipeline.student import build_student, hf_model, student_forward
from dskd_pipe.pipeline.teacher import open_teacher

# The diagnosis reads a cross-model attention (a query projector) and DSKD-CMA's loss terms.
METHODS = ("dskd-cma", "cma-ga", "chunk-attention")
CHUNK_MODES = {"chunk-attention": "attention"}
CURVE_KEYS = ("loss", "ce_student", "ce_t2s", "kd_t2s", "kd_s2t", "t2s_acc", "s2t_acc", "attention_entropy", "l_d",
              "l_g", "d_acc_real", "d_acc_fake", "grad_norm", "dev_loss")


def fixed_batches(cfg: DistillConfig, teacher, tok, n: int) -> list[dict]:
    """The first n batches of epoch 0 in seed 0's order, each with "response_chars": characters of its responses
    (+1 each for the end), the scale of the per-character NLLs."""
    side = Side(tok, eos_token_id(tok), pad_token_id(tok), cfg.max_prompt_length, cfg.max_length)
    _, source = open_teacher(cfg, "cpu")
    dataset = DistillDataset(source, side, seed=0, epoch=0)
    collate = Collate(side.pad_id, teacher.pad_id, chunk_extras)
    bs = cfg.micro_batch_size
    out = []
    for start in range(0, min(n * bs, len(dataset)), bs):
        items = [dataset[k] for k in range(start, min(start + bs, len(dataset)))]
        batch = collate(items)
        batch["teacher_hidden"] = teacher_hidden(batch).float()  # the store sends packed rows
        batch["response_chars"] = float(sum(len(it["response"]) + 1 for it in items))
        out.append(batch)
    return out


def _flat(grads, params) -> torch.Tensor:
    """One vector over all parameters; a parameter a term does not reach counts as zeros."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm() + 1e-12))


def load_trained(cfg: DistillConfig, checkpoint: Path, teacher) -> tuple:
    """(student, projectors, discriminator or None), fp32 on the CPU, from a checkpoint of the current format
    (torch.distributed.checkpoint: state/), an older one (student/ and the parts' safetensors) or a finished run
    folder (the student itself and the parts' safetensors)."""
    if (checkpoint / "state").is_dir():
        from dskd_pipe.pipeline.methods import build_parts
        from dskd_pipe.pipeline.training import load_checkpoint

        student = build_student(cfg, "cpu")
        parts = build_parts(cfg, teacher, load_tokenizer(cfg.student), hf_model(student), "cpu")
        schedule = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1.0), lambda s: 1.0)
        # the weights only: no optimizer is given, the schedule is a stand-in
        load_checkpoint(checkpoint, model=Trainee(student, parts), optimizers={}, scheduler=schedule)
        disc = parts.discriminator.eval() if parts.discriminator is not None else None
        return hf_model(student), parts.projectors, disc
    student_dir = checkpoint / "student" if (checkpoint / "student").is_dir() else checkpoint
    student = load_causal_lm(str(student_dir), dtype=torch.float32, device="cpu")
    projectors = build_projectors(student.get_input_embeddings().weight.shape[1], teacher.head.weight.shape[1],
                                  with_query=True)
    load_safetensors(projectors, checkpoint / "projectors.safetensors")
    disc = None
    if cfg.method == "cma-ga" and (checkpoint / "discriminator.safetensors").is_file():
        from dskd_pipe.pipeline.objectives.cma_ga import build_discriminator

        disc = build_discriminator(2 * teacher.head.weight.shape[1], spectral_norm=cfg.disc_spectral_norm)
        load_safetensors(disc, checkpoint / "discriminator.safetensors")
        disc.eval()
    return student, projectors, disc


def measure(cfg: DistillConfig, checkpoint: Path, batches: list[dict], teacher) -> dict:
    """The quantities of the module docstring for one checkpoint, summed over the batches."""
    student, projectors, disc = load_trained(cfg, checkpoint, teacher)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    es, ws = student.get_input_embeddings().weight, student.get_output_embeddings().weight
    lam, div, chunk_mode = cfg.kd_rate, get_divergence(cfg.divergence), CHUNK_MODES.get(cfg.method)
    sums: dict[str, float] = {}
    grads: dict[str, torch.Tensor] = {}
    key_rows, query_rows = [], []

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + float(value)

    for batch in batches:
        hs, zs = student_forward(student, batch)
        labels, t_labels = batch["labels"], batch["teacher_labels"]
        ms, mt = labels != -100, t_labels != -100
        out = dskd_cma_loss(hs, zs, labels, batch["input_ids"], es, ws, batch["teacher_input_ids"], t_labels,
                            batch["teacher_hidden"], teacher.embed, teacher.head, projectors,
                            divergence=cfg.divergence, kd_rate=lam, tau=cfg.kd_temperature,
                            teacher_temperature=cfg.teacher_temperature, teacher_embed_scale=teacher.embed_scale,
                            chunks=batch.get("chunks"), chunk_mode=chunk_mode)
        # Zt2s again (dskd_cma_loss step 5) for KD_t2s over every supervised row: what the accuracy mask removes.
        cma = cross_model_attention(hs, labels, batch["input_ids"], es, batch["teacher_input_ids"], t_labels,
                                    batch["teacher_hidden"], teacher.embed, projectors, teacher.embed_scale,
                                    batch.get("chunks"), chunk_mode)
        zt2s = ((cma.a_t2s @ cma.v_t2s)[ms] @ ws.detach().T).detach()  # [Ns, Vs]
        terms = {"ce_student": (1 - lam) * out.ce_student, "kd_t2s": lam * out.kd_t2s, "kd_s2t": lam * out.kd_s2t,
                 "kd_t2s_all_rows": lam * div(zs[ms], zt2s / cfg.teacher_temperature,
                                              torch.ones(int(ms.sum()), dtype=torch.bool), tau=cfg.kd_temperature)}
        for name, term in terms.items():  # summed over the batches, divided by all their tokens below
            g = _flat(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True), params)
            grads[name] = grads[name] + g if name in grads else g
        with torch.no_grad():
            zt = teacher_logits(batch["teacher_hidden"][mt], teacher.head)  # [Nt, Vt]
            add("ce_teacher", cross_entropy_sum(zt, t_labels[mt]))
            rows = cma.a_t2s[ms]  # [Ns, T]
            add("entropy", (-torch.where(rows > 0, rows * rows.log(), torch.zeros_like(rows)).sum(-1)).sum())
            chunks = batch["chunks"].bool()
            for b in range(labels.shape[0]):
                hits, mass, n = alignment_counts(cma.a_t2s[b], chunks[b], ms[b])
                add("align_hits", hits)
                add("align_mass", mass)
                add("align_rows", n)
                has = ms[b] & chunks[b].any(-1)
                add("align_uniform", (chunks[b][has].sum(-1).float() / max(1, int(mt[b].sum()))).sum())
            if disc is not None:
                from dskd_pipe.pipeline.objectives.cma_ga import discriminator_accuracy, response_tokens

                kr, qr = response_tokens(out.keys, out.queries, out.teacher_mask, out.student_mask)
                acc_real, acc_fake = discriminator_accuracy(disc, kr, qr, cfg.ga_directions)
                key_rows.append(kr.detach().float())
                query_rows.append(qr.detach().float())
                add("d_real", acc_real * kr.shape[0])
                add("d_fake", acc_fake * qr.shape[0])
                add("key_norm", kr.norm(dim=-1).sum())
                add("query_norm", qr.norm(dim=-1).sum())
        for key, value in (("n_student", ms.sum()), ("n_teacher", mt.sum()), ("ce_student", out.ce_student),
                           ("ce_t2s", out.ce_t2s), ("kd_t2s", out.kd_t2s), ("kd_s2t", out.kd_s2t),
                           ("t2s_correct", out.t2s_correct), ("s2t_correct", out.s2t_correct),
                           ("chars", batch["response_chars"])):
            add(key, value.detach() if torch.is_tensor(value) else value)
    n, nt, chars = sums["n_student"], sums["n_teacher"], sums["chars"]
    ce = grads["ce_student"]
    result = {
        "grad_norm": {k: float(g.norm()) / n for k, g in grads.items()},
        "grad_cos_with_ce": {k: _cos(g, ce) for k, g in grads.items() if k != "ce_student"},
        "per_student_token": {k: sums[k] / n for k in ("ce_student", "ce_t2s", "kd_t2s")},
        "kd_s2t_per_teacher_token": sums["kd_s2t"] / nt,
        "nll_per_char": {"student": sums["ce_student"] / chars, "t2s_target": sums["ce_t2s"] / chars,
                         "teacher": sums["ce_teacher"] / chars},
        "t2s_acc": sums["t2s_correct"] / n,  # = the share of rows the accuracy mask keeps
        "s2t_acc": sums["s2t_correct"] / nt,
        "attention_entropy": sums["entropy"] / n,
    }
    if sums.get("align_rows"):
        r = sums["align_rows"]
        result["alignment"] = {"argmax_in_chunk": sums["align_hits"] / r, "mass_in_chunk": sums["align_mass"] / r,
                               "uniform_mass_in_chunk": sums["align_uniform"] / r}
    if disc is not None:
        k, q = sum(int((b["teacher_labels"] != -100).sum()) for b in batches), n
        result["discriminator"] = {"acc_real": sums["d_real"] / k, "acc_fake": sums["d_fake"] / q,
                                   "key_norm": sums["key_norm"] / k, "query_norm": sums["query_norm"] / q,
                                   **separability(torch.cat(key_rows), torch.cat(query_rows))}
    return result


def _balanced_accuracy(score_k: torch.Tensor, score_q: torch.Tensor) -> float:
    """Mean of the two classes' accuracies for 'key' = score > 0."""
    return 0.5 * (float((score_k > 0).float().mean()) + float((score_q <= 0).float().mean()))


def _probe(k: torch.Tensor, q: torch.Tensor) -> float:
    """Balanced held-out accuracy of a logistic regression telling keys from queries (even rows fit, odd rows test;
    features standardised on the fit rows)."""
    x = torch.cat([k[0::2], q[0::2]])
    y = torch.cat([torch.ones(len(k[0::2])), torch.zeros(len(q[0::2]))])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    weight = torch.where(y > 0, 0.5 / y.sum(), 0.5 / (1 - y).sum())  # the classes count equally
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = ((x - mu) / sd) @ w + b
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * weight).sum() \
            + 1e-4 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return _balanced_accuracy(((k[1::2] - mu) / sd) @ w + b, ((q[1::2] - mu) / sd) @ w + b)


def separability(k: torch.Tensor, q: torch.Tensor) -> dict:
    """How easily response keys [Nk, 2dt] and queries [Nq, 2dt] are told apart, whatever D learned: by the L2 norm
    alone (the best threshold), by a linear probe on the vectors and on their directions, and the norms of each
    half (keys: the teacher's [input; target] token embeddings, scaled by one std)."""
    nk, nq = k.norm(dim=-1), q.norm(dim=-1)
    cut = torch.cat([nk, nq]).sort().values
    best = max(_balanced_accuracy(nk - c, nq - c) for c in cut[::max(1, len(cut) // 400)])
    best = max(best, max(_balanced_accuracy(c - nk, c - nq) for c in cut[::max(1, len(cut) // 400)]))
    half = k.shape[1] // 2
    # The queries are an affine image of 2 ds numbers (the query projector is Linear(2ds, 2dt)): their span, and
    # the share of the keys' spread (about the queries' mean) that lies outside it, where only keys vary.
    qc = q - q.mean(0)
    sv, basis = torch.linalg.svd(qc, full_matrices=False)[1:]
    rank = int((sv > 1e-4 * sv[0]).sum())
    kc = k - q.mean(0)
    inside = kc @ basis[:rank].T
    outside_share = 1.0 - float(inside.square().sum() / kc.square().sum())
    return {"query_rank": rank, "dims": k.shape[1], "key_spread_outside_query_span": outside_share,
            "norm_threshold_acc": best, "linear_probe_acc": _probe(k, q),
            "linear_probe_acc_directions": _probe(torch.nn.functional.normalize(k, dim=-1),
                                                  torch.nn.functional.normalize(q, dim=-1)),
            "key_norm_halves": [float(k[:, :half].norm(dim=-1).mean()), float(k[:, half:].norm(dim=-1).mean())],
            "query_norm_halves": [float(q[:, :half].norm(dim=-1).mean()), float(q[:, half:].norm(dim=-1).mean())]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True, help="The data file the run's store was built from.")
    ap.add_argument("--cache", default=None, help="Measure on another store of the same teacher (e.g. over the dev "
                    "set: held-out batches) instead of the run's own; --data is then that store's data file.")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--steps", default=None, help="Only these checkpoint steps, e.g. 20,100,320 (default: all), "
                    "or `final`: the finished run's saved student and parts.")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    run = Path(args.run)
    cfg = resolve(load_config(DistillConfig, run / RESOLVED_CONFIG,
                              {"data": args.data, "num_workers": 0, "cache": args.cache}))
    if cfg.method not in METHODS:
        print(f"{run}: --method {cfg.method}; this diagnosis covers {', '.join(METHODS)}.", file=sys.stderr)
        return 2
    teacher, _ = open_teacher(cfg, "cpu")
    tok = load_tokenizer(cfg.student)
    batches = fixed_batches(cfg, teacher, tok, args.batches)
    checkpoints = list_checkpoints(run)
    if args.steps == "final":  # the finished run's own student, projectors (and discriminator)
        checkpoints = [run]
    elif args.steps:
        wanted = {int(x) for x in args.steps.split(",")}
        checkpoints = [c for c in checkpoints if int(c.name.split("-")[-1]) in wanted]
    report = {"run": str(run), "method": cfg.method, "kd_rate": cfg.kd_rate, "tau": cfg.kd_temperature,
              "store": cfg.cache, "batches": args.batches, "checkpoints": []}
    for ckpt in checkpoints:
        step = (json.loads((run / "distill_done.json").read_text()).get("step", -1) if ckpt == run
                else int(ckpt.name.split("-")[-1]))
        with torch.enable_grad():
            report["checkpoints"].append({"step": step, **measure(cfg, ckpt, batches, teacher)})
        print(json.dumps(report["checkpoints"][-1]), flush=True)
    curves: dict[str, list] = {k: [] for k in CURVE_KEYS}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k in CURVE_KEYS:
            if k in rec:
                curves[k].append([rec["step"], rec[k]])
    report["curves"] = {k: v for k, v in curves.items() if v}
    out = Path(args.out) if args.out else Path("bench/results") / f"diagnose_{run.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
