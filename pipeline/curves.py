"""Training curves from a run's metrics.jsonl: `dskd-pipe plot RUN [RUN...] --out FILE.png` and distill's curves.png.

One small panel per quantity, every run overlaid in its own colour: the total loss, each loss term the runs logged
(student CE, the DSKD terms, KD, Soft-DTW), the projections' accuracies, CMA-GA's discriminator accuracies (real
keys solid, fake queries dashed) and generator loss L_G, the dev loss and dev ROUGE-L (one point per epoch), and the
learning rate. Training curves are drawn raw (faint) and smoothed (solid: a centred moving average over 4% of the
run), since one optimizer step's loss is noisy. Only panels that some run logged are drawn.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dskd_pipe.pipeline.config import ConfigError

METRICS = "metrics.jsonl"
CURVES = "curves.png"

# (panel title, [(metric key, line style)], y-axis label). The loss first, then each method's numbers as its entry
# shows them (pipeline/methods.py `Shown`), then these; a metric a run did not log is not drawn, and a panel none of
# the runs logged is left out.
LOSS_PANEL = ("loss (total)", [("loss", "-")], "per supervised token")
RUN_PANELS = [("dev loss", [("dev_loss", "-")], "nats / token"), ("dev ROUGE-L", [("dev_rouge_l", "-")], "x100"),
              ("learning rate", [("lr", "-")], "student lr")]


def method_panels() -> list[tuple[str, list[tuple[str, str]], str]]:
    """The panels of every method's shown numbers (built-in and installed entries), in registry order: numbers
    sharing a panel title are drawn in it together, the first solid, the next dashed."""
    from dskd_pipe.pipeline.methods import METHODS

    panels: dict[str, tuple[list[tuple[str, str]], str]] = {}
    for method in METHODS.values():
        for s in method.shown:
            lines, _ = panels.setdefault(s.panel, ([], s.unit))
            if s.key not in (key for key, _ in lines):
                lines.append((s.key, "-" if not lines else "--"))
    return [(title, lines, unit) for title, (lines, unit) in panels.items()]


EVAL_KEYS = ("dev_loss", "dev_rouge_l")  # logged once per epoch: points, not smoothed
SMOOTH_FROM = 30  # steps: a shorter run is drawn as it is (an average over a handful of steps would mislead)


@dataclass
class Run:
    """One run's metrics: `train` = one record per optimizer step, `dev` = one per evaluation."""

    label: str
    path: Path
    train: list[dict]
    dev: list[dict]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        records = self.dev if key in EVAL_KEYS else self.train
        xs, ys = [], []
        for r in records:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(float(r["step"]))
                ys.append(float(v))
        return xs, ys


def read_run(path: str | Path, label: str | None = None) -> Run:
    """A run folder (or its metrics.jsonl) -> Run; a clear error when there is nothing to draw."""
    path = Path(path)
    file = path / METRICS if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"{path}: no {METRICS} there (a distill output folder holds one).")
    train, dev = [], []
    lines = file.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if lineno == len(lines):
                continue  # a run killed mid-line leaves a partial last line: the steps before it still count
            raise ConfigError(f"{file} line {lineno}: not valid JSON.") from None
        if "step" not in record:
            continue
        (dev if any(k in record for k in EVAL_KEYS) else train).append(record)
    if not train and not dev:
        raise ConfigError(f"{file}: no steps logged yet.")
    return Run(label or (path.name if path.is_dir() else path.parent.name), path, train, dev)


def run_labels(paths: list[Path]) -> list[str]:
    """Folder names; where two are equal, the shortest distinct tails of their paths (a/s1/x, b/s1/x -> a/s1/x ...)."""
    parts = [Path(p).resolve().parts for p in paths]
    labels = []
    for i, p in enumerate(parts):
        for depth in range(1, len(p) + 1):
            tail = p[-depth:]
            if all(q[-depth:] != tail for j, q in enumerate(parts) if j != i):
                break
        labels.append("/".join(tail))
    return labels


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over `window` steps (fewer at the ends): no lag, unlike an exponential average,
    so a steep early drop stays where it happened."""
    half = max(0, window // 2)
    sums = [0.0]
    for v in values:
        sums.append(sums[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((sums[hi] - sums[lo]) / (hi - lo))
    return out


def panels_for(runs: list[Run]) -> list[tuple[str, list[tuple[str, str]], str]]:
    """The panels (LOSS_PANEL, method_panels, RUN_PANELS) that at least one of `runs` logged, in figure order."""
    return [(title, lines, unit) for title, lines, unit in [LOSS_PANEL, *method_panels(), *RUN_PANELS]
            if any(run.series(key)[0] for run in runs for key, _ in lines)]


def plot_runs(runs: list[Run], out: str | Path, title: str | None = None) -> Path:
    """Draw `runs` into one PNG at `out` (see the module docstring); returns the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install matplotlib (or pip install 'dskd-pipe[plot]').") \
            from None
    panels = panels_for(runs)
    cols = 3 if len(panels) > 4 else 2 if len(panels) > 1 else 1
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.3 * rows + 0.9), squeeze=False)  # + title, legend
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (panel_title, lines, unit) in zip(axes.flat, panels):
        for k, run in enumerate(runs):
            colour = colours[k % len(colours)]
            # earlier runs drawn wider, so a run whose curve equals a later one's still shows beneath it
            width, marker_size = max(1.2, 3.0 - 0.7 * k), max(3.0, 6.0 - 1.2 * k)
            for key, style in lines:
                xs, ys = run.series(key)
                if not xs:
                    continue
                if key in EVAL_KEYS or key == "lr" or len(xs) < SMOOTH_FROM:
                    ax.plot(xs, ys, style, color=colour, lw=width, marker="o" if len(xs) < 30 else None,
                            ms=marker_size)
                    continue
                ax.plot(xs, ys, style, color=colour, lw=0.8, alpha=0.28)
                ax.plot(xs, smooth(ys, max(3, len(xs) // 25)), style, color=colour, lw=width)  # window: 4% of the run
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if lines[0][0] == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=colours[k % len(colours)], lw=2) for k in range(len(runs))]
    height = fig.get_figheight()
    if title:
        fig.suptitle(title, y=1 - 0.1 / height, va="top", fontsize=12)
    legend_top = 1 - (0.4 if title else 0.05) / height
    if title and len(runs) == 1:  # the title names the one run
        legend_top = 1 - 0.05 / height
    else:
        fig.legend(handles, [r.label for r in runs], loc="upper center", ncol=min(len(runs), 4), frameon=False,
                   fontsize=10, bbox_to_anchor=(0.5, legend_top))
    fig.tight_layout(rect=(0, 0, 1, legend_top - 0.3 / height))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_paths(paths: list[str | Path], out: str | Path, title: str | None = None) -> Path:
    """`dskd-pipe plot`: read every run, label them by folder name, draw."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ConfigError("plot: name at least one run folder.")
    runs = [read_run(p, label) for p, label in zip(paths, run_labels([p if p.is_dir() else p.parent for p in paths]))]
    return plot_runs(runs, out, title)


__all__ = ["plot_paths", "plot_runs", "panels_for", "read_run", "run_labels", "smooth", "METRICS", "CURVES", "method_panels"]
