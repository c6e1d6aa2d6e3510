"""What a running stage prints: one progress line, notes, warnings, and silence from the libraries' own bars.

A stage builds one `Console` from its `progress` and `quiet` settings and prints through it:

- `console.bar(desc, total, unit)`: the stage's progress line. In a terminal it is one line rewritten in place
  (`distill cma-ga  step 12/40 30%  loss 3.214  ce 2.910 ...  812 tok/s  ETA 1m12s`); in a pipe or a CI log it
  is one plain line every `every` units (about 20 per run, and at least one a minute), so logs stay short.
- `console.note(msg)`: what happened on the way (resumed from, skipped records); stdout.
- `console.warn(msg)`: something the user should act on (examples cut at --max-length, empty generations); stderr,
  printed even with --quiet.
- `--quiet`: no progress line and no notes, only warnings and the stage's final lines (its result).

`quiet_libraries()` turns off the bars of transformers ("Loading weights", "Writing model shards"), datasets and
huggingface_hub for the duration of a stage: they would print several bars per checkpoint.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import IO, Callable

MODES = ("live", "lines", "off")
LINES_PER_RUN = 20  # plain-line mode: about this many lines over a whole run
LINE_INTERVAL_S = 60.0  # ... and one at least this often, for slow steps
LIVE_INTERVAL_S = 0.25  # live mode redraws at most 4 times a second


def choose_mode(progress: bool = True, quiet: bool = False, stream: IO | None = None) -> str:
    """'off' when asked for no progress; 'live' on a terminal; 'lines' in a pipe, a file or CI (CI=true)."""
    if quiet or not progress:
        return "off"
    stream = stream or sys.stderr
    tty = getattr(stream, "isatty", lambda: False)()
    if tty and os.environ.get("TERM", "") != "dumb" and not os.environ.get("CI"):
        return "live"
    return "lines"


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 2h10m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_rate(x: float) -> str:
    """3 significant digits: 7.54, 16, 812, 12.3k."""
    return format_number(x) if abs(x) >= 100 else f"{x:.3g}"


def format_number(x: float) -> str:
    """4 significant digits for small values, thousands as k / M for large counts: 3.214, 0.0123, 812, 12.3k."""
    if isinstance(x, str):
        return x
    ax = abs(x)
    if ax >= 1e6:
        return f"{x / 1e6:.1f}M"
    if ax >= 1e4:
        return f"{x / 1e3:.1f}k"
    if ax >= 100 or x == int(x) and ax >= 1:
        return f"{x:.0f}"
    return f"{x:.4g}" if ax >= 1e-3 or x == 0 else f"{x:.2e}"


class ProgressLine:
    """One progress line for `total` units of work (steps, examples), started at `initial` (a resumed run).

    `update(n, values, counts)`: n units done; `values` are shown as they are (latest loss terms, in the order
    given); `counts` are summed and shown with their rate (tokens written, tokens/s). The unit rate and the ETA
    come from the units done in this process, so a resumed run's ETA is right from its first step. `eta_count`
    (name, total still to do): the ETA follows that count instead of the units, for units of very unequal cost
    (cache-teacher's length-sorted examples: the long ones come last).
    """

    def __init__(self, desc: str, total: int, unit: str = "step", mode: str = "lines", initial: int = 0,
                 stream: IO | None = None, every: int | None = None, clock: Callable[[], float] = time.monotonic,
                 eta_count: tuple[str, float] | None = None):
        if mode not in MODES:
            raise ValueError(f"progress mode '{mode}': choose one of {', '.join(MODES)}")
        self.desc, self.total, self.unit, self.mode = desc, max(0, int(total)), unit, mode
        self.stream = stream or sys.stderr
        self.done = self.initial = int(initial)
        self.every = every or max(1, -(-self.total // LINES_PER_RUN))
        self.clock = clock
        self.start = self.last_draw = clock()
        self.values: dict[str, float | str] = {}
        self.counts: dict[str, float] = {}
        self.closed = False
        self.width = 0  # characters of the last live line, cleared on the next draw
        self.eta_count = eta_count

    def update(self, n: int = 1, values: dict | None = None, counts: dict | None = None) -> None:
        self.done += n
        if values:
            self.values = dict(values)
        for name, c in (counts or {}).items():
            self.counts[name] = self.counts.get(name, 0.0) + float(c)
        now = self.clock()
        if self.mode == "live" and (now - self.last_draw >= LIVE_INTERVAL_S or self.done >= self.total):
            self._draw_live(now)
        elif self.mode == "lines" and (self.done % self.every == 0 or self.done >= self.total
                                       or self.done - n == self.initial or now - self.last_draw >= LINE_INTERVAL_S):
            self._print(self.line(now))

    def describe(self, values: dict) -> None:
        """Show these values from the next update on (what is being worked on: model, set, seed)."""
        self.values = dict(values)

    def line(self, now: float | None = None, width: int | None = None) -> str:
        """The progress line as text (no terminal control characters). Within `width` characters the last values
        give way first, so the position, rates and ETA stay readable on a narrow terminal."""
        now = self.clock() if now is None else now
        elapsed = max(1e-9, now - self.start)
        ran = self.done - self.initial
        parts = [self.desc, f"{self.unit} {self.done}/{self.total}" +
                 (f" {100 * self.done / self.total:.0f}%" if self.total else "")]
        parts += [f"{k} {format_number(v)}" for k, v in self.values.items()]
        rates = []
        for name, c in self.counts.items():
            rates.append(f"{format_number(c)} {name} ({format_rate(c / elapsed)} {name}/s)")
        if ran > 0:
            per_s = ran / elapsed
            rates.append(f"{format_rate(per_s)} {self.unit}/s" if per_s >= 1 else
                         f"{format_duration(1 / per_s)}/{self.unit}")
            if self.total and self.done < self.total:
                left = (self.total - self.done) / per_s
                if self.eta_count and self.counts.get(self.eta_count[0]):
                    name, total = self.eta_count
                    left = max(0.0, total - self.counts[name]) / (self.counts[name] / elapsed)
                rates.append(f"ETA {format_duration(left)}")
            elif self.done >= self.total:
                rates.append(f"in {format_duration(elapsed)}")
        tail = ["|", "  ".join(rates)] if rates else []
        text = "  ".join(parts + tail)
        while width is not None and len(text) > width and len(parts) > 2:
            parts.pop()
            text = "  ".join(parts + ["…"] + tail)
        if width is not None and len(text) > width:
            text = text[:max(10, width - 1)] + "…"
        return text

    def _draw_live(self, now: float) -> None:
        # one character short of the terminal's width: a wrapped line cannot be rewritten in place
        text = self.line(now, width=shutil.get_terminal_size((120, 24)).columns - 1)
        self.stream.write("\r" + text + " " * max(0, self.width - len(text)))
        self.stream.flush()
        self.width = len(text)
        self.last_draw = now

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()
        self.last_draw = self.clock()

    def close(self) -> None:
        """End the line: a live line keeps its last state and moves to the next line; a plain log gets the last
        state if it was not printed yet."""
        if self.closed:
            return
        self.closed = True
        if self.mode == "live":
            self._draw_live(self.clock())
            self.stream.write("\n")
            self.stream.flush()
        elif self.mode == "lines" and self.done > self.initial and self.done % self.every and self.done < self.total:
            self._print(self.line())


def step_values(record: dict, shown) -> dict:
    """The progress-line values of one distill step record: the loss, then the method's numbers in the order its
    entry shows them (`shown`: methods.Shown records; those without a short name stay off the line). Numbers that
    share a short name show as one "a/b", as CMA-GA's discriminator accuracy on real keys / fake queries: "D
    0.52/0.48"."""
    values: dict = {"loss": record["loss"]} if "loss" in record else {}
    groups: dict[str, list[float]] = {}
    for s in shown:
        if s.short and s.key in record:
            groups.setdefault(s.short, []).append(record[s.key])
    for short, numbers in groups.items():
        values[short] = numbers[0] if len(numbers) == 1 else "/".join(f"{v:.2f}" for v in numbers)
    return values


@dataclass(frozen=True)
class Console:
    """Where a stage prints: its progress line, notes (stdout) and warnings (stderr)."""

    mode: str = "lines"  # "live" | "lines" | "off" (choose_mode)
    quiet: bool = False

    @classmethod
    def for_stage(cls, progress: bool = True, quiet: bool = False) -> "Console":
        return cls(choose_mode(progress, quiet), quiet)

    def bar(self, desc: str, total: int, unit: str = "step", initial: int = 0, every: int | None = None,
            eta_count: tuple[str, float] | None = None) -> ProgressLine:
        return ProgressLine(desc, total, unit, mode=self.mode, initial=initial, every=every, eta_count=eta_count)

    def note(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)


_BARS_OFF: list[bool] = []  # non-empty inside library_bars_off() while datasets was not imported at its start
_DATASETS_SILENCED: list[bool] = []  # datasets' bars turned off by silenced_datasets() inside such a block


def silenced_datasets():
    """`import datasets`, with its progress bars off when inside library_bars_off() (which undoes it at its end)."""
    import datasets

    if _BARS_OFF and datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
        _DATASETS_SILENCED.append(True)
    return datasets


def _datasets_bars_back_on() -> None:
    if _DATASETS_SILENCED:
        _DATASETS_SILENCED.clear()
        sys.modules["datasets"].enable_progress_bars()


@contextlib.contextmanager
def library_bars_off():
    """Inside: no progress bars from transformers, datasets or huggingface_hub; afterwards, as they were."""
    restore = []
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            restore.append(hf_logging.enable_progress_bar)
    # datasets only if something imported it already: importing it to silence it cost 1.6 s of every stage's
    # start (bench/fixed_cost.py), and a run from JSONL, Parquet or a store never imports it. A stage that loads a
    # `datasets` data set does so through silenced_datasets(), which silences it as it arrives.
    datasets = sys.modules.get("datasets")
    if datasets is not None and datasets.is_progress_bar_enabled():
        datasets.disable_progress_bars()
        restore.append(datasets.enable_progress_bars)
    elif datasets is None:
        restore.append(_datasets_bars_back_on)
        _BARS_OFF.append(True)
        restore.append(_BARS_OFF.pop)
    with contextlib.suppress(ImportError):
        from huggingface_hub import utils as hub_utils

        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            restore.append(hub_utils.enable_progress_bars)
    try:
        yield
    finally:
        for undo in restore:
            undo()


def quiet_libraries(stage: Callable) -> Callable:
    """Decorator for a stage's `run`: the libraries' bars are off while it runs."""

    @functools.wraps(stage)
    def run(*args, **kwargs):
        with library_bars_off():
            return stage(*args, **kwargs)

    return run


__all__ = ["Console", "ProgressLine", "step_values", "choose_mode", "format_duration", "format_number", "format_rate",
           "library_bars_off", "quiet_libraries"]
