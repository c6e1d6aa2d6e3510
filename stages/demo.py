"""`dskd-pipe demo`: the whole job on what ships with the package, in a few minutes on a CPU.

Steps, each through the same stage `run()` and config dataclasses as a real run:
    1. build a tiny Qwen2-architecture teacher (Qwen tokenizer) and a tiny GPT-2 student (GPT-2 tokenizer)
    2. SFT the teacher on the Dolly train slice (`distill --method sft`, the teacher as the student)
    3. cache-teacher: the SFT'd teacher over the train slice -> teacher.zarr
    4. distill the student with sft and with cma-ga (from the store; the tokenizers differ, so CMA is exercised)
    5. score teacher, sft student and cma-ga student on the Dolly test slice (ROUGE-L)

Sizes come from configs/demo.toml (`small`: the default, `tiny`: the test). Layout of `--out DIR`:
    demo.json                    the size and resolved settings of this demo folder
    models/teacher-init/, models/student-init/    the random tiny models
    teacher/                     the SFT'd teacher (a distill output folder)
    teacher.zarr/                the teacher-state store
    students/sft/, students/cma-ga/               the distilled students
    score/                       report.md, report.json, generations/

Re-running with the same --out reuses finished work: the models are kept, the store and the scores resume
themselves, a student whose folder holds its model and the same resolved config is not retrained (an unfinished one
resumes from its last checkpoint). Other settings in the same folder are refused; `--fresh` first removes the demo's
own outputs (only the paths listed above).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
import tomllib
from importlib import resources
from pathlib import Path

from dskd_pipe.pipeline.config import (CacheConfig, ConfigError, DistillConfig, ScoreConfig, config_to_dict,
                                       load_config)

SIZES = ("small", "tiny")
STAGES = {"teacher_sft": DistillConfig, "cache": CacheConfig, "distill": DistillConfig, "score": ScoreConfig}
MODEL_KEYS = ("teacher_d_model", "teacher_layers", "teacher_heads", "student_d_model", "student_layers",
              "student_heads")
# Set by the demo itself: a value for these in demo.toml would be ignored, so it is refused instead.
PATH_KEYS = ("teacher", "student", "data", "cache", "out", "models", "method", "resume", "dev_data")
OUTPUTS = ("demo.json", "models", "teacher", "teacher.zarr", "students", "score")
TRAIN, TEST = "dolly_train_200.jsonl", "dolly_test_50.jsonl"


def shipped(*parts: str) -> Path:
    """A file or folder shipped in dskd_pipe.configs (configs/ in the repository)."""
    return Path(str(resources.files("dskd_pipe.configs").joinpath(*parts)))


def load_demo_config(size: str, path: str | Path | None = None) -> dict:
    """{"models": {...}, "teacher_sft": DistillConfig kwargs, "cache": ..., "distill": ..., "score": ...}.

    Every problem in the file (unknown size, section or key, a path key, a bad value) is reported together.
    """
    path = Path(path) if path else shipped("demo.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the demo config ({e}).") from None
    if size not in data:
        raise ConfigError(f"{path}: no [{size}] table (found: {', '.join(sorted(data)) or 'none'}). "
                          f"Choose --size {' or '.join(sorted(data))}.")
    table, problems = data[size], []
    for name in sorted(set(table) - {"models", *STAGES}):
        problems.append(f"{path}: unknown table [{size}.{name}] (known: models, {', '.join(STAGES)}).")
    models = table.get("models", {})
    for key in MODEL_KEYS:
        if not isinstance(models.get(key), int) or isinstance(models.get(key), bool) or models[key] < 1:
            problems.append(f"{path}: [{size}.models] {key}: expected a positive integer, found {models.get(key)!r}.")
    for key in sorted(set(models) - set(MODEL_KEYS)):
        problems.append(f"{path}: [{size}.models] unknown key '{key}' (known: {', '.join(MODEL_KEYS)}).")
    for name, cls in STAGES.items():
        section = table.get(name, {})
        for key in sorted(set(section) & set(PATH_KEYS)):
            problems.append(f"{path}: [{size}.{name}] '{key}' is set by the demo; remove it.")
        try:
            load_config(cls, None, {k: v for k, v in section.items() if k not in PATH_KEYS})
        except ConfigError as e:
            problems += [f"{path}: [{size}.{name}] {line.removeprefix('command line: ')}"
                         for line in str(e).splitlines()]
    if problems:
        raise ConfigError("\n".join(problems))
    return {"models": dict(models), **{name: dict(table.get(name, {})) for name in STAGES}}


def _step(i: int, text: str) -> float:
    print(f"[demo {i}/5] {text}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"[demo] {what} ({time.perf_counter() - t0:.1f} s)", flush=True)


def _build_models(out: Path, models: dict) -> tuple[Path, Path]:
    from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

    folders = {}
    for role, arch, tokenizer in (("teacher", "qwen2", "qwen2"), ("student", "gpt2", "gpt2")):
        folder = out / "models" / f"{role}-init"
        if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
            print(f"[demo]   {folder}: present, kept")
        else:
            tok = load_tokenizer(str(shipped("tokenizers", tokenizer)))
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            # Built aside and renamed: a killed build never leaves a folder that looks finished.
            save_tiny_model(tmp, arch, tok, d_model=models[f"{role}_d_model"], layers=models[f"{role}_layers"],
                            heads=models[f"{role}_heads"], seed=0)
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            print(f"[demo]   {folder}: tiny {arch}, d={models[f'{role}_d_model']}, {models[f'{role}_layers']} "
                  f"layer(s), {len(tok):,}-token {tokenizer} tokenizer")
        folders[role] = folder
    return folders["teacher"], folders["student"]


def _distill(cfg: DistillConfig) -> Path:
    """Train unless `cfg.out` already holds the finished model of this very config; resume an unfinished one."""
    from dskd_pipe.stages import distill

    out = Path(cfg.out)
    saved = out / distill.RESOLVED_CONFIG
    if saved.is_file():
        before = json.loads(saved.read_text()).get("config", {})
        if before != config_to_dict(cfg):
            changed = sorted(k for k in set(before) | set(config_to_dict(cfg))
                             if before.get(k) != config_to_dict(cfg).get(k))
            raise ConfigError(f"{out} was trained with other settings ({', '.join(changed)}). Pass --fresh to start "
                              "the demo again, or another --out.")
        if (out / "model.safetensors").is_file():
            print(f"[demo]   {out}: finished before, kept")
            return out
    return distill.run(cfg)


def run(out: str | Path, size: str = "small", config: str | Path | None = None, fresh: bool = False,
        progress: bool = True) -> dict:
    """Run the five steps into `out`; return {"report": report dict, "paths": {name: Path}}."""
    from dskd_pipe.stages import cache_teacher, score

    if size not in SIZES and config is None:
        raise ConfigError(f"--size '{size}': choose one of {', '.join(SIZES)}.")
    settings = load_demo_config(size, config)
    out = Path(out).resolve()
    if fresh:
        for name in OUTPUTS:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    record = {"size": size, "settings": settings}
    marker = out / "demo.json"
    if marker.is_file() and json.loads(marker.read_text()) != record:
        before = json.loads(marker.read_text()).get("size")
        raise ConfigError(f"{out} holds a demo with other settings (size {before}). Pass --fresh to start again, "
                          "or another --out.")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(record, indent=2) + "\n")
    train, test = str(shipped("data", TRAIN)), str(shipped("data", TEST))
    t_all = time.perf_counter()

    t0 = _step(1, f"tiny models -> {out / 'models'}")
    teacher_init, student_init = _build_models(out, settings["models"])
    _done(t0, "models ready")

    t0 = _step(2, "SFT of the teacher on the Dolly train slice (distill --method sft)")
    teacher = _distill(load_config(DistillConfig, None, {
        **settings["teacher_sft"], "method": "sft", "student": str(teacher_init), "data": train,
        "out": str(out / "teacher"), "resume": True, "progress": progress}))
    _done(t0, f"teacher: {teacher}")

    t0 = _step(3, "cache-teacher: the teacher's hidden states over the train slice")
    store = cache_teacher.run(load_config(CacheConfig, None, {
        **settings["cache"], "teacher": str(teacher), "data": train, "out": str(out / "teacher.zarr")}))
    _done(t0, f"store: {store}")

    students = {}
    for i, method in enumerate(("sft", "cma-ga")):
        t0 = _step(4, f"distill the GPT-2 student with {method}" + (" from the store" if method != "sft" else ""))
        students[method] = _distill(load_config(DistillConfig, None, {
            **settings["distill"], "method": method, "student": str(student_init), "data": train,
            "cache": str(store) if method != "sft" else "", "out": str(out / "students" / method),
            "resume": True, "progress": progress}))
        _done(t0, f"student ({method}): {students[method]}")

    t0 = _step(5, "score teacher and students on the Dolly test slice (ROUGE-L)")
    # The published protocol (configs/score_default.toml) with the demo's shorter lengths and fewer seeds.
    score_cfg = load_config(ScoreConfig, "score_default", {
        **settings["score"], "progress": progress, "out": str(out / "score"), "data": (f"dolly={test}",),
        "models": (f"teacher={teacher}", f"sft={students['sft']}", f"cma-ga={students['cma-ga']}")})
    score_dir = score.run(score_cfg)
    _done(t0, f"scores: {score_dir}")
    print(f"[demo] done in {time.perf_counter() - t_all:.1f} s", flush=True)

    paths = {"models": out / "models", "teacher": teacher, "store": store, "student_sft": students["sft"],
             "student_cma_ga": students["cma-ga"], "score": score_dir, "report": score_dir / "report.md"}
    return {"report": json.loads((score_dir / "report.json").read_text()), "paths": paths,
            "table": (score_dir / "report.md").read_text()}


__all__ = ["run", "load_demo_config", "SIZES", "shipped"]
