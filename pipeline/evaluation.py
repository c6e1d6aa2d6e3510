"""The dev evaluation of a distill run at an epoch end: dev loss, dev ROUGE-L with the published model selection
(spec/evaluation.md), and keeping the best student so far in out/best."""
from __future__ import annotations

import json

import torch

from dskd_pipe.pipeline.config import DistillConfig, ScoreConfig
from dskd_pipe.pipeline.distributed import Processes
from dskd_pipe.pipeline.generation import evaluate_rouge
from dskd_pipe.pipeline.loader import Collate, DistillDataset, Side, TextSource, make_loader
from dskd_pipe.pipeline.objectives.divergences import cross_entropy_sum
from dskd_pipe.pipeline.step import Trainee
from dskd_pipe.pipeline.student import hf_model, save_outputs, student_forward
from dskd_pipe.pipeline.training import rng_state, set_rng_state, write_json_atomic


DEV_CURVE = "dev_curve.json"  # every dev evaluation of the run and the selected epoch


@torch.no_grad()
def dev_loss(student, examples, side: Side, collate: Collate, cfg: DistillConfig, device: str) -> float:
    """The student's cross-entropy per supervised token on the dev examples (no teacher needed)."""
    was = student.training
    student.eval()
    total, n = 0.0, 0
    dataset = DistillDataset(TextSource(examples, side), side, seed=0, epoch=0)
    for batch in make_loader(dataset, cfg.micro_batch_size, collate):
        batch = {k: v.to(device) for k, v in batch.items()}
        _, zs = student_forward(student, batch)
        total += float(cross_entropy_sum(zs, batch["labels"]))
        n += int((batch["labels"] != -100).sum())
    student.train(was)
    return total / max(1, n)


def dev_rouge_config(cfg: DistillConfig):
    """The generation settings of the published model selection (the released distillation.py's `evaluate` on the
    dev split): sampling with T = 1, top_p = 1, top_k = 0, no_repeat_ngram_size 0 (the release switches it off for
    dev), at most max_length - max_prompt_length new tokens, one pass per seed; --dev-rouge-greedy: one greedy pass.
    Seeds cfg.seed, cfg.seed + 1, ... (the release samples from its running RNG stream instead)."""
    return ScoreConfig(greedy=cfg.dev_rouge_greedy, temperature=1.0, top_p=1.0, top_k=0, no_repeat_ngram_size=0,
                       max_new_tokens=max(1, cfg.max_length - cfg.max_prompt_length),
                       max_prompt_length=cfg.max_prompt_length, batch_size=cfg.micro_batch_size, progress=False,
                       seeds=tuple(cfg.seed + k for k in range(1 if cfg.dev_rouge_greedy else cfg.dev_rouge_passes)))


def dev_rouge(student, tokenizer, examples, cfg: DistillConfig) -> float:
    """Dev ROUGE-L x 100, the mean over the passes of dev_rouge_config (pipeline/generation.py, as `score`)."""
    score_cfg = dev_rouge_config(cfg)
    was = student.training
    student.eval()
    try:
        return float(evaluate_rouge(hf_model(student), tokenizer, examples, score_cfg.seeds, score_cfg))
    finally:
        student.train(was)


def evaluate_epoch(cfg, trainee: Trainee, procs: Processes, tok, examples, side, collate, out, state, metrics):
    """Dev loss (and ROUGE-L when asked) at an epoch end; the best student so far goes to out/best, and the curve
    with the selected epoch to out/dev_curve.json.

    Under FSDP2 every process runs it (the root's parameters gathered for the while); otherwise rank 0 alone."""
    saved = rng_state()  # generation reseeds the RNGs; training must not notice the evaluation
    if procs.engine == "fsdp":
        trainee.unshard()
    try:
        loss = dev_loss(trainee.student, examples, side, collate, cfg, procs.device)
        rouge = dev_rouge(trainee.student, tok, examples, cfg) if cfg.dev_rouge else None
    finally:
        if procs.engine == "fsdp":
            trainee.reshard()
    set_rng_state(saved)
    score = rouge if rouge is not None else -loss
    record = {"step": state["step"], "epoch": state["epoch"], "dev_loss": loss}
    if rouge is not None:
        record["dev_rouge_l"] = rouge
    metrics.log(record)
    best = state.get("best")
    if best is None or score > best:
        save_outputs(trainee, procs, cfg, tok, out / "best", parts=False)
        best = score
        state["best_epoch"], state["best_step"] = state["epoch"], state["step"]
    if not procs.main:
        return best
    curve_path = out / DEV_CURVE
    curve = json.loads(curve_path.read_text())["curve"] if curve_path.is_file() else []
    curve = [r for r in curve if r["step"] < state["step"]] + [record]  # a resumed run replaces what it redoes
    write_json_atomic(curve_path, {"metric": "dev_rouge_l" if cfg.dev_rouge else "dev_loss", "curve": curve,
                                   "best": {"epoch": state.get("best_epoch"), "step": state.get("best_step")},
                                   "settings": None if rouge is None else {
                                       "greedy": cfg.dev_rouge_greedy, "passes": len(dev_rouge_config(cfg).seeds),
                                       "examples": len(examples), "no_repeat_ngram_size": 0}})
    return best
