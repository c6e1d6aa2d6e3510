"""stages/cli.py: a stage's flags are its config's declared options, each spelled, typed and explained as its field
declares it, so an option is written in one place."""
import dataclasses

from click.testing import CliRunner

from dskd_pipe.pipeline.config import (CacheConfig, DistillConfig, OnPolicyConfig, ProbeConfig, ScoreConfig, flag_of,
                                      load_config, option, option_problems)
from dskd_pipe.stages.cli import config_options, main

COMMANDS = {"cache-teacher": CacheConfig, "distill": DistillConfig, "score": ScoreConfig, "probe": ProbeConfig,
            "on-policy": OnPolicyConfig}


def test_every_field_is_a_flag_with_its_declared_help():
    for command, cls in COMMANDS.items():
        params = {p.name: p for p in main.commands[command].params}
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"
            p = params[f.name]
            assert p.opts[0] == flag_of(f), (command, f.name)
            assert p.help.startswith(f.metadata["help"]), (command, f.name)
            if "choices" in f.metadata.get("option", {}):
                assert all(str(c) in p.help for c in f.metadata["option"]["choices"] if c), (command, f.name)


def test_flags_parse_into_the_config():
    ctx = main.commands["distill"].make_context("distill", [
        "--sample-cache", "a.zarr", "--sample-cache", "b.zarr", "--method-option", "x=1", "--no-progress",
        "--lora-targets", "q_proj", "--min-lr", "0", "--ga-mode", "released", "--report-to", "tensorboard"])
    flags = {k: v for k, v in ctx.params.items() if k != "config_path"}
    cfg = load_config(DistillConfig, None, flags)
    assert cfg.sample_caches == ("a.zarr", "b.zarr") and cfg.method_options == ("x=1",) and cfg.progress is False
    assert cfg.lora_targets == ("q_proj",) and cfg.min_lr == 0.0 and cfg.ga_mode == "released"
    assert cfg.lr == DistillConfig().lr  # not typed: not given, the default stays
    score = main.commands["score"].make_context("score", ["--model", "m", "--seed", "1", "--seed", "2", "--sample"])
    assert score.params["models"] == ("m",) and score.params["seeds"] == (1, 2) and score.params["greedy"] is False
    probe = main.commands["probe"].make_context("probe", ["--heatmaps", "0,3,7", "--run", "r"])
    assert load_config(ProbeConfig, None, {k: v for k, v in probe.params.items() if k != "config_path"}).heatmaps \
        == (0, 3, 7)


def test_a_bad_value_is_one_line_naming_the_flag(tmp_path):
    r = CliRunner().invoke(main, ["distill", "--student", "s", "--data", "d", "--out", str(tmp_path / "o"),
                                  "--cache", "c", "--ga-mode", "nope"])
    assert r.exit_code == 2 and "--ga-mode 'nope': choose one of paper, released." in r.output
    assert "Traceback" not in r.output


def test_method_help_lists_the_registry():
    from dskd_pipe.pipeline.methods import METHODS

    text = "".join(CliRunner().invoke(main, ["distill", "--help"]).output.split())  # click wraps at hyphens
    assert all(name in text for name in METHODS) and text.count("Oneof:sft,kd") == 1


def test_a_declared_field_becomes_a_flag():
    """What makes "an option is declared once" true: a new field is a typed, explained flag with no CLI code."""
    @dataclasses.dataclass(frozen=True)
    class Toy:
        width: int = option(3, "How wide.", at_least=1)
        names: tuple[str, ...] = option((), "Names; repeat.", flag="--name", choices=("a", "b", ""))
        loud: bool = option(True, "Shout.", off_flag="--quiet-please")

    import click

    @click.command()
    @config_options(Toy)
    def toy(**flags):
        click.echo(repr(load_config(Toy, None, flags)))

    out = CliRunner().invoke(toy, ["--width", "5", "--name", "a", "--name", "b", "--quiet-please"]).output
    assert out.strip() == "test_a_declared_field_becomes_a_flag.<locals>.Toy(width=5, names=('a', 'b'), loud=False)"
    bad = CliRunner().invoke(toy, ["--width", "0"])
    assert "--width must be >= 1, found 0" in str(bad.exception)
    # a problem names the flag as it is spelled (--name), not the field (names)
    assert option_problems(Toy(names=("c",))) == ["--name 'c': choose one of a, b, '' (the default)."]
    assert option_problems(dataclasses.replace(Toy(), width=0)) == ["--width must be >= 1, found 0."]
