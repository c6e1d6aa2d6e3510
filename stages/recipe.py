"""`dskd-pipe recipe CONFIG --size S --out DIR`: a whole experiment from one config file, each step a stage `run()`.

Steps (the same for `dskd-pipe demo`, which is configs/demo.toml through this runner):
    1. models: build tiny random models (`teacher = "tiny"`), or convert a GGUF once (`pipeline/gguf.py`: a
       packaged name such as `gemma3-270m` / `smollm2`, or a `.gguf` path), or take a model folder / hub id as is
    2. teacher SFT on the train data (`distill --method sft`, the teacher as the student), when the size has a
       [SIZE.teacher_sft] table; without one the teacher is used as given
    3. cache-teacher over the train data -> teacher.zarr (skipped when every method is `sft`)
    4. distil the student with every method x every training seed
    5. score the teacher, the student as it started (`student-init`: what distillation has to improve on) and
       every trained student on every evaluation set (ROUGE-L, the published protocol with the size's
       [SIZE.score] changes), then a summary: mean ± std over training seeds per method and set

A config file holds one table per size. Each size table holds:
    methods = [...]          distill methods (pipeline/methods.METHODS)
    seeds = [...]            training seeds; each method is trained once per seed (default [42])
    [SIZE.models]            teacher, student (+ TINY_KEYS for "tiny")
    [SIZE.data]              train = FILE, eval = ["NAME=FILE", ...], dev = FILE (optional: keeps out/best)
    [SIZE.teacher_sft]       DistillConfig keys (optional: its presence means "fine-tune the teacher first")
    [SIZE.cache]             CacheConfig keys
    [SIZE.distill]           DistillConfig keys shared by all methods
    [SIZE.score]             ScoreConfig keys over configs/score_default.toml
Data files: an absolute path as is; a relative one under --data-root when given, else among the files shipped in
configs/data. Paths that the runner sets itself (PATH_KEYS) are refused in the stage tables.

Layout of `--out DIR`:
    recipe.json                  config, size, resolved settings and data paths of this folder
    models/teacher-init/, models/student-init/    tiny models only (converted GGUFs live in the shared cache)
    teacher/                     the SFT'd teacher (a distill output folder), when the teacher is fine-tuned
    teacher.zarr/                the teacher-state store
    students/<method>/           one folder per method, or students/<method>-seed<S>/ with several seeds
    score/                       report.md, report.json, generations/ (every model, every seed)
    summary.md, summary.json     the table over training seeds
    timings.jsonl                one line per step and invocation: step, seconds, whether it reused work

Re-running with the same --out reuses finished work: tiny models are kept, the store and the scores resume
themselves, a student whose folder is finished with the same resolved config is not retrained (an unfinished one
resumes from its last checkpoint). Other settings in the same folder are refused; `--fresh` first removes the
runner's own outputs (only the paths in OUTPUTS).
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
import tomllib
from importlib import resources
from pathlib import Path

from dskd_pipe.cache.format import MANIFEST
from dskd_pipe.pipeline.config import (OUTPUT_ONLY, CacheConfig, ConfigError, DistillConfig, ScoreConfig,
                                       config_to_dict, load_config)
from dskd_pipe.pipeline.progress import quiet_libraries

STAGES = {"teacher_sft": DistillConfig, "cache": CacheConfig, "distill": DistillConfig, "score": ScoreConfig}
TINY_KEYS = ("arch", "tokenizer", "d_model", "layers", "heads")  # per role: teacher_arch, student_d_model, ...
DATA_KEYS = ("train", "eval", "dev")
# Set by the runner: a value for these in a stage table would be ignored, so it is refused instead.
PATH_KEYS = {
    "teacher_sft": ("teacher", "student", "data", "cache", "out", "method", "resume", "dev_data"),
    "cache": ("teacher", "data", "out"),
    "distill": ("teacher", "student", "data", "cache", "out", "method", "resume", "dev_data", "seed"),
    "score": ("models", "data", "out"),
}
OUTPUTS = ("recipe.json", "models", "teacher", "teacher.zarr", "students", "score", "summary.md", "summary.json",
           "timings.jsonl")
STEPS = 5
INIT = "student-init"  # score label of the student before training


def shipped(*parts: str) -> Path:
    """A file or folder shipped in dskd_pipe.configs (configs/ in the repository)."""
    return Path(str(resources.files("dskd_pipe.configs").joinpath(*parts)))


def config_path(config: str | Path) -> Path:
    """A recipe file: a path, or the name of a shipped one (`real_gemma3_smollm2`, with or without .toml)."""
    p = Path(config)
    if p.is_file():
        return p
    if p.parent == Path("."):
        for name in (p.name, f"{p.name}.toml"):
            if shipped(name).is_file():
                return shipped(name)
    raise ConfigError(f"{config}: no such recipe file (a path, or a shipped name such as real_gemma3_smollm2).")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_models(where: str, models: dict) -> list[str]:
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
        if (tiny or key in models) and not isinstance(models.get(key), str):
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
    if "dev" in data and not isinstance(data["dev"], str):
        problems.append(f"{where} dev: expected a data file, found {data['dev']!r}.")
    return problems


def load_recipe_config(config: str | Path, size: str | None = None) -> tuple[str, dict]:
    """(size, settings) with settings = {"methods", "seeds", "models", "data", "teacher_sft" (None: no SFT),
    "cache", "distill", "score"}. Every problem in the file is reported together, each with the file and table."""
    from dskd_pipe.stages.distill import METHODS

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
    for name in sorted(set(table) - {"methods", "seeds", "models", "data", *STAGES}):
        problems.append(f"{path}: unknown key or table [{size}.{name}] (known: methods, seeds, models, data, "
                        f"{', '.join(STAGES)}).")
    methods, seeds = table.get("methods"), table.get("seeds", [42])
    if not isinstance(methods, list) or not methods or any(m not in METHODS for m in methods):
        problems.append(f"{path}: [{size}] methods: expected a list of {', '.join(METHODS)}, found {methods!r}.")
    elif len(set(methods)) != len(methods):
        problems.append(f"{path}: [{size}] methods: {methods} repeats a method.")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        problems.append(f"{path}: [{size}] seeds: expected a list of distinct integers, found {seeds!r}.")
    problems += _check_models(f"{path}: [{size}.models]", table.get("models", {}))
    problems += _check_data(f"{path}: [{size}.data]", table.get("data", {}))
    for name, cls in STAGES.items():
        section = table.get(name, {})
        for key in sorted(set(section) & set(PATH_KEYS[name])):
            problems.append(f"{path}: [{size}.{name}] '{key}' is set by the recipe; remove it.")
        try:
            load_config(cls, None, {k: v for k, v in section.items() if k not in PATH_KEYS[name]})
        except ConfigError as e:
            problems += [f"{path}: [{size}.{name}] {line.removeprefix('command line: ')}"
                         for line in str(e).splitlines()]
    if problems:
        raise ConfigError("\n".join(problems))
    settings = {"methods": list(methods), "seeds": list(seeds), "models": dict(table["models"]),
                "data": dict(table["data"]), "teacher_sft": dict(table["teacher_sft"]) if "teacher_sft" in table
                else None, **{name: dict(table.get(name, {})) for name in ("cache", "distill", "score")}}
    return size, settings


def resolve_data(value: str, data_root: str | Path | None) -> str:
    """Absolute: as is; relative: under data_root when given, else a file shipped in configs/data."""
    p = Path(value)
    if not p.is_absolute():
        p = Path(data_root) / p if data_root else shipped("data", value)
    return str(p)


def _data_paths(settings: dict, data_root) -> dict:
    data = settings["data"]
    paths = {"train": resolve_data(data["train"], data_root),
             "eval": [f"{s.split('=', 1)[0]}={resolve_data(s.split('=', 1)[1], data_root)}" for s in data["eval"]],
             "dev": resolve_data(data["dev"], data_root) if data.get("dev") else ""}
    missing = [p for p in [paths["train"], paths["dev"], *(s.split("=", 1)[1] for s in paths["eval"])]
               if p and not Path(p).is_file()]
    if missing:
        where = f"under --data-root {data_root}" if data_root else "among the shipped files (configs/data)"
        raise ConfigError(f"data file(s) not found {where}: {', '.join(missing)}. Pass --data-root FOLDER holding "
                          "them, or absolute paths in the config.")
    return paths


def _step(i: int, text: str) -> float:
    print(f"[recipe {i}/{STEPS}] {text}", flush=True)
    return time.perf_counter()


def _done(out: Path, step: str, t0: float, what: str, reused: bool = False) -> None:
    seconds = time.perf_counter() - t0
    print(f"[recipe] {what} ({seconds:.1f} s)", flush=True)
    with open(out / "timings.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "seconds": round(seconds, 1), "reused": reused,
                            "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def _model(out: Path, role: str, models: dict) -> tuple[Path | str, bool]:
    """(the model to use, reused?) for one role: build a tiny model, convert a GGUF once, or take it as given."""
    from dskd_pipe.pipeline.gguf import converted_folder, is_gguf_source
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

    source = models[role]
    if is_gguf_source(source):
        folder = converted_folder(source)
        print(f"[recipe]   {role}: {source} -> {folder}")
        return folder, True
    if source != "tiny":
        print(f"[recipe]   {role}: {source}")
        return source, True
    folder = out / "models" / f"{role}-init"
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        print(f"[recipe]   {folder}: present, kept")
        return folder, True
    tok_name = models[f"{role}_tokenizer"]
    tok = load_tokenizer(str(shipped("tokenizers", tok_name)) if shipped("tokenizers", tok_name).is_dir()
                         else tok_name)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # Built aside and renamed: a killed build never leaves a folder that looks finished.
    save_tiny_model(tmp, models[f"{role}_arch"], tok, d_model=models[f"{role}_d_model"],
                    layers=models[f"{role}_layers"], heads=models[f"{role}_heads"], seed=0)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"[recipe]   {folder}: tiny {models[f'{role}_arch']}, d={models[f'{role}_d_model']}, "
          f"{models[f'{role}_layers']} layer(s), {len(tok):,}-token {tok_name} tokenizer")
    return folder, False


def _distill(cfg: DistillConfig) -> tuple[Path, bool]:
    """(folder, reused?): train unless `cfg.out` already holds the finished model of this very config; resume an
    unfinished one. What only changes the output (config.OUTPUT_ONLY: progress, quiet, trackers) does not count."""
    from dskd_pipe.pipeline.methods import resolve
    from dskd_pipe.stages import distill

    out = Path(cfg.out)
    saved = out / distill.RESOLVED_CONFIG
    if saved.is_file():
        before = {k: v for k, v in json.loads(saved.read_text()).get("config", {}).items() if k not in OUTPUT_ONLY}
        now = {k: v for k, v in config_to_dict(resolve(cfg)).items() if k not in OUTPUT_ONLY}
        if before != now:
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            raise ConfigError(f"{out} was trained with other settings ({', '.join(changed)}). Pass --fresh to start "
                              "again, or another --out.")
        if (out / distill.DONE).is_file():
            print(f"[recipe]   {out}: finished before, kept")
            return out, True
    return distill.run(cfg), False


def _best(folder: Path) -> Path:
    """The dev-selected model (out/best) when a dev set kept one, else the final model."""
    return folder / "best" if (folder / "best" / "model.safetensors").is_file() else folder


def student_name(method: str, seed: int, seeds: list[int]) -> str:
    """`method` for a one-seed recipe, `method-seedS` with several seeds (folder and score label alike)."""
    return method if len(seeds) == 1 else f"{method}-seed{seed}"


def summarise_over_seeds(report: dict, methods: list[str], seeds: list[int]) -> dict:
    """Per set (and the all-set average): the teacher's (and the initial student's) mean ± std over sampling seeds,
    and per method the mean ± std (population) over training seeds of each student's mean over sampling seeds; one
    training seed: the score report's mean ± std over sampling seeds."""
    groups = {"teacher": ["teacher"], INIT: [INIT], **{m: [student_name(m, s, seeds) for s in seeds] for m in methods}}
    rows = {}
    for key in [*report["sets"], "Average"]:
        row = {}
        for group, labels in groups.items():
            cells = [report["models"][lab]["average" if key == "Average" else "sets"] for lab in labels]
            cells = [c if key == "Average" else c[key] for c in cells]
            if len(cells) == 1:
                row[group] = {"mean": cells[0]["mean"], "std": cells[0]["std"], "n_models": 1}
            else:
                means = [c["mean"] for c in cells]
                row[group] = {"mean": statistics.fmean(means), "std": statistics.pstdev(means),
                              "per_seed": dict(zip(map(str, seeds), means)), "n_models": len(means)}
        rows[key] = row
    return {"training_seeds": seeds, "sampling_seeds": report.get("seeds"), "rows": rows,
            "sizes": {s: report["models"]["teacher"]["sets"][s]["n"] for s in report["sets"]}}


def summary_markdown(summary: dict) -> str:
    groups = list(next(iter(summary["rows"].values())))
    many = len(summary["training_seeds"]) > 1
    over = (f"students: mean ± std over training seeds {', '.join(map(str, summary['training_seeds']))} (each "
            f"the mean over sampling seeds {', '.join(map(str, summary['sampling_seeds']))}); teacher: over sampling "
            "seeds" if many else f"mean ± std over sampling seeds {', '.join(map(str, summary['sampling_seeds']))}")
    lines = [f"ROUGE-L F1 x100; {over}.", "", "| Set | n | " + " | ".join(groups) + " |",
             "|---|---:|" + "---:|" * len(groups)]
    for key, row in summary["rows"].items():
        n = summary["sizes"].get(key, "")
        lines.append(f"| {key} | {n} | " + " | ".join(f"{row[g]['mean']:.2f} ± {row[g]['std']:.2f}" for g in groups)
                     + " |")
    return "\n".join(lines) + "\n"


@quiet_libraries
def run(config: str | Path, size: str | None = None, out: str | Path = "recipe-run", data_root: str | Path | None = None,
        fresh: bool = False, progress: bool = True) -> dict:
    """Run the five steps into `out`; return {"summary", "table", "report", "paths"}."""
    from dskd_pipe.stages import cache_teacher, score

    path = config_path(config)
    size, settings = load_recipe_config(path, size)
    data = _data_paths(settings, data_root)
    out = Path(out).resolve()
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
    methods, seeds, train = settings["methods"], settings["seeds"], data["train"]
    t_all = time.perf_counter()

    t0 = _step(1, f"models ({settings['models']['teacher']} -> {settings['models']['student']})")
    teacher_init, kept_t = _model(out, "teacher", settings["models"])
    student_init, kept_s = _model(out, "student", settings["models"])
    _done(out, "models", t0, "models ready", kept_t and kept_s)

    teacher = teacher_init
    if settings["teacher_sft"] is not None:
        t0 = _step(2, "SFT of the teacher on the train data (distill --method sft)")
        teacher, reused = _distill(load_config(DistillConfig, None, {
            **settings["teacher_sft"], "method": "sft", "student": str(teacher_init), "data": train,
            "dev_data": data["dev"], "out": str(out / "teacher"), "resume": True, "progress": progress}))
        teacher = _best(teacher)
        _done(out, "teacher_sft", t0, f"teacher: {teacher}", reused)
    else:
        print(f"[recipe {2}/{STEPS}] no [{size}.teacher_sft] table: the teacher is used as given", flush=True)

    store = None
    if any(m != "sft" for m in methods):
        t0 = _step(3, "cache-teacher: the teacher's hidden states over the train data")
        store_dir = out / "teacher.zarr"
        finished = (store_dir / MANIFEST).is_file()  # written last; cache_teacher checks it against these inputs
        store = cache_teacher.run(load_config(CacheConfig, None, {
            **settings["cache"], "teacher": str(teacher), "data": train, "out": str(store_dir)}))
        _done(out, "cache", t0, f"store: {store}", finished)
    else:
        print(f"[recipe {3}/{STEPS}] every method is sft: no teacher store", flush=True)

    students = {}
    for method in methods:
        for seed in seeds:
            name = student_name(method, seed, seeds)
            t0 = _step(4, f"distill the student with {method}, seed {seed}"
                       + (" from the store" if method != "sft" else ""))
            folder, reused = _distill(load_config(DistillConfig, None, {
                **settings["distill"], "method": method, "seed": seed, "student": str(student_init), "data": train,
                "cache": str(store) if method != "sft" else "", "dev_data": data["dev"],
                "out": str(out / "students" / name), "resume": True, "progress": progress}))
            students[name] = _best(folder)
            _done(out, f"distill {name}", t0, f"student ({name}): {students[name]}", reused)

    sets = ", ".join(s.split("=")[0] for s in data["eval"])
    t0 = _step(5, f"score the teacher, the initial student and {len(students)} trained student(s) on {sets} (ROUGE-L)")
    # The published protocol (configs/score_default.toml) with this size's changes.
    score_dir = score.run(load_config(ScoreConfig, "score_default", {
        **settings["score"], "progress": progress, "out": str(out / "score"), "data": tuple(data["eval"]),
        "models": (f"teacher={teacher}", f"{INIT}={student_init}", *(f"{n}={p}" for n, p in students.items()))}))
    report = json.loads((score_dir / "report.json").read_text())
    summary = summarise_over_seeds(report, methods, seeds)
    table = summary_markdown(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(table)
    _done(out, "score", t0, f"scores: {score_dir}")
    print(f"[recipe] done in {time.perf_counter() - t_all:.1f} s", flush=True)

    paths = {"teacher": Path(teacher), "student_init": Path(student_init), "store": store,
             **{f"student {n}": p for n, p in students.items()}, "score": score_dir, "summary": out / "summary.md"}
    return {"summary": summary, "table": table, "report": report, "paths": paths}


__all__ = ["run", "load_recipe_config", "config_path", "resolve_data", "shipped", "student_name",
           "summarise_over_seeds"]
