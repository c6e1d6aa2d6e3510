"""A distill run's folder: which folder --out may be, what a run that continues another (--resume, --init-from)
must share with it, and what a finished run leaves beside the student (model cards, curves)."""
from __future__ import annotations

import json
from pathlib import Path

from dskd_pipe.cache.paths import check_out_folder, links_leaving
from dskd_pipe.pipeline.config import OUTPUT_ONLY, ConfigError, DistillConfig, config_to_dict
from dskd_pipe.pipeline.progress import Console


RESOLVED_CONFIG = "distill_config.json"  # not config.json: that name is the student's HF config
DONE = "distill_done.json"  # written last: the folder holds a finished student


def same_path(a: str, b: str) -> bool:
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


def fingerprint_changes(before: dict, now: dict, keys) -> list[str]:
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
        changes += fingerprint_changes(saved_store, store["fingerprints"],
                                        list(store["fingerprints"]) if resume else ["teacher", "tokenizer"])
    elif saved_store is not None and store is None and resume:
        changes.append(f"--cache ({before.get('cache')!r} -> none)")
    if changes:
        what = "--resume" if resume else f"--init-from {folder}"
        raise ConfigError(f"{folder}: {what} with other settings than that run's: {'; '.join(changes)}. Use its "
                          f"settings (all in {saved_file}), or another --out for a new run.")


def write_documents(cfg: DistillConfig, out: Path, state: dict, world: int, store: dict | None, done: dict,
                    console: Console) -> None:
    """The model cards of the student folders (out/README.md, and best/, last/ when a dev set selected the output)
    and curves.png (when matplotlib is installed)."""
    from dskd_pipe.pipeline.curves import CURVES, plot_paths
    from dskd_pipe.pipeline.model_card import final_metrics, train_keys, write_model_card

    common = dict(steps=state["step"], epochs=state["epoch"], world=world, store=store,
                  metrics=final_metrics(out / "metrics.jsonl", train_keys(cfg.method)))
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


def copy_model_files(src: Path, dst: Path) -> None:
    """The files of a saved HF model folder (weights, configs, tokenizer), copied over those in `dst`."""
    import shutil

    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
