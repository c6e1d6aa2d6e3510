"""Config is data: one frozen dataclass per stage, loaded from a TOML or JSON file in `configs/`, overridden by CLI
flags. Unknown keys and bad values are reported together, each with the file and key. The resolved config is
saved with every output (JSON) so any run can be repeated with `--config resolved.json`.

An option's valid values are declared once, on its field (`option`: a range, the choices, another option it needs);
`option_problems` checks them for load_config and for every stage's own check, and the CLI's choices read them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from dskd_pipe.cache.format import COMPRESSIONS, HIDDEN_STORAGES


class ConfigError(ValueError):
    """Unknown keys or bad values in a config file or flags; lists every problem at once."""


def option(default, help: str = "", *, at_least=None, above=None, at_most=None, below=None, choices=None,
           requires=None, note: str = "", flag: str = "", off_flag: str = "", comma_list: bool = False):
    """A config field declared once: its default, its help, and its valid values (a number's bounds, and numbers are
    finite; a string's choices; another option it needs when set). `note` says what a special value means ("0 =
    off"). On the command line the field is `--name-with-dashes` unless `flag` names it otherwise; a bool is a
    switch (`off_flag`: its negative spelling, for one that is on by default); a tuple is a repeated flag, or one
    comma-separated value with `comma_list`. The CLI, `option_problems`, the stages' checks, the model card and the
    README's option tables all read this one declaration."""
    rule = {"at_least": at_least, "above": above, "at_most": at_most, "below": below, "choices": choices,
            "requires": requires, "note": note}
    spelling = {"help": help, "flag": flag or None, "off_flag": off_flag or None, "comma_list": comma_list or None}
    return field(default=default, metadata={"option": {k: v for k, v in rule.items() if v not in (None, "")},
                                            **{k: v for k, v in spelling.items() if v is not None}})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_of(f: dataclasses.Field) -> str:
    """The command-line spelling of config field `f` (its declared `flag`, else --name-with-dashes)."""
    return f.metadata.get("flag") or flag(f.name)


def command_args(cfg, skip=()) -> list[str] | None:
    """The flags that rebuild `cfg` from the defaults of its class: one per setting that differs from its default
    (a repeated flag per item of a tuple), in field order; None when a setting cannot be spelled as flags (a switch
    turned off that has no negative spelling). `skip`: field names to leave out."""
    args: list[str] = []
    defaults = type(cfg)()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in skip or value == getattr(defaults, f.name):
            continue
        name = flag_of(f)
        if isinstance(value, bool):
            if not value and not f.metadata.get("off_flag"):
                return None
            args.append(name if value else f.metadata["off_flag"])
        elif isinstance(value, tuple) and f.metadata.get("comma_list"):
            args += [name, ",".join(map(str, value))]
        elif isinstance(value, tuple):
            for item in value:
                args += [name, str(item)]
        elif value is None:  # "not set" is the default of every optional field: a set one cannot be unset by flags
            return None
        else:
            args += [name, str(value)]
    return args


def _value_problem(name: str, value, rule: dict) -> str | None:
    """What is wrong with `value` for the declared `rule`, as "NAME ..." (NAME: the flag), or None."""
    if value is None:  # "not set": the stage or the method picks the value
        return None
    note = f" ({rule['note']})" if rule.get("note") else ""
    if "choices" in rule:
        if value not in rule["choices"]:
            listed = ", ".join(c if c else "'' (the default)" for c in rule["choices"])
            return f"{name} '{value}': choose one of {listed}."
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    lo, hi = _range(rule)
    ok = math.isfinite(value) and (lo is None or (value >= lo[1] if lo[0] == ">=" else value > lo[1])) and (
        hi is None or (value <= hi[1] if hi[0] == "<=" else value < hi[1]))
    if ok:
        return None
    want = _range_text(rule)
    if not math.isfinite(value):
        want = f"a finite number {want}"
    return f"{name} must be {want}, found {value}{note}."


def option_problems(cfg) -> list[str]:
    """Every value of `cfg` outside its declared range or choices, and every option set without the option it
    needs, one line each (naming the flag)."""
    return [problem for _, problem in _field_problems(cfg)]


def _field_problems(cfg) -> list[tuple[str, str]]:
    """option_problems as (field name, problem) pairs: load_config names the file or flag each value came from."""
    problems = []
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for f in fields.values():
        rule = f.metadata.get("option")
        if not rule:
            continue
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if (problem := _value_problem(flag_of(f), v, rule)) is not None:
                problems.append((f.name, problem))
        if "requires" in rule and value and not getattr(cfg, rule["requires"]):
            problems.append((f.name, f"{flag_of(f)} needs {flag_of(fields[rule['requires']])}."))
    return problems


LITERAL_N = ("both", "prompts", "none")  # where a literal "<n>" is a newline (ScoreConfig.literal_n)
# The allowed values of the method options that a loss function also checks (pipeline/objectives/, alignment.py):
# declared here, once, and imported there.
GA_MODES = ("paper", "released")  # ga_mode
WEIGHT_FORMS = ("paper", "released")  # dwa_weights
DTW_INPUTS = ("raw", "normalised")  # dtw_inputs
DTW_POSITIONS = ("response", "released")  # dtw_positions
DTW_REDUCTIONS = ("sequence", "tokens")  # dtw_reduction
KD_WARMUP_TERMS = ("t2s", "both")  # kd_warmup_terms
DEBIAS_CHOICES = ("space+merge", "space", "none")  # alm_debias
MEAN_CHOICES = ("chunks", "released")  # alm_mean
T2S_VALUES = ("hidden+target", "hidden")  # t2s_values
T2S_KD_ROWS = ("accurate", "all", "none")  # t2s_kd_rows
UNMAPPED_CHOICES = ("drop", "unk")  # eta_unmapped
# The KD divergences (pipeline/objectives/divergences.py DIVERGENCES implements exactly these; a test holds them equal)
DIVERGENCE_NAMES = ("fkl", "rkl", "sfkl", "srkl", "js", "akl", "tvd")


@dataclass(frozen=True)
class CacheConfig:
    """`dskd-pipe cache-teacher`: run the teacher once and write the teacher-state store."""

    teacher: str = option("", "Teacher model: hub id or local folder.")
    data: str = option("", "Training data: JSONL/JSON/Parquet file or datasets name.")
    out: str = option("", "Store folder, or an fsspec URL (s3://bucket/path, gs://...; needs s3fs / gcsfs).")
    limit: int | None = option(None, "Use the first N usable records.",
                                     at_least=1, note="leave it out to use every record")
    skip_bad: bool = option(False, "Skip (and count) malformed records.")
    max_prompt_length: int = option(256, "Prompt tokens kept (the prompt's first N; spec/dskd.md \"Sequences\").",
                                         at_least=1)
    max_length: int = option(512, "Prompt + response tokens kept.", at_least=1)
    # tokens per teacher forward (padded); batches are sorted by length
    batch_tokens: int = option(8192, "Padded tokens per teacher forward.", at_least=1)
    device: str = option("", "cuda, cpu, cuda:1, ... (default: cuda when available, else cpu).")
    device_map: str = option("", "auto: one teacher spread over the node's GPUs by accelerate (a teacher larger than "
                                 "one GPU); one process.", choices=("", "auto"))
    dtype: str = option("", "bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU).",
                            choices=("", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"))
    topk: int = option(0, "Also store per-token top-k logits (0 = off).", at_least=0, note="0 = off")
    # rows per inner chunk: an example reads ~1.08x its bytes (BENCHMARKS.md, store reads)
    chunk_tokens: int = option(32, "Rows per inner chunk, the unit of reads and checksums (default 32).", at_least=1)
    # rows per shard file (32 MiB at d=2048 bf16): the write and kill-safe commit unit
    shard_tokens: int = option(8192, "Rows per shard file, the unit of writes and resumes (default 8192; a multiple "
                                     "of --chunk-tokens).", at_least=1)
    compression: str = option("none", "Chunk compression: pays only on slow or capacity-bound storage (BENCHMARKS.md).",
                                      choices=COMPRESSIONS)
    hidden_storage: str = option("exact", "Hidden states in the teacher's dtype (exact, default) or fp8: e4m3 with a "
                                          "scale per token, d_model + 4 bytes per token, near-exact logits "
                                          "(BENCHMARKS.md).", choices=HIDDEN_STORAGES)
    shard: str = option("", "I/N: this process writes part I of N.")
    progress: bool = option(True, "The progress line (examples/s, tokens written, ETA).", off_flag="--no-progress")
    quiet: bool = option(False, "Print only warnings and the final lines.")
    trust_remote_code: bool = option(False, "Run the model's own Python code from its folder or hub repo (off: only "
                                            "transformers' classes).")


@dataclass(frozen=True)
class ScoreConfig:
    """`dskd-pipe score` / `dskd-pipe generate`: sample from models and report ROUGE-L (spec/evaluation.md)."""

    models: tuple[str, ...] = option((), "Model (hub id, folder or NAME=PATH); repeat to compare.", flag="--model")
    data: tuple[str, ...] = option((), "Evaluation set (file or NAME=PATH, optionally @N: its first N records, e.g. "
                                       "unni=unni.jsonl@10000); repeat for several.")
    out: str = option("", "Output folder (generations, report.json, report.md).")
    limit: int | None = option(None, "Use the first N usable records of each set (a set's own NAME=PATH@N wins).",
                                     at_least=1, note="leave it out to use every record")
    seeds: tuple[int, ...] = option((10, 20, 30, 40, 50), "Seeds, one pass each (default 10 20 30 40 50).",
                                                          flag="--seed")
    greedy: bool = option(False, "Greedy decoding instead of sampling.", off_flag="--sample")
    temperature: float = option(1.0, "Sampling temperature (1.0, published).", at_least=0.0)
    top_p: float = option(1.0, "Nucleus sampling mass (1.0 = off, published).", above=0.0, at_most=1.0)
    top_k: int = option(0, "0 = off.", at_least=0, note="0 = off")
    no_repeat_ngram_size: int = option(6, "0 = off.", at_least=0, note="0 = off")
    max_new_tokens: int = option(256, "At most this many generated tokens per response (256, published).", at_least=1)
    max_prompt_length: int = option(256, "Prompts cut to their first N tokens (256, published).", at_least=1)
    batch_size: int = option(16, "Prompts per generate call (sorted by length).", at_least=1)
    in_domain: str = option("", "The in-distribution set (default: the first --data).")
    literal_n: str = option("both", "Where a literal <n> is a newline: prompts and references (default), prompts only "
                                    "(the released loaders), none.", choices=LITERAL_N)
    skip_bad: bool = option(False, "Skip (and count) malformed records.")
    progress: bool = option(True, "The progress line (examples/s, ETA) on stderr.", off_flag="--no-progress")
    quiet: bool = option(False, "Print only warnings and the final lines.")
    device: str = option("", "cuda, cpu, cuda:1, ... (default: cuda when available, else cpu).")
    dtype: str = option("", "bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU).",
                            choices=("", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"))
    trust_remote_code: bool = option(False, "Run the model's own Python code from its folder or hub repo.")


@dataclass(frozen=True)
class DistillConfig:
    """`dskd-pipe distill`: train a student from a teacher-state store (or a teacher run online).

    Defaults are the published DSKD setup (spec/dskd.md) except sizes: global batch = micro_batch_size * grad_accum *
    world size (32 in the paper).
    """

    cache: str = option("", "Teacher-state store (offline distillation).")
    teacher: str = option("", "Teacher model run on the fly instead of --cache (online).")
    sample_caches: tuple[str, ...] = option((), "Store of student samples (on-policy); repeat for several. KD only: "
                                                "the student's CE stays on --cache's gold data.", flag="--sample-cache")
    student: str = option("", "Student model: hub id or local folder.")
    method: str = option("dskd-cma", "The distillation method: `dskd-pipe methods` describes each (README "
                                     "\"Methods\").")
    method_options: tuple[str, ...] = option((), "NAME=VALUE: an option of the method's own (`dskd-pipe methods` "
                                                 "lists them); repeat for several.", flag="--method-option")
    data: str = option("", "Training data: the file the store was built from.")
    out: str = option("", "Output folder: an HF model folder + projectors, metrics, checkpoints.")
    dev_data: str = option("", "Dev set: dev loss (and --dev-rouge) each epoch keeps out/best.")
    dev_rouge: bool = option(False, "Also ROUGE-L on --dev-data each epoch (3 sampled passes, no_repeat_ngram 0, as "
                                    "published); the best epoch becomes the run's output.", requires="dev_data")
    dev_rouge_greedy: bool = option(False, "One greedy pass instead of the sampled ones.", requires="dev_rouge")
    dev_rouge_passes: int = option(3, "Sampled passes per dev evaluation (default 3).", at_least=1)
    limit: int | None = option(None, "Train on the first N examples.",
                                     at_least=1, note="leave it out to use every record")
    dev_limit: int | None = option(1000, "Evaluate on the first N dev examples (default 1000).",
                                         at_least=1, note="leave it out to use every record")
    # the student's side; the store fixed the teacher's when it was written
    max_prompt_length: int = option(256, "Prompt tokens kept on the student side.", at_least=1)
    max_length: int = option(512, "Prompt + response tokens kept on the student side.", at_least=1)
    skip_bad: bool = option(False, "Skip (and count) malformed records instead of stopping.")
    epochs: int = option(20, "Passes over the training data (20, published).", at_least=1)
    max_steps: int = option(0, "Stop after N optimizer steps (0 = the epochs decide).",
                               at_least=0, note="0 = the epochs decide")
    micro_batch_size: int = option(4, "Examples per forward/backward on each process.", at_least=1)
    grad_accum: int = option(8, "Micro-batches per optimizer step.", at_least=1)
    lr: float = option(5e-4, "Peak learning rate of the student (cosine schedule).", above=0.0)
    projector_lr: float | None = option(None, "None = the method's published value (pipeline/methods.py; DSKD: 1e-3)",
                                              above=0.0)
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and norms).", at_least=0.0)
    warmup_steps: int = option(0, "Linear warm-up steps of the learning rate.", at_least=0)
    min_lr: float = option(1e-7, "The cosine schedule's final learning rate.", at_least=0.0)
    max_grad_norm: float = option(1.0, "0 = no clipping.", at_least=0.0, note="0 = no clipping")
    kd_rate: float = option(0.5, "lambda in (1-lambda) CE + lambda KD.", at_least=0.0, at_most=1.0)
    kd_temperature: float = option(2.0, "Temperature of the KD divergences (student and teacher logits divided by "
                                        "it).", above=0.0)
    teacher_temperature: float = option(1.0, "Extra temperature of the teacher's distribution in the t2s target.",
                                             above=0.0)
    divergence: str | None = option(None, "The KD divergence (default: the method's, DWA-KD srkl, else fkl).",
                                    choices=DIVERGENCE_NAMES)
    lambda_ga: float = option(0.1, "CMA-GA generator weight.", at_least=0.0)
    ga_start_step: int = option(0, "CMA-GA starts at this optimizer step.", at_least=0)
    disc_lr: float = option(1e-4, "CMA-GA: the discriminator's learning rate.", above=0.0)
    disc_every: int = option(1, "CMA-GA: a discriminator update every k optimizer steps.", at_least=1)
    overlap_top_k: int = option(0, "DSKDv2: ideal init from the first k shared tokens.", at_least=0, note="0 = all")
    kd_warmup_steps: int | None = option(None, "DWA-KD: linear ramp of KD_t2s (default 300; 0 = off).",
                                               at_least=0, note="0 = off")
    dtw_gamma_start: float = option(2.0, "DWA-KD: Soft-DTW gamma anneals linearly from start to end ...", above=0.0)
    dtw_gamma_end: float = option(0.8, "DWA-KD: the Soft-DTW gamma at the end of its anneal.", above=0.0)
    dtw_gamma_steps: int = option(3570, "DWA-KD: gamma 2.0 -> 0.8 over N steps, then held (default 3570; 0 = over the "
                                        "whole run).", at_least=0, note="0 = the whole run")
    # Reference-mode choices (README "Fidelity"): the default first, then the released code's behaviour.
    cma_std: str = option("valid", "DSKD-CMA stds over the teacher's real tokens (default) or the whole padded batch "
                                   "(released).", choices=("valid", "padded"))
    same_vocab_teacher_temperature: bool = option(False, "DSKD/DSKDv2: also divide the t2s target by "
                                                         "--teacher-temperature (the release does not).")
    ga_mode: str = option("paper", "CMA-GA: the paper's trained D (default) or the released code's fixed random D.",
                                   choices=GA_MODES)
    v2_mean_weighting: str = option("tokens", "DSKDv2: weight per-micro-batch means by tokens (default) or equally "
                                              "(released).", choices=("tokens", "micro-batch"))
    v2_agreement_threshold: float | None = option(None, "DSKDv2: the released test that drops the agreement mask "
                                                        "above this ratio (released: 1.0).", at_least=0.0)
    eta_unmapped: str = option("drop", "DSKDv2-ETA: drop teacher predictions with no student string (default) or "
                                       "train on unk (released).", choices=UNMAPPED_CHOICES)
    dwa_weights: str = option("paper", "DWA-KD student weights: rescale(H g) (paper eq. 12, default) or rescale(H) g "
                                       "(released).", choices=WEIGHT_FORMS)
    dtw_inputs: str = option("raw", "DWA-KD: the teacher's Soft-DTW inputs are its raw hidden states (default) or the "
                                    "CMA's std-normalised ones.", choices=DTW_INPUTS)
    dtw_positions: str = option("response", "DWA-KD Soft-DTW on response positions (default) or the first n from "
                                            "index 0 (released).", choices=DTW_POSITIONS)
    dtw_reduction: str = option("sequence", "DWA-KD: sum_b nDTW_b | \"tokens\" (sum_b n_b nDTW_b)",
                                            choices=DTW_REDUCTIONS)
    kd_warmup_terms: str = option("t2s", "DWA-KD: the warm-up ramps KD_t2s | \"both\" (KD_t2s and KD_s2t)",
                                         choices=KD_WARMUP_TERMS)
    # Options from the quality benchmark's diagnosis (BENCHMARKS.md "Why the DSKD family did not transfer"), off
    # by default: reference mode is unchanged.
    t2s_kd_rows: str = option("accurate", "DSKD-CMA family: KD_t2s on the rows whose t2s argmax is right (default), "
                                          "on every row, or none.", choices=T2S_KD_ROWS)
    projector_warmup_steps: int = option(0, "DSKD-CMA family: the first N steps train only the projectors on the KD "
                                            "terms (default 0).", at_least=0)
    t2s_values: str = option("hidden+target", "DSKD-CMA family: t2s values from the teacher's hidden state and its "
                                              "gold target embedding (default, published) or from the hidden state "
                                              "alone.", choices=T2S_VALUES)
    ga_directions: bool = option(False, "CMA-GA: D judges the directions of keys and queries (each L2-normalised), "
                                        "not their norms.")
    disc_spectral_norm: bool = option(False, "CMA-GA: spectral normalisation on every linear layer of D.")
    ga_reachable_keys: bool = option(False, "CMA-GA: D sees each key projected onto the span the query projector can "
                                            "reach (what a query can match), not the whole key.")
    # ALM (pipeline/objectives/alm.py): tokenkit's published settings
    alm_temperature: float = option(100.0, "ALM: binarisation temperature (published 100).", above=0.0)
    alm_debias: str = option("space+merge", "ALM: chunks merged by the teacher's word-start probability and closed on "
                                            "a word start (space+merge, published), closed only (space), or the plain "
                                            "form (none).", choices=DEBIAS_CHOICES)
    alm_merge_threshold: float = option(0.1, "ALM space+merge: a merged chunk ends where the teacher's word-start "
                                             "probability exceeds this (0.1).", at_least=0.0, at_most=1.0)
    alm_mean: str = option("chunks", "ALM: the mean over the merged chunks (default) or over the released code's "
                                     "count, merged twice.", choices=MEAN_CHOICES)
    # prefix-kd (pipeline/objectives/prefix_kd.py): events are the next token's first k non-space bytes
    prefix_chars: int = option(1, "prefix-kd: match the distributions over the next token's first N non-space bytes "
                                  "(default 1).", at_least=1)
    prefix_temper: str = option("events", "prefix-kd: --kd-temperature on the events' distribution (default) or on "
                                          "the token logits before they are summed by event.",
                                          choices=("events", "tokens"))
    loss_balance: str = option("weights", "alm, prefix-kd and compositions: combine the parts by --kd-rate (default) "
                                          "or by gradient magnitude on the student's last block (tokenkit's "
                                          "approx_gradmag_preserve_mag).", choices=("weights", "gradmag"))
    save_every: int = option(0, "Checkpoint every N steps (0 = epoch ends only).",
                                at_least=0, note="0 = only at epoch ends")
    keep_checkpoints: int = option(2, "Checkpoints kept (the newest N; 0 = keep all).", at_least=0, note="0 = keep all")
    resume: bool = option(False, "Continue from the newest checkpoint in --out.")
    init_from: str = option("", "Start from another run's last checkpoint (weights, optimizer, step): the next "
                                "on-policy round.")
    schedule_steps: int = option(0, "Length of the LR schedule (0 = this run's steps).",
                                    at_least=0, note="0 = this run's own steps")
    seed: int = option(42, "Seed of the initialisation, data order and dropout.")
    num_workers: int = option(-1, "DataLoader workers reading the store (-1 = auto, the default: 0 on CPU, on a GPU "
                                  "one per free core up to 8; README \"Keeping the GPU fed\").",
                                  at_least=-1, note="-1 = auto")
    prefetch_factor: int = option(2, "Micro-batches each worker prepares ahead (2).", at_least=1)
    device: str = option("", "cuda, cpu, cuda:1, ... (default: cuda when available, else cpu).")
    dtype: str = option("", "bfloat16 (autocast, default on GPU) | float32.", choices=("", "bfloat16", "float32"))
    teacher_dtype: str = option("", "The online teacher's dtype (default: bf16 on GPU, fp32 on CPU).",
                                    choices=("", "bfloat16", "float32"))
    gradient_checkpointing: bool = option(False, "Recompute the student's activations in the backward (less memory, "
                                                 "more time).")
    fsdp: bool = option(False, "Under torchrun: FSDP2 (shards the student, its gradients and optimizer states across "
                               "the processes) instead of DDP.")
    lora_rank: int = option(0, "> 0: LoRA on --lora-targets (needs peft).", at_least=0, note="0 = full fine-tune")
    lora_alpha: float = option(8.0, "LoRA scaling alpha.", above=0.0)
    lora_dropout: float = option(0.0, "LoRA dropout.", at_least=0.0, below=1.0)
    lora_targets: tuple[str, ...] = option(("q_proj", "v_proj"), "Module names LoRA adapts (repeat the flag for "
                                                                 "several).")
    progress: bool = option(True, "The progress line (step, loss terms, tokens/s, ETA) on stderr: rewritten in place "
                                  "in a terminal, one plain line every few steps in a log.", off_flag="--no-progress")
    quiet: bool = option(False, "Print only warnings and the final lines.")
    report_to: tuple[str, ...] = option((), "Also log the metrics to tensorboard (out/tensorboard), wandb (offline in "
                                            "out/wandb unless logged in), all (every installed one) or none; repeat "
                                            "or use commas.")
    # older spelling of report_to = ["tensorboard"], kept for existing configs
    tensorboard: bool = option(False, "Same as --report-to tensorboard.")
    trust_remote_code: bool = option(False, "Run the models' own Python code from their folders or hub repos.")


# Settings that change what a run prints or where it reports, never what it computes: a rerun or a resume may
# change them freely.
OUTPUT_ONLY = frozenset({"progress", "quiet", "report_to", "tensorboard"})


def option_table(cls, read_by: dict[str, list[str]] | None = None) -> str:
    """A Markdown table of every option of config class `cls`, from the declarations: flag, default, allowed values
    and help; with `read_by` (option -> method names), a column of the methods that read each option."""
    head = "| flag | default | allowed | what |" + (" methods |" if read_by is not None else "")
    rows = [head, "|---" * (5 if read_by is not None else 4) + "|"]
    for f in dataclasses.fields(cls):
        rule = f.metadata.get("option", {})
        default = f.default
        shown = ("" if default is None else ", ".join(map(str, default)) if isinstance(default, tuple) else
                 str(default).lower() if isinstance(default, bool) else f"{default:g}" if isinstance(default, float)
                 else str(default))
        allowed = ", ".join(f"`{c}`" if c else "`''`" for c in rule["choices"]) if "choices" in rule else _bounds(rule)
        spelled = flag_of(f) + (f" / {f.metadata['off_flag']}" if f.metadata.get("off_flag") else "")
        cells = [f"`{spelled}`", f"`{shown}`" if shown else "", allowed, f.metadata.get("help", "").replace("|", "\\|")]
        if read_by is not None:
            cells.append(", ".join(read_by.get(f.name, [])))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _range(rule: dict) -> tuple:
    """A number's declared bounds: (lower, upper), each (">=" or ">", bound) or None."""
    lo = (">=", rule["at_least"]) if "at_least" in rule else (">", rule["above"]) if "above" in rule else None
    hi = ("<=", rule["at_most"]) if "at_most" in rule else ("<", rule["below"]) if "below" in rule else None
    return lo, hi


def _range_text(rule: dict) -> str:
    """A number's declared range as text ("> 0", "in [0, 1]"; "" when unbounded)."""
    lo, hi = _range(rule)
    if lo and hi:
        return f"in {'[' if lo[0] == '>=' else '('}{lo[1]:g}, {hi[1]:g}{']' if hi[0] == '<=' else ')'}"
    return " ".join(f"{op} {bound:g}" for op, bound in (lo or hi,)) if lo or hi else ""


def _bounds(rule: dict) -> str:
    """A number's declared range as text, with what a special value means (README's option tables)."""
    return (_range_text(rule) + (f" ({rule['note']})" if rule.get("note") else "")).strip()


def _check_value(name: str, value, hint):
    """Return `value` coerced to the annotated type, or raise TypeError with a short reason."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(name, value, arg)
            except TypeError:
                continue
        raise TypeError(f"expected {hint}, found {value!r}")
    if origin is tuple:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, found {value!r}")
        return tuple(_check_value(name, v, args[0]) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise TypeError(f"expected true/false, found {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(f"expected an integer, found {value!r}")
        try:
            return int(value)
        except ValueError:
            raise TypeError(f"expected an integer, found {value!r}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"expected a number, found {value!r}")
        try:
            return float(value)
        except ValueError:
            raise TypeError(f"expected a number, found {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(f"expected a string, found {value!r}")
        return str(value)
    return value


def read_config_file(path: str | Path) -> dict:
    """A TOML or JSON config as a flat dict; a name without a folder is looked up among the shipped configs."""
    p = Path(path)
    if not p.exists() and p.parent == Path("."):
        shipped = resources.files("dskd_pipe.configs") / p.name
        if not shipped.is_file() and (resources.files("dskd_pipe.configs") / f"{p.name}.toml").is_file():
            shipped = resources.files("dskd_pipe.configs") / f"{p.name}.toml"
        if shipped.is_file():
            p = Path(str(shipped))
    if not p.is_file():
        raise ConfigError(f"{path}: no such config file.")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if p.suffix == '.json' else 'TOML'} ({e}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level is a JSON {type(data).__name__}, not an object of options "
                          '(e.g. {"lr": 0.0005}).')
    # A resolved config saved by a run keeps the stage's fields under "config".
    return data.get("config", data) if isinstance(data.get("config"), dict) else data


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None):
    """Build `cls` from defaults <- file <- overrides (None values in overrides mean "not given")."""
    hints = typing.get_type_hints(cls)
    values: dict = {}
    problems: list[str] = []
    sources: list[tuple[str, dict]] = []
    if path:
        sources.append((str(path), read_config_file(path)))
    sources.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None and v != ()}))
    origin: dict[str, str] = {}
    for where, data in sources:
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in hints:
                problems.append(f"{where}: unknown key '{key}' for {cls.__name__} "
                                f"(known: {', '.join(sorted(hints))}).")
                continue
            try:
                values[name] = _check_value(name, value, hints[name])
                origin[name] = where
            except TypeError as e:
                problems.append(f"{where}: key '{key}': {e}.")
    if not problems:
        cfg = cls(**values)
        for name, problem in _field_problems(cfg):
            problems.append(f"{origin.get(name, 'defaults')}: {problem}")
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def config_to_dict(cfg) -> dict:
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v) for f in dataclasses.fields(cfg)}


def save_config(cfg, path: str | Path, **extra) -> None:
    """Write the resolved config beside a run's outputs; `--config` reads it back (and ignores `extra`: facts about
    the run's inputs, such as the teacher store's fingerprints, kept to check a resumed run against)."""
    body = {"stage": type(cfg).__name__, "config": config_to_dict(cfg), **extra}
    Path(path).write_text(json.dumps(body, indent=2) + "\n")


def require(cfg, *names: str) -> None:
    """Raise ConfigError naming every required option that is empty."""
    missing = [n for n in names if not getattr(cfg, n)]
    if missing:
        raise ConfigError("missing required option(s): " + ", ".join("--" + n.replace("_", "-") for n in missing))


@dataclass(frozen=True)
class ProbeConfig:
    """`dskd-pipe probe`: alignment accuracy and t2s attention heatmaps of a trained DSKD-CMA / CMA-GA run
    (spec/cma_ga.md "Probes and heatmaps")."""

    run: str = option("", "A distill output folder of a method with a cross-model attention (dskd-cma, cma-ga, ...).")
    cache: str = option("", "The teacher-state store the run was trained from.")
    data: str = option("", "The data file the store was built from.")
    out: str = option("", "Output folder: probe_report.json and heatmap PNGs.")
    limit: int | None = option(None, "Probe the first N store examples.",
                                     at_least=1, note="leave it out to probe every example")
    heatmaps: tuple[int, ...] = option((), "Store example indices to draw, e.g. 0,3,7 (needs matplotlib).",
                                           at_least=0, comma_list=True)
    batch_size: int = option(1, "1 (default) is exact per example.", at_least=1)
    device: str = option("", "cuda, cpu, cuda:1, ... (default: cuda when available, else cpu).")


@dataclass(frozen=True)
class OnPolicyConfig:
    """`dskd-pipe on-policy`: distillation in refresh rounds on student samples (spec/other_methods.md, DSKDv2
    step 4), with the teacher never beside the student: each step runs in its own process.

    Phase 0 trains `start_epochs` on the gold store; each round r then lets the latest student answer a seeded
    `share` of the gold prompts, caches the teacher over those samples into a new store, and trains
    `epochs_per_round` on the union (KD on samples, CE on gold only), continuing weights, optimizer and schedule.
    """

    distill: str = option("", "The distill config every round uses (method, student, data, cache = the gold store, "
                              "hyper-parameters).")
    out: str = option("", "Output folder: round-0/, round-1/, ...; a rerun keeps finished steps.")
    teacher: str = option("", "Teacher for the sample stores (default: the gold store's).")
    rounds: int = option(2, "Refresh rounds after the first phase.", at_least=1)
    share: float = option(0.5, "Share of the gold prompts the student answers per round.", above=0.0, at_most=1.0)
    start_epochs: int = option(3, "Epochs on gold data before the first round.", at_least=1)
    epochs_per_round: int = option(1, "Epochs on the union of gold data and samples in each round.", at_least=1)
    temperature: float = option(1.0, "Student sampling temperature.", above=0.0)
    top_p: float = option(1.0, "Student sampling nucleus mass.", above=0.0, at_most=1.0)
    max_new_tokens: int = option(256, "At most this many tokens per student sample.", at_least=1)
    generate_batch_size: int = option(16, "Prompts per generate call of the student.", at_least=1)
    teacher_device: str = option("", "Device of the cache-teacher process (its own GPU if you like).")
    teacher_dtype: str = option("", "Default: the gold store's dtype.")
    batch_tokens: int = option(8192, "Padded tokens per teacher forward of the cache-teacher processes.", at_least=1)
    nproc_per_node: int = option(1, "Each round's distill under torchrun with N processes (global batch: micro-batch "
                                    "x accumulation x N).", at_least=1)


__all__ = ["CacheConfig", "ScoreConfig", "DistillConfig", "ProbeConfig", "OnPolicyConfig", "ConfigError",
           "OUTPUT_ONLY", "LITERAL_N", "DIVERGENCE_NAMES", "load_config", "save_config", "config_to_dict", "require",
           "field", "option", "option_problems", "flag_of", "command_args", "option_table"]
