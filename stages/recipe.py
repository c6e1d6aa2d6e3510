"""`dskd-pipe recipe CONFIG --size S --out DIR`: a whole experiment from one config file, each step a stage `run()`.

Steps (`dskd-pipe demo` is configs/quality.toml at its `demo` size through this runner):
    1. data: the world's files generated (pipeline/world.py, [SIZE.world]) or the given files ([SIZE.data])
    2. tokenizers: trained on the teacher's training text ([SIZE.tokenizers]: a kind and a vocabulary size per
       side, pipeline/tokenizer_training.py); the share of response tokens whose end offsets coincide with one on
       the other side is recorded (tokenizers/agreement.json)
    3. models: build tiny models (`teacher = "tiny"`), or convert a GGUF once (`pipeline/gguf.py`: a packaged name
       such as `gemma3-270m` / `smollm2`, or a `.gguf` path), or take a model folder / hub id as is
    4. teacher SFT on the teacher's train data (`distill --method sft`, the teacher as the student), when the size
       has a [SIZE.teacher_sft] table; without one the teacher is used as given
    5. student pretraining on the pretraining data (`distill --method sft`), when the size has a
       [SIZE.student_pretrain] table: one base per student tokenizer, the start of every method
    6. cache-teacher over the students' train data -> teacher.zarr (skipped when no method reads the teacher)
    7. distil the student with every method x every training seed; `same_tokenizer_methods` also on a student
       that uses the teacher's tokenizer (labels `METHOD@teacher-tok`: `kd`, the same-tokenizer positive control,
       and its own sft baseline); `jobs` students at once (on a CPU each gets cores / jobs threads)
    8. score the teacher, the student(s) as they started (`student-init`: what distillation has to improve on) and
       every trained student on every evaluation set: NLL of the gold responses per token and per character
       (pipeline/likelihood.py, all examples of the set or [SIZE.nll] limit) and ROUGE-L of sampled answers (the
       published protocol with the size's [SIZE.score] changes)
    9. summary (pipeline/comparison.py): per model mean ± std over training seeds, the paired difference of each
       method to sft of the same tokenizer with its 95% interval, which methods beat sft and which do not;
       summary.md / summary.json, dev_curves.png (dev loss per method), scores.png (bars with error bars)

A config file holds one table per size. Each size table holds:
    methods = [...]                   distill methods (pipeline/methods.METHODS) on the student
    same_tokenizer_methods = [...]    methods also trained on a tiny student with the teacher's tokenizer
    seeds = [...]                     training seeds; each method is trained once per seed (default [42])
    jobs = N                          students trained at once (default 1)
    [SIZE.world]                      pipeline/world.py settings (seed, n_towns, teacher_train, student_train, dev,
                                      test, pretrain, references): the data are generated into DIR/data
    [SIZE.data]                       or: train = FILE, eval = ["NAME=FILE", ...], dev = FILE (optional: keeps
                                      out/best), teacher_train = FILE (default: train), pretrain = FILE
    [SIZE.tokenizers]                 teacher = KIND, teacher_vocab = N, student = KIND, student_vocab = N
    [SIZE.models]                     teacher, student (+ TINY_KEYS for "tiny")
    [SIZE.teacher_sft]                DistillConfig keys (optional: its presence means "fine-tune the teacher first")
    [SIZE.student_pretrain]           DistillConfig keys (optional: pretrain each student base first)
    [SIZE.cache]                      CacheConfig keys
    [SIZE.distill]                    DistillConfig keys shared by all methods
    [SIZE.method_distill.METHOD]      DistillConfig keys for one method over [SIZE.distill] (e.g. its kd_rate and
                                      temperature, chosen on dev); used by METHOD on both tokenizers
    [SIZE.score]                      ScoreConfig keys over configs/score_default.toml
    [SIZE.nll]                        limit, batch_size, max_prompt_length, max_length (default: the distill
                                      table's lengths)
Data files: an absolute path as is; a relative one under --data-root when given, else among the files shipped in
configs/data. Paths that the runner sets itself (PATH_KEYS) are refused in the stage tables.

Layout of `--out DIR`:
    recipe.json                  config, size, resolved settings and data paths of this folder
    data/                        the generated world files (with [SIZE.world])
    tokenizers/teacher, tokenizers/student, tokenizers/agreement.json    (with [SIZE.tokenizers])
    models/teacher-init/, models/student-init/, models/student-init@teacher-tok/    tiny models only
    teacher/                     the SFT'd teacher (a distill output folder), when the teacher is fine-tuned
    student-base/student, student-base/teacher-tok    pretrained student bases (with [SIZE.student_pretrain])
    teacher.zarr/                the teacher-state store
    students/<label>/            one folder per method (and seed: <method>-seed<S>; <method>@teacher-tok...)
    score/                       report.md, report.json, generations/ (ROUGE-L), nll.json (NLL per model and set)
    summary.md, summary.json, dev_curves.png, scores.png
    timings.jsonl                one line per step and invocation: step, seconds, whether it reused work

Re-running with the same --out reuses finished work: the data and tokenizers when their settings match, tiny models,
the store and the scores resume themselves, a student whose folder is finished with the same resolved config is not
retrained (an unfinished one resumes from its last checkpoint; a finished one's checkpoints/ are deleted, as
nothing reads them again: its model, best/ and last/ stay). Other settings in the same folder are refused;
`--fresh` first removes the runner's own outputs (only the paths in OUTPUTS).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
import tomllib
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from dskd_pipe.cache.format import MANIFEST
from dskd_pipe.cache.paths import bad_name
from dskd_pipe.pipeline.config import (OUTPUT_ONLY, CacheConfig, ConfigError, DistillConfig, ScoreConfig,
                                       config_to_dict, load_config)
from dskd_pipe.pipeline.progress import Console, quiet_libraries


STAGES = {"teacher_sft": DistillConfig, "student_pretrain": DistillConfig, "cache": CacheConfig,
          "distill": DistillConfig, "score": ScoreConfig}
TINY_KEYS = ("arch", "tokenizer", "d_model", "layers", "heads")  # per role: teacher_arch, student_d_model, ...
DATA_KEYS = ("train", "eval", "dev", "teacher_train", "pretrain")
WORLD_KEYS = ("seed", "n_towns", "teacher_train", "student_train", "dev", "test", "pretrain", "references")
TOKENIZER_KEYS = ("teacher", "teacher_vocab", "student", "student_vocab")
NLL_KEYS = ("limit", "batch_size", "max_prompt_length", "max_length")
TABLES = ("models", "data", "world", "tokenizers", "nll", *STAGES, "method_distill")
# Set by the runner: a value for these in a stage table would be ignored, so it is refused instead.
_TRAIN_PATHS = ("teacher", "student", "data", "cache", "out", "method", "resume", "dev_data")
PATH_KEYS = {
    "teacher_sft": _TRAIN_PATHS,
    "student_pretrain": _TRAIN_PATHS,
    "cache": ("teacher", "data", "out"),
    "distill": (*_TRAIN_PATHS, "seed"),
    "score": ("models", "data", "out"),
}
OUTPUTS = ("recipe.json", "data", "tokenizers", "models", "teacher", "student-base", "teacher.zarr", "students",
           "score", "summary.md", "summary.json", "dev_curves.png", "scores.png", "timings.jsonl")
STEPS = 9
INIT = "student-init"
SAME = "@teacher-tok"  # label suffix of the students that use the teacher's tokenizer


def shipped(*parts: str) -> Path:
    """A file or folder shipped in dskd_pipe.configs (configs/ in the repository)."""
    return Path(str(resources.files("dskd_pipe.configs").joinpath(*parts)))


def config_path(config: str | Path) -> Path:
    """A recipe file: a path, or the name of a shipped one (`quality`, with or without .toml)."""
    p = Path(config)
    if p.is_file():
        return p
    if p.parent == Path("."):
        for name in (p.name, f"{p.name}.toml"):
            if shipped(name).is_file():
                return shipped(name)
    raise ConfigError(f"{config}: no such recipe file (a path, or a shipped name such as quality or "
                      "real_gemma3_smollm2).")


# ---------------------------------------------------------------------------------------------------------------
# The config file
# ---------------------------------------------------------------------------------------------------------------

def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_models(where: str, models: dict, trained_tokenizers: bool) -> list[str]:
    from dskd_pipe.pipeline.models import TINY_ARCHITECTURES

    problems = []
    known = {"teacher", "student"} | {f"{r}_{k}" for r in ("teacher", "student") for k in TINY_KEYS}
    for key in sorted(set(models) - known):
        problems.append(f"{where} unknown key '{key}' (known: teacher, student, and for a tiny model "
                        f"ROLE_{', ROLE_'.join(TINY_KEYS)}).")
    for role in ("teacher", "student"):
        source = models.get(role)
        if not isinstance(source, str) or not source:
            problems.append(f"{where} {role}: expected \"tiny\", a packaged GGUF name, a .gguf file, a model folder "
                            f"or a hub id, found {source!r}.")
        tiny = source == "tiny"
        for k in ("d_model", "layers", "heads"):
            key = f"{role}_{k}"
            if (tiny or key in models) and not _positive_int(models.get(key)):
                problems.append(f"{where} {key}: expected a positive integer, found {models.get(key)!r}.")
        key = f"{role}_arch"
        if (tiny or key in models) and models.get(key) not in TINY_ARCHITECTURES:
            problems.append(f"{where} {key}: expected one of {', '.join(TINY_ARCHITECTURES)}, found "
                            f"{models.get(key)!r}.")
        key = f"{role}_tokenizer"
        if trained_tokenizers:
            if key in models:
                problems.append(f"{where} {key}: the [tokenizers] table trains this tokenizer; remove it.")
            if source != "tiny":
                problems.append(f"{where} {role}: trained tokenizers need tiny models (a pretrained model keeps its "
                                f"own tokenizer), found {source!r}.")
        elif (tiny or key in models) and not isinstance(models.get(key), str):
            problems.append(f"{where} {key}: expected a shipped tokenizer (configs/tokenizers) or a folder, found "
                            f"{models.get(key)!r}.")
        if isinstance(source, str) and source and not tiny:
            for key in sorted(k for k in models if k.startswith(f"{role}_")):
                problems.append(f"{where} {key}: only for {role} = \"tiny\"; remove it.")
    return problems


def _check_data(where: str, data: dict) -> list[str]:
    problems = [f"{where} unknown key '{k}' (known: {', '.join(DATA_KEYS)})." for k in sorted(set(data) - set(DATA_KEYS))]
    if not isinstance(data.get("train"), str) or not data.get("train"):
        problems.append(f"{where} train: expected a data file, found {data.get('train')!r}.")
    sets = data.get("eval")
    if not isinstance(sets, list) or not sets or not all(isinstance(s, str) and "=" in s for s in sets):
        problems.append(f"{where} eval: expected a list of \"NAME=FILE\", found {sets!r}.")
    elif len({s.split("=", 1)[0] for s in sets}) != len(sets):
        problems.append(f"{where} eval: set names repeat ({', '.join(s.split('=', 1)[0] for s in sets)}).")
    for key in ("dev", "teacher_train", "pretrain"):
        if key in data and not isinstance(data[key], str):
            problems.append(f"{where} {key}: expected a data file, found {data[key]!r}.")
    return problems


def _check_world(where: str, world: dict) -> list[str]:
    problems = [f"{where} unknown key '{k}' (known: {', '.join(WORLD_KEYS)})." for k in sorted(set(world) - set(WORLD_KEYS))]
    for key in WORLD_KEYS:
        v = world.get(key)
        optional = key in ("pretrain", "references", "seed")
        if v is None and optional:
            continue
        ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if key in ("pretrain", "seed") else v >= 1)
        if not ok:
            problems.append(f"{where} {key}: expected a {'non-negative' if key in ('pretrain', 'seed') else 'positive'}"
                            f" integer, found {v!r}.")
    if (_positive_int(world.get("student_train")) and _positive_int(world.get("teacher_train"))
            and world["student_train"] > world["teacher_train"]):
        problems.append(f"{where} student_train ({world['student_train']}) must be <= teacher_train "
                        f"({world['teacher_train']}): the students' data is part of the teacher's.")
    return problems


def _check_tokenizers(where: str, table: dict) -> list[str]:
    from dskd_pipe.pipeline.tokenizer_training import KINDS

    problems = [f"{where} unknown key '{k}' (known: {', '.join(TOKENIZER_KEYS)})."
                for k in sorted(set(table) - set(TOKENIZER_KEYS))]
    for role in ("teacher", "student"):
        if table.get(role) not in KINDS:
            problems.append(f"{where} {role}: expected one of {', '.join(KINDS)}, found {table.get(role)!r}.")
        v = table.get(f"{role}_vocab")
        if not (_positive_int(v) and v >= 64):
            problems.append(f"{where} {role}_vocab: expected an integer >= 64, found {v!r}.")
    return problems


def load_recipe_config(config: str | Path, size: str | None = None) -> tuple[str, dict]:
    """(size, settings) with settings = {"methods", "same_tokenizer_methods", "seeds", "jobs", "models", "data"
    (None with a world), "world" (or None), "tokenizers" (or None), "teacher_sft" / "student_pretrain" (None: not
    done), "cache", "distill", "score", "nll"}. Every problem in the file is reported together, each with the file
    and table."""
    from dskd_pipe.pipeline.methods import METHODS

    path = config_path(config)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the recipe ({e}).") from None
    sizes = [k for k, v in data.items() if isinstance(v, dict)]
    size = size or (sizes[0] if sizes else "")
    if size not in sizes:
        raise ConfigError(f"{path}: no [{size}] table (found: {', '.join(sizes) or 'none'}). "
                          f"Choose --size {' or '.join(sizes)}.")
    table, problems = data[size], []
    top = ("methods", "same_tokenizer_methods", "seeds", "jobs")
    for name in sorted(set(table) - {*top, *TABLES}):
        problems.append(f"{path}: unknown key or table [{size}.{name}] (known: {', '.join(top)}, "
                        f"{', '.join(TABLES)}).")
    methods, seeds = table.get("methods"), table.get("seeds", [42])
    same = table.get("same_tokenizer_methods", [])
    for key, value, empty_ok in (("methods", methods, False), ("same_tokenizer_methods", same, True)):
        if not isinstance(value, list) or (not value and not empty_ok) or any(m not in METHODS for m in value):
            problems.append(f"{path}: [{size}] {key}: expected a list of {', '.join(METHODS)}, found {value!r}.")
        elif len(set(value)) != len(value):
            problems.append(f"{path}: [{size}] {key}: {value} repeats a method.")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        problems.append(f"{path}: [{size}] seeds: expected a list of distinct integers, found {seeds!r}.")
    if not _positive_int(table.get("jobs", 1)):
        problems.append(f"{path}: [{size}] jobs: expected a positive integer, found {table.get('jobs')!r}.")
    world, tokenizers = table.get("world"), table.get("tokenizers")
    problems += _check_models(f"{path}: [{size}.models]", table.get("models", {}), tokenizers is not None)
    if same and table.get("models", {}).get("student") != "tiny":
        problems.append(f"{path}: [{size}] same_tokenizer_methods: needs a tiny student (rebuilt with the teacher's "
                        "tokenizer); remove it or use student = \"tiny\".")
    if world is not None and "data" in table:
        problems.append(f"{path}: [{size}] has both [world] and [data]; the world generates the data, remove one.")
    elif world is not None:
        problems += _check_world(f"{path}: [{size}.world]", world)
    else:
        problems += _check_data(f"{path}: [{size}.data]", table.get("data", {}))
    if tokenizers is not None:
        problems += _check_tokenizers(f"{path}: [{size}.tokenizers]", tokenizers)
    nll = table.get("nll", {})
    for key in sorted(nll):
        if key not in NLL_KEYS:
            problems.append(f"{path}: [{size}.nll] unknown key '{key}' (known: {', '.join(NLL_KEYS)}).")
        elif not _positive_int(nll[key]):
            problems.append(f"{path}: [{size}.nll] {key}: expected a positive integer, found {nll[key]!r}.")
    if "student_pretrain" in table and not (world and world.get("pretrain")) and not table.get("data", {}).get(
            "pretrain"):
        problems.append(f"{path}: [{size}.student_pretrain] needs pretraining data: [world] pretrain = N or "
                        "[data] pretrain = FILE.")
    for name, cls in STAGES.items():
        section = table.get(name, {})
        for key in sorted(set(section) & set(PATH_KEYS[name])):
            problems.append(f"{path}: [{size}.{name}] '{key}' is set by the recipe; remove it.")
        try:
            load_config(cls, None, {**_set_by_recipe(cls, name),
                                    **{k: v for k, v in section.items() if k not in PATH_KEYS[name]}})
        except ConfigError as e:
            problems += [f"{path}: [{size}.{name}] {line.removeprefix('command line: ')}"
                         for line in str(e).splitlines()]
    per_method = table.get("method_distill", {})
    for method in sorted(per_method):
        where = f"{path}: [{size}.method_distill.{method}]"
        if method not in [*(methods or []), *same] or not isinstance(per_method[method], dict):
            problems.append(f"{where}: expected a table for one of this size's methods "
                            f"({', '.join(dict.fromkeys([*(methods or []), *same]))}).")
            continue
        section = per_method[method]
        for key in sorted(set(section) & set(PATH_KEYS["distill"])):
            problems.append(f"{where} '{key}' is set by the recipe; remove it.")
        try:
            load_config(DistillConfig, None, {
                **_set_by_recipe(DistillConfig, "distill"), **table.get("distill", {}),
                **{k: v for k, v in section.items() if k not in PATH_KEYS["distill"]}, "method": method})
        except ConfigError as e:
            problems += [f"{where} {line.removeprefix('command line: ')}" for line in str(e).splitlines()]
    if problems:
        raise ConfigError("\n".join(problems))
    settings = {"methods": list(methods), "same_tokenizer_methods": list(same), "seeds": list(seeds),
                "jobs": int(table.get("jobs", 1)), "models": dict(table["models"]),
                "data": dict(table["data"]) if world is None else None, "world": dict(world) if world else None,
                "tokenizers": dict(tokenizers) if tokenizers else None, "nll": dict(nll),
                **{name: dict(table[name]) if name in table else None for name in ("teacher_sft", "student_pretrain")},
                **{name: dict(table.get(name, {})) for name in ("cache", "distill", "score")},
                "method_distill": {m: dict(v) for m, v in per_method.items()}}
    return size, settings


def _set_by_recipe(cls, stage: str) -> dict:
    """Stand-ins for the paths the recipe sets itself in `stage`'s config: a table is checked as a whole config,
    where an option that needs one of them (--dev-rouge needs --dev-data) finds it set."""
    return {f.name: "(set by the recipe)" for f in dataclasses.fields(cls) if f.name in PATH_KEYS[stage]
            and f.type == "str"}


def resolve_data(value: str, data_root: str | Path | None) -> str:
    """Absolute: as is; relative: under data_root when given, else a file shipped in configs/data. A relative path
    stays inside that folder: ConfigError for one through '..'."""
    p = Path(value)
    if not p.is_absolute():
        if bad_name(str(value)) is not None:
            raise ConfigError(f"data path '{value}': a relative path in a recipe config names a file under "
                              f"{'--data-root' if data_root else 'the shipped configs/data'}, and '..' leads out of "
                              "it. Give an absolute path for a file elsewhere.")
        p = Path(data_root) / p if data_root else shipped("data", value)
    return str(p)


def _data_paths(settings: dict, data_root, out: Path) -> dict:
    """{"teacher_train", "train", "dev", "eval": ["NAME=PATH"], "pretrain"}: the world's files in out/data, or the
    config's files (checked to exist)."""
    world = settings["world"]
    if world is not None:
        d = out / "data"
        return {"teacher_train": str(d / "teacher_train.jsonl"), "train": str(d / "student_train.jsonl"),
                "dev": str(d / "dev.jsonl"), "eval": [f"test={d / 'test.jsonl'}"],
                "pretrain": str(d / "pretrain.jsonl") if world.get("pretrain") else ""}
    data = settings["data"]
    paths = {"train": resolve_data(data["train"], data_root),
             "eval": [f"{s.split('=', 1)[0]}={resolve_data(s.split('=', 1)[1], data_root)}" for s in data["eval"]],
             "dev": resolve_data(data["dev"], data_root) if data.get("dev") else "",
             "pretrain": resolve_data(data["pretrain"], data_root) if data.get("pretrain") else ""}
    paths["teacher_train"] = resolve_data(data["teacher_train"], data_root) if data.get("teacher_train") \
        else paths["train"]
    files = [paths["train"], paths["teacher_train"], paths["dev"], paths["pretrain"],
             *(s.split("=", 1)[1] for s in paths["eval"])]
    missing = [p for p in dict.fromkeys(files) if p and not Path(p).is_file()]
    if missing:
        where = f"under --data-root {data_root}" if data_root else "among the shipped files (configs/data)"
        raise ConfigError(f"data file(s) not found {where}: {', '.join(missing)}. Pass --data-root FOLDER holding "
                          "them, or absolute paths in the config.")
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------

def _step(console: Console, i: int, text: str) -> float:
    console.note(f"[recipe {i}/{STEPS}] {text}")
    return time.perf_counter()


def _done(console: Console, out: Path, step: str, t0: float, what: str, reused: bool = False,
          seconds: float | None = None) -> None:
    seconds = time.perf_counter() - t0 if seconds is None else seconds
    console.note(f"[recipe] {what} ({seconds:.1f} s)")
    with open(out / "timings.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "seconds": round(seconds, 1), "reused": reused,
                            "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def _world_data(out: Path, world: dict) -> bool:
    """Generate the world's files into out/data unless they are there from the same settings; True if reused."""
    from dskd_pipe.pipeline.world import write_world_files

    folder = out / "data"
    marker = folder / "world_files.json"
    if marker.is_file() and json.loads(marker.read_text()).get("settings") == world:
        return True
    sizes = {k: world[k] for k in ("teacher_train", "student_train", "dev", "test")}
    sizes["pretrain"] = world.get("pretrain", 0)
    made = write_world_files(folder, seed=world.get("seed", 0), n_towns=world["n_towns"], sizes=sizes,
                             n_references=world.get("references", 4))
    marker.write_text(json.dumps({"settings": world, **made}, indent=1) + "\n")  # last: the files are complete
    return False


def _tokenizers(out: Path, table: dict, data: dict) -> tuple[dict, bool]:
    """Train the teacher's and the student's tokenizers on the teacher's training text (prompt + response as the
    template writes them) into out/tokenizers/ROLE; return ({role: folder}, reused?) and write agreement.json."""
    from dskd_pipe.pipeline.data import file_fingerprint, load_examples
    from dskd_pipe.pipeline.models import load_tokenizer
    from dskd_pipe.pipeline.tokenizer_training import end_offset_agreement, train_tokenizer

    folders = {role: out / "tokenizers" / role for role in ("teacher", "student")}
    sha = file_fingerprint(data["teacher_train"])
    wanted = {role: {"kind": table[role], "vocab_size": table[f"{role}_vocab"], "data_sha256": sha}
              for role in folders}
    marker = out / "tokenizers" / "trained.json"
    reused = marker.is_file() and json.loads(marker.read_text()) == wanted
    if not reused:
        examples = load_examples(data["teacher_train"])
        texts = [e.prompt + e.response for e in examples]
        for role, folder in folders.items():
            shutil.rmtree(folder, ignore_errors=True)
            train_tokenizer(table[role], texts, table[f"{role}_vocab"], folder)
        marker.write_text(json.dumps(wanted, indent=1) + "\n")
    agreement_file = out / "tokenizers" / "agreement.json"
    if not reused or not agreement_file.is_file():
        teacher, student = (load_tokenizer(str(folders[r])) for r in ("teacher", "student"))
        responses = [e.response for e in load_examples(data["dev"] or data["train"])]
        n_t = sum(len(teacher(r, add_special_tokens=False)["input_ids"]) for r in responses)
        n_s = sum(len(student(r, add_special_tokens=False)["input_ids"]) for r in responses)
        agreement = {
            "responses": len(responses), "of": data["dev"] or data["train"],
            "teacher": f"{table['teacher']}-{len(teacher)}", "student": f"{table['student']}-{len(student)}",
            "student_tokens_ending_on_a_teacher_end": end_offset_agreement(student, teacher, responses),
            "teacher_tokens_ending_on_a_student_end": end_offset_agreement(teacher, student, responses),
            "tokens_per_response": {"teacher": n_t / len(responses), "student": n_s / len(responses)},
        }
        agreement_file.write_text(json.dumps(agreement, indent=1) + "\n")
    return {r: str(f) for r, f in folders.items()}, reused


def _model(console: Console, out: Path, role: str, models: dict, tokenizer: str | None = None,
           folder_name: str | None = None) -> tuple[Path | str, bool]:
    """(the model to use, reused?) for one role: build a tiny model, convert a GGUF once, or take it as given.
    `tokenizer` (a folder) replaces the role's configured tokenizer of a tiny model."""
    from dskd_pipe.pipeline.gguf import converted_folder, is_gguf_source
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

    source = models[role]
    if is_gguf_source(source):
        folder = converted_folder(source)
        console.note(f"[recipe]   {role}: {source} -> {folder}")
        return folder, True
    if source != "tiny":
        console.note(f"[recipe]   {role}: {source}")
        return source, True
    folder = out / "models" / (folder_name or f"{role}-init")
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        console.note(f"[recipe]   {folder}: present, kept")
        return folder, True
    tok_name = tokenizer or models[f"{role}_tokenizer"]
    # A shipped tokenizer by its plain name; anything else (a hub id, a path) as given.
    own = bad_name(tok_name, plain=True) is None and shipped("tokenizers", tok_name).is_dir()
    tok = load_tokenizer(str(shipped("tokenizers", tok_name)) if own else tok_name)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # Built aside and renamed: a killed build never leaves a folder that looks finished.
    save_tiny_model(tmp, models[f"{role}_arch"], tok, d_model=models[f"{role}_d_model"],
                    layers=models[f"{role}_layers"], heads=models[f"{role}_heads"], seed=0)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    console.note(f"[recipe]   {folder}: tiny {models[f'{role}_arch']}, d={models[f'{role}_d_model']}, "
          f"{models[f'{role}_layers']} layer(s), {len(tok):,}-token {Path(tok_name).name} tokenizer")
    return folder, False


def _distill(cfg: DistillConfig) -> tuple[Path, bool]:
    """(folder, reused?): train unless `cfg.out` already holds the finished model of this very config; resume an
    unfinished one. What only changes the output (config.OUTPUT_ONLY: progress, quiet, trackers) does not count."""
    from dskd_pipe.pipeline.methods import resolve
    from dskd_pipe.pipeline.run_folder import DONE, RESOLVED_CONFIG
    from dskd_pipe.stages import distill

    out = Path(cfg.out)
    saved = out / RESOLVED_CONFIG
    if saved.is_file():
        # A field added since that folder was written counts as its default there.
        saved_config = {**config_to_dict(DistillConfig()), **json.loads(saved.read_text()).get("config", {})}
        before = {k: v for k, v in saved_config.items() if k not in OUTPUT_ONLY}
        now = {k: v for k, v in config_to_dict(resolve(cfg)).items() if k not in OUTPUT_ONLY}
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ConfigError(f"{out} was trained with other settings ({', '.join(changed)}). Pass --fresh to start "
                              "again, or another --out.")
        if (out / DONE).is_file():
            Console.for_stage(False, cfg.quiet).note(f"[recipe]   {out}: finished before, kept")
            _drop_resume_state(out)
            return out, True
    folder = distill.run(cfg)
    _drop_resume_state(folder)
    return folder, False


def _drop_resume_state(folder: Path) -> None:
    """Delete a finished run's checkpoints/ (weights and optimizer states: about 3x the model). The recipe never
    reads them again: it keeps a finished student as it is and trains a changed config only after --fresh. Nine
    finished Gemma-3-270M students of real_gemma3_smollm2 held 33 GB of them and filled the disk."""
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def _distill_job(cfg: DistillConfig, threads: int) -> tuple[str, bool, float]:
    """One student in a worker process: (folder, reused?, seconds). `threads` torch threads (0: torch's default)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    folder, reused = _distill(cfg)
    return str(folder), reused, time.perf_counter() - t0


def _train_all(console: Console, out: Path, jobs: list[tuple[str, DistillConfig]], n_jobs: int,
               step: int) -> dict[str, Path]:
    """Train every (label, config), `n_jobs` at once in spawned worker processes (each with cores / n_jobs torch
    threads on a CPU); one job runs in this process. Returns {label: folder}."""
    done: dict[str, Path] = {}
    if n_jobs <= 1 or len(jobs) <= 1:
        for label, cfg in jobs:
            t0 = _step(console, step, f"distill {label}" + (" from the store" if cfg.cache else ""))
            folder, reused = _distill(cfg)
            done[label] = folder
            _done(console, out, f"distill {label}", t0, f"student ({label}): {folder}", reused)
        return done
    import multiprocessing

    import torch

    threads = 0 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // n_jobs)
    _step(console, step, f"distill {len(jobs)} students, {n_jobs} at once"
          + (f" ({threads} thread(s) each)" if threads else ""))
    kwargs = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"), **kwargs) as pool:
        futures = {pool.submit(_distill_job, cfg, threads): label for label, cfg in jobs}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                label = futures[f]
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise f.exception()
                folder, reused, seconds = f.result()
                done[label] = Path(folder)
                _done(console, out, f"distill {label}", 0.0, f"student ({label}): {folder}", reused,
                      seconds=seconds)
    return {label: done[label] for label, _ in jobs}


def _best(folder: Path) -> Path:
    """The dev-selected model (out/best) when a dev set kept one, else the final model."""
    return folder / "best" if (folder / "best" / "model.safetensors").is_file() else folder


def student_name(method: str, seed: int, seeds: list[int]) -> str:
    """`method` for a one-seed recipe, `method-seedS` with several seeds (folder and score label alike)."""
    return method if len(seeds) == 1 else f"{method}-seed{seed}"


def _nll_scores(out: Path, models: dict[str, str], sets: list[str], settings: dict) -> dict:
    """{label: {set: response_nll(...)}} for every model on every set; finished (model, set) pairs are kept in
    out/score/nll.json with the model's identity and the set's sha256, and reused."""
    import torch

    from dskd_pipe.pipeline.data import file_fingerprint, load_examples
    from dskd_pipe.pipeline.likelihood import response_nll
    from dskd_pipe.pipeline.models import default_device, load_causal_lm, load_tokenizer
    from dskd_pipe.stages.score import model_id

    path = out / "score" / "nll.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(path.read_text()) if path.is_file() else {}
    lengths = {k: settings["nll"].get(k, settings["distill"].get(k, v))
               for k, v in (("max_prompt_length", 256), ("max_length", 512))}
    limit, batch = settings["nll"].get("limit"), settings["nll"].get("batch_size", 16)
    device = settings["score"].get("device") or default_device()
    data = {name: (p, file_fingerprint(p)) for name, p in (s.split("=", 1) for s in sets)}
    results = {}
    for label, model_path in models.items():
        ident = model_id(str(model_path))
        results[label] = {}
        model = tok = None
        for name, (p, sha) in data.items():
            key = {"model": ident, "data": sha, "limit": limit, **lengths}
            old = kept.get(label, {}).get(name)
            if old is not None and old.get("key") == key:
                results[label][name] = old
                continue
            if model is None:
                tok = load_tokenizer(str(model_path))
                model = load_causal_lm(str(model_path), dtype=torch.float32, device=device)
            r = response_nll(model, tok, load_examples(p, limit=limit), batch_size=batch, device=device, **lengths)
            results[label][name] = {**r, "key": key}
            kept.setdefault(label, {})[name] = results[label][name]
            path.write_text(json.dumps(kept, indent=1) + "\n")
        del model
    return results


def _dev_ratio(tokenizer_path: str, dev: str, lengths: dict) -> float:
    """Supervised tokens per character of the dev responses for one tokenizer: nats/token x this = nats/char."""
    from dskd_pipe.pipeline.data import build_sequence, load_examples
    from dskd_pipe.pipeline.models import eos_token_id, load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    examples = load_examples(dev)
    tokens = sum(len(s.ids) - s.prompt_len for s in (build_sequence(tok, e.prompt, e.response, eos_token_id(tok),
                                                                    **lengths) for e in examples))
    return tokens / sum(len(e.response) + 1 for e in examples)


def _dev_curves(out: Path, groups: dict, folders: dict, inits: dict, dev: str, lengths: dict) -> bool:
    """dev_curves.png: each method's dev loss over steps (nats per character, so both tokenizers share an axis)."""
    from dskd_pipe.pipeline.comparison import dev_curves

    ratios = {}
    curves = {}
    for name, g in groups.items():
        if g["kind"] != "method":
            continue
        init = inits[g["init"]]
        ratios.setdefault(g["init"], _dev_ratio(str(init), dev, lengths))
        points: dict[int, list[float]] = {}
        for label in g["labels"].values():
            metrics = folders[label].parent / "metrics.jsonl" if folders[label].name == "best" else \
                folders[label] / "metrics.jsonl"
            if not metrics.is_file():
                continue
            for line in metrics.read_text().splitlines():
                rec = json.loads(line)
                if "dev_loss" in rec:
                    points.setdefault(int(rec["step"]), []).append(rec["dev_loss"] * ratios[g["init"]])
        if points:
            curves[name] = points
    return bool(curves) and dev_curves(curves, out / "dev_curves.png", "dev NLL, nats per character")


@quiet_libraries
def run(config: str | Path, size: str | None = None, out: str | Path = "recipe-run", data_root: str | Path | None = None,
        fresh: bool = False, progress: bool = True, quiet: bool = False) -> dict:
    """Run the nine steps into `out`; return {"summary", "table", "report", "paths"}. `progress` and `quiet` go to
    every stage (quiet: only warnings and the stages' final lines; the recipe's own step lines are left out too)."""
    r = _open(config, size, out, data_root, fresh, Console.for_stage(progress, quiet),
              {"progress": progress, "quiet": quiet})
    t_all = time.perf_counter()
    _data_tokenizers_models(r)  # steps 1-3
    _teacher_and_student_bases(r)  # steps 4-5
    _teacher_store(r)  # step 6
    groups, folders = _students(r)  # step 7
    all_models = {"teacher": r.teacher, INIT: r.inits["student"], **(
        {f"{INIT}{SAME}": r.inits["teacher-tok"]} if r.same else {}), **folders}
    score_dir, report, nll = _score(r, all_models, len(folders))  # step 8
    summary, table = _summary(r, groups, folders, all_models, report, nll)  # step 9
    r.console.note(f"[recipe] done in {time.perf_counter() - t_all:.1f} s")

    r.paths.update({"teacher": Path(r.teacher), "student_init": Path(r.inits["student"]), "store": r.store,
                    **{f"student {n}": p for n, p in folders.items()}, "score": score_dir,
                    "summary": r.out / "summary.md"})
    for name in ("dev_curves.png", "scores.png"):
        if (r.out / name).is_file():
            r.paths[name.removesuffix(".png").replace("_", " ")] = r.out / name
    return {"summary": summary, "table": table, "report": report, "paths": r.paths}


@dataclass
class _Recipe:
    """One recipe run as its steps fill it in."""

    console: Console
    shown: dict  # progress and quiet: output only (config.OUTPUT_ONLY), so a rerun still reuses finished steps
    size: str
    settings: dict
    out: Path
    data: dict
    paths: dict = field(default_factory=dict)
    tok_folders: dict = field(default_factory=dict)
    teacher: str | Path = ""
    inits: dict = field(default_factory=dict)  # "student" (and "teacher-tok"): the students' starting folders
    store: str | Path | None = None
    with_teacher: set = field(default_factory=set)

    @property
    def same(self) -> list:
        return self.settings["same_tokenizer_methods"]


def _open(config, size, out, data_root, fresh: bool, console: Console, shown: dict) -> _Recipe:
    """The config's table for `size`, the data paths, and the run folder (cleared with `fresh`; refused when it
    holds a run of other settings)."""
    path = config_path(config)
    size, settings = load_recipe_config(path, size)
    out = Path(out).resolve()
    data = _data_paths(settings, data_root, out)
    if fresh:
        for name in OUTPUTS:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    record = {"config": path.name, "size": size, "settings": settings, "data": data}
    marker = out / "recipe.json"
    if marker.is_file() and json.loads(marker.read_text()) != record:
        before = json.loads(marker.read_text())
        raise ConfigError(f"{out} holds a run with other settings ({before.get('config')}, size {before.get('size')}). "
                          "Pass --fresh to start again, or another --out.")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=2) + "\n")
    return _Recipe(console, shown, size, settings, out, data)


def _data_tokenizers_models(r: _Recipe) -> None:
    """Steps 1-3: the generated world's data, the trained tokenizers, and the initial teacher and student(s)."""
    console, out, settings, size = r.console, r.out, r.settings, r.size
    if settings["world"] is not None:
        t0 = _step(console, 1, f"data: a world of {settings['world']['n_towns']} towns (pipeline/world.py)")
        reused = _world_data(out, settings["world"])
        _done(console, out, "data", t0, f"data: {out / 'data'}", reused)
        r.paths["data"] = out / "data"
    else:
        _step(console, 1, f"data: {r.data['train']}")

    models = dict(settings["models"])
    if settings["tokenizers"] is not None:
        tk = settings["tokenizers"]
        t0 = _step(console, 2, f"tokenizers: teacher {tk['teacher']} ({tk['teacher_vocab']}), student "
                               f"{tk['student']} ({tk['student_vocab']}), trained on the teacher's train text")
        r.tok_folders, reused = _tokenizers(out, tk, r.data)
        agreement = json.loads((out / "tokenizers" / "agreement.json").read_text())
        _done(console, out, "tokenizers", t0, "tokenizers: {} student tokens of {} end where a teacher token "
              "ends".format(f"{agreement['student_tokens_ending_on_a_teacher_end']:.1%}", agreement["of"]), reused)
        r.paths["tokenizers"] = out / "tokenizers"
    else:
        _step(console, 2, f"no [{size}.tokenizers] table: the models' own tokenizers")

    t0 = _step(console, 3, f"models ({models['teacher']} -> {models['student']})")
    r.teacher, kept_t = _model(console, out, "teacher", models, r.tok_folders.get("teacher"))
    r.inits = {"student": _model(console, out, "student", models, r.tok_folders.get("student"))[0]}
    kept_s = True
    if r.same:
        teacher_tok = r.tok_folders.get("teacher") or models.get("teacher_tokenizer")
        r.inits["teacher-tok"], kept_s = _model(console, out, "student", models, teacher_tok, f"student-init{SAME}")
    _done(console, out, "models", t0, "models ready", kept_t and kept_s)


def _teacher_and_student_bases(r: _Recipe) -> None:
    """Steps 4-5: the teacher's SFT on its own data, and the students' pretraining (each when its table is there)."""
    console, out, settings, data, size = r.console, r.out, r.settings, r.data, r.size
    if settings["teacher_sft"] is not None:
        t0 = _step(console, 4, "SFT of the teacher on its train data (distill --method sft)")
        teacher, reused = _distill(load_config(DistillConfig, None, {
            **settings["teacher_sft"], "method": "sft", "student": str(r.teacher), "data": data["teacher_train"],
            "dev_data": data["dev"], "out": str(out / "teacher"), "resume": True, **r.shown}))
        r.teacher = _best(teacher)
        _done(console, out, "teacher_sft", t0, f"teacher: {r.teacher}", reused)
    else:
        _step(console, 4, f"no [{size}.teacher_sft] table: the teacher is used as given")

    if settings["student_pretrain"] is not None:
        jobs = [(f"student-base/{name}", load_config(DistillConfig, None, {
            **settings["student_pretrain"], "method": "sft", "student": str(init), "data": data["pretrain"],
            "out": str(out / "student-base" / name), "resume": True,
            **r.shown, "progress": r.shown["progress"] and settings["jobs"] == 1})) for name, init in r.inits.items()]
        _step(console, 5, f"pretrain the student base(s) on {data['pretrain']}")
        trained = _train_all(console, out, jobs, settings["jobs"], 5)
        r.inits = {name: folder for name, folder in zip(r.inits, trained.values())}
    else:
        _step(console, 5, f"no [{size}.student_pretrain] table: the students start as built")


def _teacher_store(r: _Recipe) -> None:
    """Step 6: the teacher store, when a method of the recipe reads the teacher."""
    from dskd_pipe.pipeline.methods import METHODS
    from dskd_pipe.stages import cache_teacher

    # The entries say which methods read the teacher (an installed package's methods as well as the built-in ones).
    r.with_teacher = {m for m in [*r.settings["methods"], *r.same] if METHODS[m].uses_teacher}
    if not r.with_teacher:
        _step(r.console, 6, "no method reads the teacher: no teacher store")
        return
    t0 = _step(r.console, 6, "cache-teacher: the teacher's hidden states over the students' train data")
    store_dir = r.out / "teacher.zarr"
    finished = (store_dir / MANIFEST).is_file()  # written last; cache_teacher checks it against these inputs
    r.store = cache_teacher.run(load_config(CacheConfig, None, {
        **r.settings["cache"], "teacher": str(r.teacher), "data": r.data["train"], "out": str(store_dir), **r.shown}))
    _done(r.console, r.out, "cache", t0, f"store: {r.store}", finished)


def _students(r: _Recipe) -> tuple[dict, dict]:
    """Step 7: every method x seed student (the teacher-tokenizer group too); (groups, label -> output folder)."""
    from dskd_pipe.pipeline.methods import METHODS

    settings, seeds = r.settings, r.settings["seeds"]
    groups: dict[str, dict] = {}
    jobs = []
    for init_name, group_methods, suffix in (("student", settings["methods"], ""), ("teacher-tok", r.same, SAME)):
        for method in group_methods:
            name = f"{method}{suffix}"
            # a method with a teacher is compared with the group's sft students (the entry says which need one)
            baseline = f"sft{suffix}" if METHODS[method].uses_teacher and "sft" in group_methods else None
            groups[name] = {"kind": "method", "labels": {}, "init": init_name, "baseline": baseline}
            for seed in seeds:
                label = student_name(name, seed, seeds)
                groups[name]["labels"][seed] = label
                jobs.append((label, load_config(DistillConfig, None, {
                    **settings["distill"], **settings["method_distill"].get(method, {}), "method": method,
                    "seed": seed, "student": str(r.inits[init_name]), "data": r.data["train"],
                    "cache": str(r.store) if method in r.with_teacher else "", "dev_data": r.data["dev"],
                    "out": str(r.out / "students" / label), "resume": True,
                    **r.shown, "progress": r.shown["progress"] and settings["jobs"] == 1})))
    folders = {label: _best(folder)
               for label, folder in _train_all(r.console, r.out, jobs, settings["jobs"], 7).items()}
    return groups, folders


def _score(r: _Recipe, all_models: dict, n_students: int) -> tuple[Path, dict, dict]:
    """Step 8: ROUGE-L of every model with the published protocol (this size's changes), and the gold responses'
    NLL; (the score folder, its report, the NLL per model and set)."""
    from dskd_pipe.stages import score

    sets = ", ".join(s.split("=")[0] for s in r.data["eval"])
    t0 = _step(r.console, 8, f"score the teacher, the initial student(s) and {n_students} trained student(s) on "
                             f"{sets}: NLL of the gold responses, ROUGE-L of sampled answers")
    # The published protocol (configs/score_default.toml) with this size's changes; then the NLL, whose nll.json
    # joins the score run's folder (score refuses a folder it did not start).
    score_dir = score.run(load_config(ScoreConfig, "score_default", {
        **r.settings["score"], **r.shown, "out": str(r.out / "score"), "data": tuple(r.data["eval"]),
        "models": tuple(f"{n}={p}" for n, p in all_models.items())}))
    nll = _nll_scores(r.out, all_models, r.data["eval"], r.settings)
    report = json.loads((score_dir / "report.json").read_text())
    _done(r.console, r.out, "score", t0, f"scores: {score_dir}")
    return score_dir, report, nll


def _summary(r: _Recipe, groups: dict, folders: dict, all_models: dict, report: dict, nll: dict) -> tuple[dict, str]:
    """Step 9: mean ± std over training seeds and paired differences to sft; summary.md/json, charts."""
    from dskd_pipe.pipeline import comparison

    out, settings = r.out, r.settings
    t0 = _step(r.console, 9, "summary: mean ± std over training seeds, paired differences to sft")
    set_names = report["sets"]
    values: dict[str, dict[str, float]] = {}
    for label in all_models:
        v = values.setdefault(label, {})
        for s in set_names:
            if s in nll.get(label, {}):
                v[f"nll_char/{s}"] = nll[label][s]["per_char"]
                v[f"nll_token/{s}"] = nll[label][s]["per_token"]
            v[f"rouge_l/{s}"] = report["models"][label]["sets"][s]["mean"]
    tok_name = {"student": "", "teacher-tok": ""}
    if settings["tokenizers"] is not None:
        tk = settings["tokenizers"]
        tok_name = {"student": f"{tk['student']}-{tk['student_vocab']}",
                    "teacher-tok": f"{tk['teacher']}-{tk['teacher_vocab']}"}
    reference_groups = {"teacher": {"kind": "reference", "labels": {0: "teacher"}, "tokenizer": tok_name["teacher-tok"]},
                        INIT: {"kind": "reference", "labels": {0: INIT}, "tokenizer": tok_name["student"]}}
    if r.same:
        reference_groups[f"{INIT}{SAME}"] = {"kind": "reference", "labels": {0: f"{INIT}{SAME}"},
                                             "tokenizer": tok_name["teacher-tok"]}
    for name, g in groups.items():
        g["tokenizer"] = tok_name[g["init"]]
    summary = comparison.summarise(values, {**reference_groups, **groups}, settings["seeds"], set_names)
    summary["sizes"] = {s: report["models"]["teacher"]["sets"][s]["n"] for s in set_names}
    summary["nll_examples"] = {s: nll["teacher"][s]["examples"] for s in set_names}
    summary["sampling_seeds"] = report.get("seeds")
    if (out / "tokenizers" / "agreement.json").is_file():
        summary["tokenizers"] = json.loads((out / "tokenizers" / "agreement.json").read_text())
    table = comparison.markdown(summary, _header(summary, settings))
    comparison.write(summary, out, table)
    lengths = {k: settings["distill"].get(k, v) for k, v in (("max_prompt_length", 256), ("max_length", 512))}
    if r.data["dev"]:
        _dev_curves(out, groups, folders, r.inits, r.data["dev"], lengths)
    comparison.bar_chart(summary, out / "scores.png", set_names[0])
    _done(r.console, out, "summary", t0, f"summary: {out / 'summary.md'}")
    return summary, table


def _header(summary: dict, settings: dict) -> str:
    seeds = summary["training_seeds"]
    parts = [f"Held-out scores. NLL: negative log-likelihood of the gold responses (first reference), nats per "
             f"character (comparable across tokenizers) and per token of the model's own tokenizer, over "
             f"{', '.join(f'{n} {s}' for s, n in summary['nll_examples'].items())} examples. ROUGE-L: F1 x100 of "
             f"sampled answers (spec/evaluation.md protocol), mean over sampling seeds "
             f"{', '.join(map(str, summary.get('sampling_seeds') or []))}."]
    if len(seeds) > 1:
        parts.append(f"Students: mean ± std over training seeds {', '.join(map(str, seeds))}; Δ vs sft: the paired "
                     "difference to sft on the same student tokenizer (same seed), mean [95% t-interval]; ✓ / ✗: "
                     "the interval excludes 0 on the better / worse side.")
    tk = summary.get("tokenizers")
    if tk:
        parts.append(f"Tokenizers: teacher {tk['teacher']}, student {tk['student']}; "
                     f"{tk['student_tokens_ending_on_a_teacher_end']:.1%} of the student's response tokens (and "
                     f"{tk['teacher_tokens_ending_on_a_student_end']:.1%} of the teacher's) end where a token of the "
                     "other tokenizer ends.")
    if settings.get("method_distill"):
        parts.append("Per-method settings over the shared distill table: " + "; ".join(
            f"{m}: " + ", ".join(f"{k} = {v}" for k, v in kv.items()) for m, kv in settings["method_distill"].items())
            + ".")
    return " ".join(parts)


__all__ = ["run", "load_recipe_config", "config_path", "resolve_data", "shipped", "student_name"]
