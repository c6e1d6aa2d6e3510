"""The README.md of every student folder, in the Hugging Face model-card format (YAML metadata, then Markdown).

It says what the folder holds and how it was made: the base student, the teacher, the method and its settings,
the data and teacher-store fingerprints, the steps, the final metrics, how to load the model, and the commands that
reproduce it (the resolved config saved beside it, and the same as flags).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
import statistics
from pathlib import Path

from dskd_pipe.pipeline.config import OUTPUT_ONLY, CacheConfig, DistillConfig, command_args

CARD = "README.md"
# The card's "method settings": the KD settings of every method with a teacher, the values the method's entry sets
# (pipeline/methods.py `defaults`), and those of the options its entry reads (`settings`) that differ from what the
# method resolves to by default.
KD_SETTINGS = ("kd_rate", "kd_temperature", "divergence")
# What the project's quality benchmark measured for a method (BENCHMARKS.md "Closing the gap", the `full` size: 24-town
# world, BPE-768 teacher -> WordPiece-928 student, test NLL per character, 3 seeds, paired to sft), negative results
# included; a student's card repeats its method's line.
MEASURED = {
    "sft": "the baseline every method is compared with (test NLL/char 0.0931 ± 0.0009).",
    "kd": "with the teacher's tokenizer: -0.0165 nats/char against sft (the same-tokenizer gain the others are "
          "measured against).",
    "alm+prefix-kd": "-0.0109 nats/char against sft [-0.0164, -0.0055]: 66% of plain KD's same-tokenizer gain, the "
                     "best cross-tokenizer method measured.",
    "prefix-kd": "-0.0104 nats/char against sft [-0.0160, -0.0049]: 63% of plain KD's same-tokenizer gain.",
    "alm": "-0.0052 nats/char against sft [-0.0081, -0.0022] (published form, GradMag balancing): 32% of plain KD's "
           "same-tokenizer gain.",
    "cma-ga+prefix-kd": "-0.0050 nats/char against sft [-0.0081, -0.0019]: 30% of plain KD's same-tokenizer gain.",
    "cma-ga+alm+prefix-kd": "-0.0041 nats/char against sft [-0.0060, -0.0023]: 25% of plain KD's gain.",
    "cma-ga": "no measurable difference from sft (+0.0014 nats/char [-0.0022, +0.0050]); composed with prefix-kd it "
              "gains -0.0050.",
    "cma-ga+alm": "no measurable difference from sft (+0.0016 nats/char [-0.0009, +0.0041]).",
    "dskd-cma": "no measurable difference from sft (+0.0018 nats/char [-0.0028, +0.0063]).",
    "dwa-kd": "no measurable difference from sft (-0.0001 nats/char [-0.0071, +0.0070]).",
    "dskd-v2-eta": "no measurable difference from sft (+0.0020 nats/char [-0.0031, +0.0071]).",
    "mined": "no measurable difference from sft (+0.0020 nats/char [-0.0060, +0.0101]).",
    "uld": "worse than sft (+0.0094 nats/char [+0.0049, +0.0138]).",
    "chunk-attention": "worse than sft (+0.0032 nats/char [+0.0008, +0.0057]).",
    "dskd": "with the teacher's tokenizer: -0.0093 nats/char against sft (56% of plain KD's gain).",
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "gpt2", "Qwen/Qwen2.5-0.5B"


def _is_hub_id(name: str) -> bool:
    """A hub name ("gpt2", "owner/name") that is not a local path or a data file name."""
    return (bool(HUB_ID.match(name)) and not Path(name).exists()
            and Path(name).suffix.lower() not in (".jsonl", ".json", ".parquet", ".gguf", ".csv", ".txt"))


def flag_command(cfg: DistillConfig, out: str | None = None) -> str | None:
    """`dskd-pipe distill ...` with a flag for every setting that differs from the default (config.command_args), or
    None when one of them cannot be spelled as a flag (then only `--config distill_config.json` reproduces the run)."""
    if out is not None:
        cfg = dataclasses.replace(cfg, out=out)
    args = command_args(cfg, skip=OUTPUT_ONLY | {"resume"})  # a new folder needs no --resume
    return None if args is None else " ".join(shlex.quote(a) for a in ["dskd-pipe", "distill", *args])


def cache_command(store_config: dict) -> str:
    """The `dskd-pipe cache-teacher` command of a store's saved CacheConfig (its non-default settings as flags)."""
    known = {f.name for f in dataclasses.fields(CacheConfig)} - OUTPUT_ONLY - {"shard"}
    cfg = CacheConfig(**{k: v for k, v in store_config.items() if k in known})
    args = command_args(cfg) or []
    return " ".join(shlex.quote(a) for a in ["dskd-pipe", "cache-teacher", *args])


def train_keys(method: str) -> tuple[str, ...]:
    """The numbers of a step record the card averages: the loss, then those the method's entry shows."""
    from dskd_pipe.pipeline.methods import METHODS

    entry = METHODS.get(method)
    return ("loss", *(s.key for s in entry.shown)) if entry is not None else ("loss",)


def final_metrics(metrics_path: Path, keys: tuple[str, ...], last: int = 10) -> dict:
    """{"train": the mean of each of `keys` over the last `last` steps, "dev": [every dev record], "steps": n}."""
    train, dev = [], []
    if Path(metrics_path).is_file():
        for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            (dev if "dev_loss" in record else train).append(record)
    tail = train[-last:]
    means = {k: statistics.fmean(r[k] for r in tail) for k in keys if tail and all(k in r for r in tail)}
    return {"train": means, "last_steps": len(tail), "dev": dev,
            "supervised_tokens": sum(r.get("supervised_tokens", 0) for r in train)}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "none"
    return f"`{v}`" if isinstance(v, str) and v else str(v)


def model_card(cfg: DistillConfig, *, folder: str, steps: int, epochs: int, world: int = 1, store: dict | None = None,
               metrics: dict | None = None, selected: str | None = None, config_file: str = "distill_config.json"
               ) -> str:
    """The card's text. `store`: {"path", "fingerprints", "config"} of the teacher store (None without one);
    `metrics`: final_metrics(); `selected`: which model of the run this folder holds (dev selection: the output,
    best/, last/)."""
    metrics = metrics or {"train": {}, "dev": [], "last_steps": 0, "supervised_tokens": 0}
    fps = (store or {}).get("fingerprints") or {}
    teacher = fps.get("teacher", {}).get("name") or cfg.teacher or None
    from dskd_pipe.pipeline.methods import BUILT_IN, METHODS, method_options, resolve

    entry = METHODS.get(cfg.method)
    uses_teacher = entry is None or entry.uses_teacher
    cross = uses_teacher and entry is not None and not entry.same_vocabulary
    tags = ["dskd-pipe", "knowledge-distillation", cfg.method] + (["cross-tokenizer"] if cross else [])
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if _is_hub_id(cfg.student):
        meta.append(f"base_model: {cfg.student}")
    meta.append("tags:")
    meta += [f"- {t}" for t in tags]
    if _is_hub_id(cfg.data):
        meta += ["datasets:", f"- {cfg.data}"]
    meta.append("---")

    # the method entry's one-line summary, without its pointer into the project's spec
    method = re.sub(r"\s*\(spec/[^)]*\)$", "", entry.summary) if entry is not None else cfg.method
    title = f"A student distilled with {cfg.method}" if uses_teacher else f"A fine-tuned model ({cfg.method})"
    lines = meta + ["", f"# {title}", ""]
    intro = f"`{cfg.student}` trained with {method}"
    intro += f" from the teacher `{teacher}`" if teacher and uses_teacher else ""
    lines.append(intro + f" by dskd-pipe on `{cfg.data}`.")
    if selected:
        lines += ["", selected]
    lora = f" (LoRA rank {cfg.lora_rank}, merged into the weights)" if cfg.lora_rank else ""
    origin = METHODS.origin(cfg.method) if entry is not None else BUILT_IN
    from_package = "" if origin == BUILT_IN else f" (from {origin})"  # the package a reader must install
    lines += ["", "## Training", "", "| | |", "|---|---|",
              f"| method | `{cfg.method}`: {method}{from_package} |",
              f"| base student | `{cfg.student}`{lora} |"]
    if teacher and uses_teacher:
        t = fps.get("teacher", {})
        extra = ", ".join(x for x in (t.get("architecture"), f"revision {t['revision']}" if t.get("revision") else "")
                          if x)
        lines.append(f"| teacher | `{teacher}`" + (f" ({extra})" if extra else "") + " |")
    data_fp = fps.get("data", {})
    data_sha = data_fp.get("sha256")
    lines.append(f"| data | `{cfg.data}`" + (f", sha256 `{data_sha[:16]}…`" if data_sha else "")
                 + (f", {data_fp['n_examples']} examples" if data_fp.get("n_examples") else "")
                 + (f" (first {cfg.limit} used)" if cfg.limit and cfg.limit < data_fp.get("n_examples", cfg.limit + 1)
                    else "") + " |")
    if store:
        parts = [f"`{store['path']}`"]
        if fps.get("tokenizer"):
            parts.append(f"teacher tokenizer sha256 `{fps['tokenizer'][:16]}…`")
        weights = fps.get("teacher", {}).get("weights_sha256") or {}
        if weights:
            parts.append("weights " + ", ".join(f"{k} `{v[:12]}…`" for k, v in sorted(weights.items())))
        if fps.get("template"):
            parts.append(f"template `{fps['template']}`")
        lines.append(f"| teacher store | {'; '.join(parts)} |")
    if cfg.sample_caches:
        lines.append(f"| student-sample stores | {', '.join(f'`{s}`' for s in cfg.sample_caches)} |")
    if cfg.init_from:
        lines.append(f"| started from | `{cfg.init_from}` (its last checkpoint) |")
    global_batch = cfg.micro_batch_size * cfg.grad_accum * world
    lines.append(f"| steps | {steps} optimizer steps, {epochs} epoch(s) done, global batch {global_batch} "
                 f"({cfg.micro_batch_size} x {cfg.grad_accum} accumulation x {world} process(es))"
                 + (f", {int(metrics['supervised_tokens']):,} supervised tokens" if metrics["supervised_tokens"]
                    else "") + " |")
    lines.append(f"| sequence lengths | prompt <= {cfg.max_prompt_length}, total <= {cfg.max_length} tokens |")
    lines.append(f"| optimizer | AdamW, lr {cfg.lr:g}, weight decay {cfg.weight_decay:g}, warm-up {cfg.warmup_steps}, "
                 f"cosine to {cfg.min_lr:g}, grad clip {cfg.max_grad_norm:g}, seed {cfg.seed} |")
    usual = resolve(DistillConfig(method=cfg.method)) if entry is not None else DistillConfig()
    own = tuple(entry.defaults) if entry is not None else ()
    settings = entry.settings if entry is not None else ()
    shown = [k for k in dict.fromkeys((*KD_SETTINGS, *own, *settings)) if uses_teacher
             and (k in KD_SETTINGS or k in own or getattr(cfg, k) != getattr(usual, k))]
    if shown:
        lines.append("| method settings | " + ", ".join(f"{k} {_fmt(getattr(cfg, k))}" for k in shown) + " |")
    if entry is not None and entry.options:
        lines.append("| method options | " + ", ".join(f"{k} {_fmt(v)}" for k, v in method_options(cfg).items())
                     + " |")

    if cfg.method in MEASURED:
        lines += ["", f"On the project's quality benchmark (BENCHMARKS.md), `{cfg.method}`: {MEASURED[cfg.method]}"]
    lines += ["", "## Results", ""]
    if metrics["train"]:
        lines.append(f"Training, mean of the last {metrics['last_steps']} optimizer steps (per supervised token):")
        lines += ["", "| " + " | ".join(metrics["train"]) + " |", "|" + "---:|" * len(metrics["train"]),
                  "| " + " | ".join(f"{v:.4g}" for v in metrics["train"].values()) + " |"]
    if metrics["dev"]:
        last = metrics["dev"][-1]
        text = f"Dev set `{cfg.dev_data}`, at step {last['step']}: loss {last['dev_loss']:.4g}"
        if "dev_rouge_l" in last:
            text += f", greedy ROUGE-L {last['dev_rouge_l']:.2f}"
            best = max(metrics["dev"], key=lambda r: r["dev_rouge_l"])
            text += f"; best ROUGE-L {best['dev_rouge_l']:.2f} at step {best['step']}"
        else:
            best = min(metrics["dev"], key=lambda r: r["dev_loss"])
            text += f"; best loss {best['dev_loss']:.4g} at step {best['step']}"
        lines += ["", text + "."]
    if not metrics["train"] and not metrics["dev"]:
        lines.append("No metrics were logged.")
    lines += ["", "ROUGE-L on held-out sets with the published protocol: "
              f"`dskd-pipe score --model {folder} --data NAME=FILE`.", "",
              "## Use", "",
              "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "",
              f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
              f'model = AutoModelForCausalLM.from_pretrained("{folder}")',
              'prompt = ("Below is an instruction that describes a task. Write a response that appropriately '
              'completes the request."',
              '          "\\n\\n### Instruction:\\nName three primary colours.\\n\\n### Response:\\n")',
              "ids = tokenizer(prompt, return_tensors=\"pt\", add_special_tokens=False)",
              "out = model.generate(**ids, max_new_tokens=128)",
              "print(tokenizer.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
              "```", "",
              "It was trained on prompts in this (Alpaca) template, without BOS, answers ended by EOS.", "",
              "## Reproduce", "",
              f"Every setting is in `{config_file}` beside this card:", "",
              "```bash"]
    if store and store.get("config"):
        lines.append(cache_command(store["config"]) + "   # the teacher store")
    lines.append(f"dskd-pipe distill --config {config_file} --out NEW_FOLDER")
    lines.append("```")
    flags = flag_command(cfg, out="NEW_FOLDER")
    if flags:
        lines += ["", "or, as flags:", "", "```bash", flags, "```"]
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, cfg: DistillConfig, **kwargs) -> Path:
    """Write the card as folder/README.md (replacing an older one) and return its path."""
    path = Path(folder) / CARD
    tmp = path.with_name(f".tmp-{CARD}")
    tmp.write_text(model_card(cfg, folder=str(folder), **kwargs), encoding="utf-8")
    tmp.replace(path)
    return path


__all__ = ["model_card", "write_model_card", "final_metrics", "flag_command", "cache_command", "CARD", "KD_SETTINGS",
           "train_keys"]
