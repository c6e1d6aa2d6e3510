"""`dskd-pipe on-policy`: distillation in refresh rounds on the student's own samples (spec/other_methods.md,
DSKDv2 step 4), with the teacher never in the student's process or beside it on its GPU.

The spec's on-policy phase needs a live teacher; this project keeps it offline instead. Every step below is its own
`dskd-pipe` process, so the student's memory is freed before the teacher loads and the other way round:

    round-0/student/       distill on the gold store for `start_epochs`
    round-r/prompts.jsonl  a seeded `share` of the gold store's prompts (and gold responses, kept for reference)
    round-r/samples.jsonl  `dskd-pipe generate`: the round r-1 student answers them (sampling)
    round-r/samples.zarr/  `dskd-pipe cache-teacher`: the teacher over prompt + sample (re-tokenised with the
                           teacher tokenizer, so different vocabularies need nothing more)
    round-r/student/       distill `epochs_per_round` on gold + samples of rounds 1..r (`--sample-cache`: KD terms
                           on samples, the student's CE on gold only), continuing from round r-1's checkpoint
                           (`--init-from`: weights, projectors, discriminator, optimizer states, step count) on one
                           LR schedule over the whole run (`--schedule-steps`)

Kill it at any moment and run the same command again: finished steps are kept (a distill folder counts as
finished once it holds distill_done.json; generate writes its file atomically; cache-teacher and distill resume
themselves), nothing is duplicated. A folder made with other settings is refused.
"""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from dskd_pipe.pipeline.config import (ConfigError, DistillConfig, OnPolicyConfig, config_to_dict, load_config,
                                      option_problems, require, save_config)
from dskd_pipe.pipeline.methods import METHODS

SETTINGS = "on_policy.json"
DONE = "on_policy_done.json"


class StepFailed(RuntimeError):
    """A step's process exited non-zero; its own messages were printed above."""


def check_config(cfg: OnPolicyConfig, base: DistillConfig) -> None:
    require(cfg, "distill", "out")
    problems = []
    if not base.cache:
        problems.append(f"{cfg.distill}: on-policy rounds distil from a store: set `cache` (the gold store).")
    if base.method in METHODS and not METHODS[base.method].uses_teacher:
        problems.append(f"{cfg.distill}: method {base.method} uses no teacher; choose a KD method (dskd-v2-eta, "
                        "cma-ga, ...).")
    if base.max_steps or base.init_from or base.sample_caches or base.schedule_steps:
        problems.append(f"{cfg.distill}: max_steps, init_from, sample_caches and schedule_steps are set by the "
                        "rounds; remove them.")
    problems += option_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))


def round_prompts(n_gold: int, share: float, seed: int, round_index: int) -> list[int]:
    """Sorted gold-store indices the student answers in round r: a seeded draw of round(share * n) of them."""
    k = max(1, round(share * n_gold))
    rng = np.random.default_rng([int(seed), 7919, int(round_index)])
    return sorted(int(i) for i in rng.choice(n_gold, size=min(k, n_gold), replace=False))


def schedule_steps(n_gold: int, n_share: int, cfg: OnPolicyConfig, base: DistillConfig) -> int:
    """Optimizer steps of the whole run (the union grows by n_share examples per round; each step takes
    micro-batch x accumulation x processes examples)."""
    def per_epoch(n: int) -> int:
        return math.ceil(n / (base.micro_batch_size * base.grad_accum * cfg.nproc_per_node))

    return per_epoch(n_gold) * cfg.start_epochs + sum(per_epoch(n_gold + r * n_share) * cfg.epochs_per_round
                                                      for r in range(1, cfg.rounds + 1))


def _dskd_pipe(args: list[str], what: str, nproc: int = 1) -> None:
    """Run one step as its own `dskd-pipe` process (the student and the teacher never share one); with nproc > 1
    as `nproc` processes under torchrun on this node."""
    launch = (["torchrun", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []) + ["dskd-pipe"]
    print(f"[on-policy] {what}: {' '.join(launch + args)}", flush=True)
    python = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
              "dskd_pipe"] if nproc > 1 else [sys.executable, "-m", "dskd_pipe"]
    code = subprocess.call([*python, *args])
    if code != 0:
        raise StepFailed(f"{what} failed (exit {code}); its messages are above. Fix the cause and run the same "
                         "command again: finished steps are kept.")


def _write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def _distill(round_cfg: DistillConfig, folder: Path, what: str, nproc: int = 1) -> Path:
    """Train unless `folder` holds this very config's finished student; resume an unfinished one."""
    from dskd_pipe.pipeline.methods import resolve
    from dskd_pipe.pipeline.run_folder import DONE as DISTILL_DONE, RESOLVED_CONFIG

    saved = folder / RESOLVED_CONFIG
    if (folder / DISTILL_DONE).is_file() and saved.is_file():
        if json.loads(saved.read_text()).get("config") == config_to_dict(resolve(round_cfg)):
            print(f"[on-policy] {what}: {folder} finished before, kept", flush=True)
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    request = folder.parent / "distill_request.json"
    save_config(round_cfg, request)
    _dskd_pipe(["distill", "--config", str(request)], what, nproc)
    return folder


def _finished_store(path: Path) -> bool:
    from dskd_pipe.cache.format import StoreError
    from dskd_pipe.cache.reader import open_store

    if not path.exists():
        return False
    try:
        return bool(open_store(str(path)).manifest.complete)
    except StoreError:  # unfinished: cache-teacher resumes it
        return False


def run(cfg: OnPolicyConfig) -> Path:
    """All rounds into cfg.out; returns the final student's folder."""
    from dskd_pipe.cache.reader import open_store
    from dskd_pipe.pipeline.teacher import expected_fingerprints

    require(cfg, "distill", "out")
    base = load_config(DistillConfig, cfg.distill)
    check_config(cfg, base)
    out = Path(cfg.out).resolve()
    record = {"on_policy": config_to_dict(cfg), "distill": config_to_dict(base)}
    marker = out / SETTINGS
    if marker.is_file() and json.loads(marker.read_text()) != record:
        before = json.loads(marker.read_text())
        changed = sorted(f"{part}.{k}" for part in record for k in record[part]
                         if before.get(part, {}).get(k) != record[part][k])
        raise ConfigError(f"{out} holds on-policy rounds with other settings ({', '.join(changed)}). Choose another "
                          "--out, or remove that folder to start again.")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=2) + "\n")

    gold = open_store(base.cache, expected=expected_fingerprints(base))  # refused here, before any training
    n_gold = len(gold) if base.limit is None else min(base.limit, len(gold))
    n_share = len(round_prompts(n_gold, cfg.share, base.seed, 1))
    total = schedule_steps(n_gold, n_share, cfg, base)
    teacher = cfg.teacher or str(gold.manifest.fingerprints["teacher"]["name"])
    print(f"[on-policy] {n_gold} gold examples, {n_share} student samples per round, {cfg.rounds} round(s), "
          f"{total} optimizer steps; teacher {teacher}", flush=True)

    common = dict(resume=True, schedule_steps=total)
    student = _distill(dataclasses.replace(base, out=str(out / "round-0" / "student"), epochs=cfg.start_epochs,
                                           **common), out / "round-0" / "student", "round 0: distill on gold",
                       cfg.nproc_per_node)
    sample_stores: list[str] = []
    for r in range(1, cfg.rounds + 1):
        folder = out / f"round-{r}"
        folder.mkdir(parents=True, exist_ok=True)
        prompts, samples, store = folder / "prompts.jsonl", folder / "samples.jsonl", folder / "samples.zarr"
        if not samples.is_file():
            chosen = round_prompts(n_gold, cfg.share, base.seed, r)
            _write_jsonl_atomic(prompts, [{"prompt": rec["prompt"], "output": rec["response"], "gold_index": i}
                                          for i, rec in ((i, gold.read(i)) for i in chosen)])
            _dskd_pipe(["generate", "--model", str(student), "--data", str(prompts), "--out", str(samples),
                        "--seed", str(base.seed * 1000 + r), "--sample", "--temperature", str(cfg.temperature),
                        "--top-p", str(cfg.top_p), "--top-k", "0", "--no-repeat-ngram-size", "0",
                        "--max-new-tokens", str(cfg.max_new_tokens), "--max-prompt-length",
                        str(base.max_prompt_length), "--batch-size", str(cfg.generate_batch_size),
                        "--no-progress"] + (["--device", base.device] if base.device else []),
                       f"round {r}: the student answers {len(chosen)} prompts")
        else:
            print(f"[on-policy] round {r}: {samples} present, kept", flush=True)
        # cache-teacher resumes an unfinished store. Empty samples (EOS at once) have no response to distil on:
        # --skip-bad skips and counts them.
        if _finished_store(store):
            print(f"[on-policy] round {r}: {store} finished before, kept", flush=True)
        else:
                _dskd_pipe(["cache-teacher", "--teacher", teacher, "--data", str(samples), "--out", str(store),
                        "--skip-bad", "--max-length", str(base.max_length), "--max-prompt-length",
                        str(base.max_prompt_length), "--batch-tokens", str(cfg.batch_tokens),
                        "--dtype", cfg.teacher_dtype or gold.manifest.hidden_dtype,
                        "--chunk-tokens", str(gold.manifest.chunk_tokens), "--shard-tokens",
                        str(gold.manifest.shard_tokens), "--compression", gold.manifest.compression,
                        "--hidden-storage", gold.manifest.hidden_storage] + (["--device", cfg.teacher_device] if cfg.teacher_device else []),
                       f"round {r}: the teacher over the samples")
        sample_stores.append(str(store))
        student = _distill(dataclasses.replace(base, out=str(folder / "student"), epochs=cfg.epochs_per_round,
                                               init_from=str(student), sample_caches=tuple(sample_stores), **common),
                           folder / "student", f"round {r}: distill on gold + samples of rounds 1..{r}",
                           cfg.nproc_per_node)
    (out / DONE).write_text(json.dumps({"student": str(student), "rounds": cfg.rounds,
                                        "sample_stores": sample_stores, "schedule_steps": total}, indent=2) + "\n")
    print(f"[on-policy] done: {student}", flush=True)
    return student


__all__ = ["run", "round_prompts", "schedule_steps", "check_config", "StepFailed"]
