"""One optimizer step of a distill run: how a process cuts the epoch into steps (`StepPlan`), the method's loss of
one micro-batch (`micro_batch_loss`), the forward/backward of a step's micro-batches under the engine
(`accumulate_gradients`), and the checks that stop a diverged run before the update (`check_finite_step`)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from dskd_pipe.pipeline.config import ConfigError, DistillConfig
from dskd_pipe.pipeline.distributed import Processes, all_reduce_sum, gradient_sync, local_tensor, transformer_blocks
from dskd_pipe.pipeline.loader import Collate, DistillDataset, Side
from dskd_pipe.pipeline.methods import METHODS, LossInputs, LossTerms, MethodParts
from dskd_pipe.pipeline.student import hf_model, student_forward
from dskd_pipe.pipeline.teacher import Teacher
from dskd_pipe.pipeline.training import TrainingDiverged, list_checkpoints, micro_batch_seed


class StepPlan:
    """How one process cuts the epoch into optimizer steps: each step takes the next `global_batch` examples of
    the epoch order (fewer in the last step), this process the slice `rank` of `rank_batch` of them, in
    micro-batches of `micro` (pipeline/loader.rank_positions). Every process runs as many micro-batches as rank 0,
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


def first_batch(source, side: Side, collate: Collate, cfg: DistillConfig, epoch: int, device: str) -> dict:
    """The epoch's first example as a batch: the filler of a process that has no example of its own yet."""
    item = DistillDataset(source, side, cfg.seed, epoch)[0]
    return {k: v.to(device) for k, v in collate([item]).items()}


def engine_blocks(student, procs: Processes) -> list:
    """The student's transformer blocks FSDP2 shards one by one (none under DDP or one process)."""
    return transformer_blocks(student) if procs.engine == "fsdp" else []


def autocast(device: str, cfg: DistillConfig):
    """bf16 autocast on a GPU unless --dtype float32; nothing on the CPU."""
    use = torch.device(device).type == "cuda" and cfg.dtype in ("", "bfloat16")
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=use)


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
        check_same_tokenisation(batch, cfg.method)
    inputs = LossInputs(cfg, batch, hf_model(student), hs, zs, ht, teacher, parts, step=step, progress=progress,
                        adversary_step=adversary_step, total_steps=total_steps, step_tokens=step_tokens,
                        step_teacher_tokens=step_teacher_tokens, step_micro_batches=step_micro_batches)
    terms = method.loss(inputs)
    terms.logs = {"n_student": inputs.n_student.float(), **terms.logs}
    return terms


def check_same_tokenisation(batch: dict, method: str) -> None:
    """ConfigError unless the two sides of `batch` are one tokenisation (a same-vocabulary method's need)."""
    same = batch["input_ids"].shape == batch["teacher_input_ids"].shape and torch.equal(
        batch["labels"], batch["teacher_labels"])
    if not same:
        raise ConfigError(f"--method {method} needs the teacher and the student to tokenise the same way (same "
                          "vocabulary); these do not. Use --method dskd-cma or cma-ga for different tokenizers.")


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
        # examples are cut that way: StepPlan): the same masks however the step is split over processes or resumed.
        torch.manual_seed(micro_batch_seed(cfg.seed, step, procs.rank * cfg.grad_accum + k))
        with gradient_sync(model, procs, sync=k == len(micro) - 1):
            with autocast(procs.device, cfg):
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


def step_metrics(cfg: DistillConfig, sums: dict, n_step: float) -> dict:
    """Normalised terms of one optimizer step from the summed logs of its micro-batches (and processes)."""
    return METHODS[cfg.method].metrics(sums, n_step)


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
