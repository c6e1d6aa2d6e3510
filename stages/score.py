"""`dskd-pipe score` and `dskd-pipe generate`: sample responses and report ROUGE-L with the published protocol.

spec/evaluation.md: prompts cut to their first 256 tokens (no special tokens, no BOS) and left-padded; sampling with
T=1, top_p=1, top_k=0 (off), no_repeat_ngram_size=6, at most 256 new tokens; one full pass per seed (10..50);
decode with special tokens skipped, cut at the first EOS text, strip; ROUGE-L F1 with stemming, max over references,
mean x 100; per set mean and std over seeds, the all-set and the out-of-distribution averages.

Layout of a score run (`--out DIR`):
    config.json                                   the resolved ScoreConfig
    generations/<model>/<set>/seed<S>.jsonl       a header line {"header": fingerprint}, then one line per example:
                                                  prompt, references, generation, rougeL (x100)
    report.json, report.md, rouge_l.png           figures; the PNG only when matplotlib is installed

Determinism. `generate` calls torch.manual_seed(seed) once, then samples the length-sorted batches in a fixed order,
so a pass is a function of (model, prompts, seed, batch_size, device, dtype). A prompt's sample can change when the
other prompts or the batch size change (HF `generate` draws one random stream per batch), which is why batch_size,
device and dtype are part of a generations file's fingerprint. Greedy decoding does not depend on the batch.

Resume. A generations file is written to a temp name and renamed only once complete; its header holds the model
(name, local weight files' sizes and mtimes), the set file's sha256, the set's limit and the generation settings. A
rerun re-uses a file whose header matches and regenerates any other, so an interrupted run loses at most one pass.

Sets. `--data NAME=PATH@N` scores the first N usable records of that set (the papers score UnNI on its first 10,000),
overriding --limit for it. A literal "<n>" in prompts and references is a newline, as the released evaluation
loaders read prompts (they leave references as they are, where ROUGE-L's tokenizer then sees a word "n"; --literal-n
prompts does that).
"""
from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

import torch

from dskd_pipe.cache.paths import check_out_folder, check_out_location
from dskd_pipe.pipeline.comparison import mean_std
from dskd_pipe.pipeline.config import ConfigError, ScoreConfig, require, save_config
from dskd_pipe.pipeline.data import DataError, Example, file_fingerprint, load_examples
from dskd_pipe.pipeline.generation import (NEWLINE_MARKER, check_generation_settings, generate, prompt_lengths_over,
                                           unescape_newlines)
from dskd_pipe.pipeline.models import (check_device, check_vocabulary, default_device, default_dtype, load_causal_lm,
                                       load_tokenizer)
from dskd_pipe.pipeline.progress import Console, quiet_libraries
from dskd_pipe.pipeline.rouge import rouge_l


FORMAT_VERSION = 1  # of a generations file; bump when its header or lines change meaning

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# Names, fingerprints and generations files
# ---------------------------------------------------------------------------------------------------------------

def split_name(spec: str) -> tuple[str, str]:
    """`name=path` -> (name, path); a bare path -> (its file name without extension, path)."""
    head, sep, tail = spec.partition("=")
    if sep and head and tail and "/" not in head and not os.path.exists(spec):
        return head, tail
    path = spec.rstrip("/")
    name = Path(path).name
    for suffix in (".jsonl", ".json", ".parquet"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or path, spec


def split_limit(spec: str) -> tuple[str, int | None]:
    """`[NAME=]PATH@N` -> (`[NAME=]PATH`, N): this set's own limit; no `@N` (or an existing path with an '@') -> None."""
    body, sep, tail = spec.rpartition("@")
    path = spec.partition("=")[2] if "=" in spec and "/" not in spec.partition("=")[0] else spec
    if not sep or not body or os.path.exists(path) or os.path.exists(spec):
        return spec, None
    if not tail.isdigit() or int(tail) < 1:
        raise ConfigError(f"--data {spec}: the limit after '@' must be a positive integer (NAME=PATH@10000).")
    return body, int(tail)


def _safe(name: str) -> str:
    """A name usable as one folder name."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name) or "_"


def _named(specs: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    pairs = [split_name(s) for s in specs]
    folders = [_safe(n) for n, _ in pairs]  # names must differ as folder names too
    dup = [n for n, _ in pairs if folders.count(_safe(n)) > 1]
    if dup:
        raise ConfigError(f"two {what}s are named '{dup[0]}'. Name them apart with --{what} NAME=PATH.")
    return pairs


def model_id(name_or_path: str) -> dict:
    """A cheap model identity for generations headers: the name, and for a local folder the sizes and mtimes of its
    config, tokenizer and weight files (hashing multi-GB weights on every rerun costs more than it is worth)."""
    ident: dict = {"name": name_or_path}
    folder = Path(name_or_path)
    if folder.is_dir():
        files = sorted({*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("config.json"),
                        *folder.glob("tokenizer*"), *folder.glob("*.model")})
        ident["files"] = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    return ident


def generation_settings(cfg: ScoreConfig, device: str, dtype: torch.dtype) -> dict:
    """Everything besides model, data and seed that a pass's text depends on."""
    settings = {"greedy": cfg.greedy, "max_new_tokens": cfg.max_new_tokens, "max_prompt_length": cfg.max_prompt_length,
                "no_repeat_ngram_size": cfg.no_repeat_ngram_size, "batch_size": cfg.batch_size,
                "device": torch.device(device).type, "dtype": str(dtype).removeprefix("torch.")}
    if not cfg.greedy:
        settings.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    return settings


def _resolve_device_dtype(cfg: ScoreConfig) -> tuple[str, torch.dtype]:
    device = check_device(cfg.device or default_device())
    return device, (_DTYPES[cfg.dtype] if cfg.dtype else default_dtype(device))


def _own_run(folder: Path) -> bool:
    """Whether `folder` is an earlier score run (its config.json says ScoreConfig): its finished passes are reused."""
    try:
        return json.loads((folder / "config.json").read_text()).get("stage") == "ScoreConfig"
    except (OSError, ValueError, AttributeError):
        return False


def check_out_file(out: str, data_path: str) -> Path:
    """`generate --out`, checked before anything is loaded: a new file, or one an earlier generate wrote (its
    NAME.config.json beside it), never the --data file or any other existing file."""
    path = check_out_location(out, ConfigError, kind="file")
    if path.exists() and Path(data_path).exists() and path.resolve() == Path(data_path).resolve():
        raise ConfigError(f"--out {path} is the --data file itself; write the generations to a new file.")
    if path.exists() and not path.with_name(path.name + ".config.json").is_file():
        raise ConfigError(f"--out {path} exists and is not an earlier generate output (no {path.name}.config.json "
                          "beside it): it would be overwritten. Pass a new file name.")
    return path


def _write_jsonl_atomic(path: Path, lines: list[dict]) -> None:
    """Write to a temp file in the same folder, fsync, rename: a reader sees a complete file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_generations(path: Path, header: dict, n: int) -> list[dict] | None:
    """The rows of a finished generations file whose header equals `header`, else None (missing or stale)."""
    if not path.is_file():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    if not lines or lines[0].get("header") != header or len(lines) != n + 1:
        return None
    return lines[1:]


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def summarise(scores: dict[str, dict[str, dict[str, float]]], set_names: list[str], in_domain: str,
              sizes: dict[str, int]) -> dict:
    """scores[model][set][seed] = mean ROUGE-L x100 -> per set mean/std over seeds, all-set and OOD averages.

    The averages' std is over seeds of the per-seed average across sets.
    """
    ood = [s for s in set_names if s != in_domain]
    models = {}
    for label, per_set in scores.items():
        seeds = list(next(iter(per_set.values())))
        entry = {"sets": {s: {**mean_std(list(per_set[s].values())), "per_seed": per_set[s], "n": sizes[s]}
                          for s in set_names}}
        entry["average"] = mean_std([statistics.fmean(per_set[s][k] for s in set_names) for k in seeds])
        entry["ood_average"] = (mean_std([statistics.fmean(per_set[s][k] for s in ood) for k in seeds])
                                if ood else None)
        models[label] = entry
    return {"sets": set_names, "in_domain": in_domain, "ood_sets": ood, "models": models}


def markdown_table(report: dict) -> str:
    """Sets as rows, models side by side as columns, cells 'mean ± std' over seeds."""
    labels = list(report["models"])
    seeds = report.get("seeds", [])
    settings = report.get("settings", {})
    mode = "greedy" if settings.get("greedy") else (
        f"sampling T={settings.get('temperature')}, top_p={settings.get('top_p')}, top_k={settings.get('top_k')}")
    lines = [f"ROUGE-L F1 x100 (stemmed, max over references), mean ± std over seeds "
             f"{', '.join(map(str, seeds))}; {mode}.", "",
             "| Set | n | " + " | ".join(labels) + " |",
             "|---|---:|" + "---:|" * len(labels)]

    def cell(ms):
        return "-" if ms is None else f"{ms['mean']:.2f} ± {ms['std']:.2f}"

    for s in report["sets"]:
        first = report["models"][labels[0]]["sets"][s]
        name = f"{s} (in-domain)" if s == report["in_domain"] else s
        lines.append(f"| {name} | {first['n']} | " + " | ".join(cell(report["models"][m]["sets"][s]) for m in labels)
                     + " |")
    lines.append("| Average | | " + " | ".join(cell(report["models"][m]["average"]) for m in labels) + " |")
    lines.append("| OOD average | | " + " | ".join(cell(report["models"][m]["ood_average"]) for m in labels) + " |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> bool:
    """A grouped bar chart (sets and averages x models, std as error bars); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = list(report["models"])
    groups = report["sets"] + ["Average"] + (["OOD average"] if report["ood_sets"] else [])

    def get(m, g):
        e = report["models"][m]
        return e["average"] if g == "Average" else e["ood_average"] if g == "OOD average" else e["sets"][g]

    width = 0.8 / len(labels)
    # The legend sits right of the axes, at most 20 names a column, so a recipe's 39 models still fit the figure.
    columns = -(-len(labels) // 20)
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.25 * len(groups) * len(labels))) + 1.8 * columns,
                                    max(4.0, 0.2 * -(-len(labels) // columns))))
    for j, m in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [get(m, g)["mean"] for g in groups], width, yerr=[get(m, g)["std"] for g in groups], label=m,
               capsize=2)
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylabel("ROUGE-L x100")
    ax.legend(fontsize="small", ncol=columns, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------

def _load_sets(cfg: ScoreConfig) -> list[tuple[str, str, list[Example], str, int | None, bool]]:
    """(name, path, examples, sha256, limit, had "<n>") per --data, all read before any model is loaded so data
    errors come first. A set's `@N` limit wins over --limit."""
    specs = [split_limit(s) for s in cfg.data]
    sets = []
    for (name, path), (_, own_limit) in zip(_named(tuple(s for s, _ in specs), "data"), specs):
        limit = own_limit if own_limit is not None else cfg.limit
        examples = load_examples(path, limit=limit, skip_bad=cfg.skip_bad)
        marked = any(NEWLINE_MARKER in e.prompt or any(NEWLINE_MARKER in r for r in e.references) for e in examples)
        sets.append((name, path, unescape_newlines(examples, cfg.literal_n), file_fingerprint(path), limit, marked))
    return sets


def _seed_labels(cfg: ScoreConfig) -> list[tuple[str, int]]:
    """(label, seed) per pass: one pass when greedy (the seed changes nothing)."""
    if cfg.greedy:
        return [("greedy", cfg.seeds[0])]
    return [(str(s), s) for s in cfg.seeds]


@quiet_libraries
def run(cfg: ScoreConfig) -> Path:
    """Score every --model on every --data set; return the output folder (see the module docstring)."""
    require(cfg, "models", "data", "out")
    check_generation_settings(cfg)
    out = check_out_folder(cfg.out, _own_run, "score", ConfigError)  # before anything is loaded
    device, dtype = _resolve_device_dtype(cfg)
    sets = _load_sets(cfg)
    set_names = [s[0] for s in sets]
    in_domain = cfg.in_domain or set_names[0]
    if in_domain not in set_names:
        raise ConfigError(f"--in-domain '{in_domain}' is not one of the sets ({', '.join(set_names)}).")
    models = _named(cfg.models, "model")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.json")
    settings = generation_settings(cfg, device, dtype)
    passes = _seed_labels(cfg)
    console = Console.for_stage(cfg.progress, cfg.quiet)

    # Every (model, set, pass) and its generations file; a finished file with the same header is re-used.
    files, found = {}, {}
    for label, model_path in models:
        ident = model_id(model_path)
        for set_name, set_path, examples, sha, limit, marked in sets:
            for seed_label, seed in passes:
                path = out / "generations" / _safe(label) / _safe(set_name) / f"seed{seed_label}.jsonl"
                if cfg.greedy:
                    path = path.with_name("greedy.jsonl")
                header = {"version": FORMAT_VERSION, "model": ident, "data": {"path": set_path, "sha256": sha},
                          "limit": limit, "skip_bad": cfg.skip_bad, "seed": None if cfg.greedy else seed,
                          "settings": settings}
                if marked:  # only where it changes the text: files of sets without "<n>" stay valid
                    header["literal_n"] = cfg.literal_n
                files[label, set_name, seed_label] = path, header
                found[label, set_name, seed_label] = read_generations(path, header, len(examples))
    n_examples = {s[0]: len(s[2]) for s in sets}
    bar = console.bar("score", sum(n_examples[k[1]] for k, rows in found.items() if rows is None), "ex")

    scores: dict[str, dict[str, dict[str, float]]] = {}
    prompts_cut: dict[str, dict[str, int]] = {}
    for label, model_path in models:
        model = tokenizer = None
        scores[label], prompts_cut[label] = {}, {}
        generations = []
        for set_name, set_path, examples, sha, limit, marked in sets:
            scores[label][set_name] = {}
            for seed_label, seed in passes:
                path, header = files[label, set_name, seed_label]
                rows = found[label, set_name, seed_label]
                if rows is None:
                    if model is None:
                        tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
                        model = load_causal_lm(model_path, dtype=dtype, device=device,
                                               trust_remote_code=cfg.trust_remote_code)
                        check_vocabulary(model, tokenizer, model_path)
                    prompts = [e.prompt for e in examples]
                    cut = prompt_lengths_over(tokenizer, prompts, cfg.max_prompt_length)
                    if set_name not in prompts_cut[label] and any(cut):
                        console.warn(f"{label} on {set_name}: {sum(cut)} of {len(cut)} prompts cut at "
                                     f"--max-prompt-length {cfg.max_prompt_length} (the model sees their first "
                                     f"{cfg.max_prompt_length} tokens).")
                    bar.describe({"model": label, "set": set_name, "seed": seed_label})
                    texts = generate(model, tokenizer, prompts, seed, cfg, bar=bar)
                    rows = [{"prompt": e.prompt, "references": list(e.references), "generation": t,
                             "rougeL": 100.0 * rouge_l(t, e.references), "prompt_cut": c}
                            for e, t, c in zip(examples, texts, cut)]
                    _write_jsonl_atomic(path, [{"header": header}, *rows])
                if "prompt_cut" in rows[0]:  # files written before this field have no count
                    prompts_cut[label][set_name] = sum(bool(r["prompt_cut"]) for r in rows)
                scores[label][set_name][seed_label] = statistics.fmean(r["rougeL"] for r in rows)
                generations += [r["generation"] for r in rows]
        if not any(t.strip() for t in generations):
            console.warn(f"every generation of {label} is empty ({len(generations)} of them): it ends each answer "
                         "at once. Check its EOS token and that it was trained with this prompt template.")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    bar.close()

    report = summarise(scores, set_names, in_domain, {s[0]: len(s[2]) for s in sets})
    report = {"protocol": "spec/evaluation.md", "seeds": [p[0] for p in passes], "settings": settings,
              "limit": cfg.limit, "set_limits": {s[0]: s[4] for s in sets}, "model_paths": dict(models),
              "data_paths": {s[0]: s[1] for s in sets}, "prompts_cut": prompts_cut, **report}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown_table(report))
    plot_report(report, out / "rouge_l.png")
    return out


@quiet_libraries
def run_generate(cfg: ScoreConfig) -> Path:
    """`dskd-pipe generate`: one pass of the first --model over the --data prompts, written as a new data file.

    Each line keeps the record's own fields, sets `prompt` to the full prompt and `output` to the generation (the
    SeqKD target); the record's original output is kept as `original_output`. Seed: the first of cfg.seeds.
    """
    require(cfg, "models", "data", "out")
    if len(cfg.models) != 1 or len(cfg.data) != 1:
        raise ConfigError(f"generate takes one --model and one --data (found {len(cfg.models)} and {len(cfg.data)}).")
    check_generation_settings(cfg)
    device, dtype = _resolve_device_dtype(cfg)
    data_spec, own_limit = split_limit(cfg.data[0])
    _, data_path = split_name(data_spec)
    _, model_path = split_name(cfg.models[0])
    out = check_out_file(cfg.out, data_path)
    examples = load_examples(data_path, limit=own_limit if own_limit is not None else cfg.limit,
                             skip_bad=cfg.skip_bad)
    examples = unescape_newlines(examples, "prompts" if cfg.literal_n == "both" else cfg.literal_n)
    from dskd_pipe.pipeline.data import _raw_records  # the original fields of each record, by location

    wanted = {e.where for e in examples}
    raw = {where: rec for where, rec in _raw_records(data_path) if where in wanted}
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(model_path, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    check_vocabulary(model, tokenizer, model_path)
    console = Console.for_stage(cfg.progress, cfg.quiet)
    prompts = [e.prompt for e in examples]
    if n_cut := sum(prompt_lengths_over(tokenizer, prompts, cfg.max_prompt_length)):
        console.warn(f"{n_cut} of {len(prompts)} prompts cut at --max-prompt-length {cfg.max_prompt_length} (the "
                     f"model sees their first {cfg.max_prompt_length} tokens).")
    texts = generate(model, tokenizer, prompts, cfg.seeds[0], cfg, desc="generate")
    if not any(t.strip() for t in texts):
        console.warn(f"every generation of {model_path} is empty ({len(texts)} of them): {out} would train on empty "
                     "answers. Check the model's EOS token and that it was trained with this prompt template.")
    lines = []
    for e, t in zip(examples, texts):
        rec = dict(raw.get(e.where) or {})
        if "output" in rec:
            rec["original_output"] = rec.pop("output")
        rec.update(prompt=e.prompt, output=t)
        lines.append(rec)
    _write_jsonl_atomic(out, lines)
    save_config(cfg, out.with_name(out.name + ".config.json"))
    return out


__all__ = ["run", "run_generate", "summarise", "markdown_table", "split_name", "split_limit", "DataError"]
