"""`dskd-pipe`: parses flags into a stage config and calls the stage's `run`. Flags override the config file.

The command line sits above the stages and nothing imports it. A stage's flags are not written here: each is made
from its config field's one declaration (pipeline/config.py `option`: spelling, type, default, help, choices), so
an option added to a config is a flag of its command at once.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing

import click

from dskd_pipe.pipeline.config import (CacheConfig, ConfigError, DistillConfig, OnPolicyConfig, ProbeConfig,
                                      ScoreConfig, flag_of)


class _MethodHelp(click.Option):
    """--method, whose help lists the methods of pipeline/methods.METHODS (built-in and installed), read only when
    the help is shown: `dskd-pipe --version` need not import torch."""

    def get_help_record(self, ctx):
        from dskd_pipe.pipeline.methods import METHODS

        declared = self.help
        self.help = f"{declared} One of: {', '.join(METHODS)}."
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = declared


def _comma_list(ctx, param, value):
    """'0,3,7' -> ('0', '3', '7'): the config check turns the items into the field's type."""
    if value is None:
        return None
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _click_option(f: dataclasses.Field, hint):
    """The click option of config field `f` (annotated `hint`), from its declaration. Every default is None ("not
    given"), so a flag overrides the config file only when typed."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    name, meta = flag_of(f), f.metadata
    allowed = meta.get("option", {}).get("choices")
    shown = " [one of: " + ", ".join(c or "''" for c in allowed) + "]" if allowed else ""
    kwargs: dict = {"default": None, "help": meta.get("help", "") + shown}
    decls = [name, f.name]
    if base is bool:
        if meta.get("off_flag"):
            decls = [f"{name}/{meta['off_flag']}", f.name]
        else:
            kwargs["is_flag"] = True
    elif typing.get_origin(base) is tuple:
        if meta.get("comma_list"):
            kwargs["callback"] = _comma_list
        else:
            kwargs.update(multiple=True, type=typing.get_args(base)[0], default=())
    else:
        kwargs["type"] = base
    if f.name == "method":
        kwargs["cls"] = _MethodHelp
    return click.option(*decls, **kwargs)


def config_options(cls, skip: tuple[str, ...] = ()):
    """Decorate a command with one flag per field of config class `cls` (but `skip`), in field order."""
    hints = typing.get_type_hints(cls)

    def decorate(command):
        for f in reversed([f for f in dataclasses.fields(cls) if f.name not in skip]):
            command = _click_option(f, hints[f.name])(command)
        return command
    return decorate


class _Group(click.Group):
    """Turns the project's user errors (bad data, config, store, model) into one clear line and exit code 2."""

    def invoke(self, ctx):
        from dskd_pipe.pipeline.data import DataError
        from dskd_pipe.pipeline.models import ModelError

        user_errors: tuple[type[BaseException], ...] = (ConfigError, DataError, ModelError)
        try:
            from dskd_pipe.cache.format import StoreError

            user_errors += (StoreError,)
        except ImportError:
            pass
        from dskd_pipe.pipeline.training import CheckpointError, TrainingDiverged

        user_errors += (CheckpointError, TrainingDiverged)
        try:
            return super().invoke(ctx)
        except user_errors as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="dskd-pipe", prog_name="dskd-pipe", message="%(prog)s %(version)s")
def main() -> None:
    """dskd-pipe: distil a teacher LLM into a student with any tokenizer, from a cached teacher-state store."""


# --- cache-teacher, cache-info, cache-verify (stages/cache_teacher.py, cache/) ---
@main.command("cache-teacher")
@click.option("--config", "config_path", default=None, help="TOML/JSON config (configs/cache_*.toml).")
@config_options(CacheConfig)
def cache_teacher(config_path, **flags) -> None:
    """Run the teacher once over the data and write the teacher-state store."""
    from dskd_pipe.pipeline.config import load_config
    from dskd_pipe.stages.cache_teacher import run

    run(load_config(CacheConfig, config_path, flags))


@main.command("convert-gguf")
@click.argument("src")
@click.option("--out", default=None, help="Output model folder (default: the shared cache, "
              "$DSKD_PIPE_CACHE/gguf/<sha256 prefix>, which .gguf paths given to any stage also use).")
def convert_gguf_cmd(src, out) -> None:
    """Dequantise a GGUF file (or a packaged model: smollm2, gemma3-270m) into a normal model folder, once."""
    from dskd_pipe.pipeline.gguf import convert_gguf, converted_folder, resolve_gguf_source

    folder = convert_gguf(resolve_gguf_source(src), out) if out else converted_folder(src)
    click.echo(f"model folder: {folder}")


@main.command("cache-info")
@click.argument("store")
def cache_info(store) -> None:
    """Show what a store holds: fingerprints, shapes, size on disk, bytes/token."""
    import json

    from dskd_pipe.cache.verify import store_info

    click.echo(json.dumps(store_info(store), indent=2))


@main.command("cache-verify")
@click.argument("store")
def cache_verify(store) -> None:
    """Read every chunk (crc32c) and check the index; exit 1 naming each bad array/chunk."""
    from dskd_pipe.cache.verify import verify_store

    report = verify_store(store)
    for problem in report["problems"]:
        click.echo(f"{store}: {problem}", err=True)
    if not report["ok"]:
        click.echo(f"{store}: {len(report['problems'])} problem(s); rebuild the store or the affected part.", err=True)
        sys.exit(1)
    click.echo(f"{store}: ok ({report['chunks']} chunks, {report['examples']} examples, {report['tokens']} tokens)")


# --- distill (stages/distill.py) ---
@main.command("distill")
@click.option("--config", "config_path", default=None, help="TOML/JSON config (configs/*.toml, or a run's "
              "distill_config.json).")
@config_options(DistillConfig)
def distill(config_path, **flags) -> None:
    """Train a student from a teacher-state store (or a teacher run online) with one of the methods (`dskd-pipe
    methods` lists them)."""
    from dskd_pipe.pipeline.config import load_config
    from dskd_pipe.stages.distill import run

    out = run(load_config(DistillConfig, config_path, flags))
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun: one final line, not one per process
        click.echo(f"student: {out}")


# --- methods (pipeline/methods.py) ---
@main.command("methods")
def methods_cmd() -> None:
    """Every distill method: the built-in ones and those installed packages add (entry point group
    dskd_pipe.methods), with where each comes from and its own options."""
    from dskd_pipe.pipeline.methods import BUILT_IN, ENTRY_POINT_GROUP, METHODS

    origins = {name: METHODS.origin(name) for name in METHODS}
    added = sum(origin != BUILT_IN for origin in origins.values())
    click.echo(f"{len(origins) - added} built-in method(s), {added} from installed packages (entry point group "
               f"{ENTRY_POINT_GROUP}):")
    width = max(map(len, origins)) + 2
    for name, method in METHODS.items():
        needs = ("no teacher" if not method.uses_teacher else "same tokenizer" if method.same_vocabulary
                 else "any tokenizers")
        click.echo(f"  {name:<{width}}{needs:<16}{method.summary}")
        indent = " " * (width + 2)
        if origins[name] != BUILT_IN:
            click.echo(f"{indent}from {origins[name]}")
        if method.settings:
            click.echo(f"{indent}reads --{' --'.join(k.replace('_', '-') for k in method.settings)}")
        for option, spec in method.options.items():
            allowed = f", one of {', '.join(map(str, spec.choices))}" if spec.choices else ""
            click.echo(f"{indent}--method-option {option}={spec.default} ({type(spec.default).__name__}{allowed}): "
                       f"{spec.help}")
    if METHODS.problems:
        click.echo("left out:")
        for problem in METHODS.problems:
            click.echo(f"  {problem}")


# --- plot (pipeline/curves.py) ---
@main.command("plot")
@click.argument("runs", nargs=-1, required=True)
@click.option("--out", default=None, help="PNG file (default: RUN/curves.png for one run; needed for several).")
@click.option("--title", default=None, help="A title above the panels.")
def plot(runs, out, title) -> None:
    """Training curves of one or more distill runs, overlaid: loss terms, dev metrics, learning rate, CMA-GA's
    discriminator accuracies and L_G (needs matplotlib)."""
    from pathlib import Path

    from dskd_pipe.pipeline.curves import CURVES, plot_paths

    from dskd_pipe.cache.paths import check_out_location

    if out is None:
        if len(runs) > 1:
            raise ConfigError("plot: with several runs, name the picture with --out FILE.png.")
        folder = Path(runs[0])
        out = str((folder if folder.is_dir() else folder.parent) / CURVES)
    check_out_location(out, ConfigError, kind="file")
    click.echo(f"curves: {plot_paths(list(runs), out, title)}")


# --- score, generate (stages/score.py) ---


_SET_FLAGS = ("models", "data", "out", "seeds", "in_domain")  # `generate` spells these its own way
_PROTOCOL = click.option("--config", "config_path", default="score_default", show_default=True,
                         help="TOML/JSON config; the default is the published protocol (configs/score_default.toml).")


@main.command("score")
@_PROTOCOL
@config_options(ScoreConfig)
def score(config_path, **flags) -> None:
    """ROUGE-L of one or more models on evaluation sets with the published protocol; resumable."""
    from dskd_pipe.pipeline.config import load_config
    from dskd_pipe.stages.score import run

    out = run(load_config(ScoreConfig, config_path, flags))
    click.echo((out / "report.md").read_text(), nl=False)
    click.echo(f"report: {out / 'report.md'}")


@main.command("generate")
@click.option("--model", default=None, help="Model whose responses become the targets (hub id or folder).")
@click.option("--data", default=None, help="Prompts: a data file (JSONL/JSON/Parquet) or datasets name.")
@click.option("--out", default=None, help="New JSONL data file: the records with output = the generation.")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: the first seed of the config, 10).")
@_PROTOCOL
@config_options(ScoreConfig, skip=_SET_FLAGS)
def generate_cmd(config_path, model, data, seed, **flags) -> None:
    """Write a model's responses to training prompts as a new data file (the SeqKD baseline)."""
    from dskd_pipe.pipeline.config import ScoreConfig, load_config
    from dskd_pipe.stages.score import run_generate

    flags.update(models=(model,) if model else None, data=(data,) if data else None,
                 seeds=(seed,) if seed is not None else None)
    out = run_generate(load_config(ScoreConfig, config_path, flags))
    click.echo(f"wrote {out}")


# --- demo (stages/demo.py) ---
@main.command("demo")
@click.option("--out", default="dskd-demo", show_default=True, help="Output folder; a rerun reuses finished steps.")
@click.option("--size", type=click.Choice(["demo", "ci"]), default="demo", show_default=True,
              help="demo: a few minutes on a 2-core CPU; ci: a smoke test in seconds.")
@click.option("--config", "config_path", default=None, help="A recipe TOML like configs/quality.toml (default: it).")
@click.option("--fresh", is_flag=True, help="Remove this demo's outputs in --out first.")
@click.option("--progress/--no-progress", default=True, help="The stages' progress bars on stderr.")
@click.option("--quiet", is_flag=True, help="Every stage runs with --quiet, and the step lines are left out: only "
              "warnings, each stage's final line and the final table.")
def demo(out, size, config_path, fresh, progress, quiet) -> None:
    """The quality benchmark at demo size: train a teacher, distil students across tokenizers, score, compare."""
    from dskd_pipe.stages.demo import run

    _show(run(out, size=size, config=config_path, fresh=fresh, progress=progress, quiet=quiet))


def _show(result: dict) -> None:
    """The summary table of a recipe (or demo) run, then where every output lies."""
    click.echo("\n" + result["table"], nl=False)
    click.echo("\nwhere everything lies:")
    for name, path in result["paths"].items():
        click.echo(f"  {name:15s} {path}")


# --- recipe (stages/recipe.py) ---
@main.command("recipe")
@click.argument("config")
@click.option("--size", default=None, help="The config's table to run (e.g. cpu or gpu; default: its first).")
@click.option("--out", required=True, help="Output folder; a rerun reuses finished steps.")
@click.option("--data-root", default=None, help="Folder holding the config's relative data paths (default: the "
              "files shipped in configs/data).")
@click.option("--fresh", is_flag=True, help="Remove this recipe's outputs in --out first.")
@click.option("--progress/--no-progress", default=True, help="The stages' progress bars on stderr.")
@click.option("--quiet", is_flag=True, help="Every stage runs with --quiet, and the step lines are left out: only "
              "warnings, each stage's final line and the final table.")
def recipe(config, size, out, data_root, fresh, progress, quiet) -> None:
    """A whole experiment from one config: data, tokenizers, models -> teacher SFT -> cache -> methods x seeds ->
    score, summary."""
    from dskd_pipe.stages.recipe import run

    _show(run(config, size=size, out=out, data_root=data_root, fresh=fresh, progress=progress, quiet=quiet))


# --- probe (stages/probe.py) ---
@main.command("probe")
@click.option("--config", "config_path", default=None, help="TOML/JSON config (or a probe_config.json).")
@config_options(ProbeConfig)
def probe(config_path, **flags) -> None:
    """Alignment accuracy and t2s attention heatmaps of a trained cross-model attention (DSKD-CMA, CMA-GA)."""
    from dskd_pipe.pipeline.config import load_config
    from dskd_pipe.stages import probe as stage

    stage.run(load_config(ProbeConfig, config_path, flags))


# --- on-policy (stages/on_policy.py) ---
@main.command("on-policy")
@click.option("--config", "config_path", default=None, help="TOML/JSON config (or an on_policy.json).")
@config_options(OnPolicyConfig)
def on_policy(config_path, **flags) -> None:
    """Distil in refresh rounds on the student's own samples (DSKDv2 on-policy), the teacher in its own process."""
    from dskd_pipe.pipeline.config import load_config
    from dskd_pipe.stages.on_policy import StepFailed, run

    try:
        student = run(load_config(OnPolicyConfig, config_path, flags))
    except StepFailed as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(f"student: {student}")


if __name__ == "__main__":  # `python -m dskd_pipe.stages.cli ...` (also `python -m dskd_pipe ...`)
    main()
