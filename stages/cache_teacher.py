"""`dskd-pipe cache-teacher`: run the teacher once over the data and write the teacher-state store.

The plan (cache/format.py `plan_store`) is made first, from the whole data set: length-sorted batches, dealt to the
parts round robin. Each process writes one part (shard I of N: torchrun's RANK/WORLD_SIZE without --shard); a killed
run resumes with the same command, recomputing whole planned batches; the last part to finish writes the final
manifest. Because every example is computed in its planned batch, the bytes do not depend on kills or shards.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from dskd_pipe.cache.format import (CREATE_LOCK, LOCK, MANIFEST, PARTIAL_MANIFEST, Manifest, StoreError,
                                    check_compatible, part_name, plan_store)
from dskd_pipe.cache.paths import describe_contents, visible_entries
from dskd_pipe.cache.verify import store_sizes
from dskd_pipe.cache.writer import (PartWriter, check_out_path, finalize_store, lock_owner, open_for_writing,
                                    read_manifest_file, write_shared)
from dskd_pipe.pipeline.config import CacheConfig, ConfigError, config_to_dict, option_problems, require
from dskd_pipe.pipeline.data import TEMPLATE_ID, build_sequence, cut_report, file_fingerprint, load_examples
from dskd_pipe.pipeline.models import (check_vocabulary, default_device, embedding_parts, eos_token_id, head_parts,
                                       last_hidden_state, input_device, load_causal_lm, load_tokenizer,
                                       model_fingerprint, pad_token_id, tokenizer_fingerprint)
from dskd_pipe.pipeline.objectives.dskd import TeacherHead, teacher_logits
from dskd_pipe.pipeline.progress import Console, quiet_libraries

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def parse_shard(shard: str) -> tuple[int, int]:
    """ "I/N" -> (I, N); "" -> torchrun's (RANK, WORLD_SIZE) or (0, 1)."""
    if not shard:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise StoreError(f"--shard '{shard}': expected I/N, e.g. 0/4.") from None
    if not 0 <= i < n:
        raise StoreError(f"--shard '{shard}': need 0 <= I < N.")
    return i, n


@torch.no_grad()
def teacher_states(model, batch_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Post-final-norm last hidden states [B, T, d] of a right-padded batch (what the LM head consumes)."""
    return last_hidden_state(model, batch_ids, attention_mask)


def check_settings(cfg: CacheConfig) -> None:
    """Raise ConfigError listing every problem with the options (the declared ranges and choices of
    pipeline/config.py, then what depends on several options); StoreError for --device-map under torchrun."""
    problems = option_problems(cfg)
    if cfg.chunk_tokens > 0 and cfg.shard_tokens > 0 and cfg.shard_tokens % cfg.chunk_tokens:
        problems.append(f"--shard-tokens ({cfg.shard_tokens}) must be a positive multiple of --chunk-tokens "
                        f"({cfg.chunk_tokens}).")
    if cfg.batch_tokens < cfg.max_length:
        problems.append(f"--batch-tokens ({cfg.batch_tokens}) must be at least --max-length ({cfg.max_length}).")
    if problems:
        raise ConfigError("\n".join(problems))
    if cfg.device_map and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise StoreError("--device-map auto spreads one teacher over all the node's GPUs: run it as one process "
                         "(without torchrun), or drop it to give each torchrun process a GPU of its own.")


def teacher_device(cfg: CacheConfig) -> str:
    """--device, or cuda when there is one (under torchrun: this process's own GPU, cuda:LOCAL_RANK), else cpu."""
    device = cfg.device or default_device()
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def precheck_store(root: Path, fingerprints: dict, settings: dict, plan_sha256: str, shard: int) -> None:
    """Refuse a store started from other data or settings, or a part another live process writes, before any model
    is loaded (the teacher's own fingerprint is checked once it is loaded). A local folder that holds something
    else than a store is refused here too, naming what it holds."""
    if isinstance(root, Path) and root.is_dir() and not (root / PARTIAL_MANIFEST).is_file() \
            and not (root / MANIFEST).is_file() and [n for n in visible_entries(root) if n != CREATE_LOCK]:
        raise StoreError(f"{root}: exists, is not empty and holds no store manifest: it holds "
                         f"{describe_contents(root)}. Pass a new --out.")
    started = read_manifest_file(root / PARTIAL_MANIFEST) if root.is_dir() else None
    if started is None:
        return
    check_compatible(started, fingerprints, store=str(root))
    probe = Manifest(fingerprints=fingerprints, hidden_dtype=started.hidden_dtype, d_model=started.d_model,
                     vocab_size=started.vocab_size, eos_id=0, pad_id=0, plan_sha256=plan_sha256, **settings)
    for key in settings:
        if getattr(started, key) != getattr(probe, key):
            flag = {"n_parts": "--shard I/N"}.get(key, "--" + key.replace("_", "-"))
            raise StoreError(f"{root} was started with {key}={getattr(started, key)}, not {getattr(probe, key)}. "
                             f"Pass the same {flag} to finish it, or build a new store.")
    if started.plan_sha256 != plan_sha256:
        raise StoreError(f"{root} was planned from other token lengths: the tokenizer or data changed under it. "
                         "Build a new store.")
    lock = root / part_name(shard) / LOCK
    owner = lock_owner(lock)
    if owner is not None:
        pid, _, host = owner.partition("@")
        raise StoreError(f"part {shard} of {root} is being written by process {pid} on host {host} (lock file "
                         f"{lock}). Wait for it to finish; if that process is gone, delete the lock file and run "
                         "again.")


@quiet_libraries
def run(cfg: CacheConfig) -> Path:
    require(cfg, "teacher", "data", "out")
    check_settings(cfg)
    root = check_out_path(cfg.out)  # before anything is loaded
    shard, n_shards = parse_shard(cfg.shard)
    console = Console.for_stage(cfg.progress, cfg.quiet)
    examples = load_examples(cfg.data, limit=cfg.limit, skip_bad=cfg.skip_bad, report=console.warn)
    device = teacher_device(cfg)
    tok = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    eos, pad = eos_token_id(tok), pad_token_id(tok)
    # The whole data set is tokenised by every process: the plan (and so every byte) depends on all lengths.
    seqs = [build_sequence(tok, ex.prompt, ex.response, eos, cfg.max_prompt_length, cfg.max_length)
            for ex in examples]
    plan = plan_store([len(s.ids) for s in seqs], [s.prompt_len for s in seqs], cfg.batch_tokens, n_shards)
    if shard == 0 and (cut := cut_report(seqs, cfg.max_prompt_length, cfg.max_length)):
        console.warn(cut)  # every part tokenises the whole data set: one of them says it
    fingerprints = {
        "tokenizer": tokenizer_fingerprint(tok),
        "data": {"path": str(cfg.data), "sha256": file_fingerprint(cfg.data), "limit": cfg.limit,
                 "skip_bad": cfg.skip_bad, "n_examples": len(examples)},
        "template": TEMPLATE_ID,
        "lengths": {"max_prompt_length": cfg.max_prompt_length, "max_length": cfg.max_length},
    }
    settings = {"topk": cfg.topk, "chunk_tokens": cfg.chunk_tokens, "shard_tokens": cfg.shard_tokens,
                "batch_tokens": cfg.batch_tokens, "compression": cfg.compression,
                "hidden_storage": cfg.hidden_storage, "n_parts": n_shards}
    precheck_store(root, fingerprints, settings, plan.sha256(), shard)

    model = load_causal_lm(cfg.teacher, dtype=_DTYPES.get(cfg.dtype), device=device,
                           trust_remote_code=cfg.trust_remote_code, device_map=cfg.device_map or None)
    device = str(input_device(model))  # a dispatched model takes its inputs on its first device
    check_vocabulary(model, tok, cfg.teacher)
    head = head_parts(model)
    if cfg.topk > head["weight"].shape[0]:
        raise ConfigError(f"--topk {cfg.topk} is above the teacher's vocabulary ({head['weight'].shape[0]} tokens). "
                          f"Pass at most {head['weight'].shape[0]} (0 = no top-k).")
    dtype = next(model.parameters()).dtype
    manifest = Manifest(
        fingerprints={"teacher": model_fingerprint(cfg.teacher, model), **fingerprints},
        hidden_dtype=str(dtype).removeprefix("torch."), d_model=int(head["weight"].shape[1]),
        vocab_size=int(head["weight"].shape[0]), eos_id=eos, pad_id=pad, plan_sha256=plan.sha256(), **settings)
    root, on_disk = open_for_writing(cfg.out, manifest, config_to_dict(cfg), plan,
                                     [(ex.prompt, ex.response) for ex in examples])
    if on_disk.complete:
        console.note(f"{root}: already complete ({on_disk.totals['examples']} examples); nothing to do.")
        return root
    if shard == 0:
        write_shared(root, on_disk, head, embedding_parts(model), tok, model.config.to_dict())

    writer = PartWriter(root, shard, on_disk, plan)
    try:
        # Whole planned batches: one cut by the kill is recomputed in full and only its missing examples are added.
        batches = [plan.batches[b] for b in plan.part_batches(shard)
                   if any(i not in writer.committed_ids for i in plan.batches[b])]
        cache_batches(model, writer, seqs, batches, head, pad, cfg, device, shard, n_shards, console)
        writer.close(complete=True)
    except BaseException:
        writer.close(complete=False)
        raise
    final = finalize_store(root)
    if final is None:
        console.note(f"{root}: part {shard}/{n_shards} done; the store is finished when every part is.")
    else:
        t, sizes = final.totals, store_sizes(root)
        print(f"{root}: {t['examples']} examples, {t['tokens']} tokens, {sizes['bytes_on_disk'] / 2**20:.1f} MiB: "
              f"{sizes['bytes_per_example_data'] / max(1, t['tokens']):.0f} bytes/token "
              f"+ {sizes['bytes_once_per_store'] / 2**20:.1f} MiB once per store (head, embeddings, tokenizer, "
              "texts).")
    return root


def cache_batches(model, writer, seqs, batches, head, pad, cfg, device, shard, n_shards, console: Console) -> None:
    """The capture loop of `run`: the teacher's forward over each planned batch, every example's rows to `writer`.

    `seqs`: every example's `Sequence` (`build_sequence`); `batches`: lists of example indices (length-sorted, from
    `plan_store`), right-padded with `pad`; `head`: `head_parts(model)` (used only for `cfg.topk`). Examples already
    in `writer.committed_ids` are computed with their batch but not written again. `shard` / `n_shards` and
    `console` only label the progress line. The caller opens and closes the `PartWriter` (bench/capture.py times
    this loop against the bare forward).
    """
    # fp32 once per run, not per example: a 152k x 2048 head is 1.2 GB in fp32
    logit_head = TeacherHead(head["weight"].float(), None if head["bias"] is None else head["bias"].float(),
                             head["logit_scale"], head["final_logit_softcap"]) if cfg.topk else None
    n_examples = sum(len(batch) for batch in batches)
    total = sum(len(seqs[i].ids) for batch in batches for i in batch)
    # ETA from tokens: batches are length-sorted, so the last examples are the longest
    bar = console.bar(f"cache-teacher part {shard}/{n_shards}", total=n_examples, unit="ex", eta_count=("tok", total))
    start = time.perf_counter()
    for batch in batches:
        lens = [len(seqs[i].ids) for i in batch]
        width = max(lens)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for b, i in enumerate(batch):
            ids[b, :lens[b]] = torch.tensor(seqs[i].ids)
            mask[b, :lens[b]] = 1
        hidden = teacher_states(model, ids.to(device), mask.to(device))  # [B, T, d]
        for b, i in enumerate(batch):
            if i in writer.committed_ids:
                continue
            h = hidden[b, :lens[b]]  # [L, d]: row k is the state after ids[0..k]
            extra = {}
            if cfg.topk:
                z = teacher_logits(h.to(logit_head.weight.device), logit_head)  # [L, V] fp32
                values, indices = z.topk(min(cfg.topk, z.shape[-1]), dim=-1)
                extra = {"topk_values": values.cpu(), "topk_indices": indices.cpu(),
                         "logsumexp": torch.logsumexp(z, dim=-1).cpu()}
            s = seqs[i]
            writer.add(i, s.ids, s.prompt_len, s.offsets, h.cpu(), **extra)
        bar.update(len(batch), counts={"tok": sum(lens)})
    bar.close()
    elapsed = time.perf_counter() - start
    if console.mode == "off":  # else the progress line's last state said it
        console.note(f"part {shard}/{n_shards}: {n_examples} examples, {total} tokens in {elapsed:.1f} s "
                     f"({total / max(1e-9, elapsed):.0f} tokens/s)")
