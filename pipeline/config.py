"""Config is data: one frozen dataclass per stage, loaded from a TOML or JSON file in `configs/`, overridden by CLI
flags. Unknown keys and bad values are reported together, each with the file and key. The resolved config is
saved with every output (JSON) so any run can be repeated with `--config resolved.json`.
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


class ConfigError(ValueError):
    """Unknown keys or bad values in a config file or flags; lists every problem at once."""


@dataclass(frozen=True)
class CacheConfig:
    """`dskd-pipe cache-teacher`: run the teacher once and write the teacher-state store."""

    teacher: str = ""
    data: str = ""
    out: str = ""
    limit: int | None = None
    skip_bad: bool = False
    max_prompt_length: int = 256
    max_length: int = 512
    batch_tokens: int = 8192  # tokens per teacher forward (padded); batches are sorted by length
    device: str = ""  # "" = cuda when available, else cpu
    device_map: str = ""  # "auto": one teacher spread over the node's GPUs by accelerate (larger than one GPU)
    dtype: str = ""  # "" = bf16 on GPU, fp32 on CPU
    topk: int = 0  # per-token top-k logits (values, indices) + log-normaliser; 0 = off
    chunk_tokens: int = 32  # rows per inner chunk: an example reads ~1.08x its bytes (BENCHMARKS.md, store reads)
    shard_tokens: int = 8192  # rows per shard file (32 MiB at d=2048 bf16): the write and kill-safe commit unit
    compression: str = "none"  # "none" | "zstd" | "blosc": pays only on slow or capacity-bound storage
    hidden_storage: str = "exact"  # "exact" (the teacher's dtype) | "fp8" (e4m3, a scale per token)
    shard: str = ""  # "I/N": this process writes part I of N; "" = one process (or torchrun's rank/world)
    progress: bool = True  # a progress line on stderr (pipeline/progress.py)
    quiet: bool = False  # only warnings and the final lines
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ScoreConfig:
    """`dskd-pipe score` / `dskd-pipe generate`: sample from models and report ROUGE-L (spec/evaluation.md)."""

    models: tuple[str, ...] = ()
    data: tuple[str, ...] = ()
    out: str = ""
    limit: int | None = None
    seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
    greedy: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 6
    max_new_tokens: int = 256
    max_prompt_length: int = 256
    batch_size: int = 16
    in_domain: str = ""  # the in-distribution set; "" = the first set
    # Where a literal "<n>" is a newline: "both" (prompts and references) | "prompts" (the released evaluation
    # loaders; references keep it) | "none".
    literal_n: str = "both"
    skip_bad: bool = False
    progress: bool = True  # a progress line (examples/s, ETA) on stderr
    quiet: bool = False  # only warnings and the final lines (the report)
    device: str = ""
    dtype: str = ""
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DistillConfig:
    """`dskd-pipe distill`: train a student from a teacher-state store (or a teacher run online).

    Defaults are the published DSKD setup (spec/dskd.md) except sizes: global batch = micro_batch_size * grad_accum *
    world size (32 in the paper).
    """

    cache: str = ""  # a teacher-state store (offline); or
    teacher: str = ""  # a teacher model run on the fly (online)
    # Stores of student samples (on-policy rounds, `dskd-pipe on-policy`): the same teacher over student-generated
    # responses. KD terms use them; the student's own CE stays on the gold data of `cache`.
    sample_caches: tuple[str, ...] = ()
    student: str = ""
    method: str = "dskd-cma"  # one of pipeline/methods.METHODS (README "Methods")
    method_options: tuple[str, ...] = ()  # "NAME=VALUE": the method's own options (methods.Method.options)
    data: str = ""
    out: str = ""
    # Dev evaluation at every epoch end: "" = none; else the dev loss, and with dev_rouge the published model
    # selection (spec/evaluation.md): ROUGE-L of dev_rouge_passes sampled passes (T=1, top_p=1, top_k=0,
    # no_repeat_ngram 0) on the first dev_limit examples. The best epoch (ROUGE-L, else dev loss) is the run's output.
    dev_data: str = ""
    dev_rouge: bool = False
    dev_rouge_greedy: bool = False  # one greedy pass instead of the sampled ones
    dev_rouge_passes: int = 3
    limit: int | None = None
    dev_limit: int | None = 1000  # the released scripts' --dev-num
    skip_bad: bool = False
    max_prompt_length: int = 256
    max_length: int = 512
    epochs: int = 20
    max_steps: int = 0  # 0 = the epochs decide; else stop after this many optimizer steps
    micro_batch_size: int = 4
    grad_accum: int = 8
    lr: float = 5e-4
    projector_lr: float | None = None  # None = the method's published value (pipeline/methods.py; DSKD: 1e-3)
    weight_decay: float = 0.01
    warmup_steps: int = 0
    min_lr: float = 1e-7
    max_grad_norm: float = 1.0  # 0 = no clipping
    kd_rate: float = 0.5
    kd_temperature: float = 2.0
    teacher_temperature: float = 1.0
    divergence: str | None = None  # fkl | rkl | sfkl | srkl | js | akl | tvd; None = the method's (DWA-KD srkl, else fkl)
    lambda_ga: float = 0.1
    ga_start_step: int = 0  # CMA-GA: the generator term and D steps start at this optimizer step
    disc_lr: float = 1e-4
    disc_every: int = 1  # CMA-GA: a discriminator step after every k-th optimizer step (on the whole step's batch)
    overlap_top_k: int = 0  # DSKDv2: ideal projector init from the first k overlapping tokens (0 = all)
    kd_warmup_steps: int | None = None  # DWA-KD: linear ramp of KD_t2s over this many steps (None = 300; 0 = off)
    dtw_gamma_start: float = 2.0  # DWA-KD: Soft-DTW gamma anneals linearly from start to end ...
    dtw_gamma_end: float = 0.8
    dtw_gamma_steps: int = 3570  # ... over this many steps, then holds (the public code); 0 = over the whole run
    # Reference-mode choices (README "Fidelity"): the default first, then the released code's behaviour.
    cma_std: str = "valid"  # DSKD-CMA family: stds over the teacher's real tokens | "padded" (the whole padded batch)
    same_vocab_teacher_temperature: bool = False  # DSKD/DSKDv2: also divide the t2s target by teacher_temperature
    ga_mode: str = "paper"  # CMA-GA: "paper" | "released" (DSKD-KQ: a fixed random D, gradient reversal, all positions)
    v2_mean_weighting: str = "tokens"  # DSKDv2: per-micro-batch means weighted by "tokens" | "micro-batch" (equal)
    v2_agreement_threshold: float | None = None  # DSKDv2: None = always mask; 1.0 = the released test
    eta_unmapped: str = "drop"  # DSKDv2-ETA: teacher predictions with no student string: "drop" | "unk"
    dwa_weights: str = "paper"  # DWA-KD student weights: "paper" (rescale(H g), eq. 12) | "released" (rescale(H) g)
    dtw_inputs: str = "raw"  # DWA-KD teacher Soft-DTW inputs: "raw" | "normalised" (the CMA's std-normalised ones)
    dtw_positions: str = "response"  # DWA-KD Soft-DTW positions: "response" | "released" (first n_b from index 0)
    dtw_reduction: str = "sequence"  # DWA-KD: sum_b nDTW_b | "tokens" (sum_b n_b nDTW_b)
    kd_warmup_terms: str = "t2s"  # DWA-KD: the warm-up ramps KD_t2s | "both" (KD_t2s and KD_s2t)
    # Options from the quality benchmark's diagnosis (BENCHMARKS.md "Why the DSKD family did not transfer"), off
    # by default: reference mode is unchanged.
    t2s_kd_rows: str = "accurate"  # DSKD-CMA family: KD_t2s on rows whose t2s argmax is the gold token | "all" | "none"
    projector_warmup_steps: int = 0  # DSKD-CMA family: the first N steps train only the projectors on the KD terms
    t2s_values: str = "hidden+target"  # DSKD-CMA family: Vt2s = t2s(Ht~ + Etg~) | "hidden": t2s(Ht~), no gold embedding
    ga_directions: bool = False  # CMA-GA: D sees L2-normalised keys and queries (their directions, not their norms)
    disc_spectral_norm: bool = False  # CMA-GA: every Linear of D spectrally normalised
    ga_reachable_keys: bool = False  # CMA-GA: D sees keys projected onto the span the query projector can reach
    # ALM (pipeline/objectives/alm.py): tokenkit's published settings
    alm_temperature: float = 100.0  # the binarisation temperature (tokenkit's binarization_temp)
    alm_debias: str = "space+merge"  # "space+merge" (published) | "space" (append_space only) | "none" (plain form)
    alm_merge_threshold: float = 0.1  # merge chunks until the teacher's word-start probability exceeds this
    alm_mean: str = "chunks"  # ALM's mean over the merged chunks | "released" (tokenkit's count, merged twice)
    # prefix-kd (pipeline/objectives/prefix_kd.py): events are the next token's first k non-space bytes
    prefix_chars: int = 1
    prefix_temper: str = "events"  # prefix-kd: kd_temperature on the events' distribution | "tokens": on the logits
    # Methods whose loss has several parts (alm, prefix-kd, compositions "A+B"): "weights" = (1 - kd_rate) CE (or
    # the base method's loss) + kd_rate * each added term | "gradmag": each part scaled by the inverse norm of its
    # gradient on the student's last block (tokenkit's approx_gradmag_preserve_mag)
    loss_balance: str = "weights"
    save_every: int = 0  # checkpoint every N optimizer steps (0 = only at epoch ends)
    keep_checkpoints: int = 2
    resume: bool = False
    # Continue from another run's last checkpoint (student, projectors, discriminator, optimizer states, step
    # count) on this run's data: the next on-policy round starts where the previous one stopped.
    init_from: str = ""
    schedule_steps: int = 0  # length of the LR schedule; 0 = this run's own steps (on-policy: the whole run's)
    seed: int = 42
    num_workers: int = -1  # DataLoader workers; -1 = auto: 0 on CPU, up to 8 on a GPU (cache.streaming)
    prefetch_factor: int = 2
    device: str = ""  # "" = cuda when available, else cpu
    dtype: str = ""  # "" = bf16 autocast on GPU, fp32 on CPU; or bfloat16 | float32
    teacher_dtype: str = ""  # online teacher: "" = bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: FSDP2 (sharded student, gradients, optimizer states) instead of DDP
    lora_rank: int = 0  # 0 = full fine-tune; > 0 needs `peft`
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    progress: bool = True  # a progress line on stderr: step/total, loss terms, tokens/s, ETA
    quiet: bool = False  # only warnings and the final lines
    # Experiment trackers besides metrics.jsonl: "tensorboard", "wandb", "all" or "none" (pipeline/trackers.py)
    report_to: tuple[str, ...] = ()
    tensorboard: bool = False  # older spelling of report_to = ["tensorboard"], kept for existing configs
    trust_remote_code: bool = False


# Settings that change what a run prints or where it reports, never what it computes: a rerun or a resume may
# change them freely.
OUTPUT_ONLY = frozenset({"progress", "quiet", "report_to", "tensorboard"})


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
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if p.suffix == '.json' else 'TOML'} ({e}).") from None
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
    for where, data in sources:
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in hints:
                problems.append(f"{where}: unknown key '{key}' for {cls.__name__} "
                                f"(known: {', '.join(sorted(hints))}).")
                continue
            try:
                values[name] = _check_value(name, value, hints[name])
            except TypeError as e:
                problems.append(f"{where}: key '{key}': {e}.")
                continue
            if name.endswith("limit") and values[name] is not None and values[name] < 1:
                # "first N records": 0 or less would read nothing and fail later as "no usable records"
                problems.append(f"{where}: --{name.replace('_', '-')} must be >= 1, found {values[name]} "
                                "(leave it out to use every record).")
    if problems:
        raise ConfigError("\n".join(problems))
    return cls(**values)


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

    run: str = ""  # a distill output folder (student + projectors.safetensors + distill_config.json)
    cache: str = ""  # the teacher-state store the run was trained from
    data: str = ""  # the data file the store was built from (its fingerprint is checked)
    out: str = ""
    limit: int | None = None  # probe the first N store examples
    heatmaps: tuple[int, ...] = ()  # store example indices to draw (one PNG each)
    batch_size: int = 1  # 1 = exact per example: the key normalisation is one std over the padded batch
    device: str = ""  # "" = cuda when available, else cpu


@dataclass(frozen=True)
class OnPolicyConfig:
    """`dskd-pipe on-policy`: distillation in refresh rounds on student samples (spec/other_methods.md, DSKDv2
    step 4), with the teacher never beside the student: each step runs in its own process.

    Phase 0 trains `start_epochs` on the gold store; each round r then lets the latest student answer a seeded
    `share` of the gold prompts, caches the teacher over those samples into a new store, and trains
    `epochs_per_round` on the union (KD on samples, CE on gold only), continuing weights, optimizer and schedule.
    """

    distill: str = ""  # the distill config of every round: method, student, data, cache and hyper-parameters
    out: str = ""
    teacher: str = ""  # the teacher for the sample stores; "" = the path recorded in the gold store
    rounds: int = 2  # refresh rounds after phase 0
    share: float = 0.5  # share of the gold prompts the student answers in each round (the spec's probability)
    start_epochs: int = 3  # epochs on the gold store before the first refresh (the spec's N)
    epochs_per_round: int = 1
    temperature: float = 1.0  # student sampling
    top_p: float = 1.0
    max_new_tokens: int = 256
    generate_batch_size: int = 16
    teacher_device: str = ""  # the cache-teacher process: "" = cuda when available (a GPU of its own), else cpu
    teacher_dtype: str = ""  # "" = the gold store's dtype (the union must hold one dtype)
    batch_tokens: int = 8192  # cache-teacher tokens per forward
    nproc_per_node: int = 1  # > 1: each round's distill under torchrun with this many processes (DDP, or FSDP2)


__all__ = ["CacheConfig", "ScoreConfig", "DistillConfig", "ProbeConfig", "OnPolicyConfig", "ConfigError",
           "OUTPUT_ONLY", "load_config", "save_config", "config_to_dict", "require", "field"]
