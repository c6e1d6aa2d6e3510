"""stages/probe.py end to end on tiny models: a tiny Qwen2 teacher store, a 1-step DSKD-CMA GPT-2 student, then the
probe's report and a heatmap PNG; runs of other methods are refused; the CLI command."""
import json
import math

import pytest
from click.testing import CliRunner

from dskd_pipe.pipeline.config import CacheConfig, ConfigError, DistillConfig, ProbeConfig
from dskd_pipe.pipeline.models import load_tokenizer, save_tiny_model

TOK = "tests/fixtures/tokenizers"
DATA = "tests/fixtures/data/dolly_train_40.jsonl"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from dskd_pipe.stages import distill
    from dskd_pipe.stages.cache_teacher import run as cache

    tmp = tmp_path_factory.mktemp("probe")
    teacher = save_tiny_model(tmp / "tq", "qwen2", load_tokenizer(f"{TOK}/qwen2"), d_model=32, layers=1)
    student = save_tiny_model(tmp / "sg", "gpt2", load_tokenizer(f"{TOK}/gpt2"), d_model=32, layers=1, seed=2)
    store = cache(CacheConfig(teacher=str(teacher), data=DATA, out=str(tmp / "store"), limit=4, max_length=64,
                              device="cpu"))
    common = dict(student=str(student), cache=str(store), data=DATA, limit=4, max_length=64, micro_batch_size=2,
                  grad_accum=1, max_steps=1, num_workers=0, progress=False, device="cpu")
    runs = {m: distill.run(DistillConfig(method=m, out=str(tmp / m), **common)) for m in ("dskd-cma", "sft")}
    return {"tmp": tmp, "store": str(store), "runs": runs}


def test_probe_writes_report_and_heatmap(env, capsys):
    from dskd_pipe.stages.probe import run

    out = run(ProbeConfig(run=str(env["runs"]["dskd-cma"]), cache=env["store"], data=DATA,
                          out=str(env["tmp"] / "probe"), limit=3, heatmaps=(1,), device="cpu"))
    report = json.loads((out / "probe_report.json").read_text())
    assert report["method"] == "dskd-cma" and report["examples"] == 3 and len(report["per_example"]) == 3
    assert report["probed_tokens"] > 0
    for key in ("alignment_accuracy", "in_chunk_mass", "uniform_in_chunk_mass"):
        assert 0.0 <= report[key] <= 1.0
    # Totals are token-weighted means of the per-example rates.
    rows = report["per_example"]
    n = sum(r["probed_tokens"] for r in rows)
    assert n == report["probed_tokens"]
    assert math.isclose(sum(r["in_chunk_mass"] * r["probed_tokens"] for r in rows) / n, report["in_chunk_mass"],
                        rel_tol=1e-9)
    png = out / "heatmap_00001.png"
    assert report["heatmaps"] == [str(png)]
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    assert "alignment accuracy" in capsys.readouterr().out


def test_probe_refuses_runs_without_attention(env):
    from dskd_pipe.stages.probe import run

    with pytest.raises(ConfigError, match="trained with --method sft, which has no cross-model attention"):
        run(ProbeConfig(run=str(env["runs"]["sft"]), cache=env["store"], data=DATA, out=str(env["tmp"] / "p2")))
    with pytest.raises(ConfigError, match="--heatmaps 9: out of range"):
        run(ProbeConfig(run=str(env["runs"]["dskd-cma"]), cache=env["store"], data=DATA, out=str(env["tmp"] / "p3"),
                        limit=2, heatmaps=(9,), device="cpu"))


def test_probe_cli(env):
    from dskd_pipe.stages.cli import main

    out = env["tmp"] / "cli"
    result = CliRunner().invoke(main, ["probe", "--run", str(env["runs"]["dskd-cma"]), "--cache", env["store"],
                                       "--data", DATA, "--out", str(out), "--limit", "2", "--heatmaps", "0,1",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "in-chunk attention mass" in result.output
    assert (out / "heatmap_00000.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "heatmap_00001.png").exists()
    bad = CliRunner().invoke(main, ["probe", "--run", str(env["runs"]["sft"]), "--cache", env["store"],
                                    "--data", DATA, "--out", str(out)])
    assert bad.exit_code == 2 and "no cross-model attention" in bad.output


def test_probe_without_matplotlib_skips_heatmaps(env, monkeypatch, capsys):
    import sys

    from dskd_pipe.stages.probe import run

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import now raises ImportError
    out = run(ProbeConfig(run=str(env["runs"]["dskd-cma"]), cache=env["store"], data=DATA,
                          out=str(env["tmp"] / "nomatplotlib"), limit=1, heatmaps=(0,), device="cpu"))
    assert json.loads((out / "probe_report.json").read_text())["heatmaps"] == []
    assert not list(out.glob("*.png"))
    assert "heatmap of example 0 skipped: matplotlib is not installed" in capsys.readouterr().out
