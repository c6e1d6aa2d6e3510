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


def option(default, *, at_least=None, above=None, at_most=None, below=None, choices=None, requires=None,
           note: str = ""):
    """A config field with its valid values: a number's bounds (numbers are also finite), a string's choices, or
    another option it needs when set. `note` says what a special value means ("0 = off"). The one declaration
    `option_problems`, the stages' checks and the CLI's choices read."""
    rule = {"at_least": at_least, "above": above, "at_most": at_most, "below": below, "choices": choices,
            "requires": requires, "note": note}
    return field(default=default, metadata={"option": {k: v for k, v in rule.items() if v not in (None, "")}})


def choices(cls, name: str) -> tuple:
    """The declared choices of option `name` of config class `cls`."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["option"]["choices"]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value_problem(name: str, value, rule: dict) -> str | None:
    """What is wrong with `value` for the declared `rule`, as "--name ...", or None."""
    if value is None:  # "not set": the stage or the method picks the value
        return None
    note = f" ({rule['note']})" if rule.get("note") else ""
    if "choices" in rule:
        if value not in rule["choices"]:
            listed = ", ".join(c if c else "'' (the default)" for c in rule["choices"])
            return f"{flag(name)} '{value}': choose one of {listed}."
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    lo = (">=", rule["at_least"]) if "at_least" in rule else (">", rule["above"]) if "above" in rule else None
    hi = ("<=", rule["at_most"]) if "at_most" in rule else ("<", rule["below"]) if "below" in rule else None
    ok = math.isfinite(value) and (lo is None or (value >= lo[1] if lo[0] == ">=" else value > lo[1])) and (
        hi is None or (value <= hi[1] if hi[0] == "<=" else value < hi[1]))
    if ok:
        return None
    if lo and hi:
        want = f"in {'[' if lo[0] == '>=' else '('}{lo[1]:g}, {hi[1]:g}{']' if hi[0] == '<=' else ')'}"
    else:
        want = " ".join(f"{op} {bound:g}" for op, bound in (lo or hi,))
    if not math.isfinite(value):
        want = f"a finite number {want}"
    return f"{flag(name)} must be {want}, found {value}{note}."


def option_problems(cfg) -> list[str]:
    """Every value of `cfg` outside its declared range or choices, and every option set without the option it
    needs, one line each (naming the flag)."""
    problems = []
    for f in dataclasses.fields(cfg):
        rule = f.metadata.get("option")
        if not rule:
            continue
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if (problem := _value_problem(f.name, v, rule)) is not None:
                problems.append(problem)
        if "requires" in rule and value and not getattr(cfg, rule["requires"]):
            problems.append(f"{flag(f.name)} needs {flag(rule['requires'])}.")
    return problems


LITERAL_N = ("both", "prompts", "none")  # where a literal "<n>" is a newline (ScoreConfig.literal_n)


@dataclass(frozen=True)
class CacheConfig:
    """`dskd-pipe cache-teacher`: run the teacher once and write the teacher-state store."""

    teacher: str = ""
    data: str = ""
    out: str = ""
    limit: int | None = option(None, at_least=1, note="leave it out to use every record")
    skip_bad: bool = False
    max_prompt_length: int = option(256, at_least=1)
    max_length: int = option(512, at_least=1)
    batch_tokens: int = option(8192, at_least=1)  # tokens per teacher forward (padded); batches are sorted by length
    device: str = ""  # "" = cuda when available, else cpu
    # "auto": one teacher spread over the node's GPUs by accelerate (larger than one GPU)
    device_map: str = option("", choices=("", "auto"))
    # "" = bf16 on GPU, fp32 on CPU
    dtype: str = option("", choices=("", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32"))
    # per-token top-k logits (values, indices) + log-normaliser; 0 = off
    topk: int = option(0, at_least=0, note="0 = off")
    # rows per inner chunk: an example reads ~1.08x its bytes (BENCHMARKS.md, store reads)
    chunk_tokens: int = option(32, at_least=1)
    # rows per shard file (32 MiB at d=2048 bf16): the write and kill-safe commit unit
    shard_tokens: int = option(8192, at_least=1)
    # "none" | "zstd" | "blosc": pays only on slow or capacity-bound storage
    compression: str = option("none", choices=COMPRESSIONS)
    # "exact" (the teacher's dtype) | "fp8" (e4m3, a scale per token)
    hidden_storage: str = option("exact", choices=HIDDEN_STORAGES)
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
    limit: int | None = option(None, at_least=1, note="leave it out to use every record")
    seeds: tuple[int, ...] = (10, 20, 30, 40, 50)
    greedy: bool = False
    temperature: float = option(1.0, at_least=0.0)
    top_p: float = option(1.0, above=0.0, at_most=1.0)
    top_k: int = option(0, at_least=0, note="0 = off")
    no_repeat_ngram_size: int = option(6, at_least=0, note="0 = off")
    max_new_tokens: int = option(256, at_least=1)
    max_prompt_length: int = option(256, at_least=1)
    batch_size: int = option(16, at_least=1)
    in_domain: str = ""  # the in-distribution set; "" = the first set
    # Where a literal "<n>" is a newline: "both" (prompts and references) | "prompts" (the released evaluation
    # loaders; references keep it) | "none".
    literal_n: str = option("both", choices=LITERAL_N)
    skip_bad: bool = False
    progress: bool = True  # a progress line (examples/s, ETA) on stderr
    quiet: bool = False  # only warnings and the final lines (the report)
    device: str = ""
    dtype: str = option("", choices=("", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"))
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
    dev_rouge: bool = option(False, requires="dev_data")
    dev_rouge_greedy: bool = option(False, requires="dev_rouge")  # one greedy pass instead of the sampled ones
    dev_rouge_passes: int = option(3, at_least=1)
    limit: int | None = option(None, at_least=1, note="leave it out to use every record")
    # the released scripts' --dev-num
    dev_limit: int | None = option(1000, at_least=1, note="leave it out to use every record")
    skip_bad: bool = False
    max_prompt_length: int = option(256, at_least=1)
    max_length: int = option(512, at_least=1)
    epochs: int = option(20, at_least=1)
    # 0 = the epochs decide; else stop after this many optimizer steps
    max_steps: int = option(0, at_least=0, note="0 = the epochs decide")
    micro_batch_size: int = option(4, at_least=1)
    grad_accum: int = option(8, at_least=1)
    lr: float = option(5e-4, above=0.0)
    # None = the method's published value (pipeline/methods.py; DSKD: 1e-3)
    projector_lr: float | None = option(None, above=0.0)
    weight_decay: float = option(0.01, at_least=0.0)
    warmup_steps: int = option(0, at_least=0)
    min_lr: float = option(1e-7, at_least=0.0)
    max_grad_norm: float = option(1.0, at_least=0.0, note="0 = no clipping")  # 0 = no clipping
    kd_rate: float = option(0.5, at_least=0.0, at_most=1.0)
    kd_temperature: float = option(2.0, above=0.0)
    teacher_temperature: float = option(1.0, above=0.0)
    divergence: str | None = None  # fkl | rkl | sfkl | srkl | js | akl | tvd; None = the method's (DWA-KD srkl, else fkl)
    lambda_ga: float = option(0.1, at_least=0.0)
    ga_start_step: int = option(0, at_least=0)  # CMA-GA: the generator term and D steps start at this optimizer step
    disc_lr: float = option(1e-4, above=0.0)
    # CMA-GA: a discriminator step after every k-th optimizer step (on the whole step's batch)
    disc_every: int = option(1, at_least=1)
    # DSKDv2: ideal projector init from the first k overlapping tokens (0 = all)
    overlap_top_k: int = option(0, at_least=0, note="0 = all")
    # DWA-KD: linear ramp of KD_t2s over this many steps (None = 300; 0 = off)
    kd_warmup_steps: int | None = option(None, at_least=0, note="0 = off")
    dtw_gamma_start: float = option(2.0, above=0.0)  # DWA-KD: Soft-DTW gamma anneals linearly from start to end ...
    dtw_gamma_end: float = option(0.8, above=0.0)
    # ... over this many steps, then holds (the public code); 0 = over the whole run
    dtw_gamma_steps: int = option(3570, at_least=0, note="0 = the whole run")
    # Reference-mode choices (README "Fidelity"): the default first, then the released code's behaviour.
    # DSKD-CMA family: stds over the teacher's real tokens | "padded" (the whole padded batch)
    cma_std: str = option("valid", choices=("valid", "padded"))
    same_vocab_teacher_temperature: bool = False  # DSKD/DSKDv2: also divide the t2s target by teacher_temperature
    # CMA-GA: "paper" | "released" (DSKD-KQ: a fixed random D, gradient reversal, all positions)
    ga_mode: str = option("paper", choices=("paper", "released"))
    # DSKDv2: per-micro-batch means weighted by "tokens" | "micro-batch" (equal)
    v2_mean_weighting: str = option("tokens", choices=("tokens", "micro-batch"))
    # DSKDv2: None = always mask; 1.0 = the released test
    v2_agreement_threshold: float | None = option(None, at_least=0.0)
    # DSKDv2-ETA: teacher predictions with no student string: "drop" | "unk"
    eta_unmapped: str = option("drop", choices=("drop", "unk"))
    # DWA-KD student weights: "paper" (rescale(H g), eq. 12) | "released" (rescale(H) g)
    dwa_weights: str = option("paper", choices=("paper", "released"))
    # DWA-KD teacher Soft-DTW inputs: "raw" | "normalised" (the CMA's std-normalised ones)
    dtw_inputs: str = option("raw", choices=("raw", "normalised"))
    # DWA-KD Soft-DTW positions: "response" | "released" (first n_b from index 0)
    dtw_positions: str = option("response", choices=("response", "released"))
    # DWA-KD: sum_b nDTW_b | "tokens" (sum_b n_b nDTW_b)
    dtw_reduction: str = option("sequence", choices=("sequence", "tokens"))
    # DWA-KD: the warm-up ramps KD_t2s | "both" (KD_t2s and KD_s2t)
    kd_warmup_terms: str = option("t2s", choices=("t2s", "both"))
    # Options from the quality benchmark's diagnosis (BENCHMARKS.md "Why the DSKD family did not transfer"), off
    # by default: reference mode is unchanged.
    # DSKD-CMA family: KD_t2s on rows whose t2s argmax is the gold token | "all" | "none"
    t2s_kd_rows: str = option("accurate", choices=("accurate", "all", "none"))
    # DSKD-CMA family: the first N steps train only the projectors on the KD terms
    projector_warmup_steps: int = option(0, at_least=0)
    # DSKD-CMA family: Vt2s = t2s(Ht~ + Etg~) | "hidden": t2s(Ht~), no gold embedding
    t2s_values: str = option("hidden+target", choices=("hidden+target", "hidden"))
    ga_directions: bool = False  # CMA-GA: D sees L2-normalised keys and queries (their directions, not their norms)
    disc_spectral_norm: bool = False  # CMA-GA: every Linear of D spectrally normalised
    ga_reachable_keys: bool = False  # CMA-GA: D sees keys projected onto the span the query projector can reach
    # ALM (pipeline/objectives/alm.py): tokenkit's published settings
    alm_temperature: float = option(100.0, above=0.0)  # the binarisation temperature (tokenkit's binarization_temp)
    # "space+merge" (published) | "space" (append_space only) | "none" (the plain form)
    alm_debias: str = option("space+merge", choices=("space+merge", "space", "none"))
    # merge chunks until the teacher's word-start probability exceeds this
    alm_merge_threshold: float = option(0.1, at_least=0.0, at_most=1.0)
    # ALM's mean over the merged chunks | "released" (tokenkit's count, merged twice)
    alm_mean: str = option("chunks", choices=("chunks", "released"))
    # prefix-kd (pipeline/objectives/prefix_kd.py): events are the next token's first k non-space bytes
    prefix_chars: int = option(1, at_least=1)
    # prefix-kd: kd_temperature on the events' distribution | "tokens": on the token logits before the sums
    prefix_temper: str = option("events", choices=("events", "tokens"))
    # Methods whose loss has several parts (alm, prefix-kd, compositions "A+B"): "weights" = (1 - kd_rate) CE (or
    # the base method's loss) + kd_rate * each added term | "gradmag": each part scaled by the inverse norm of its
    # gradient on the student's last block (tokenkit's approx_gradmag_preserve_mag)
    loss_balance: str = option("weights", choices=("weights", "gradmag"))
    # checkpoint every N optimizer steps (0 = only at epoch ends)
    save_every: int = option(0, at_least=0, note="0 = only at epoch ends")
    keep_checkpoints: int = option(2, at_least=0, note="0 = keep all")
    resume: bool = False
    # Continue from another run's last checkpoint (student, projectors, discriminator, optimizer states, step
    # count) on this run's data: the next on-policy round starts where the previous one stopped.
    init_from: str = ""
    # length of the LR schedule; 0 = this run's own steps (on-policy: the whole run's)
    schedule_steps: int = option(0, at_least=0, note="0 = this run's own steps")
    seed: int = 42
    # DataLoader workers; -1 = auto: 0 on CPU, up to 8 on a GPU (cache.streaming)
    num_workers: int = option(-1, at_least=-1, note="-1 = auto")
    prefetch_factor: int = option(2, at_least=1)
    device: str = ""  # "" = cuda when available, else cpu
    # "" = bf16 autocast on GPU, fp32 on CPU; or bfloat16 | float32
    dtype: str = option("", choices=("", "bfloat16", "float32"))
    # online teacher: "" = bf16 on GPU, fp32 on CPU
    teacher_dtype: str = option("", choices=("", "bfloat16", "float32"))
    gradient_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: FSDP2 (sharded student, gradients, optimizer states) instead of DDP
    lora_rank: int = option(0, at_least=0, note="0 = full fine-tune")  # 0 = full fine-tune; > 0 needs `peft`
    lora_alpha: float = option(8.0, above=0.0)
    lora_dropout: float = option(0.0, at_least=0.0, below=1.0)
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
        for problem in option_problems(cfg):
            name = problem.split(" ", 1)[0].removeprefix("--").replace("-", "_")
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

    run: str = ""  # a distill output folder (student + projectors.safetensors + distill_config.json)
    cache: str = ""  # the teacher-state store the run was trained from
    data: str = ""  # the data file the store was built from (its fingerprint is checked)
    out: str = ""
    # probe the first N store examples
    limit: int | None = option(None, at_least=1, note="leave it out to probe every example")
    heatmaps: tuple[int, ...] = option((), at_least=0)  # store example indices to draw (one PNG each)
    # 1 = exact per example: the key normalisation is one std over the padded batch
    batch_size: int = option(1, at_least=1)
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
    rounds: int = option(2, at_least=1)  # refresh rounds after phase 0
    # share of the gold prompts the student answers in each round (the spec's probability)
    share: float = option(0.5, above=0.0, at_most=1.0)
    start_epochs: int = option(3, at_least=1)  # epochs on the gold store before the first refresh (the spec's N)
    epochs_per_round: int = option(1, at_least=1)
    temperature: float = option(1.0, above=0.0)  # student sampling
    top_p: float = option(1.0, above=0.0, at_most=1.0)
    max_new_tokens: int = option(256, at_least=1)
    generate_batch_size: int = option(16, at_least=1)
    teacher_device: str = ""  # the cache-teacher process: "" = cuda when available (a GPU of its own), else cpu
    teacher_dtype: str = ""  # "" = the gold store's dtype (the union must hold one dtype)
    batch_tokens: int = option(8192, at_least=1)  # cache-teacher tokens per forward
    # > 1: each round's distill under torchrun with this many processes (DDP, or FSDP2)
    nproc_per_node: int = option(1, at_least=1)


__all__ = ["CacheConfig", "ScoreConfig", "DistillConfig", "ProbeConfig", "OnPolicyConfig", "ConfigError",
           "OUTPUT_ONLY", "LITERAL_N", "load_config", "save_config", "config_to_dict", "require", "field", "option",
           "option_problems", "choices"]
