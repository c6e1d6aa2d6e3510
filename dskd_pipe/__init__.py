"""dskd-pipe as a library: the teacher-state store in your own training loop, the stages as functions, the losses
as tensor functions, and methods from your own package.

Everything public is named here (`dskd_pipe.__all__`) and in `dskd_pipe.losses`; the modules below
(`dskd_pipe.pipeline`, `.cache`, `.stages`) are the implementation and may change without notice.

Read a store (built by `dskd-pipe cache-teacher` or `cache_teacher()`):

    import dskd_pipe as dp

    store = dp.open_store("runs/qwen-dolly.zarr")     # a folder or an fsspec URL (s3://..., gs://...)
    ex = store[0]                                      # ids [T], offsets [T, 2], hidden [T, d], prompt, response
    lp = store.log_probs(ex, rows=slice(0, 8))         # [8, V]: the teacher's next-token log-probabilities
    values, ids = store.topk(ex, k=5, max_rows=64)     # [T, 5], never more than a [64, V] block at once

Train from it, with any student tokenizer:

    data = dp.StoreDataset(store, student_tokenizer)
    collate = dp.store_collate(store, student_tokenizer, method="alm")   # + "teacher_chunk", "student_chunk"
    for batch in DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alm = dp.losses.alm_loss(logits, batch["labels"], dp.teacher_hidden(batch), batch["teacher_labels"],
                                 store.head, batch["student_chunk"], batch["teacher_chunk"], debias="none").loss
        ce = dp.losses.cross_entropy_sum(logits, batch["labels"]) / (batch["labels"] != -100).sum()
        (0.5 * ce + 0.5 * alm).backward()

`examples/` in the repository holds two whole scripts: a plain PyTorch loop and Hugging Face's `Trainer`.

Run the stages as the command line does: `dp.cache_teacher(...)`, `dp.distill(...)`, `dp.score(...)` take their
config (a `CacheConfig` / `DistillConfig` / `ScoreConfig`, or a config file) and keyword options, checked like
flags, and return the output folder.

A method of your own package: build a `Method` record (its loss reads a `LossInputs`, returns `LossTerms`) and
declare it under the entry point group `dskd_pipe.methods` in your pyproject.toml; `dskd-pipe methods` then lists
it and `dskd-pipe distill --method NAME`, the recipes and `dp.distill(method=NAME)` train with it. README
"Methods from your own package" has a whole one.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load on first use (below)
    from dskd_pipe.cache.format import StoreError
    from dskd_pipe.pipeline.loader import teacher_hidden
    from dskd_pipe.pipeline.config import CacheConfig, ConfigError, DistillConfig, ScoreConfig
    from dskd_pipe.pipeline.methods import Adversary, LossInputs, LossTerms, Method, MethodOption, MethodParts
    from dskd_pipe.pipeline.objectives.dskd import TeacherHead
    from dskd_pipe.pipeline.store_data import StoreDataset, held_out_loss, store_collate
    from dskd_pipe.pipeline.teacher_store import TeacherExample, TeacherStore, open_store
    from dskd_pipe.pipeline.student import student_forward

    from . import losses


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dskd-pipe")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

# Public name -> the module that defines it. Imported on first use (PEP 562): `import dskd_pipe` stays as light as
# the command line needs (torch and transformers load only when a name that needs them is used).
_LAZY = {
    "open_store": "dskd_pipe.pipeline.teacher_store",
    "TeacherStore": "dskd_pipe.pipeline.teacher_store",
    "TeacherExample": "dskd_pipe.pipeline.teacher_store",
    "StoreError": "dskd_pipe.cache.format",
    "StoreDataset": "dskd_pipe.pipeline.store_data",
    "store_collate": "dskd_pipe.pipeline.store_data",
    "held_out_loss": "dskd_pipe.pipeline.store_data",
    "teacher_hidden": "dskd_pipe.pipeline.loader",
    "student_forward": "dskd_pipe.pipeline.student",
    "TeacherHead": "dskd_pipe.pipeline.objectives.dskd",
    "CacheConfig": "dskd_pipe.pipeline.config",
    "DistillConfig": "dskd_pipe.pipeline.config",
    "ScoreConfig": "dskd_pipe.pipeline.config",
    "ConfigError": "dskd_pipe.pipeline.config",
    "Method": "dskd_pipe.pipeline.methods",
    "MethodOption": "dskd_pipe.pipeline.methods",
    "MethodParts": "dskd_pipe.pipeline.methods",
    "LossInputs": "dskd_pipe.pipeline.methods",
    "LossTerms": "dskd_pipe.pipeline.methods",
    "Adversary": "dskd_pipe.pipeline.methods",
}


def __getattr__(name: str):
    if name == "losses":
        return importlib.import_module("dskd_pipe.losses")
    if name not in _LAZY:
        raise AttributeError(f"module 'dskd_pipe' has no attribute {name!r} (its public names: dskd_pipe.__all__)")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once: later reads are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def _config(cls, config, options: dict):
    """`cls` from a config instance or file (None: the defaults) and keyword options, checked as flags are: every
    unknown key and bad value reported together in one ConfigError."""
    from dskd_pipe.pipeline.config import load_config

    given = {k.replace("-", "_"): v for k, v in options.items()}
    if config is None or isinstance(config, (str, os.PathLike)):
        return load_config(cls, config, given)
    if not isinstance(config, cls):
        raise TypeError(f"expected a {cls.__name__}, a config file or None, found {type(config).__name__}.")
    checked = load_config(cls, None, given)  # checks the options; its other fields are defaults, not used
    return dataclasses.replace(config, **{k: v if v is None else getattr(checked, k) for k, v in given.items()})


def cache_teacher(config: CacheConfig | str | os.PathLike | None = None, /, **options) -> Path:
    """Run the teacher once over the data and write the teacher-state store (`dskd-pipe cache-teacher`).

    config: a CacheConfig, or a TOML/JSON config file; options: any CacheConfig field, overriding it (e.g.
    `cache_teacher(teacher="Qwen/Qwen1.5-1.8B", data="dolly/train.jsonl", out="runs/qwen-dolly.zarr")`).
    Returns the store's folder (or URL).
    """
    from dskd_pipe.pipeline.config import CacheConfig
    from dskd_pipe.stages.cache_teacher import run

    return run(_config(CacheConfig, config, options))


def distill(config: DistillConfig | str | os.PathLike | None = None, /, **options) -> Path:
    """Train a student from a store or a teacher (`dskd-pipe distill`), with any method `methods()` lists.

    config: a DistillConfig, or a TOML/JSON config file (a run's distill_config.json repeats that run); options:
    any DistillConfig field, overriding it (e.g. `distill(cache="runs/qwen-dolly.zarr", student="gpt2",
    method="alm", data="dolly/train.jsonl", out="runs/gpt2-alm")`). Returns the output folder: a Hugging Face
    model folder with its projectors, metrics.jsonl, the resolved config and a model card.
    """
    from dskd_pipe.pipeline.config import DistillConfig
    from dskd_pipe.stages.distill import run

    return run(_config(DistillConfig, config, options))


def score(config: ScoreConfig | str | os.PathLike | None = "score_default", /, **options) -> Path:
    """ROUGE-L of models on evaluation sets with the published protocol (`dskd-pipe score`).

    config: a ScoreConfig, or a config file (default: the published protocol, configs/score_default.toml);
    options: any ScoreConfig field (e.g. `score(models=("runs/gpt2-alm",), data=("dolly=dolly/test.jsonl",),
    out="runs/scores")`). Returns the output folder (report.json, report.md, the generations).
    """
    from dskd_pipe.pipeline.config import ScoreConfig
    from dskd_pipe.stages.score import run

    return run(_config(ScoreConfig, config, options))


def methods() -> dict[str, Method]:
    """Every distill method by name: the built-in ones, then those installed packages declare under the entry
    point group `dskd_pipe.methods` (a copy: changing it changes nothing)."""
    from dskd_pipe.pipeline.methods import METHODS

    return dict(METHODS.items())


__all__ = [
    "__version__",
    # the store
    "open_store", "TeacherStore", "TeacherExample", "StoreError",
    # your own training loop
    "StoreDataset", "store_collate", "teacher_hidden", "held_out_loss", "student_forward", "TeacherHead", "losses",
    # the stages
    "cache_teacher", "distill", "score", "CacheConfig", "DistillConfig", "ScoreConfig", "ConfigError",
    # methods
    "methods", "Method", "MethodOption", "MethodParts", "LossInputs", "LossTerms", "Adversary",
]
