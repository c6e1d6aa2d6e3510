"""Every option's valid values are declared once, on its config field (pipeline/config.py `option`), and checked
from there for a config file, the command line and a config built in code, every problem reported at once (issue
24: --max-steps -1, --kd-temperature -2, cache-teacher --max-length 0, --dev-rouge without --dev-data and others
were accepted)."""
from __future__ import annotations

import dataclasses

import click
import pytest

from dskd_pipe.stages.cli import main
from dskd_pipe.pipeline.config import (CacheConfig, ConfigError, DistillConfig, OnPolicyConfig, ProbeConfig,
                                       ScoreConfig, option_problems)
from reliability_helpers import cache_args, distill_args, invoke

# Numbers without a range of their own: any seed is a seed.
UNBOUNDED = {"seed", "seeds"}


@pytest.mark.parametrize("cls", [CacheConfig, ScoreConfig, DistillConfig, ProbeConfig, OnPolicyConfig])
def test_every_number_and_every_closed_set_of_words_is_declared(cls):
    """Each int / float option has a declared range; each option the CLI offers as a choice has declared choices,
    and the CLI's list is the declaration."""
    undeclared = [f.name for f in dataclasses.fields(cls) if f.name not in UNBOUNDED
                  and any(t in str(f.type) for t in ("int", "float")) and "option" not in f.metadata]
    assert undeclared == []
    for command in main.commands.values():
        for param in command.params:
            name = (param.name or "").replace("-", "_")
            if isinstance(param.type, click.Choice) and name in {f.name for f in dataclasses.fields(cls)}:
                field = next(f for f in dataclasses.fields(cls) if f.name == name)
                if "option" in field.metadata and "choices" in field.metadata["option"]:
                    assert tuple(param.type.choices) == field.metadata["option"]["choices"], (command.name, name)


def test_the_issues_bad_values_are_all_reported_at_once(models, tmp_path):
    result = invoke(*distill_args(models, tmp_path / "r", "--max-steps", "-1", "--max-length", "-5",
                                  "--kd-temperature", "-2", "--warmup-steps", "-3", "--max-grad-norm", "-1",
                                  "--save-every", "-1", "--dev-rouge"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.splitlines() == [
        "error: command line: --dev-rouge needs --dev-data.",
        "command line: --max-length must be >= 1, found -5.",
        "command line: --max-steps must be >= 0, found -1 (0 = the epochs decide).",
        "command line: --warmup-steps must be >= 0, found -3.",
        "command line: --max-grad-norm must be >= 0, found -1.0 (0 = no clipping).",
        "command line: --kd-temperature must be > 0, found -2.0.",
        "command line: --save-every must be >= 0, found -1 (0 = only at epoch ends)."]
    assert not (tmp_path / "r").exists()
    result = invoke(*cache_args(models["teacher"], tmp_path / "t.zarr", "--max-length", "0", "--topk", "-1"))
    assert result.exit_code == 2 and result.output.splitlines() == [
        "error: command line: --max-length must be >= 1, found 0.",
        "command line: --topk must be >= 0, found -1 (0 = off)."]
    assert not (tmp_path / "t.zarr").exists()


def test_a_config_file_names_the_file_and_a_config_built_in_code_is_checked_too(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("kd_rate = 1.5\ncma_std = \"both\"\nlr = 0.001\n")
    with pytest.raises(ConfigError) as e:
        from dskd_pipe.pipeline.config import load_config

        load_config(DistillConfig, config, {"lr": -1.0})
    assert str(e.value).splitlines() == [  # in the order of the fields
        "command line: --lr must be > 0, found -1.0.",
        f"{config}: --kd-rate must be in [0, 1], found 1.5.",
        f"{config}: --cma-std 'both': choose one of valid, padded."]
    from dskd_pipe.stages.distill import check_config

    with pytest.raises(ConfigError, match=r"--lora-dropout must be in \[0, 1\), found 1.0"):
        check_config(DistillConfig(student="s", data="d", out="o", method="sft", lora_dropout=1.0))
    assert option_problems(ScoreConfig(top_p=0.0)) == ["--top-p must be in (0, 1], found 0.0."]
