"""`dskd-pipe distill`: train a student from the teacher-state store (or a teacher run online) with one of the methods
of pipeline/methods.py (SFT, vanilla KD, DSKD, DSKD-CMA, DSKD-CMA-GA, ...; spec/dskd.md, spec/cma_ga.md).

The loop below never names a method: it asks the method's entry for its parts, collate extras, loss and metrics.

Offline (--cache) and online (--teacher) share one path: the same dataset and collate build the teacher view; the
teacher's hidden states come from the store or from the teacher model, its head and embeddings from the store or
the model. Every loss term is a token SUM; the step's total over its micro-batches (and ranks) is divided once by
the step's supervised student tokens (spec/dskd.md "Reduction").

Under torchrun (WORLD_SIZE > 1) the student and the method's trained parts run under DDP, or FSDP2 with --fsdp
(pipeline/distributed.py). Each optimizer step takes the next micro-batch x accumulation x processes examples of
the epoch order, each process its own slice, so N processes x b x k compute the step of 1 process x b x N*k.
Checkpoints go through torch.distributed.checkpoint (a run saved by N processes resumes on M); rank 0 prints the
final lines and writes the outputs.

Output folder: the student (save_pretrained, safetensors) and its tokenizer, projectors.safetensors
(+ discriminator.safetensors), distill_config.json (the resolved config and the store's fingerprints),
metrics.jsonl, checkpoints/, README.md (a Hugging Face model card), curves.png (with matplotlib), and best/ (the
dev-selected student, with its own card) when a dev set is given.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dskd_pipe.cache.paths import check_out_folder, links_leaving
from dskd_pipe.cache.remote import filesystem
from dskd_pipe.cache.streaming import (Collate, DistillDataset, Side, StoreSource, TextSource, UnionSource,
                                       auto_num_workers, loader_advice, make_loader, teacher_hidden)
from dskd_pipe.pipeline.config import (OUTPUT_ONLY, ConfigError, DistillConfig, config_to_dict, option_problems,
                                      require, save_config)
from dskd_pipe.pipeline.data import TEMPLATE_ID, cut_report, file_fingerprint, load_examples
from dskd_pipe.pipeline.distributed import (Processes, all_reduce_sum, barrier, gradient_sync, local_tensor, setup,
                                            transformer_blocks, wrap)
from dskd_pipe.pipeline.methods import (METHODS, LossInputs, LossTerms, MethodParts, build_parts, collate_extras,
                                        method_options, resolve, unknown_method)
from dskd_pipe.pipeline.models import (check_device, check_vocabulary, default_device, embedding_parts, eos_token_id,
                                       head_parts, last_hidden_state, load_causal_lm, load_tokenizer, logit_transform,
                                       pad_token_id)
from dskd_pipe.pipeline.objectives.divergences import DIVERGENCES, cross_entropy_sum
from dskd_pipe.pipeline.objectives.dskd import TeacherHead
from dskd_pipe.pipeline.progress import Console, quiet_libraries, step_values
from dskd_pipe.pipeline.teacher_store import teacher_head
from dskd_pipe.pipeline.trackers import open_trackers, resolve_report_to
from dskd_pipe.pipeline.training import (MetricsLogger, cosine_schedule, list_checkpoints, load_checkpoint,
                                         micro_batch_seed, param_groups, peek_trainer_state, rng_state,
                                         save_checkpoint, save_safetensors, seed_everything, set_rng_state,
                                         TrainingDiverged, usable_checkpoint, write_json_atomic)

# Tests: os._exit(137) right after the checkpoint of step N; with DIE_RANK_ENV=R, only rank R dies instead, by
# SIGKILL in the middle of step N+1 (gradients computed, not applied), on torchrun's first attempt only.
DIE_AT_STEP_ENV = "DSKD_PIPE_TEST_DIE_AT_STEP"
DIE_RANK_ENV = "DSKD_PIPE_TEST_DIE_RANK"
RESOLVED_CONFIG = "distill_config.json"  # not config.json: that name is the student's HF config
DONE = "distill_done.json"  # written last: the folder holds a finished student


# ---------------------------------------------------------------------------------------------------------------
# Checks and set-up
# ---------------------------------------------------------------------------------------------------------------

def check_config(cfg: DistillConfig) -> None:
    """Raise ConfigError listing every problem with the options at once: the declared ranges and choices of
    pipeline/config.py, then what depends on several options or on the method."""
    require(cfg, "student", "data", "out")
    problems = option_problems(cfg)
    if cfg.method not in METHODS:
        problems.append(unknown_method(cfg.method))
    else:
        try:
            method_options(cfg)
        except ConfigError as e:
            problems.append(str(e))
    if cfg.divergence is not None and cfg.divergence not in DIVERGENCES:
        problems.append(f"--divergence '{cfg.divergence}': choose one of {', '.join(DIVERGENCES)}.")
    uses_teacher = cfg.method not in METHODS or METHODS[cfg.method].uses_teacher
    if bool(cfg.cache) == bool(cfg.teacher) and uses_teacher:
        problems.append("pass exactly one of --cache STORE (offline) or --teacher MODEL (online).")
    if cfg.sample_caches and (not cfg.cache or not uses_teacher):
        problems.append("--sample-cache (student samples, KD terms only) needs --cache with the gold data and a KD "
                        f"method, not {'online --teacher' if uses_teacher else f'--method {cfg.method}'}.")
    if cfg.init_from and not list_checkpoints(Path(cfg.init_from)):
        problems.append(f"--init-from {cfg.init_from}: no checkpoint there (a distill output folder holds "
                        "checkpoints/step-N).")
    try:
        resolve_report_to(cfg.report_to, cfg.tensorboard)
    except ConfigError as e:
        problems.append(str(e))
    if cfg.ga_mode == "released" and (cfg.ga_directions or cfg.disc_spectral_norm or cfg.ga_reachable_keys):
        problems.append("--ga-directions, --disc-spectral-norm and --ga-reachable-keys change the paper's trained D; "
                        "--ga-mode released keeps the released code's fixed random D. Drop one of them.")
    if cfg.loss_balance == "gradmag" and cfg.fsdp:
        problems.append("--loss-balance gradmag takes per-part gradients of the student's last block, which FSDP2 "
                        "shards; use DDP (drop --fsdp) or --loss-balance weights.")
    if cfg.out and cfg.student and _same_path(cfg.out, cfg.student):
        problems.append(f"--out {cfg.out} is the --student folder: the run would write over the weights it starts "
                        "from. Pass another --out.")
    if problems:
        raise ConfigError("\n".join(problems))


def _same_path(a: str, b: str) -> bool:
    """Whether two existing local paths are the same file or folder (links and '..' resolved)."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def check_out(cfg: DistillConfig) -> Path:
    """--out, checked before anything is loaded (cache/paths.check_out_folder): writable, and new, empty or this
    stage's own earlier run (its distill_config.json), never a folder holding something else. An earlier run's folder
    may hold no link to outside it, since the run writes its files again."""
    out = check_out_folder(cfg.out, lambda folder: (folder / RESOLVED_CONFIG).is_file(), "distill", ConfigError)
    if out.is_dir() and (leaving := links_leaving(out)):
        raise ConfigError(f"--out {out}: {', '.join(leaving[:3])}: link(s) to outside the run folder; the run writes "
                          "its files again and would write there. Remove the link(s), or pass another --out.")
    return out


def expected_fingerprints(cfg: DistillConfig) -> dict:
    """What the store must have been built from: the same data file, template and sequence lengths."""
    return {
        "data": {"path": str(cfg.data), "sha256": file_fingerprint(cfg.data)},
        "template": TEMPLATE_ID,
        "lengths": {"max_prompt_length": cfg.max_prompt_length, "max_length": cfg.max_length},
    }


@dataclass
class Teacher:
    """The teacher as the losses need it: head, input embeddings, pad id, and the model itself when online."""

    head: TeacherHead | None
    embed: torch.Tensor | None  # [Vt, dt]
    embed_scale: float
    pad_id: int
    model: object = None  # online mode only
    loaded_tokenizer: object = None  # cross-tokenizer alignments (ETA, ALM, prefix-kd, mined); online: the model's
    load_tokenizer: object = None  # offline: () -> the store's tokenizer, called on first use of .tokenizer

    @property
    def tokenizer(self):
        """The teacher's tokenizer. Offline it is rebuilt from the store when a method first asks: most methods
        never do, and a 152k-entry tokenizer takes 1-2 s to build on a CPU (bench/fixed_cost.py)."""
        if self.loaded_tokenizer is None and self.load_tokenizer is not None:
            self.loaded_tokenizer = self.load_tokenizer()
        return self.loaded_tokenizer

    @torch.no_grad()
    def hidden(self, batch: dict) -> torch.Tensor:
        """[B, T, dt]: the cached rows, or the teacher run now; zeros on pads either way (as the store's collate)."""
        if "teacher_hidden_rows" in batch:
            return teacher_hidden(batch)
        mask = batch["teacher_attention_mask"]
        h = last_hidden_state(self.model, batch["teacher_input_ids"], mask)  # [B, T, dt]
        return h * mask[..., None].to(h.dtype)


def open_teacher(cfg: DistillConfig, device: str):
    """(Teacher, source of teacher views). Offline: the store, checked against --data; online: the teacher model."""
    student_examples = None
    if cfg.cache:
        from dskd_pipe.cache.reader import open_store

        reader = open_store(cfg.cache, expected=expected_fingerprints(cfg))
        h, e = reader.head(), reader.embeddings()
        reader.tokenizer_names()  # a bad file name is refused now, even when no method builds the tokenizer
        teacher = Teacher(teacher_head(h, device), e["weight"].to(device), float(e["embed_scale"]),
                          int(reader.manifest.pad_id), load_tokenizer=reader.tokenizer)
        source = StoreSource(reader, limit=cfg.limit)
        if cfg.sample_caches:
            # Sample stores: the same teacher, tokenizer, template and lengths as the gold store; their data are
            # student generations, so no data fingerprint is compared.
            same = {k: reader.manifest.fingerprints[k] for k in ("teacher", "tokenizer", "template", "lengths")}
            samples = [StoreSource(open_store(path, expected=same)) for path in cfg.sample_caches]
            source = UnionSource(source, samples)
        return teacher, source
    student_examples = load_examples(cfg.data, limit=cfg.limit, skip_bad=cfg.skip_bad)
    if not cfg.teacher:  # sft without a teacher: the teacher view is the student's own tokenisation, unused
        tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
        side = Side(tok, eos_token_id(tok), pad_token_id(tok), cfg.max_prompt_length, cfg.max_length)
        return Teacher(None, None, 1.0, side.pad_id), TextSource(student_examples, side)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(cfg.teacher_dtype)
    model = load_causal_lm(cfg.teacher, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    model.requires_grad_(False)
    tok = load_tokenizer(cfg.teacher, trust_remote_code=cfg.trust_remote_code)
    check_vocabulary(model, tok, cfg.teacher)
    side = Side(tok, eos_token_id(tok), pad_token_id(tok), cfg.max_prompt_length, cfg.max_length)
    e = embedding_parts(model)
    teacher = Teacher(teacher_head(head_parts(model), device), e["weight"], float(e["embed_scale"]), side.pad_id,
                      model, loaded_tokenizer=tok)
    return teacher, TextSource(student_examples, side)


def build_student(cfg: DistillConfig, device: str):
    """The trainable student (fp32 master weights) from --student; LoRA through peft when lora_rank > 0. A resumed
    run loads its trained weights from the checkpoint afterwards."""
    model = load_causal_lm(cfg.student, dtype=torch.float32, device=device, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora_rank:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("--lora-rank needs the `peft` package: pip install peft") from None
        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_targets), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    model.train()
    return model


def _hf(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def student_forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hs [B, S, ds] post-final-norm, Zs [B, S, Vs]) of the student; the head applied to Hs as the model does."""
    hf = _hf(model)
    hidden = last_hidden_state(hf, batch["input_ids"], batch["attention_mask"])  # [B, S, ds]
    logits = hf.get_output_embeddings()(hidden)  # [B, S, Vs]
    scale, cap = logit_transform(hf)
    if scale != 1.0:
        logits = logits * scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return hidden, logits


def _check_same_tokenisation(batch: dict, method: str) -> None:
    same = batch["input_ids"].shape == batch["teacher_input_ids"].shape and torch.equal(
        batch["labels"], batch["teacher_labels"])
    if not same:
        raise ConfigError(f"--method {method} needs the teacher and the student to tokenise the same way (same "
                          "vocabulary); these do not. Use --method dskd-cma or cma-ga for different tokenizers.")


# ---------------------------------------------------------------------------------------------------------------
# One micro-batch, one optimizer step
# ---------------------------------------------------------------------------------------------------------------

def micro_batch_loss(cfg: DistillConfig, batch: dict, student, teacher: Teacher, parts: MethodParts, *,
                     step: int = 0, progress: float = 0.0, adversary_step: bool = False, total_steps: int = 1,
                     step_tokens: torch.Tensor | float = 1.0, step_teacher_tokens: torch.Tensor | float = 1.0,
                     step_micro_batches: int = 1) -> LossTerms:
    """The method's LossTerms of one micro-batch (student-side loss SUM, adversary share, logs).

    The student's forward, then the method's loss (pipeline/methods.py). step: optimizer steps done before this
    one; progress: step / total steps; adversary_step, the step's token counts and micro-batches over all
    processes: see LossInputs.
    """
    method = METHODS[cfg.method]
    hs, zs = student_forward(student, batch)
    ht = None
    if method.uses_teacher:
        ht = teacher.hidden(batch)
    if method.same_vocabulary:
        _check_same_tokenisation(batch, cfg.method)
    inputs = LossInputs(cfg, batch, _hf(student), hs, zs, ht, teacher, parts, step=step, progress=progress,
                        adversary_step=adversary_step, total_steps=total_steps, step_tokens=step_tokens,
                        step_teacher_tokens=step_teacher_tokens, step_micro_batches=step_micro_batches)
    terms = method.loss(inputs)
    terms.logs = {"n_student": inputs.n_student.float(), **terms.logs}
    return terms


class Trainee(torch.nn.Module):
    """Everything one optimizer step trains, as one module for the engines (DDP replicates it, FSDP2 shards it):
    the student, the method's projectors and its adversary. Its forward is one micro-batch's loss, so the engines
    see every use of a trained parameter, the losses' direct use of the student's embeddings and head included."""

    def __init__(self, student, parts: MethodParts):
        super().__init__()
        self.student = student
        self.projectors = parts.projectors
        self.discriminator = parts.discriminator
        self.parts = parts  # the same modules (not registered twice: a plain record) and the token map

    def forward(self, cfg: DistillConfig, batch: dict, teacher: Teacher, **clock) -> LossTerms:
        return micro_batch_loss(cfg, batch, self.student, teacher, self.parts, **clock)


def accumulate_gradients(cfg: DistillConfig, micro: list[dict], model, teacher: Teacher, procs: Processes, *,
                         real: list[bool] | None = None, step: int = 0, progress: float = 0.0,
                         adversary_step: bool = False, total_steps: int = 1) -> tuple[dict, torch.Tensor]:
    """Forward/backward this process's micro-batches of one optimizer step; (summed logs, the step's supervised
    student tokens over all processes).

    Reduction (spec/dskd.md): every term is a sum; the step's total is divided by its GLOBAL supervised student
    tokens (all micro-batches, all processes), so k micro-batches of b examples on N processes give the gradient
    of one batch of N*k*b. The engines average gradients over processes, hence the factor `world`. Gradients are
    reduced in the backward of the last micro-batch only. Every random draw of a micro-batch (dropout) is seeded
    from (seed, step, its index in the step over all processes): training.micro_batch_seed. `real[k]` False: a
    filler micro-batch (a process whose share of the last step of an epoch is short) that runs with weight 0, so
    that every process takes part in every collective. `model`: a Trainee, or the engine around one.
    """
    real = [True] * len(micro) if real is None else real
    counts = torch.zeros(3, device=procs.device)  # student tokens, teacher tokens, micro-batches: own, then all
    for b, r in zip(micro, real):
        if r:
            counts += torch.stack([(b["labels"] != -100).sum(), (b["teacher_labels"] != -100).sum(),
                                   torch.ones((), device=b["labels"].device)]).float()
    n_step, n_teacher, n_micro = all_reduce_sum(counts, procs).clamp_min(1.0)
    sums: dict[str, torch.Tensor] = {}
    for k, (b, r) in enumerate(zip(micro, real)):
        # Dropout of micro-batch k of this process, i.e. of the step's micro-batch rank * grad_accum + k (the
        # examples are cut that way: _Steps): the same masks however the step is split over processes or resumed.
        torch.manual_seed(micro_batch_seed(cfg.seed, step, procs.rank * cfg.grad_accum + k))
        with gradient_sync(model, procs, sync=k == len(micro) - 1):
            with _autocast(procs.device, cfg):
                terms = model(cfg, b, teacher, step=step, progress=progress, adversary_step=adversary_step,
                              total_steps=total_steps, step_tokens=n_step, step_teacher_tokens=n_teacher,
                              step_micro_batches=int(n_micro))
            total = terms.loss / n_step
            if terms.adversary_loss is not None:
                total = total + terms.adversary_loss
            (total * (float(procs.world) if r else 0.0)).backward()
        weight = 1.0 if r else 0.0  # a filler adds nothing, but its names: every process sums the same logs
        for name, v in terms.logs.items():
            sums[name] = sums.get(name, 0.0) + weight * v.detach().float()
        sums["loss"] = sums.get("loss", 0.0) + weight * terms.loss.detach().float()
    return sums, n_step


def gradient_norm(params) -> torch.Tensor:
    """The total L2 norm of the gradients of `params` (what clipping would use), without clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    return local_tensor(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())


def check_finite_step(cfg: DistillConfig, step: int, sums: dict, n_step: float, grad_norm: float, out: Path,
                      adversary=None) -> None:
    """TrainingDiverged naming the first non-finite loss term (or the gradient norm) of optimizer step `step`, what
    was kept and what to change; nothing when all are finite. `sums`: the step's summed logs over all processes."""
    terms = {"loss": sums["loss"] / n_step, **step_metrics(cfg, sums, n_step)}
    bad = [(k, v) for k, v in terms.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        name, value = next(((k, v) for k, v in bad if k != "loss"), bad[0])
        what = f"the loss term '{name}' is {value}"
    elif not math.isfinite(grad_norm):
        what = f"the gradient norm is {grad_norm} (loss {terms['loss']:.4g}: the backward overflowed)"
    elif adversary is not None and not math.isfinite(float(gradient_norm(adversary.parameters()))):
        what = "the discriminator's gradient is not finite"
    else:
        return
    kept = list_checkpoints(out)
    raise TrainingDiverged(
        f"step {step}: {what}; the run stopped before that update (weights, checkpoints and outputs hold no NaN; "
        f"{'the last checkpoint is ' + kept[-1].name if kept else 'no checkpoint was written'}). Lower --lr (now "
        f"{cfg.lr:g}), clip with --max-grad-norm (now {cfg.max_grad_norm:g}), or check "
        + (f"--kd-temperature (now {cfg.kd_temperature:g}) and " if METHODS[cfg.method].uses_teacher else "")
        + "the data.")


def check_finite_weights(model, procs: Processes, step: int) -> None:
    """TrainingDiverged if any trained weight (any process's shard) is not finite: nothing non-finite is saved."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    bad = sum(int(not bool(torch.isfinite(t).all())) for t in local if t.numel())
    if float(all_reduce_sum(torch.tensor([float(bad)], device=procs.device), procs)):
        raise TrainingDiverged(f"step {step}: the weights are no longer finite after the optimizer step; nothing was "
                               "saved. Lower --lr, or clip with --max-grad-norm.")


# ---------------------------------------------------------------------------------------------------------------
# Metrics, evaluation, outputs
# ---------------------------------------------------------------------------------------------------------------

def step_metrics(cfg: DistillConfig, sums: dict, n_step: float) -> dict:
    """Normalised terms of one optimizer step from the summed logs of its micro-batches (and processes)."""
    return METHODS[cfg.method].metrics(sums, n_step)


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
    from dskd_pipe.pipeline.config import ScoreConfig

    return ScoreConfig(greedy=cfg.dev_rouge_greedy, temperature=1.0, top_p=1.0, top_k=0, no_repeat_ngram_size=0,
                       max_new_tokens=max(1, cfg.max_length - cfg.max_prompt_length),
                       max_prompt_length=cfg.max_prompt_length, batch_size=cfg.micro_batch_size, progress=False,
                       seeds=tuple(cfg.seed + k for k in range(1 if cfg.dev_rouge_greedy else cfg.dev_rouge_passes)))


def dev_rouge(student, tokenizer, examples, cfg: DistillConfig) -> float | None:
    """Dev ROUGE-L x 100, the mean over the passes of dev_rouge_config, via stages/score.py (None without it)."""
    try:
        from dskd_pipe.stages.score import evaluate_rouge
    except ImportError:
        return None
    score_cfg = dev_rouge_config(cfg)
    was = student.training
    student.eval()
    try:
        return float(evaluate_rouge(_hf(student), tokenizer, examples, score_cfg.seeds, score_cfg))
    finally:
        student.train(was)


def save_student(student, tokenizer, folder: Path) -> None:
    """A normal HF folder; a LoRA student is merged into its base first."""
    model = student
    if hasattr(student, "merge_and_unload"):
        import copy

        model = copy.deepcopy(student).merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_outputs(trainee: Trainee, procs: Processes, cfg: DistillConfig, tokenizer, folder: Path,
                 parts: bool = True, student: bool = True) -> None:
    """Rank 0 writes `folder`: with `student`, the student as an HF folder (safetensors, LoRA merged) and its
    tokenizer; with `parts`, each trained part of the method as NAME.safetensors. Every process calls it: under
    FSDP2 the full weights are gathered to rank 0 first, loaded there into a fresh student on the CPU."""
    if procs.engine != "fsdp":
        if procs.main and student:
            save_student(trainee.student, tokenizer, folder)
        if procs.main:
            for name in ("projectors", "discriminator"):
                if parts and getattr(trainee, name) is not None:
                    save_safetensors(getattr(trainee, name), folder / f"{name}.safetensors")
        return
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(trainee, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not procs.main:
        return
    if student:
        model = build_student(cfg, "cpu")
        model.load_state_dict({k[len("student."):]: v for k, v in full.items() if k.startswith("student.")})
        save_student(model, tokenizer, folder)
    for name in ("projectors", "discriminator"):
        part = {k[len(name) + 1:]: v.contiguous() for k, v in full.items() if k.startswith(name + ".")}
        if parts and part:
            save_file(part, str(folder / f"{name}.safetensors"))


def _autocast(device: str, cfg: DistillConfig):
    use = torch.device(device).type == "cuda" and cfg.dtype in ("", "bfloat16")
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use)


class _Steps:
    """How one process cuts the epoch into optimizer steps: each step takes the next `global_batch` examples of
    the epoch order (fewer in the last step), this process the slice `rank` of `rank_batch` of them, in
    micro-batches of `micro` (cache/streaming.rank_positions). Every process runs as many micro-batches as rank 0,
    the fullest, padding its own short share with fillers."""

    def __init__(self, cfg: DistillConfig, procs: Processes, n: int):
        self.n, self.micro, self.rank = n, cfg.micro_batch_size, procs.rank
        self.rank_batch = cfg.micro_batch_size * cfg.grad_accum
        self.global_batch = self.rank_batch * procs.world
        self.per_epoch = math.ceil(n / self.global_batch)

    def examples(self, position: int) -> int:
        """Examples of the step that starts at `position` of the epoch order, over all processes."""
        return min(self.global_batch, self.n - position)

    def micro_batches(self, position: int) -> tuple[int, int]:
        """(micro-batches every process runs, how many of them are this process's own) for that step."""
        step = self.examples(position)
        own = min(self.rank_batch, max(0, step - self.rank * self.rank_batch))
        return math.ceil(min(self.rank_batch, step) / self.micro), math.ceil(own / self.micro)


def _engine_blocks(student, procs: Processes) -> list:
    return transformer_blocks(student) if procs.engine == "fsdp" else []


# ---------------------------------------------------------------------------------------------------------------
# Runs that continue another (--resume, --init-from) and what a finished run leaves beside the student
# ---------------------------------------------------------------------------------------------------------------

# What --resume may change: how long, where and how visibly the run goes on, never what it computes. The store path
# may change too (a moved store), its fingerprints may not.
# Where the run lies is no part of it either: a run folder moved or copied elsewhere resumes with its new --out (and
# the --init-from it started from matters no more once it has checkpoints of its own).
RESUME_MAY_CHANGE = OUTPUT_ONLY | {"resume", "epochs", "max_steps", "save_every", "keep_checkpoints", "num_workers",
                                   "prefetch_factor", "device", "dev_data", "dev_limit", "dev_rouge",
                                   "gradient_checkpointing", "trust_remote_code", "cache", "out", "init_from",
                                   # a resume on another number of processes keeps the global batch through
                                   # --grad-accum, and may change the engine (checkpoints load on any)
                                   "grad_accum", "fsdp"}
# What --init-from must share with the run it starts from: what its saved parts are (shapes and meaning). Data,
# lengths and hyper-parameters may change (the next on-policy round trains on new samples).
INIT_MUST_MATCH = ("method", "student", "teacher", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def store_record(cache: str) -> dict | None:
    """{"path", "fingerprints", "config"} of a finished teacher store (config: its saved CacheConfig, or None)."""
    if not cache:
        return None
    from dskd_pipe.cache.format import CONFIG
    from dskd_pipe.cache.reader import read_manifest

    record = {"path": cache, "fingerprints": read_manifest(cache).fingerprints, "config": None}
    try:
        fs, root = filesystem(cache)
        record["config"] = json.loads(fs.cat(f"{root.rstrip('/')}/{CONFIG}")).get("config")
    except (OSError, ValueError):  # an older store without its config: the card shows no cache-teacher command
        pass
    return record


def _fingerprint_changes(before: dict, now: dict, keys) -> list[str]:
    """Readable differences between two stores' fingerprints."""
    changes = []
    for key in keys:
        a, b = before.get(key), now.get(key)
        if a is None or a == b:
            continue
        if key == "teacher" and a.get("name") != b.get("name"):
            changes.append(f"the store's teacher ({a.get('name')} -> {b.get('name')})")
        elif key == "teacher":
            changes.append(f"the store's teacher weights or config ({a.get('name')}, other hashes)")
        elif key == "data":
            changes.append(f"the store's data ({a.get('path')} sha256 {str(a.get('sha256'))[:12]} -> {b.get('path')} "
                           f"sha256 {str(b.get('sha256'))[:12]})")
        else:
            changes.append(f"the store's {'teacher tokenizer' if key == 'tokenizer' else key} "
                           f"({str(a)[:40]} -> {str(b)[:40]})")
    return changes


def check_same_run(cfg: DistillConfig, folder: Path, resume: bool, store: dict | None) -> None:
    """Refuse, naming every changed setting, to --resume (resume=True) or --init-from a run in `folder` whose saved
    config or store fingerprints differ where they must not: loading its checkpoint would fail half-way (a projector
    of another size, a discriminator file that does not exist) or silently train something else."""
    saved_file = folder / RESOLVED_CONFIG
    if not saved_file.is_file():
        return  # a folder from an older version: the checkpoint loads or fails on its own
    try:
        saved = json.loads(saved_file.read_text())
        if not isinstance(saved, dict) or not isinstance(saved.get("config", {}), dict):
            raise ValueError("not a resolved distill config")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{saved_file}: damaged ({' '.join(str(e).split())[:120]}), so the run's settings are "
                          "unknown. Start again in another --out.") from None
    before, now = saved.get("config", {}), config_to_dict(cfg)
    saved_store = saved.get("store")
    keys = [k for k in now if k not in RESUME_MAY_CHANGE] if resume else list(INIT_MUST_MATCH)
    if resume and saved_store is None:
        keys.append("cache")  # no fingerprints saved: the path is all there is to compare
    changes = [f"--{k.replace('_', '-')} ({before[k]!r} -> {now[k]!r})" for k in keys
               if k in before and before[k] != now[k]]
    if saved_store is not None and store is not None:
        changes += _fingerprint_changes(saved_store, store["fingerprints"],
                                        list(store["fingerprints"]) if resume else ["teacher", "tokenizer"])
    elif saved_store is not None and store is None and resume:
        changes.append(f"--cache ({before.get('cache')!r} -> none)")
    if changes:
        what = "--resume" if resume else f"--init-from {folder}"
        raise ConfigError(f"{folder}: {what} with other settings than that run's: {'; '.join(changes)}. Use its "
                          f"settings (all in {saved_file}), or another --out for a new run.")


def report_cut_examples(cfg: DistillConfig, side: Side, n: int, console: Console) -> None:
    """Warn how many of the first `n` training examples lose tokens at the student's length limits (the teacher
    side was counted by cache-teacher). Read from --data, which the store's fingerprint ties to the store's texts."""
    examples = load_examples(cfg.data, limit=n, skip_bad=True, report=lambda _: None)
    if cut := cut_report((side.encode(e.prompt, e.response) for e in examples), cfg.max_prompt_length,
                         cfg.max_length, what="training examples (student tokens)"):
        console.warn(cut)


def write_documents(cfg: DistillConfig, out: Path, state: dict, world: int, store: dict | None, done: dict,
                    console: Console) -> None:
    """The model cards of the student folders (out/README.md, and best/, last/ when a dev set selected the output)
    and curves.png (when matplotlib is installed)."""
    from dskd_pipe.pipeline.curves import CURVES, plot_paths
    from dskd_pipe.pipeline.model_card import final_metrics, write_model_card

    common = dict(steps=state["step"], epochs=state["epoch"], world=world, store=store,
                  metrics=final_metrics(out / "metrics.jsonl"))
    metric = "dev ROUGE-L" if cfg.dev_rouge else "dev loss"
    if done.get("student") == "best":
        picked = f"epoch {done.get('best_epoch')} (step {done.get('best_step')}), the best {metric}"
        write_model_card(out, cfg, **common, selected=f"This folder holds the dev-selected model: {picked}. The "
                         "model after the last step is in `last/`.")
        write_model_card(out / "last", cfg, **common, config_file=f"../{RESOLVED_CONFIG}", selected="The model "
                         "after the last step; the run's output (the dev-selected model) is in the folder above.")
    else:
        write_model_card(out, cfg, **common)
    if (out / "best" / "config.json").is_file():
        write_model_card(out / "best", cfg, **common, config_file=f"../{RESOLVED_CONFIG}", selected=f"The model "
                         f"of the best {metric} so far (`best/`); the run's output is in the folder above.")
    try:
        plot_paths([out], out / CURVES, title=f"{cfg.method}: {out.name}")
    except ConfigError as e:  # no matplotlib: the curves are one `pip install matplotlib` + `dskd-pipe plot` away
        console.note(f"no {CURVES}: {e}")
    except Exception as e:  # a picture must not fail a finished run (matplotlib's font cache, a backend)
        console.warn(f"{out / CURVES} not drawn ({' '.join(str(e).split())[:200]}); `dskd-pipe plot {out}` retries.")


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------

@quiet_libraries
def run(cfg: DistillConfig) -> Path:
    check_config(cfg)
    cfg = resolve(cfg)  # the method's published defaults for options left unset
    out = check_out(cfg)  # before anything is loaded
    procs = setup(check_device(cfg.device or default_device()), fsdp=cfg.fsdp)
    rank, device = procs.rank, procs.device
    method = METHODS[cfg.method]
    console = Console.for_stage(cfg.progress and procs.main, cfg.quiet or not procs.main)
    checkpoints = list_checkpoints(out)
    if checkpoints and not cfg.resume:
        raise ConfigError(f"{out} already holds checkpoints ({checkpoints[-1].name}). Pass --resume to continue, "
                          "or choose another --out.")
    # The newest whole checkpoint: a newer one cut short (a copy, a full disk) is named (by rank 0) and skipped.
    warn = console.warn if procs.main else (lambda message: None)
    resume_from = usable_checkpoint(out, warn) if cfg.resume and checkpoints else None
    # --init-from: a fresh run that starts from another run's last checkpoint (ignored once this run has its own).
    init_from = usable_checkpoint(Path(cfg.init_from), warn) if cfg.init_from and resume_from is None else None
    store = store_record(cfg.cache)
    if resume_from is not None or init_from is not None:  # before any model is loaded
        check_same_run(cfg, out if resume_from is not None else Path(cfg.init_from), resume_from is not None, store)
    seed_everything(cfg.seed)  # the same on every process: one student, projector and discriminator init

    # Teacher side (store or model) and the student.
    teacher, source = open_teacher(cfg, device)
    tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    student_side = Side(tok, eos_token_id(tok), pad_token_id(tok), cfg.max_prompt_length, cfg.max_length)
    if rank == 0:
        gold = source.sources[0] if isinstance(source, UnionSource) else source  # samples are no --data records
        report_cut_examples(cfg, student_side, len(gold), console)
    plain_collate = Collate(student_side.pad_id, teacher.pad_id)
    student = build_student(cfg, device)
    check_vocabulary(_hf(student), tok, cfg.student)

    # The method's parts (projectors, an adversary, token maps) and the student, as one module under the engine;
    # the optimizers over the engine's parameters (FSDP2 replaces them by sharded ones); the schedule.
    parts = build_parts(cfg, teacher, tok, _hf(student), device)
    collate = Collate(student_side.pad_id, teacher.pad_id, collate_extras(cfg, teacher, tok))
    trainee = Trainee(student, parts)
    model = wrap(trainee, procs, _engine_blocks(student, procs), find_unused_parameters=method.adversary is not None,
                 bf16=device.startswith("cuda") and cfg.dtype in ("", "bfloat16"))
    extra = [(trainee.projectors, cfg.projector_lr)] if trainee.projectors is not None else []
    optimizer = torch.optim.AdamW(param_groups(trainee.student, cfg.lr, cfg.weight_decay, extra), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    adversary_opt = (method.adversary.optimizer(cfg, trainee.discriminator) if method.adversary is not None
                     else None)
    steps = _Steps(cfg, procs, len(source))
    run_steps = min(cfg.max_steps, steps.per_epoch * cfg.epochs) if cfg.max_steps else steps.per_epoch * cfg.epochs
    # Step numbers continue across --init-from runs: this run does steps start_step + 1 .. start_step + run_steps.
    start_step = (int(peek_trainer_state(resume_from).get("start_step", 0)) if resume_from is not None
                  else int(peek_trainer_state(init_from)["step"]) if init_from is not None else 0)
    total_steps = start_step + run_steps
    scheduler = cosine_schedule(optimizer, cfg.schedule_steps or total_steps, cfg.warmup_steps, cfg.min_lr)
    optimizers = {"student": optimizer, "adversary": adversary_opt}

    state = {"step": start_step, "start_step": start_step, "epoch": 0, "position": 0, "best": None}
    if resume_from is not None:
        state.update(load_checkpoint(resume_from, model=model, optimizers=optimizers, scheduler=scheduler,
                                     procs=procs))
        console.note(f"resuming from {resume_from} (step {state['step']}, epoch {state['epoch']}, "
                     f"position {state['position']})")
    elif init_from is not None:
        load_checkpoint(init_from, model=model, optimizers=optimizers, scheduler=scheduler, procs=procs)
        console.note(f"starting from {init_from} (step {start_step}; this run's data from its first example)")
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / DONE).unlink(missing_ok=True)
        save_config(cfg, out / RESOLVED_CONFIG, **({"store": store["fingerprints"]} if store else {}))
    resumed_at = state["step"] if resume_from is not None else None
    trackers = (open_trackers(resolve_report_to(cfg.report_to, cfg.tensorboard), out, config_to_dict(cfg),
                              resumed_at, note=console.note, warn=console.warn) if procs.main else [])
    metrics = MetricsLogger(out / "metrics.jsonl", enabled=procs.main, truncate_after_step=resumed_at,
                            trackers=trackers)
    # Under FSDP2 every process takes part in the evaluation's forwards; otherwise rank 0 evaluates alone.
    dev_examples = None
    if cfg.dev_data and (procs.main or procs.engine == "fsdp"):
        from dskd_pipe.stages.score import unescape_newlines  # a literal "<n>" is a newline, as in `score`

        dev_examples = unescape_newlines(load_examples(cfg.dev_data, limit=cfg.dev_limit))
    die_at = int(os.environ.get(DIE_AT_STEP_ENV, 0))
    die_rank = int(os.environ.get(DIE_RANK_ENV, -1))
    die_rank = die_rank if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" else -2

    def checkpoint() -> None:
        check_finite_weights(model, procs, state["step"])
        trainer_state = {k: v for k, v in state.items() if v is not None}
        save_checkpoint(out, state["step"], model=model, optimizers=optimizers, scheduler=scheduler,
                        trainer_state=trainer_state, procs=procs, keep=cfg.keep_checkpoints)
        if die_at and state["step"] == die_at and die_rank == -1:
            os._exit(137)

    bar = console.bar(f"distill {cfg.method}", run_steps, "step", initial=state["step"] - start_step)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    workers = cfg.num_workers if cfg.num_workers >= 0 else auto_num_workers(device)
    wait_fracs = []  # loader wait shares of this run's first steps, for loader_advice
    filler = None  # a batch this process ran before: the template of its filler micro-batches
    while state["step"] < total_steps and state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        dataset = DistillDataset(source, student_side, cfg.seed, epoch, rank, procs.world, start=state["position"],
                                 rank_batch=steps.rank_batch)
        # A loader-own generator: creating the iterator must not draw from the global RNG (exact resume).
        loader = make_loader(dataset, cfg.micro_batch_size, collate, workers, cfg.prefetch_factor,
                             pin_memory=device.startswith("cuda"))
        loader.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        batches = iter(loader)
        while state["step"] < total_steps and state["position"] < steps.n:
            t0 = time.perf_counter()
            n_micro, own = steps.micro_batches(state["position"])
            micro, wait = [], 0.0
            for _ in range(own):
                tw = time.perf_counter()
                b = next(batches)
                wait += time.perf_counter() - tw
                micro.append({k: v.to(device, non_blocking=True) for k, v in b.items()})
            if filler is None:
                filler = micro[0] if micro else _first_batch(source, student_side, collate, cfg, epoch, device)
            real = [True] * len(micro) + [False] * (n_micro - len(micro))
            micro += [filler] * (n_micro - len(micro))
            adversary_step = method.adversary is not None and method.adversary.steps_at(cfg, state["step"])
            sums, n_step = accumulate_gradients(cfg, micro, model, teacher, procs, real=real, step=state["step"],
                                                progress=state["step"] / max(1, total_steps),
                                                adversary_step=adversary_step, total_steps=total_steps)
            if die_at and state["step"] == die_at and die_rank == rank:
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            names = sorted(sums)
            totals = all_reduce_sum(torch.stack([torch.as_tensor(sums[k], device=device).float() for k in names]),
                                    procs)
            sums = dict(zip(names, totals.tolist()))
            grad_norm = (local_tensor(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
                         if cfg.max_grad_norm > 0 else gradient_norm(trainable))
            # Non-finite loss or gradient: stop before the update, so no NaN reaches the weights (README "A run that
            # diverges"). Every process sees the same totals and norm, so all stop together.
            check_finite_step(cfg, state["step"] + 1, sums, float(n_step), float(grad_norm), out,
                              adversary=trainee.discriminator if adversary_step else None)
            step_lrs = [g["lr"] for g in optimizer.param_groups]  # the lrs this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if adversary_opt is not None:
                if adversary_step:
                    adversary_opt.step()
                adversary_opt.zero_grad(set_to_none=True)
            state["position"] += steps.examples(state["position"])
            state["step"] += 1

            elapsed = time.perf_counter() - t0
            own_tokens = sum(b["attention_mask"].sum() for b, r in zip(micro, real) if r)
            n_tokens = float(all_reduce_sum(torch.as_tensor(own_tokens, device=device).float(), procs))
            record = {"step": state["step"], "epoch": epoch, "loss": sums["loss"] / float(n_step),
                      **step_metrics(cfg, sums, float(n_step)), "grad_norm": float(grad_norm),
                      "lr": step_lrs[0], "step_s": elapsed, "tokens_per_s": n_tokens / elapsed,
                      "loader_wait_frac": wait / elapsed, "supervised_tokens": float(n_step)}
            if trainee.projectors is not None:
                record["projector_lr"] = step_lrs[-1]
            if adversary_opt is not None:
                record["adversary_steps"] = int(adversary_step)
            metrics.log(record)
            bar.update(1, values=step_values(record), counts={"tok": n_tokens})
            # Steps 3-22 of the run (past the workers' start): say once if the loader held the GPU up.
            if rank == 0 and device.startswith("cuda") and 3 <= state["step"] - start_step <= 22:
                wait_fracs.append(record["loader_wait_frac"])
                advice = loader_advice(wait_fracs, workers) if len(wait_fracs) == 20 else None
                if advice:
                    console.warn(advice)
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total_steps:
                checkpoint()
        finished_epoch = state["position"] >= steps.n
        if finished_epoch:
            state["epoch"] += 1
            state["position"] = 0
            check_finite_weights(model, procs, state["step"])  # before best/ is written (every process: a collective)
            if dev_examples is not None:
                state["best"] = _evaluate(cfg, trainee, procs, tok, dev_examples, student_side, plain_collate, out,
                                          state, metrics)
        checkpoint()
        if not finished_epoch:
            break
    bar.close()

    check_finite_weights(model, procs, state["step"])
    done = {"step": state["step"], "method": cfg.method}
    if state.get("best") is not None and (out / "best" / "config.json").is_file():
        # Model selection (spec/evaluation.md): the best dev epoch is the run's output; the last one stays.
        save_outputs(trainee, procs, cfg, tok, out / "last", parts=False)
        if procs.main:
            _copy_model_files(out / "best", out)
        done.update(student="best", best_epoch=state.get("best_epoch"), best_step=state.get("best_step"),
                    dev_metric="dev_rouge_l" if cfg.dev_rouge else "dev_loss")
        save_outputs(trainee, procs, cfg, tok, out, student=False)
    else:
        save_outputs(trainee, procs, cfg, tok, out)
    if procs.main:
        metrics.close()
        write_documents(cfg, out, state, procs.world, store, done, console)
        write_json_atomic(out / DONE, done)
        which = f"the best dev epoch ({state.get('best_epoch')})" if done.get("student") == "best" else "the student"
        print(f"{out}: {which} after {state['step']} steps ({cfg.method}).")
    barrier(procs)
    return out


DEV_CURVE = "dev_curve.json"  # every dev evaluation of the run and the selected epoch


def _copy_model_files(src: Path, dst: Path) -> None:
    """The files of a saved HF model folder (weights, configs, tokenizer), copied over those in `dst`."""
    import shutil

    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)


def _first_batch(source, side: Side, collate: Collate, cfg: DistillConfig, epoch: int, device: str) -> dict:
    """The epoch's first example as a batch: the filler of a process that has no example of its own yet."""
    item = DistillDataset(source, side, cfg.seed, epoch)[0]
    return {k: v.to(device) for k, v in collate([item]).items()}


def _evaluate(cfg, trainee: Trainee, procs: Processes, tok, examples, side, collate, out, state, metrics):
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
