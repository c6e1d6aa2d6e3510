"""`dskd-pipe distill`: train a student from the teacher-state store (or a teacher run online) with one of the methods
of pipeline/methods.py (`dskd-pipe methods` lists them; spec/dskd.md, spec/cma_ga.md).

This module is the run from start to end; each concern lives in its own pipeline module, read top to bottom:
    pipeline/teacher.py     the teacher side: a store (offline) or the teacher model (online)
    pipeline/student.py     the student: building it (LoRA), its forward, saving it
    pipeline/step.py        one optimizer step: the micro-batches' losses, gradients, the divergence checks
    pipeline/evaluation.py  the dev evaluation at epoch ends and the best student
    pipeline/run_folder.py  --out, --resume / --init-from rules, the model cards and curves of a finished run
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

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dskd_pipe.pipeline.config import ConfigError, DistillConfig, config_to_dict, option_problems, require, save_config
from dskd_pipe.pipeline.data import cut_report, load_examples
from dskd_pipe.pipeline.distributed import Processes, all_reduce_sum, barrier, local_tensor, setup, wrap
from dskd_pipe.pipeline.evaluation import evaluate_epoch
from dskd_pipe.pipeline.generation import unescape_newlines
from dskd_pipe.pipeline.loader import (Collate, DistillDataset, Side, UnionSource, auto_num_workers, loader_advice,
                                       make_loader)
from dskd_pipe.pipeline.methods import (METHODS, Method, build_parts, collate_extras, method_options, resolve,
                                        unknown_method)
from dskd_pipe.pipeline.models import (check_device, check_vocabulary, default_device, eos_token_id, load_tokenizer,
                                       pad_token_id)
from dskd_pipe.pipeline.progress import Console, quiet_libraries, step_values
from dskd_pipe.pipeline.run_folder import (DONE, RESOLVED_CONFIG, check_out, check_same_run, copy_model_files,
                                           same_path, write_documents)
from dskd_pipe.pipeline.step import (StepPlan, Trainee, accumulate_gradients, check_finite_step, check_finite_weights,
                                     engine_blocks, first_batch, gradient_norm, step_metrics)
from dskd_pipe.pipeline.student import build_student, hf_model, save_outputs
from dskd_pipe.pipeline.teacher import Teacher, open_teacher, store_record
from dskd_pipe.pipeline.trackers import open_trackers, resolve_report_to
from dskd_pipe.pipeline.training import (MetricsLogger, cosine_schedule, list_checkpoints, load_checkpoint,
                                         param_groups, peek_trainer_state, save_checkpoint, seed_everything,
                                         usable_checkpoint, write_json_atomic)


# Tests: os._exit(137) right after the checkpoint of step N; with DIE_RANK_ENV=R, only rank R dies instead, by
# SIGKILL in the middle of step N+1 (gradients computed, not applied), on torchrun's first attempt only.
DIE_AT_STEP_ENV = "DSKD_PIPE_TEST_DIE_AT_STEP"
DIE_RANK_ENV = "DSKD_PIPE_TEST_DIE_RANK"


# ---------------------------------------------------------------------------------------------------------------
# Checks
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
    if cfg.out and cfg.student and same_path(cfg.out, cfg.student):
        problems.append(f"--out {cfg.out} is the --student folder: the run would write over the weights it starts "
                        "from. Pass another --out.")
    if problems:
        raise ConfigError("\n".join(problems))



def report_cut_examples(cfg: DistillConfig, side: Side, n: int, console: Console) -> None:
    """Warn how many of the first `n` training examples lose tokens at the student's length limits (the teacher
    side was counted by cache-teacher). Read from --data, which the store's fingerprint ties to the store's texts."""
    examples = load_examples(cfg.data, limit=n, skip_bad=True, report=lambda _: None)
    if cut := cut_report((side.encode(e.prompt, e.response) for e in examples), cfg.max_prompt_length,
                         cfg.max_length, what="training examples (student tokens)"):
        console.warn(cut)



# ---------------------------------------------------------------------------------------------------------------
# The stage: set up, train, finish
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything a distill run holds while it trains: what it reads, what it trains, and where it is."""

    cfg: DistillConfig
    out: Path
    procs: Processes
    console: Console
    method: Method
    teacher: Teacher
    source: object  # the teacher views: a StoreSource, UnionSource (with samples) or TextSource (online)
    tokenizer: object  # the student's
    student_side: Side
    collate: Collate
    trainee: Trainee
    model: torch.nn.Module  # the trainee under its engine (DDP, FSDP2) or the trainee itself
    optimizers: dict  # "student" (student and projectors), "adversary" (or None)
    scheduler: object
    plan: StepPlan
    total_steps: int  # the last step number of this run (step numbers continue across --init-from runs)
    run_steps: int  # optimizer steps this run does
    state: dict  # step, start_step, epoch, position (in the epoch's order), best (dev score)
    store: dict | None  # the store's record (path, fingerprints, config), for the card and --resume checks
    metrics: MetricsLogger | None = None
    dev_examples: list | None = None
    die: tuple[int, int] = (0, -2)  # tests: (step, rank) of a simulated kill (DIE_AT_STEP_ENV)
    wait_fracs: list = field(default_factory=list)  # loader wait shares of the first steps, for loader_advice
    trainable: list = field(default_factory=list)  # the student optimizer's parameters (what the step clips)


@quiet_libraries
def run(cfg: DistillConfig) -> Path:
    """Train the student of `cfg` and write its folder; returns the folder (the student's HF folder)."""
    r = _set_up(cfg)
    _train(r)
    return _finish(r)


def _continuing(cfg: DistillConfig, out: Path, procs: Processes, console: Console):
    """(the checkpoint this run resumes, the one it starts from with --init-from), each a folder or None, checked
    against the run that made it before any model is loaded; and the store's record."""
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
    if resume_from is not None or init_from is not None:
        check_same_run(cfg, out if resume_from is not None else Path(cfg.init_from), resume_from is not None, store)
    return resume_from, init_from, store


def _set_up(cfg: DistillConfig) -> Run:
    """Checks, the engine, the teacher side, the student and the method's parts under the engine, the optimizers and
    schedule, and the state a resumed run continues from; the run folder's config is written last."""
    check_config(cfg)
    cfg = resolve(cfg)  # the method's published defaults for options left unset
    out = check_out(cfg)  # before anything is loaded
    procs = setup(check_device(cfg.device or default_device()), fsdp=cfg.fsdp)
    device, method = procs.device, METHODS[cfg.method]
    console = Console.for_stage(cfg.progress and procs.main, cfg.quiet or not procs.main)
    resume_from, init_from, store = _continuing(cfg, out, procs, console)
    seed_everything(cfg.seed)  # the same on every process: one student, projector and discriminator init

    teacher, source = open_teacher(cfg, device)
    tok = load_tokenizer(cfg.student, trust_remote_code=cfg.trust_remote_code)
    student_side = Side(tok, eos_token_id(tok), pad_token_id(tok), cfg.max_prompt_length, cfg.max_length)
    if procs.main:
        gold = source.sources[0] if isinstance(source, UnionSource) else source  # samples are no --data records
        report_cut_examples(cfg, student_side, len(gold), console)
    student = build_student(cfg, device)
    check_vocabulary(hf_model(student), tok, cfg.student)

    # The method's parts (projectors, an adversary, token maps) and the student, as one module under the engine;
    # the optimizers over the engine's parameters (FSDP2 replaces them by sharded ones); the schedule.
    parts = build_parts(cfg, teacher, tok, hf_model(student), device)
    trainee = Trainee(student, parts)
    model = wrap(trainee, procs, engine_blocks(student, procs), find_unused_parameters=method.adversary is not None,
                 bf16=device.startswith("cuda") and cfg.dtype in ("", "bfloat16"))
    extra = [(trainee.projectors, cfg.projector_lr)] if trainee.projectors is not None else []
    optimizer = torch.optim.AdamW(param_groups(trainee.student, cfg.lr, cfg.weight_decay, extra), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    adversary_opt = (method.adversary.optimizer(cfg, trainee.discriminator) if method.adversary is not None
                     else None)
    plan = StepPlan(cfg, procs, len(source))
    run_steps = min(cfg.max_steps, plan.per_epoch * cfg.epochs) if cfg.max_steps else plan.per_epoch * cfg.epochs
    # Step numbers continue across --init-from runs: this run does steps start_step + 1 .. start_step + run_steps.
    start_step = (int(peek_trainer_state(resume_from).get("start_step", 0)) if resume_from is not None
                  else int(peek_trainer_state(init_from)["step"]) if init_from is not None else 0)
    scheduler = cosine_schedule(optimizer, cfg.schedule_steps or start_step + run_steps, cfg.warmup_steps, cfg.min_lr)
    r = Run(cfg, out, procs, console, method, teacher, source, tok, student_side,
            Collate(student_side.pad_id, teacher.pad_id, collate_extras(cfg, teacher, tok)), trainee, model,
            {"student": optimizer, "adversary": adversary_opt}, scheduler, plan, start_step + run_steps, run_steps,
            {"step": start_step, "start_step": start_step, "epoch": 0, "position": 0, "best": None}, store)
    _load_start(r, resume_from, init_from)
    r.trainable = [p for g in optimizer.param_groups for p in g["params"]]
    _open_outputs(r, resumed_at=r.state["step"] if resume_from is not None else None)
    return r


def _load_start(r: Run, resume_from: Path | None, init_from: Path | None) -> None:
    """Load the checkpoint the run resumes (its whole state) or starts from (--init-from: weights, optimizer
    states and step count; this run's data from its first example)."""
    if resume_from is not None:
        r.state.update(load_checkpoint(resume_from, model=r.model, optimizers=r.optimizers, scheduler=r.scheduler,
                                       procs=r.procs))
        r.console.note(f"resuming from {resume_from} (step {r.state['step']}, epoch {r.state['epoch']}, "
                       f"position {r.state['position']})")
    elif init_from is not None:
        load_checkpoint(init_from, model=r.model, optimizers=r.optimizers, scheduler=r.scheduler, procs=r.procs)
        r.console.note(f"starting from {init_from} (step {r.state['start_step']}; this run's data from its first "
                       "example)")


def _open_outputs(r: Run, resumed_at: int | None) -> None:
    """The run folder's config (rank 0), the metrics log and trackers, the dev set, and the test hook."""
    cfg, procs, out = r.cfg, r.procs, r.out
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / DONE).unlink(missing_ok=True)
        save_config(cfg, out / RESOLVED_CONFIG, **({"store": r.store["fingerprints"]} if r.store else {}))
    trackers = (open_trackers(resolve_report_to(cfg.report_to, cfg.tensorboard), out, config_to_dict(cfg),
                              resumed_at, note=r.console.note, warn=r.console.warn) if procs.main else [])
    r.metrics = MetricsLogger(out / "metrics.jsonl", enabled=procs.main, truncate_after_step=resumed_at,
                              trackers=trackers)
    # Under FSDP2 every process takes part in the evaluation's forwards; otherwise rank 0 evaluates alone.
    if cfg.dev_data and (procs.main or procs.engine == "fsdp"):
        # a literal "<n>" is a newline, as in `score`
        r.dev_examples = unescape_newlines(load_examples(cfg.dev_data, limit=cfg.dev_limit))
    die_rank = int(os.environ.get(DIE_RANK_ENV, -1))
    r.die = (int(os.environ.get(DIE_AT_STEP_ENV, 0)),
             die_rank if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" else -2)


def _checkpoint(r: Run) -> None:
    """Save a checkpoint of the run as it stands (weights checked finite first)."""
    check_finite_weights(r.model, r.procs, r.state["step"])
    trainer_state = {k: v for k, v in r.state.items() if v is not None}
    save_checkpoint(r.out, r.state["step"], model=r.model, optimizers=r.optimizers, scheduler=r.scheduler,
                    trainer_state=trainer_state, procs=r.procs, keep=r.cfg.keep_checkpoints)
    if r.die[0] and r.state["step"] == r.die[0] and r.die[1] == -1:
        os._exit(137)


def _train(r: Run) -> None:
    """Epochs of optimizer steps until the run's last step; a checkpoint at every epoch end (and every
    --save-every steps), the dev evaluation at epoch ends."""
    cfg, procs, state = r.cfg, r.procs, r.state
    bar = r.console.bar(f"distill {cfg.method}", r.run_steps, "step", initial=state["step"] - state["start_step"])
    workers = cfg.num_workers if cfg.num_workers >= 0 else auto_num_workers(procs.device)
    filler = None  # a batch this process ran before: the template of its filler micro-batches
    while state["step"] < r.total_steps and state["epoch"] < cfg.epochs:
        epoch = state["epoch"]
        dataset = DistillDataset(r.source, r.student_side, cfg.seed, epoch, procs.rank, procs.world,
                                 start=state["position"], rank_batch=r.plan.rank_batch)
        loader = make_loader(dataset, cfg.micro_batch_size, r.collate, workers, cfg.prefetch_factor,
                             pin_memory=procs.device.startswith("cuda"))
        # A loader-own generator: creating the iterator must not draw from the global RNG (exact resume).
        loader.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        batches = iter(loader)
        while state["step"] < r.total_steps and state["position"] < r.plan.n:
            t0 = time.perf_counter()
            n_micro, own = r.plan.micro_batches(state["position"])
            micro, wait = [], 0.0
            for _ in range(own):
                tw = time.perf_counter()
                b = next(batches)
                wait += time.perf_counter() - tw
                micro.append({k: v.to(procs.device, non_blocking=True) for k, v in b.items()})
            if filler is None:
                filler = micro[0] if micro else first_batch(r.source, r.student_side, r.collate, cfg, epoch,
                                                            procs.device)
            real = [True] * len(micro) + [False] * (n_micro - len(micro))
            micro += [filler] * (n_micro - len(micro))
            record, n_tokens = _optimizer_step(r, micro, real, epoch)
            elapsed = time.perf_counter() - t0
            record.update(step_s=elapsed, tokens_per_s=n_tokens / elapsed, loader_wait_frac=wait / elapsed)
            r.metrics.log(record)
            bar.update(1, values=step_values(record, r.method.shown), counts={"tok": n_tokens})
            _loader_advice(r, record, workers)
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < r.total_steps:
                _checkpoint(r)
        finished_epoch = state["position"] >= r.plan.n
        if finished_epoch:
            state["epoch"] += 1
            state["position"] = 0
            check_finite_weights(r.model, procs, state["step"])  # before best/ is written (every process: a collective)
            if r.dev_examples is not None:
                state["best"] = evaluate_epoch(cfg, r.trainee, procs, r.tokenizer, r.dev_examples, r.student_side,
                                               Collate(r.student_side.pad_id, r.teacher.pad_id), r.out, state,
                                               r.metrics)
        _checkpoint(r)
        if not finished_epoch:
            break
    bar.close()


def _optimizer_step(r: Run, micro: list[dict], real: list[bool], epoch: int) -> tuple[dict, float]:
    """One optimizer step over this process's micro-batches (fillers where `real` is False): gradients, the
    divergence check, the updates (the adversary's on its steps); (the step's metrics record without timings, the
    step's tokens over all processes)."""
    cfg, procs, state = r.cfg, r.procs, r.state
    optimizer, adversary_opt = r.optimizers["student"], r.optimizers["adversary"]
    adversary_step = r.method.adversary is not None and r.method.adversary.steps_at(cfg, state["step"])
    sums, n_step = accumulate_gradients(cfg, micro, r.model, r.teacher, procs, real=real, step=state["step"],
                                        progress=state["step"] / max(1, r.total_steps),
                                        adversary_step=adversary_step, total_steps=r.total_steps)
    if r.die[0] and state["step"] == r.die[0] and r.die[1] == procs.rank:
        os.kill(os.getpid(), signal.SIGKILL)
    names = sorted(sums)
    totals = all_reduce_sum(torch.stack([torch.as_tensor(sums[k], device=procs.device).float() for k in names]),
                            procs)
    sums = dict(zip(names, totals.tolist()))
    grad_norm = (local_tensor(torch.nn.utils.clip_grad_norm_(r.trainable, cfg.max_grad_norm))
                 if cfg.max_grad_norm > 0 else gradient_norm(r.trainable))
    # Non-finite loss or gradient: stop before the update, so no NaN reaches the weights (README "A run that
    # diverges"). Every process sees the same totals and norm, so all stop together.
    check_finite_step(cfg, state["step"] + 1, sums, float(n_step), float(grad_norm), r.out,
                      adversary=r.trainee.discriminator if adversary_step else None)
    step_lrs = [g["lr"] for g in optimizer.param_groups]  # the lrs this step used
    optimizer.step()
    r.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if adversary_opt is not None:
        if adversary_step:
            adversary_opt.step()
        adversary_opt.zero_grad(set_to_none=True)
    state["position"] += r.plan.examples(state["position"])
    state["step"] += 1
    own_tokens = sum(b["attention_mask"].sum() for b, is_real in zip(micro, real) if is_real)
    n_tokens = float(all_reduce_sum(torch.as_tensor(own_tokens, device=procs.device).float(), procs))
    record = {"step": state["step"], "epoch": epoch, "loss": sums["loss"] / float(n_step),
              **step_metrics(cfg, sums, float(n_step)), "grad_norm": float(grad_norm), "lr": step_lrs[0],
              "supervised_tokens": float(n_step)}
    if r.trainee.projectors is not None:
        record["projector_lr"] = step_lrs[-1]
    if adversary_opt is not None:
        record["adversary_steps"] = int(adversary_step)
    return record, n_tokens


def _loader_advice(r: Run, record: dict, workers: int) -> None:
    """Steps 3-22 of the run on a GPU (past the workers' start): say once if the loader held the GPU up."""
    if r.procs.rank == 0 and r.procs.device.startswith("cuda") and 3 <= r.state["step"] - r.state["start_step"] <= 22:
        r.wait_fracs.append(record["loader_wait_frac"])
        advice = loader_advice(r.wait_fracs, workers) if len(r.wait_fracs) == 20 else None
        if advice:
            r.console.warn(advice)


def _finish(r: Run) -> Path:
    """The run's outputs: the student (the best dev epoch's when a dev set selected one, the last in last/), the
    method's parts, the model cards and curves, then distill_done.json last."""
    cfg, procs, state, out = r.cfg, r.procs, r.state, r.out
    check_finite_weights(r.model, procs, state["step"])
    done = {"step": state["step"], "method": cfg.method}
    if state.get("best") is not None and (out / "best" / "config.json").is_file():
        # Model selection (spec/evaluation.md): the best dev epoch is the run's output; the last one stays.
        save_outputs(r.trainee, procs, cfg, r.tokenizer, out / "last", parts=False)
        if procs.main:
            copy_model_files(out / "best", out)
        done.update(student="best", best_epoch=state.get("best_epoch"), best_step=state.get("best_step"),
                    dev_metric="dev_rouge_l" if cfg.dev_rouge else "dev_loss")
        save_outputs(r.trainee, procs, cfg, r.tokenizer, out, student=False)
    else:
        save_outputs(r.trainee, procs, cfg, r.tokenizer, out)
    if procs.main:
        r.metrics.close()
        write_documents(cfg, out, state, procs.world, r.store, done, r.console)
        write_json_atomic(out / DONE, done)
        which = f"the best dev epoch ({state.get('best_epoch')})" if done.get("student") == "best" else "the student"
        print(f"{out}: {which} after {state['step']} steps ({cfg.method}).")
    barrier(procs)
    return out
