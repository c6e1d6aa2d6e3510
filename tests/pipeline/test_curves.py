import json
import math

import pytest
from click.testing import CliRunner

from dskd_pipe.stages.cli import main
from dskd_pipe.pipeline.config import ConfigError
from dskd_pipe.pipeline.curves import panels_for, read_run, run_labels, smooth


def write_run(folder, method, steps=40, dev_every=20):
    """A metrics.jsonl as distill writes it: one record per step, a dev record at each epoch end."""
    folder.mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        r = {"step": s, "epoch": (s - 1) // dev_every, "loss": 5 * math.exp(-s / 15) + 1, "ce_student": 4.0 - s / 20,
             "grad_norm": 1.0, "lr": 5e-4 * min(1, s / 5), "step_s": 0.5, "tokens_per_s": 900.0,
             "supervised_tokens": 100.0}
        if method == "cma-ga":
            r.update(kd_t2s=0.5, kd_s2t=0.3, ce_t2s=4.1, t2s_acc=0.1, s2t_acc=0.2, l_g=0.69, d_acc_real=0.6,
                     d_acc_fake=0.4, l_d=0.68)
        lines.append(json.dumps(r))
        if s % dev_every == 0:
            lines.append(json.dumps({"step": s, "epoch": s // dev_every, "dev_loss": 3.0 - s / 40,
                                     "dev_rouge_l": s / 4}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_read_run_splits_steps_and_dev_and_tolerates_a_killed_last_line(tmp_path):
    run = write_run(tmp_path / "sft", "sft")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "loss"')  # killed mid-write
    r = read_run(run)
    assert len(r.train) == 40 and [d["step"] for d in r.dev] == [20, 40] and r.label == "sft"
    assert r.series("dev_rouge_l") == ([20.0, 40.0], [5.0, 10.0])
    with pytest.raises(ConfigError, match=r"nope: no metrics.jsonl there \(a distill output folder holds one\)\."):
        read_run(tmp_path / "nope")


def test_panels_follow_what_the_runs_logged(tmp_path):
    sft = read_run(write_run(tmp_path / "sft", "sft"))
    ga = read_run(write_run(tmp_path / "ga", "cma-ga"))
    titles = [p[0] for p in panels_for([sft])]
    assert titles == ["loss (total)", "CE of the student (gold)", "dev loss", "dev ROUGE-L", "learning rate"]
    both = [p[0] for p in panels_for([sft, ga])]
    assert {"KD t2s (student space)", "KD s2t (teacher space)", "L_G (generator)",
            "D accuracy (real keys solid, fake queries dashed)"} <= set(both)
    assert both.index("loss (total)") == 0 and both[-1] == "learning rate"


def test_smoothing_is_centred_without_lag():
    assert smooth([2.0, 2.0, 2.0], 5) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([0.0, 3.0, 6.0, 9.0, 12.0], 3) == pytest.approx([1.5, 3.0, 6.0, 9.0, 10.5])  # a line stays put
    noisy = [1.0, 3.0] * 20
    assert max(smooth(noisy, 9)[5:-5]) - min(smooth(noisy, 9)[5:-5]) < 0.3


def test_labels_are_folder_names_made_distinct(tmp_path):
    assert run_labels([tmp_path / "a" / "cma-ga", tmp_path / "b" / "sft"]) == ["cma-ga", "sft"]
    assert run_labels([tmp_path / "s1" / "student", tmp_path / "s2" / "student"]) == ["s1/student", "s2/student"]


def test_cli_plot_draws_one_png_for_several_runs(tmp_path):
    pytest.importorskip("matplotlib")
    sft, ga = write_run(tmp_path / "sft", "sft"), write_run(tmp_path / "cma-ga", "cma-ga")
    out = tmp_path / "pics" / "both.png"
    r = CliRunner().invoke(main, ["plot", str(sft), str(ga), "--out", str(out), "--title", "demo"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"curves: {out}"
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    assert width >= 1000 and height >= 700  # 3 columns of readable panels
    one = CliRunner().invoke(main, ["plot", str(sft)])
    assert one.exit_code == 0 and (sft / "curves.png").is_file()
    several = CliRunner().invoke(main, ["plot", str(sft), str(ga)])
    assert several.exit_code == 2 and "with several runs, name the picture with --out FILE.png" in several.output
    missing = CliRunner().invoke(main, ["plot", str(tmp_path / "nope"), "--out", str(out)])
    assert missing.exit_code == 2 and "no metrics.jsonl there" in missing.output


def test_panels_come_from_the_entries(monkeypatch):
    """Every number an entry shows has its panel; a new entry's numbers get theirs with no change to curves.py."""
    import dataclasses

    from dskd_pipe.pipeline import methods
    from dskd_pipe.pipeline.curves import method_panels

    panels = {title: lines for title, lines, _ in method_panels()}
    for method in methods.METHODS.values():
        for shown in method.shown:
            assert shown.key in [key for key, _ in panels[shown.panel]], (method.name, shown.key)
    assert panels["D accuracy (real keys solid, fake queries dashed)"] == [("d_acc_real", "-"), ("d_acc_fake", "--")]
    mine = dataclasses.replace(methods.METHODS["sft"], name="mine", shown=(methods.Shown("wobble", "w", "Wobble"),))
    monkeypatch.setitem(methods.METHODS, "mine", mine)
    assert ("Wobble", [("wobble", "-")], "per token") in method_panels()
