"""The distill methods, one entry each: what a method needs and which loss function it calls.

A method is a `Method` record in `METHODS`. The training loop (stages/distill.py, pipeline/step.py) asks the record
and never names a method:

- `uses_teacher` / `same_vocabulary`: whether it needs a teacher, and one that tokenises like the student;
- `build_parts`: its trained parts besides the student (projectors, trained with the student's optimizer at
  `projector_lr`; an adversary such as CMA-GA's discriminator) and fixed tables (token maps);
- `adversary`: for a part trained against the student by its own optimizer, that optimizer and the optimizer
  steps at which it is stepped (a function of the step only: the same whatever the split into processes and
  micro-batches);
- `collate_extras`: per-batch alignment tensors built in the DataLoader workers (ETA / MinED pairs, chunks);
- `loss`: a thin call of its loss function in pipeline/objectives/ (a function of tensors), returning the
  micro-batch's student-side loss SUM, the adversary's share of its loss and the log terms (`LossTerms`);
- `metrics`: how the summed log terms of one optimizer step become the logged numbers;
- `shown`: which of those numbers the progress line, the curves and the model card show, and how (`Shown`);
- `settings`: the DistillConfig options its loss reads beyond every KD method's (kd_rate, kd_temperature,
  divergence): its model card lists them, and `dskd-pipe methods` names them;
- `defaults`: published values of options the user left unset (`None` in DistillConfig), see `resolve`;
- `options`: the method's own options (`MethodOption`), set with `--method-option NAME=VALUE` and read by its loss
  as `LossInputs.options[NAME]`: where a new method's option goes, declared once, in its entry.

Adding a method = one entry here + its loss function in pipeline/objectives/ + its test. A method of another
package is the same record, declared under the entry point group `dskd_pipe.methods` of that package (see
`MethodTable`): `METHODS` holds the built-in entries, then the installed packages' ones.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from dskd_pipe.pipeline.alignment import (EtaPairs, TokenStrings, blank_mask, eta_pairs_for_batch, next_text_events,
                                          teacher_to_student_token_map, vocab_overlap, word_start_mask)
from dskd_pipe.pipeline.config import ConfigError, DistillConfig
from dskd_pipe.pipeline.objectives.alm import alm_loss, label_log_probs
from dskd_pipe.pipeline.objectives.balance import balanced_sum, gradmag_weights, last_block_parameters
from dskd_pipe.pipeline.objectives.baselines import mined_loss, mined_pairs_for_batch, mined_token_map, uld_loss
from dskd_pipe.pipeline.objectives.divergences import DIVERGENCES, cross_entropy_sum
from dskd_pipe.pipeline.objectives.dskd import build_projectors, dskd_cma_loss, dskd_same_vocab_loss, teacher_logits
from dskd_pipe.pipeline.objectives.dskd_v2 import dskd_v2_eta_loss, dskd_v2_same_vocab_loss, ideal_projector_init
from dskd_pipe.pipeline.objectives.dwa import build_dwa_projectors, dtw_gamma, dwa_kd_loss, kd_warmup
from dskd_pipe.pipeline.objectives.prefix_kd import prefix_kd_loss, shared_boundaries
from dskd_pipe.pipeline.probes import chunk_ids, label_offsets

PROJECTOR_LR = 1e-3  # DSKD (spec/dskd.md "Published training setup"); DSKDv2 and DWA-KD build on its setup
# MinED's token map is computed once per tokenizer pair (about 30 s for Qwen -> GPT-2 on 2 cores) and kept here.
TOKEN_MAP_CACHE = Path(os.environ.get("DSKD_PIPE_CACHE", Path.home() / ".cache" / "dskd-pipe"))


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class MethodParts:
    """What a method trains or looks up besides the student.

    projectors: trained by the student's optimizer (own lr group); discriminator: trained by its own optimizer
    (Method.adversary); token_map: a fixed teacher -> student id table [Vt] (DSKDv2-ETA, MinED); tables: the fixed
    per-vocabulary tables of a composed method's terms (`Term.tables`: word-start masks, next-text events).
    """

    projectors: nn.Module | None = None
    discriminator: nn.Module | None = None
    token_map: Tensor | None = None
    tables: dict = field(default_factory=dict)


@dataclass
class LossTerms:
    """A method's loss of one micro-batch.

    loss: the student-side SUM over tokens (the stage divides the step's total once by its supervised student
    tokens); adversary_loss: the adversary's loss share of this micro-batch, already divided by the step's token
    counts (the shares of a step add up to its loss over the whole step), or None; logs: detached sums and counts.
    """

    loss: Tensor
    logs: dict
    adversary_loss: Tensor | None = None


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch as a method's loss sees it.

    batch: the collated micro-batch on the device; student: the transformers model (its embedding and head
    weights); hidden Hs [B, S, ds] and logits Zs [B, S, Vs] from the student's forward; teacher_hidden Ht [B, T, dt]
    (None for methods without a teacher); teacher: head (TeacherHead), embed [Vt, dt], embed_scale, tokenizer.
    step: optimizer steps done before this one; progress: step / total steps; adversary_step: the adversary is
    stepped after this optimizer step (its loss is wanted); total_steps, step_tokens (supervised student tokens),
    step_teacher_tokens, step_micro_batches: see the fields.
    """

    cfg: DistillConfig
    batch: dict
    student: nn.Module
    hidden: Tensor
    logits: Tensor
    teacher_hidden: Tensor | None
    teacher: object
    parts: MethodParts
    step: int = 0
    progress: float = 0.0
    adversary_step: bool = False
    total_steps: int = 1  # optimizer steps of the whole run (DWA-KD's whole-run gamma anneal)
    step_tokens: Tensor | float = 1.0  # supervised student tokens of the optimizer step, all micro-batches and ranks
    step_teacher_tokens: Tensor | float = 1.0  # the same on the teacher side
    step_micro_batches: int = 1  # micro-batches of the optimizer step, all ranks

    @property
    def micro_batch_mean_weight(self) -> float:
        """The released DSKD codes' per-micro-batch token denominator ("loss_denom"): step tokens / micro-batches."""
        return float(self.step_tokens) / max(1, self.step_micro_batches)

    @property
    def labels(self) -> Tensor:
        return self.batch["labels"]

    @property
    def ce_labels(self) -> Tensor | None:
        """Labels of the student's own CE when they differ from `labels`: student samples of on-policy rounds
        (gold False) feed the KD terms only, so their rows are -100 here. None = `labels`."""
        gold = self.batch.get("gold")
        if gold is None or bool(gold.all()):
            return None
        return self.labels.masked_fill(~gold[:, None], -100)

    @property
    def n_student(self) -> Tensor:
        return (self.labels != -100).sum()

    @cached_property
    def student_label_log_probs(self) -> tuple[Tensor, Tensor]:
        """(log softmax(Zs)[label], logsumexp(Zs)) at the positions with a label, fp32 [Ns] each (alm
        .label_log_probs): computed once per micro-batch for the student's CE and ALM, so its [Ns, Vs] logits go
        to fp32 once."""
        labelled = self.labels != -100
        return label_log_probs(self.logits[labelled], self.labels[labelled])

    @property
    def options(self) -> dict:
        """The method's own options (Method.options): their defaults, with the run's --method-option values."""
        return method_options(self.cfg)


LossFn = Callable[[LossInputs], LossTerms]
PartsFn = Callable[[DistillConfig, object, object, nn.Module, str], MethodParts]
ExtrasFn = Callable[[object, object], Callable]
MetricsFn = Callable[[dict, float], dict]


@dataclass(frozen=True)
class Adversary:
    """A part trained against the student by its own optimizer (CMA-GA's discriminator, MethodParts.discriminator).

    optimizer(cfg, module) -> its optimizer, built by the stage after the engines wrapped the module; steps_at(cfg,
    step) -> whether it is stepped after optimizer step `step` (0-based), on the gradient of its loss over the whole
    step (all micro-batches and processes).
    """

    optimizer: Callable[[DistillConfig, nn.Module], torch.optim.Optimizer]
    steps_at: Callable[[DistillConfig, int], bool]


@dataclass(frozen=True)
class MethodOption:
    """One option of a method's own (`Method.options`), for what DistillConfig has no field for.

    Set per run with `--method-option NAME=VALUE` (repeatable) or `method_options = ["NAME=VALUE"]` in a config;
    the loss reads `LossInputs.options[NAME]`. default: the value when not given; its type (bool, int, float or str)
    is the option's type. help: one line, shown by `dskd-pipe methods`. choices: the allowed values (empty: any).
    """

    default: bool | int | float | str
    help: str = ""
    choices: tuple = ()


@dataclass(frozen=True)
class Shown:
    """A logged number as the progress line, the curves and the model card show it.

    key: its name in a step record of metrics.jsonl; short: its name on the progress line ("" = not there; numbers
    sharing a short name show as one "a/b"); panel, unit: the curves panel it is drawn in and its y label (numbers
    sharing a panel are drawn together, the first solid, the next dashed).
    """

    key: str
    short: str
    panel: str
    unit: str = "per token"


CE_SHOWN = Shown("ce_student", "ce", "CE of the student (gold)", "nats / token")
KD_SHOWN = Shown("kd", "kd", "KD")
# The DSKD family's terms and its projections' top-1 agreement.
DSKD_SHOWN = (CE_SHOWN, Shown("ce_t2s", "ce_t2s", "CE t2s (teacher states, student head)", "nats / token"),
              Shown("kd_t2s", "kd_t2s", "KD t2s (student space)"), Shown("kd_s2t", "kd_s2t", "KD s2t (teacher space)"),
              Shown("t2s_acc", "", "projection accuracy (t2s solid, s2t dashed)", "top-1 agreement"),
              Shown("s2t_acc", "", "projection accuracy (t2s solid, s2t dashed)", "top-1 agreement"))
CMA_GA_SHOWN = DSKD_SHOWN + (
    Shown("l_g", "l_g", "L_G (generator)"),
    Shown("d_acc_real", "D", "D accuracy (real keys solid, fake queries dashed)", "accuracy"),
    Shown("d_acc_fake", "D", "D accuracy (real keys solid, fake queries dashed)", "accuracy"),
    Shown("l_d", "", "L_D (discriminator)"))

# The options each family's loss reads (Method.settings), beyond every KD method's kd_rate, kd_temperature and
# divergence.
DSKD_SETTINGS = ("projector_lr", "teacher_temperature", "same_vocab_teacher_temperature")
CMA_SETTINGS = ("projector_lr", "teacher_temperature", "cma_std", "t2s_kd_rows", "projector_warmup_steps", "t2s_values")
CMA_GA_SETTINGS = CMA_SETTINGS + ("lambda_ga", "ga_start_step", "disc_lr", "disc_every", "ga_mode", "ga_directions",
                                  "disc_spectral_norm", "ga_reachable_keys")
V2_SETTINGS = ("projector_lr", "teacher_temperature", "same_vocab_teacher_temperature", "overlap_top_k",
               "v2_mean_weighting", "v2_agreement_threshold")
V2_ETA_SETTINGS = ("projector_lr", "teacher_temperature", "overlap_top_k", "v2_mean_weighting",
                   "v2_agreement_threshold", "eta_unmapped")
DWA_SETTINGS = ("projector_lr", "teacher_temperature", "cma_std", "kd_warmup_steps", "dtw_gamma_start", "dtw_gamma_end",
                "dtw_gamma_steps", "dwa_weights", "dtw_inputs", "dtw_positions", "dtw_reduction", "kd_warmup_terms")


@dataclass(frozen=True)
class Method:
    """One distill method: see the module docstring."""

    name: str
    summary: str
    loss: LossFn
    metrics: MetricsFn
    uses_teacher: bool = True
    same_vocabulary: bool = False
    build_parts: PartsFn | None = None  # (cfg, teacher, student tokenizer, student, device) -> MethodParts
    adversary: Adversary | None = None
    collate_extras: ExtrasFn | None = None  # (teacher tokenizer, student tokenizer) -> Collate's extras
    shown: tuple[Shown, ...] = ()  # besides the total loss
    settings: tuple[str, ...] = ()  # DistillConfig options its loss reads besides kd_rate, kd_temperature, divergence
    defaults: Mapping[str, object] = field(default_factory=dict)
    options: Mapping[str, MethodOption] = field(default_factory=dict)  # the method's own options


# ---------------------------------------------------------------------------------------------------------------
# Collate extras
# ---------------------------------------------------------------------------------------------------------------

class AlignmentExtras:
    """Collate extra for cross-tokenizer methods that align token positions (DSKDv2-ETA's exact token alignment,
    MinED's edit-distance DTW): the aligned label positions of a batch, built in the loader workers."""

    def __init__(self, pairs_for_batch, teacher_tok, student_tok):
        self.pairs_for_batch = pairs_for_batch
        self.teacher = TokenStrings(teacher_tok)  # per-id string caches live as long as the collate
        self.student = TokenStrings(student_tok)

    def __call__(self, items, teacher_labels, student_labels) -> dict:
        pairs = self.pairs_for_batch(teacher_labels, student_labels, self.teacher, self.student)
        return {"align_teacher_pos": pairs.teacher_pos, "align_student_pos": pairs.student_pos}


def chunk_extras(items, teacher_labels, student_labels) -> dict:
    """Collate extra of the chunk-level ablations: "chunks" bool [B, S, T], the ground-truth chunk alignment of the
    label positions of each example (pipeline/probes.chunk_alignment: the same chunk on both sides, from
    `chunk_id_extras`), padded to the batch's widths."""
    ids = chunk_id_extras(items, teacher_labels, student_labels)
    s, t = ids["student_chunk"][:, :, None], ids["teacher_chunk"][:, None, :]  # [B, S, 1], [B, 1, T]
    return {"chunks": (s == t) & (s >= 0)}


def chunk_id_extras(items, teacher_labels, student_labels) -> dict:
    """Collate extra of the likelihood terms (ALM, prefix-kd): "teacher_chunk" [B, T] and "student_chunk" [B, S]
    long, the ordinal of the ground-truth chunk of each label position (pipeline/probes.chunk_ids), -1 outside and
    in the padding."""
    width_s = max(len(r) for r in student_labels)
    width_t = max(len(r) for r in teacher_labels)
    teacher = torch.full((len(items), width_t), -1, dtype=torch.long)
    student = torch.full((len(items), width_s), -1, dtype=torch.long)
    for b, (it, t_lab, s_lab) in enumerate(zip(items, teacher_labels, student_labels)):
        t_ids, s_ids = chunk_ids(label_offsets(it["offsets"]), label_offsets(it["student_offsets"]),
                                 torch.tensor(t_lab) != -100, torch.tensor(s_lab) != -100)
        teacher[b, :t_ids.shape[0]] = t_ids
        student[b, :s_ids.shape[0]] = s_ids
    return {"teacher_chunk": teacher, "student_chunk": student}


def _eta_extras(teacher_tok, student_tok) -> AlignmentExtras:
    return AlignmentExtras(eta_pairs_for_batch, teacher_tok, student_tok)


def _mined_extras(teacher_tok, student_tok) -> AlignmentExtras:
    return AlignmentExtras(mined_pairs_for_batch, teacher_tok, student_tok)


def _chunk_extras(teacher_tok, student_tok):
    return chunk_extras


def _pairs(batch: dict) -> EtaPairs:
    return EtaPairs(batch["align_teacher_pos"], batch["align_student_pos"])


# ---------------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------------

def _dims(teacher, student: nn.Module) -> tuple[int, int]:
    """(ds, dt): the student's and the teacher's hidden sizes."""
    return student.get_input_embeddings().weight.shape[1], teacher.head.weight.shape[1]


def _projectors(with_query: bool) -> PartsFn:
    """DSKD's projectors: t2s and s2t, and with_query the cross-model attention's query projector
    (objectives/dskd.py)."""

    def build(cfg, teacher, student_tok, student, device) -> MethodParts:
        return MethodParts(projectors=build_projectors(*_dims(teacher, student), with_query=with_query).to(device))

    return build


def _cma_ga_parts(cfg, teacher, student_tok, student, device) -> MethodParts:
    """DSKD-CMA's projectors and the discriminator over [K; Q] tokens (2 dt)."""
    from dskd_pipe.pipeline.objectives.cma_ga import build_discriminator

    parts = _projectors(with_query=True)(cfg, teacher, student_tok, student, device)
    parts.discriminator = build_discriminator(2 * teacher.head.weight.shape[1],
                                              spectral_norm=cfg.disc_spectral_norm).to(device)
    return parts


def _disc_optimizer(cfg: DistillConfig, disc: nn.Module) -> torch.optim.Optimizer | None:
    from dskd_pipe.pipeline.objectives.cma_ga import build_discriminator_optimizer

    # --ga-mode released: D keeps its random init, as in the released code (no optimizer)
    return build_discriminator_optimizer(disc, lr=cfg.disc_lr) if cfg.ga_mode != "released" else None


def _disc_steps_at(cfg: DistillConfig, step: int) -> bool:
    """CMA-GA's discriminator: from `ga_start_step` on, after every `disc_every`-th optimizer step (never with
    --ga-mode released: the released code gives D no optimizer)."""
    return cfg.ga_mode != "released" and step >= cfg.ga_start_step and step % cfg.disc_every == 0


def _dwa_parts(cfg, teacher, student_tok, student, device) -> MethodParts:
    return MethodParts(projectors=build_dwa_projectors(*_dims(teacher, student)).to(device))


def _v2_same_vocab_parts(cfg, teacher, student_tok, student, device) -> MethodParts:
    """DSKDv2 "ideal" projectors from the two heads over the shared ids (spec/other_methods.md step 1)."""
    ws = student.get_output_embeddings().weight.detach()
    v = min(ws.shape[0], teacher.head.weight.shape[0])  # padded vocabularies: the shared ids
    ids = torch.arange(v if not cfg.overlap_top_k else min(v, cfg.overlap_top_k))
    return MethodParts(projectors=ideal_projector_init(teacher.head.weight, ws, ids, ids).to(device))


def _v2_eta_parts(cfg, teacher, student_tok, student, device) -> MethodParts:
    """DSKDv2 ideal projectors over the vocabulary overlap by token string, and the teacher -> student id map."""
    ws = student.get_output_embeddings().weight.detach()
    t_ids, s_ids = vocab_overlap(teacher.tokenizer, student_tok, top_k=cfg.overlap_top_k or None)
    projectors = ideal_projector_init(teacher.head.weight, ws, t_ids, s_ids).to(device)
    token_map = teacher_to_student_token_map(teacher.tokenizer, student_tok, unmapped=cfg.eta_unmapped).to(device)
    return MethodParts(projectors=projectors, token_map=token_map)


def _mined_parts(cfg, teacher, student_tok, student, device) -> MethodParts:
    """MinED's fixed teacher -> student map by minimum edit distance (cached in TOKEN_MAP_CACHE)."""
    return MethodParts(token_map=mined_token_map(teacher.tokenizer, student_tok, cache_dir=TOKEN_MAP_CACHE).to(device))


# ---------------------------------------------------------------------------------------------------------------
# Losses: each entry's call of its loss function in pipeline/objectives/
# ---------------------------------------------------------------------------------------------------------------

def _common(x: LossInputs) -> dict:
    cfg = x.cfg
    return dict(divergence=cfg.divergence, kd_rate=cfg.kd_rate, tau=cfg.kd_temperature,
                teacher_temperature=cfg.teacher_temperature, ce_labels=x.ce_labels)


def _head(x: LossInputs) -> Tensor:
    return x.student.get_output_embeddings().weight


def _embed(x: LossInputs) -> Tensor:
    return x.student.get_input_embeddings().weight  # live: DSKD-CMA's query and DWA-KD's Soft-DTW train it


def _dskd_logs(out, n_s: Tensor) -> dict:
    """The DSKD family's term sums and counts for the step log."""
    logs = {name: getattr(out, name).detach().float()
            for name in ("ce_student", "ce_t2s", "kd_t2s", "kd_s2t", "t2s_correct", "s2t_correct", "n_teacher")}
    for name in ("dtw", "dtw_hidden", "dtw_embed"):  # DWA-KD
        if getattr(out, name, None) is not None:
            logs[name] = getattr(out, name).detach().float()
    if out.attention_entropy is not None:
        logs["attention_entropy_sum"] = out.attention_entropy.detach() * n_s  # token-weighted over micro-batches
    return logs


def sft_loss(x: LossInputs) -> LossTerms:
    ce = cross_entropy_sum(x.logits, x.labels if x.ce_labels is None else x.ce_labels)
    return LossTerms(ce, {"ce_student": ce.detach()})


def kd_loss(x: LossInputs) -> LossTerms:
    """Vanilla KD (same vocabulary): (1 - lambda) CE + lambda sum D(Zs, Zt) over the supervised positions."""
    cfg, labels, zs = x.cfg, x.labels, x.logits
    ms = labels != -100
    zt = teacher_logits(x.teacher_hidden[ms], x.teacher.head)  # [Ns, Vt]
    v = min(zt.shape[-1], zs.shape[-1])  # padded vocabularies: compare the shared ids only
    ce = cross_entropy_sum(zs, labels if x.ce_labels is None else x.ce_labels)
    kd = DIVERGENCES[cfg.divergence](zs[ms][:, :v], zt[:, :v], torch.ones_like(labels[ms], dtype=torch.bool),
                                     tau=cfg.kd_temperature)
    return LossTerms((1.0 - cfg.kd_rate) * ce + cfg.kd_rate * kd, {"ce_student": ce.detach(), "kd": kd.detach()})


def mined_method_loss(x: LossInputs) -> LossTerms:
    out = mined_loss(x.logits, x.labels, x.teacher_hidden, x.batch["teacher_labels"], x.teacher.head,
                     _pairs(x.batch), x.parts.token_map, kd_rate=x.cfg.kd_rate, tau=x.cfg.kd_temperature,
                     ce_labels=x.ce_labels)
    return LossTerms(out.loss, {"ce_student": out.ce_student.detach(), "kd": out.kd.detach()})


def uld_method_loss(x: LossInputs) -> LossTerms:
    out = uld_loss(x.logits, x.labels, x.teacher_hidden, x.batch["teacher_labels"], x.teacher.head,
                   kd_rate=x.cfg.kd_rate, ce_labels=x.ce_labels)
    return LossTerms(out.loss, {"ce_student": out.ce_student.detach(), "kd": out.kd.detach()})


def _std_mask(x: LossInputs) -> Tensor | None:
    """The DSKD-CMA stds' positions: the teacher's real tokens (cma_std "valid"), or None = the whole padded batch
    ("padded", the released code; objectives/dskd.cross_model_attention)."""
    return x.batch["teacher_attention_mask"].bool() if x.cfg.cma_std == "valid" else None


def _v2_options(x: LossInputs) -> dict:
    """DSKDv2's reference-mode choices (objectives/dskd_v2.py module docstring)."""
    cfg = x.cfg
    weight = x.micro_batch_mean_weight if cfg.v2_mean_weighting == "micro-batch" else None
    return dict(mean_weight=weight, agreement_threshold=cfg.v2_agreement_threshold,
                t2s_teacher_temperature=cfg.same_vocab_teacher_temperature)


def dskd_loss(x: LossInputs) -> LossTerms:
    out = dskd_same_vocab_loss(x.hidden, x.logits, x.labels, _head(x), x.teacher_hidden, x.teacher.head,
                               x.parts.projectors, t2s_teacher_temperature=x.cfg.same_vocab_teacher_temperature,
                               **_common(x))
    return LossTerms(out.loss, _dskd_logs(out, x.n_student))


def dskd_v2_loss(x: LossInputs) -> LossTerms:
    out = dskd_v2_same_vocab_loss(x.hidden, x.logits, x.labels, _head(x), x.teacher_hidden, x.teacher.head,
                                  x.parts.projectors, **_v2_options(x), **_common(x))
    return LossTerms(out.loss, _dskd_logs(out, x.n_student))


def dskd_v2_eta_method_loss(x: LossInputs) -> LossTerms:
    out = dskd_v2_eta_loss(x.hidden, x.logits, x.labels, _head(x), x.teacher_hidden, x.teacher.head,
                           x.parts.projectors, _pairs(x.batch), x.parts.token_map, **_v2_options(x), **_common(x))
    return LossTerms(out.loss, _dskd_logs(out, x.n_student))


def dwa_method_loss(x: LossInputs) -> LossTerms:
    cfg, b = x.cfg, x.batch
    anneal = cfg.dtw_gamma_steps or max(1, x.total_steps)  # 0: the anneal spans the whole run
    out = dwa_kd_loss(x.hidden, x.logits, x.labels, b["input_ids"], _embed(x), _head(x), b["teacher_input_ids"],
                      b["teacher_labels"], x.teacher_hidden, x.teacher.embed, x.teacher.head, x.parts.projectors,
                      gamma=dtw_gamma(x.step, anneal, start=cfg.dtw_gamma_start, end=cfg.dtw_gamma_end),
                      kd_scale=kd_warmup(x.step, cfg.kd_warmup_steps), teacher_embed_scale=x.teacher.embed_scale,
                      weights=cfg.dwa_weights, dtw_inputs=cfg.dtw_inputs, dtw_positions=cfg.dtw_positions,
                      dtw_reduction=cfg.dtw_reduction, kd_warmup_terms=cfg.kd_warmup_terms,
                      teacher_attention_mask=_std_mask(x), **_common(x))
    return LossTerms(out.loss, _dskd_logs(out, x.n_student))


def _cma_call(x: LossInputs, chunk_mode: str | None = None):
    b = x.batch
    return dskd_cma_loss(x.hidden, x.logits, x.labels, b["input_ids"], _embed(x), _head(x), b["teacher_input_ids"],
                         b["teacher_labels"], x.teacher_hidden, x.teacher.embed, x.teacher.head, x.parts.projectors,
                         teacher_embed_scale=x.teacher.embed_scale, chunks=b.get("chunks"), chunk_mode=chunk_mode,
                         t2s_kd_rows=x.cfg.t2s_kd_rows, student_kd=x.step >= x.cfg.projector_warmup_steps,
                         t2s_values=x.cfg.t2s_values,
                         teacher_attention_mask=_std_mask(x), **_common(x))


def dskd_cma_method_loss(x: LossInputs) -> LossTerms:
    out = _cma_call(x)
    return LossTerms(out.loss, _dskd_logs(out, x.n_student))


def _chunk_loss(mode: str) -> LossFn:
    """The two ablations of spec/cma_ga.md: DSKD-CMA with its attention confined to (or replaced by a uniform
    average over) the ground-truth chunk of each token (pipeline/probes.chunk_alignment)."""

    def loss(x: LossInputs) -> LossTerms:
        out = _cma_call(x, mode)
        return LossTerms(out.loss, _dskd_logs(out, x.n_student))

    return loss


def cma_ga_method_loss(x: LossInputs) -> LossTerms:
    """DSKD-CMA plus the adversarial key-query matching (spec/cma_ga.md steps 3-5).

    From optimizer step `ga_start_step` on, the generator term lambda_GA * L_G * n_s joins the student-side sum
    (L_G against D as it stands at the start of the step). At the steps D is trained (Adversary.steps_at), L_D on
    the detached response keys/queries is divided by the step's token counts, so D's one update per step follows
    the L_D of the whole step's batch (spec step 3, "every k steps"), whatever the split into processes and
    micro-batches. --ga-mode released: the released code's term instead (objectives/cma_ga.released_kq_term: a D
    that is never stepped, gradient reversal, every position, lambda_GA * L_KQ added unscaled); "l_g" logs L_KQ.
    """
    from dskd_pipe.pipeline.objectives.cma_ga import (discriminator_accuracy, discriminator_loss, generator_loss,
                                                      generator_term, reachable_keys, released_kq_term,
                                                      response_tokens)

    cfg, disc = x.cfg, x.parts.discriminator
    out = _cma_call(x)
    n_s = x.n_student
    terms = LossTerms(out.loss, _dskd_logs(out, n_s))
    if x.step < cfg.ga_start_step:
        return terms
    kr, qr = response_tokens(out.keys, out.queries, out.teacher_mask, out.student_mask)
    if cfg.ga_mode == "released":
        term, l_kq = released_kq_term(disc, out.queries, out.keys, cfg.lambda_ga)
        acc_real, acc_fake = discriminator_accuracy(disc, kr, qr)
        n_kr, n_qr = float(kr.shape[0]), float(qr.shape[0])
        terms.logs.update(l_g_sum=l_kq.detach() * n_s,
                          d_acc_real_sum=torch.nan_to_num(acc_real) * n_kr, d_real_n=torch.tensor(n_kr),
                          d_acc_fake_sum=torch.nan_to_num(acc_fake) * n_qr, d_fake_n=torch.tensor(n_qr))
        terms.loss = terms.loss + term
        return terms
    if cfg.ga_reachable_keys:
        kr = reachable_keys(kr, x.parts.projectors.query)
    if x.adversary_step:
        # inputs detached inside: trains D only
        terms.adversary_loss = discriminator_loss(disc, kr, qr, normalize_directions=cfg.ga_directions,
                                                  counts=(x.step_teacher_tokens, x.step_tokens))
        terms.logs["l_d"] = terms.adversary_loss.detach()  # shares of the step add up to its L_D
    l_g = generator_loss(disc, qr, normalize_directions=cfg.ga_directions)  # gradient into the query projector only
    terms.loss = terms.loss + generator_term(l_g, n_s, cfg.lambda_ga)
    acc_real, acc_fake = discriminator_accuracy(disc, kr, qr, cfg.ga_directions)  # NaN for a side with no tokens
    n_kr, n_qr = float(kr.shape[0]), float(qr.shape[0])
    terms.logs.update(l_g_sum=l_g.detach() * n_s,
                      d_acc_real_sum=torch.nan_to_num(acc_real) * n_kr, d_real_n=torch.tensor(n_kr),
                      d_acc_fake_sum=torch.nan_to_num(acc_fake) * n_qr, d_fake_n=torch.tensor(n_qr))
    return terms


# ---------------------------------------------------------------------------------------------------------------
# Terms an entry adds to its loss (ALM, prefix-kd), and entries composed of a base method and terms
# ---------------------------------------------------------------------------------------------------------------

TablesFn = Callable[[DistillConfig, object, object, nn.Module, str], dict]


@dataclass(frozen=True)
class Term:
    """A term a method entry adds to its loss (`compose`).

    value(x) -> (the term on the micro-batch in the stage's SUM convention, its log sums); shown: its logged
    numbers (per student token) and how they are shown; settings: the DistillConfig options it reads;
    collate_extras: the batch tensors it reads, built in the loader workers; tables(cfg, teacher, student_tok,
    student, device) -> the fixed per-vocabulary tables it looks up (MethodParts.tables), built once per run.
    """

    name: str
    value: Callable[[LossInputs], tuple[Tensor, dict]]
    shown: tuple[Shown, ...]
    settings: tuple[str, ...] = ()
    collate_extras: ExtrasFn | None = None
    tables: TablesFn | None = None


def _sizes(teacher, student: nn.Module) -> tuple[int, int]:
    """(Vt, Vs): the rows of the teacher's and the student's heads (padded vocabularies included)."""
    return teacher.head.weight.shape[0], student.get_output_embeddings().weight.shape[0]


def _word_start_tables(cfg, teacher, student_tok, student, device) -> dict:
    if cfg.alm_debias == "none":
        return {}
    vt, vs = _sizes(teacher, student)
    return {"teacher_word_start": word_start_mask(teacher.tokenizer, vt).to(device),
            "student_word_start": word_start_mask(student_tok, vs).to(device)}


def _alm_value(x: LossInputs) -> tuple[Tensor, dict]:
    """ALM's chunk mean of this micro-batch, times the step's tokens per micro-batch: after the stage's division
    by the step's tokens, the step's term is the mean over its micro-batches of their chunk means (tokenkit's
    gradient accumulation of per-batch means)."""
    cfg, tables = x.cfg, x.parts.tables
    out = alm_loss(x.logits, x.labels, x.teacher_hidden, x.batch["teacher_labels"], x.teacher.head,
                   x.batch["student_chunk"], x.batch["teacher_chunk"], tau=cfg.alm_temperature,
                   debias=cfg.alm_debias, student_word_start=tables.get("student_word_start"),
                   teacher_word_start=tables.get("teacher_word_start"), merge_threshold=cfg.alm_merge_threshold,
                   mean_over=cfg.alm_mean, student_label_log_probs=x.student_label_log_probs)
    value = out.loss * x.micro_batch_mean_weight
    return value, {"alm": value.detach(), "alm_chunks": out.chunks.detach()}


def _next_text_tables(cfg, teacher, student_tok, student, device) -> dict:
    vt, vs = _sizes(teacher, student)
    events = next_text_events(teacher.tokenizer, student_tok, cfg.prefix_chars, vt, vs)
    return {"teacher_events": events.teacher.to(device), "student_events": events.student.to(device),
            "n_events": events.size, "teacher_blank": blank_mask(teacher.tokenizer, vt).to(device),
            "student_blank": blank_mask(student_tok, vs).to(device)}


def _prefix_kd_value(x: LossInputs) -> tuple[Tensor, dict]:
    tables, b = x.parts.tables, x.batch
    t_chunk, s_chunk = b["teacher_chunk"].to(x.logits.device), b["student_chunk"].to(x.logits.device)
    t_lab = b["teacher_labels"][:, :t_chunk.shape[1]].to(x.logits.device)
    s_lab = x.labels[:, :s_chunk.shape[1]]
    t_blank = tables["teacher_blank"][t_lab.clamp_min(0)]
    s_blank = tables["student_blank"][s_lab.clamp_min(0)]
    t_pos, s_pos = shared_boundaries(t_chunk, s_chunk, t_blank, s_blank)
    out = prefix_kd_loss(x.logits, x.teacher_hidden, x.teacher.head, t_pos, s_pos, tables["teacher_events"],
                         tables["student_events"], tables["n_events"], tau=x.cfg.kd_temperature,
                         temper=x.cfg.prefix_temper)
    return out.kd, {"prefix_kd": out.kd.detach(), "boundaries": out.boundaries,
                    "teacher_next_text_entropy": out.teacher_entropy}


ALM = Term("alm", _alm_value, (Shown("alm", "alm", "ALM (chunk likelihoods, BCE)", "mean per chunk"),),
           ("alm_temperature", "alm_debias", "alm_merge_threshold", "alm_mean", "loss_balance"),
           collate_extras=lambda teacher_tok, student_tok: chunk_id_extras, tables=_word_start_tables)
PREFIX_KD = Term("prefix-kd", _prefix_kd_value, (Shown("prefix_kd", "prefix_kd", "prefix-kd (next-text KL)"),),
                 ("prefix_chars", "prefix_temper", "loss_balance"),
                 collate_extras=lambda teacher_tok, student_tok: chunk_id_extras, tables=_next_text_tables)


def _ce_part(x: LossInputs) -> LossTerms:
    """(1 - kd_rate) CE: the base of a composition with no base method. Its gold log-probabilities are the ones
    ALM reads (LossInputs.student_label_log_probs), unless student samples leave some rows out of the CE."""
    ce = -x.student_label_log_probs[0].sum() if x.ce_labels is None else cross_entropy_sum(x.logits, x.ce_labels)
    return LossTerms((1.0 - x.cfg.kd_rate) * ce, {"ce_student": ce.detach()})


def _merged_extras(makers: list[ExtrasFn]) -> ExtrasFn | None:
    """One Collate extra calling each distinct extra once and merging their tensors."""
    if not makers:
        return None

    def make(teacher_tok, student_tok):
        extras = list(dict.fromkeys(m(teacher_tok, student_tok) for m in makers))

        def call(items, teacher_labels, student_labels) -> dict:
            out = {}
            for extra in extras:
                out.update(extra(items, teacher_labels, student_labels))
            return out

        return call

    return make


def compose(name: str, summary: str, base: Method | None, *terms: Term) -> Method:
    """One entry: the base method's loss ((1 - kd_rate) CE when None) plus kd_rate x each term, combined as
    --loss-balance says ("weights": that sum; "gradmag": the parts balanced by their gradient on the student's last
    block, objectives/balance.py). The base keeps its parts, adversary, extras and published defaults; the terms'
    tables join its parts."""
    base_loss = _ce_part if base is None else base.loss
    base_metrics = _per_token("ce_student") if base is None else base.metrics
    logged = tuple(shown.key for t in terms for shown in t.shown)

    def loss(x: LossInputs) -> LossTerms:
        head = base_loss(x)
        parts, logs = [head.loss], dict(head.logs)
        for term in terms:
            value, term_logs = term.value(x)
            parts.append(x.cfg.kd_rate * value)
            logs.update(term_logs)
        if x.cfg.loss_balance == "gradmag":
            weights = gradmag_weights(parts, last_block_parameters(x.student))
            total = balanced_sum(parts, weights)
            share = weights / weights.sum().clamp_min(1e-30)
            logs.update({f"gradmag_{part}_sum": share[k] * x.n_student.float()
                         for k, part in enumerate(("base", *(t.name for t in terms)))})
        else:
            total = sum(parts[1:], parts[0])
        return LossTerms(total, logs, head.adversary_loss)

    def metrics(sums: dict, n_step: float) -> dict:
        m = base_metrics(sums, n_step)
        m.update({k: sums[k] / n_step for k in logged if k in sums})
        m.update({k[:-4]: sums[k] / n_step for k in sums if k.startswith("gradmag_")})
        return m

    def build(cfg, teacher, student_tok, student, device) -> MethodParts:
        parts = MethodParts() if base is None or base.build_parts is None else \
            base.build_parts(cfg, teacher, student_tok, student, device)
        for term in terms:
            if term.tables is not None:
                parts.tables.update(term.tables(cfg, teacher, student_tok, student, device))
        return parts

    extras = [m for m in ([base.collate_extras] if base is not None else []) + [t.collate_extras for t in terms]
              if m is not None]
    return Method(name, summary, loss, metrics, build_parts=build,
                  adversary=None if base is None else base.adversary, collate_extras=_merged_extras(extras),
                  shown=((CE_SHOWN,) if base is None else base.shown) + tuple(s for t in terms for s in t.shown),
                  settings=tuple(dict.fromkeys(((base.settings if base else ()) + tuple(
                      k for t in terms for k in t.settings)))),
                  defaults={} if base is None else base.defaults, options={} if base is None else base.options)


# ---------------------------------------------------------------------------------------------------------------
# Step metrics: the summed log terms of one optimizer step (all micro-batches and ranks) -> logged numbers
# ---------------------------------------------------------------------------------------------------------------

def _per_token(*names: str) -> MetricsFn:
    """Token sums divided by the step's supervised student tokens."""

    def metrics(sums: dict, n_step: float) -> dict:
        return {name: sums[name] / n_step for name in names if name in sums}

    return metrics


def _dskd_metrics(*extra: str) -> MetricsFn:
    """The DSKD family: term means, projection accuracies, CMA's attention entropy."""
    terms = _per_token("ce_student", "ce_t2s", "kd_t2s", "kd_s2t", *extra)

    def metrics(sums: dict, n_step: float) -> dict:
        m = terms(sums, n_step)
        m["t2s_acc"] = sums["t2s_correct"] / max(1.0, n_step)
        m["s2t_acc"] = sums["s2t_correct"] / max(1.0, sums.get("n_teacher", 1.0))
        if "attention_entropy_sum" in sums:
            m["attention_entropy"] = sums["attention_entropy_sum"] / n_step
        return m

    return metrics


def _cma_ga_metrics(sums: dict, n_step: float) -> dict:
    m = _dskd_metrics()(sums, n_step)
    if "l_g_sum" in sums:
        m["l_g"] = sums["l_g_sum"] / n_step
        m["d_acc_real"] = sums["d_acc_real_sum"] / max(1.0, sums["d_real_n"])
        m["d_acc_fake"] = sums["d_acc_fake_sum"] / max(1.0, sums["d_fake_n"])
    if "l_d" in sums:
        m["l_d"] = sums["l_d"]  # the shares of the step's micro-batches and processes add up to its L_D
    return m


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------

_DSKD_DEFAULTS = {"projector_lr": PROJECTOR_LR}
# DSKDv2's released scripts (scripts/dolly/gpt2/run_dskdv2*.sh) train the projector at 5e-4.
_V2_DEFAULTS = {"projector_lr": 5e-4}
# DWA-KD's public script: skewed reverse KL on the student side; the public code ramps KD_t2s over 300 steps.
_DWA_DEFAULTS = {"projector_lr": PROJECTOR_LR, "divergence": "srkl", "kd_warmup_steps": 300}
# Options every method resolves to when neither the user nor the method's entry sets them.
_FALLBACKS = {"projector_lr": PROJECTOR_LR, "divergence": "fkl", "kd_warmup_steps": 0}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", "cross-entropy on the gold responses; no teacher", sft_loss, _per_token("ce_student"),
           uses_teacher=False, shown=(CE_SHOWN,)),
    Method("kd", "vanilla KD over the shared vocabulary (same tokenizer)", kd_loss, _per_token("ce_student", "kd"),
           same_vocabulary=True, shown=(CE_SHOWN, KD_SHOWN)),
    Method("dskd", "DSKD, same vocabulary (spec/dskd.md)", dskd_loss, _dskd_metrics(), same_vocabulary=True,
           build_parts=_projectors(with_query=False), shown=DSKD_SHOWN, settings=DSKD_SETTINGS,
           defaults=_DSKD_DEFAULTS),
    Method("dskd-cma", "DSKD with cross-model attention, any tokenizers (spec/dskd.md)", dskd_cma_method_loss,
           _dskd_metrics(), build_parts=_projectors(with_query=True), shown=DSKD_SHOWN, settings=CMA_SETTINGS,
           defaults=_DSKD_DEFAULTS),
    Method("cma-ga", "DSKD-CMA with adversarial key-query matching (spec/cma_ga.md)", cma_ga_method_loss,
           _cma_ga_metrics, build_parts=_cma_ga_parts, adversary=Adversary(_disc_optimizer, _disc_steps_at),
           shown=CMA_GA_SHOWN, settings=CMA_GA_SETTINGS, defaults=_DSKD_DEFAULTS),
    Method("dskd-v2", "DSKDv2, same vocabulary: ideal projectors, teacher-argmax targets", dskd_v2_loss,
           _dskd_metrics(), same_vocabulary=True, build_parts=_v2_same_vocab_parts, shown=DSKD_SHOWN,
           settings=V2_SETTINGS, defaults=_V2_DEFAULTS),
    Method("dskd-v2-eta", "DSKDv2 with exact token alignment, any tokenizers", dskd_v2_eta_method_loss,
           _dskd_metrics(), build_parts=_v2_eta_parts, collate_extras=_eta_extras, shown=DSKD_SHOWN,
           settings=V2_ETA_SETTINGS, defaults=_V2_DEFAULTS),
    Method("dwa-kd", "DSKD-CMA with entropy weights and Soft-DTW alignment", dwa_method_loss,
           _dskd_metrics("dtw", "dtw_hidden", "dtw_embed"), build_parts=_dwa_parts,
           shown=DSKD_SHOWN + (Shown("dtw", "dtw", "Soft-DTW"),), settings=DWA_SETTINGS, defaults=_DWA_DEFAULTS),
    Method("mined", "MinED: edit-distance token map and DTW alignment (baseline)", mined_method_loss,
           _per_token("ce_student", "kd"), build_parts=_mined_parts, collate_extras=_mined_extras,
           shown=(CE_SHOWN, KD_SHOWN)),
    Method("uld", "ULD: sorted-probability distance (baseline)", uld_method_loss, _per_token("ce_student", "kd"),
           shown=(CE_SHOWN, KD_SHOWN)),
    # Chunk-level projection has no query: DSKD's t2s/s2t pair only.
    Method("chunk-attention", "ablation: CMA attention confined to each token's ground-truth chunk",
           _chunk_loss("attention"), _dskd_metrics(), build_parts=_projectors(with_query=True),
           collate_extras=_chunk_extras, shown=DSKD_SHOWN, settings=CMA_SETTINGS, defaults=_DSKD_DEFAULTS),
    Method("chunk-projection", "ablation: a uniform average over each token's ground-truth chunk, no attention",
           _chunk_loss("projection"), _dskd_metrics(), build_parts=_projectors(with_query=False),
           collate_extras=_chunk_extras, shown=DSKD_SHOWN, settings=CMA_SETTINGS, defaults=_DSKD_DEFAULTS),
)}
# Entries composed of a base method and likelihood terms (`compose`): one record each, as the others.
METHODS.update({m.name: m for m in (
    compose("alm", "ALM: the two models' likelihoods of each chunk of text both tokenizations end on, matched "
            "(tokenkit's published form)", None, ALM),
    compose("prefix-kd", "the teacher's distribution over the next characters, matched at every shared token "
            "boundary", None, PREFIX_KD),
    compose("alm+prefix-kd", "ALM and prefix-kd together", None, ALM, PREFIX_KD),
    compose("cma-ga+alm", "CMA-GA with ALM's chunk likelihoods added", METHODS["cma-ga"], ALM),
    compose("cma-ga+prefix-kd", "CMA-GA with prefix-kd's next-character distributions added", METHODS["cma-ga"],
            PREFIX_KD),
    compose("cma-ga+alm+prefix-kd", "CMA-GA with ALM and prefix-kd added", METHODS["cma-ga"], ALM, PREFIX_KD),
)})


# ---------------------------------------------------------------------------------------------------------------
# Methods from other packages, and the methods' own options
# ---------------------------------------------------------------------------------------------------------------

ENTRY_POINT_GROUP = "dskd_pipe.methods"
BUILT_IN = "built-in"


def _entry_points() -> list:
    """The installed entry points of the group, in a stable order: by distribution, then by name."""
    from importlib.metadata import entry_points

    return sorted(entry_points(group=ENTRY_POINT_GROUP),
                  key=lambda ep: (ep.dist.name if getattr(ep, "dist", None) else "", ep.name))


def _where(ep) -> str:
    """"my-plugin 0.1 (entry point my-kd = my_plugin.methods:METHOD)": a method's origin, for people."""
    dist = getattr(ep, "dist", None)
    package = f"{dist.name} {dist.version}" if dist is not None else "an unnamed package"
    return f"{package} (entry point {ep.name} = {ep.value})"


def _plugin_records(ep) -> list[Method]:
    """The Method records an entry point names: one Method named like the entry point, or a list of Methods.
    Raises TypeError / ValueError saying what was found instead."""
    obj = ep.load()
    records = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    for m in records:
        if not isinstance(m, Method):
            raise TypeError(f"expected a dskd_pipe Method (or a list of them), found {type(m).__name__}")
        if not callable(m.loss) or not callable(m.metrics):
            raise TypeError(f"method {m.name!r}: its loss and metrics must be functions")
    if not isinstance(obj, (list, tuple)) and records[0].name != ep.name:
        raise ValueError(f"the entry point is named {ep.name!r}, its Method {records[0].name!r}: name them the same")
    return records


class MethodTable(dict):
    """METHODS: name -> Method. The built-in entries, then the methods that installed packages declare under the
    entry point group `dskd_pipe.methods`; in the package's pyproject.toml:

        [project.entry-points."dskd_pipe.methods"]
        my-kd = "my_package.methods:MY_KD"      # a Method named "my-kd" (or a list of Methods)

    The packages load on the first read of the table, not when this module is imported (a plugin imports this
    module to build its record), in every process that reads it (DataLoader workers and the recipe's spawned jobs
    too). A package that fails to load, or names a method that is taken already (built-in names win), is left out
    with its problem kept in `problems`, shown by `dskd-pipe methods` and by the unknown-method error; the other
    methods are unaffected. `origin(name)` says where a method comes from.
    """

    def __init__(self, builtin: Mapping[str, Method]):
        super().__init__(builtin)
        self._origins = {name: BUILT_IN for name in builtin}
        self.problems: list[str] = []
        self._loaded = False

    def load(self) -> None:
        """Add the installed packages' methods (once; later calls do nothing)."""
        if self._loaded:
            return
        self._loaded = True  # first: reading the table below must not load again
        for ep in _entry_points():
            where = _where(ep)
            try:
                records = _plugin_records(ep)
            except Exception as e:  # a broken plugin must not take the other methods down with it
                self.problems.append(f"{where} did not load ({type(e).__name__}: {e}). Fix or uninstall it.")
                continue
            for m in records:
                if dict.__contains__(self, m.name):
                    self.problems.append(f"{where}: method {m.name!r} is taken by {self.origin(m.name)}; left out. "
                                         "Rename it.")
                    continue
                dict.__setitem__(self, m.name, m)
                self._origins[m.name] = where

    def origin(self, name: str) -> str:
        """"built-in", or the package and entry point a method came from."""
        self.load()
        return self._origins.get(name, "added at run time")

    def __getitem__(self, name):
        self.load()
        return dict.__getitem__(self, name)

    def __contains__(self, name) -> bool:
        self.load()
        return dict.__contains__(self, name)

    def __iter__(self):
        self.load()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self.load()
        return dict.__len__(self)

    def get(self, name, default=None):
        self.load()
        return dict.get(self, name, default)

    def keys(self):
        self.load()
        return dict.keys(self)

    def values(self):
        self.load()
        return dict.values(self)

    def items(self):
        self.load()
        return dict.items(self)

    def __repr__(self) -> str:
        self.load()
        return f"MethodTable({dict.__repr__(self)})"


METHODS = MethodTable(METHODS)


def unknown_method(name: str) -> str:
    """The error line for a method name that METHODS does not hold: the known names, and the packages left out."""
    return f"--method '{name}': choose one of {', '.join(METHODS)}.{_left_out()}"


def _left_out() -> str:
    METHODS.load()  # its problems are known once the packages were tried
    return f" Left out: {' '.join(METHODS.problems)}" if METHODS.problems else ""


def _option_value(name: str, option: MethodOption, text: str):
    """`text` as the option's type (its default's), checked against its choices; ValueError says why not."""
    kind = type(option.default)
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{name}: expected true or false, found {text!r}")
        value = text.lower() in ("true", "1", "yes")
    else:
        try:
            value = kind(text)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise ValueError(f"{name}: expected {what}, found {text!r}") from None
    if option.choices and value not in option.choices:
        raise ValueError(f"{name}: {text!r} is not one of {', '.join(map(str, option.choices))}")
    return value


def method_options(cfg: DistillConfig) -> dict:
    """The method's own options (Method.options) for this run: their defaults, overridden by cfg.method_options
    ("NAME=VALUE" each). Raises ConfigError listing every unknown name and bad value at once."""
    method = METHODS.get(cfg.method)
    declared = dict(method.options) if method is not None else {}
    values = {name: option.default for name, option in declared.items()}
    problems = []
    for item in cfg.method_options:
        name, sep, text = (part.strip() for part in item.partition("="))
        if not sep or name not in declared:
            known = ", ".join(declared) or "none"
            problems.append(f"--method-option '{item}': {cfg.method} has no option {name!r} (its options: {known}); "
                            "write NAME=VALUE (dskd-pipe methods lists each method's options).")
            continue
        try:
            values[name] = _option_value(name, declared[name], text)
        except ValueError as e:
            problems.append(f"--method-option {e}.")
    if problems:
        raise ConfigError("\n".join(problems))
    return values


def get_method(name: str) -> Method:
    """The entry for `name`; a KeyError names the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}.{_left_out()}") from None


def resolve(cfg: DistillConfig) -> DistillConfig:
    """`cfg` with the method's published defaults filled into the options left unset (None)."""
    method = METHODS.get(cfg.method)
    fill = {}
    for f in dataclasses.fields(cfg):
        if getattr(cfg, f.name) is None and method is not None and f.name in method.defaults:
            fill[f.name] = method.defaults[f.name]
    for name, value in _FALLBACKS.items():  # e.g. a method without projectors: the value is unused but concrete
        if getattr(cfg, name) is None and name not in fill:
            fill[name] = value
    return dataclasses.replace(cfg, **fill) if fill else cfg


def build_parts(cfg: DistillConfig, teacher, student_tok, student: nn.Module, device: str) -> MethodParts:
    """The method's parts (empty for methods without any): `student` is the transformers model."""
    build = METHODS[cfg.method].build_parts
    return MethodParts() if build is None else build(cfg, teacher, student_tok, student, device)


def collate_extras(cfg: DistillConfig, teacher, student_tok):
    """The method's Collate extras, or None."""
    make = METHODS[cfg.method].collate_extras
    return None if make is None else make(teacher.tokenizer, student_tok)


__all__ = ["METHODS", "Method", "MethodParts", "LossInputs", "LossTerms", "Adversary", "AlignmentExtras", "Term",
           "compose", "chunk_extras", "chunk_id_extras", "get_method", "resolve", "build_parts", "collate_extras",
           "MethodOption", "MethodTable", "ENTRY_POINT_GROUP", "BUILT_IN", "unknown_method", "method_options"]
