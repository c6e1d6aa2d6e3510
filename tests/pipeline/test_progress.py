import io

import pytest

from dskd_pipe.pipeline.progress import (Console, ProgressLine, choose_mode, format_duration, format_number,
                                         library_bars_off)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_mode_follows_the_stream_ci_and_flags(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert choose_mode(True, False, Tty()) == "live"
    assert choose_mode(True, False, io.StringIO()) == "lines"  # a pipe or a file
    assert choose_mode(False, False, Tty()) == "off" and choose_mode(True, True, Tty()) == "off"
    monkeypatch.setenv("CI", "true")
    assert choose_mode(True, False, Tty()) == "lines"


def test_plain_lines_every_n_steps_with_terms_rate_and_eta():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressLine("distill cma-ga", total=40, unit="step", mode="lines", stream=out, clock=clock)
    for step in range(40):
        clock.t += 0.5
        bar.update(1, values={"loss": 3.2144, "ce": 2.9, "kd_t2s": 0.01234, "D real/fake": "0.52/0.48"},
                   counts={"tok": 800})
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 21  # the first step, then every 2 steps (40 / 20 lines)
    assert lines[0].startswith("distill cma-ga  step 1/40 2%  loss 3.214  ce 2.9  kd_t2s 0.01234  D real/fake "
                               "0.52/0.48  |  800 tok (1600 tok/s)  2 step/s  ETA 20s")
    assert lines[1].startswith("distill cma-ga  step 2/40 5%")
    assert lines[-1].startswith("distill cma-ga  step 40/40 100%") and lines[-1].endswith("2 step/s  in 20s")


def test_plain_lines_at_least_once_a_minute_and_the_last_state_at_close():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressLine("cache-teacher part 0/1", total=1000, unit="ex", mode="lines", stream=out, clock=clock)
    bar.update(1)  # first: printed
    clock.t += 61
    bar.update(1)  # 2 % 50 != 0 but a minute passed: printed
    clock.t += 1
    bar.update(1)  # not printed
    bar.close()  # the stage stopped early: its last state is printed
    lines = out.getvalue().splitlines()
    assert [ln.split("  ")[1] for ln in lines] == ["ex 1/1000 0%", "ex 2/1000 0%", "ex 3/1000 0%"]
    assert "/ex" in lines[1]  # slower than one a second: seconds per example


def test_live_line_is_rewritten_in_place_and_ends_with_one_newline():
    out, clock = Tty(), FakeClock()
    bar = ProgressLine("score", total=3, unit="ex", mode="live", stream=out, clock=clock)
    for _ in range(3):
        clock.t += 1
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n") and text.count("\r") >= 3
    assert text.rstrip().split("\r")[-1].startswith("score  ex 3/3 100%")


def test_a_resumed_run_counts_its_eta_from_its_own_steps():
    out, clock = io.StringIO(), FakeClock()
    bar = ProgressLine("distill sft", total=100, initial=90, mode="lines", stream=out, clock=clock, every=1)
    clock.t += 2
    bar.update(1)
    assert "step 91/100 91%" in out.getvalue() and "ETA 18s" in out.getvalue()


def test_off_prints_nothing_and_quiet_keeps_warnings_only(capsys):
    console = Console.for_stage(progress=True, quiet=True)
    bar = console.bar("distill", 5)
    for _ in range(5):
        bar.update(1, values={"loss": 1.0})
    bar.close()
    console.note("resuming from step 3")
    console.warn("3 of 40 examples cut at --max-length 64")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "warning: 3 of 40 examples cut at --max-length 64\n"


def test_number_and_duration_formats():
    assert [format_number(x) for x in (3.21449, 0.012345, 812.4, 12345.0, 2.5e6, 0.0, 1e-5, 7.0)] == [
        "3.214", "0.01235", "812", "12.3k", "2.5M", "0", "1.00e-05", "7"]
    assert [format_duration(s) for s in (4.4, 185, 7800)] == ["4s", "3m05s", "2h10m"]


def test_library_bars_are_off_inside_and_restored_after():
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with library_bars_off():
        assert not hf_logging.is_progress_bar_enabled()
        assert not datasets.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled()
    assert hf_logging.is_progress_bar_enabled() and datasets.is_progress_bar_enabled()
    assert not hub_utils.are_progress_bars_disabled()


def test_a_narrow_terminal_drops_the_last_values_first_and_keeps_the_eta():
    clock = FakeClock()
    bar = ProgressLine("distill cma-ga", total=10, mode="lines", stream=io.StringIO(), clock=clock)
    clock.t += 4
    bar.update(2, values={"loss": 3.2, "ce": 2.9, "kd_t2s": 0.4, "kd_s2t": 0.2, "l_g": 0.69})
    full = bar.line()
    assert full == ("distill cma-ga  step 2/10 20%  loss 3.2  ce 2.9  kd_t2s 0.4  kd_s2t 0.2  l_g 0.69  |  "
                    "2s/step  ETA 16s")
    expected = "distill cma-ga  step 2/10 20%  loss 3.2  ce 2.9  …  |  2s/step  ETA 16s"
    assert bar.line(width=len(expected)) == expected
    assert len(bar.line(width=30)) == 30 and bar.line(width=30).startswith("distill cma-ga  step 2/10")


def test_step_values_show_what_the_entry_shows():
    """The progress line's terms come from the method's entry (methods.Shown), in its order; shared short names
    join as a/b (CMA-GA's discriminator accuracies)."""
    from dskd_pipe.pipeline.methods import METHODS, Shown
    from dskd_pipe.pipeline.progress import step_values

    record = {"loss": 1.5, "ce_student": 1.0, "ce_t2s": 2.0, "kd_t2s": 0.5, "kd_s2t": 0.25, "t2s_acc": 0.5,
              "s2t_acc": 0.5, "l_g": 0.7, "d_acc_real": 0.52, "d_acc_fake": 0.48, "l_d": 1.3, "lr": 1e-4}
    values = step_values(record, METHODS["cma-ga"].shown)
    assert values == {"loss": 1.5, "ce": 1.0, "ce_t2s": 2.0, "kd_t2s": 0.5, "kd_s2t": 0.25, "l_g": 0.7,
                      "D": "0.52/0.48"}
    assert step_values(record, METHODS["sft"].shown) == {"loss": 1.5, "ce": 1.0}
    assert step_values({"loss": 1.0, "mine": 3.0}, (Shown("mine", "m", "my term"),)) == {"loss": 1.0, "m": 3.0}
    assert list(step_values({"loss": 1, "alm": 2, "prefix_kd": 3, "ce_student": 4},
                            METHODS["alm+prefix-kd"].shown)) == ["loss", "ce", "alm", "prefix_kd"]
