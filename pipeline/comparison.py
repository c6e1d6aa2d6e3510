"""Comparing trained students over training seeds: mean ± std, paired differences to a baseline with a 95%
t-interval, the summary table and its plots (`dskd-pipe recipe`, `dskd-pipe demo`).

Metrics come in per model label and per evaluation set:
    nll_char   NLL of the gold responses, nats per character (pipeline/likelihood.py; lower is better, comparable
               across tokenizers)
    nll_token  the same per token of the model's own tokenizer (lower is better)
    rouge_l    ROUGE-L F1 x100 of sampled answers, mean over sampling seeds (stages/score.py; higher is better)
A method is compared with its baseline (sft on the same student tokenizer) seed by seed: d_s = m_s - sft_s, the
mean of d and its 95% interval mean ± t(0.975, n-1) * sd(d) / sqrt(n). "better" / "worse" when the interval
excludes 0 on that side, else "no measurable difference" (one seed: no interval, no verdict).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

METRICS = {"nll_char": ("NLL/char", "lower"), "nll_token": ("NLL/token", "lower"), "rouge_l": ("ROUGE-L", "higher")}
# t(0.975, df) for df = 1..30 (beyond: the normal 1.96 is within 4%).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_975(df: int) -> float:
    return T_975[df - 1] if 1 <= df <= len(T_975) else 1.96


def mean_std(values: list[float]) -> dict:
    """Mean and population std (numpy's default, ddof=0; 0 for one value) of the values: the spread over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def paired_difference(method: list[float], baseline: list[float], direction: str) -> dict:
    """Seed-by-seed differences method - baseline: mean, sample sd, 95% t-interval and a verdict."""
    d = [m - b for m, b in zip(method, baseline)]
    out = {"mean": statistics.fmean(d), "per_seed": d, "n": len(d)}
    if len(d) < 2:
        return {**out, "sd": None, "ci95": None, "verdict": None}
    sd = statistics.stdev(d)
    half = t_975(len(d) - 1) * sd / math.sqrt(len(d))
    lo, hi = out["mean"] - half, out["mean"] + half
    improves = hi < 0 if direction == "lower" else lo > 0
    hurts = lo > 0 if direction == "lower" else hi < 0
    return {**out, "sd": sd, "ci95": [lo, hi],
            "verdict": "better" if improves else "worse" if hurts else "no measurable difference"}


def summarise(values: dict[str, dict[str, dict[str, float]]], groups: dict[str, dict], seeds: list[int],
              sets: list[str]) -> dict:
    """values[label][metric/set] = number, for every trained label and reference model; groups[name] =
    {"labels": {seed: label} (or one label for a reference model), "kind": "reference" | "method",
    "baseline": group name or None, "tokenizer": text}. Returns the summary dict (see module docstring)."""
    rows = {}
    for name, g in groups.items():
        labels = g["labels"]
        keys = sorted({k for lab in labels.values() for k in values.get(lab, {})})
        cells = {}
        for key in keys:
            per = {str(s): values[lab][key] for s, lab in labels.items() if key in values.get(lab, {})}
            if per:
                cells[key] = {**mean_std(list(per.values())), "n": len(per), "per_seed": per}
        row = {"kind": g["kind"], "tokenizer": g.get("tokenizer", ""), "baseline": g.get("baseline"),
               "metrics": cells, "vs_baseline": {}}
        base = groups.get(g.get("baseline") or "")
        if base is not None and g["kind"] == "method":
            for key in keys:
                shared = [s for s in labels if s in base["labels"]
                          and key in values.get(labels[s], {}) and key in values.get(base["labels"][s], {})]
                if shared:
                    row["vs_baseline"][key] = paired_difference(
                        [values[labels[s]][key] for s in shared], [values[base["labels"][s]][key] for s in shared],
                        METRICS[key.split("/")[0]][1])
        rows[name] = row
    return {"training_seeds": seeds, "sets": sets, "rows": rows}


def _fmt(cell: dict | None, digits: int) -> str:
    if cell is None:
        return "-"
    return f"{cell['mean']:.{digits}f}" + (f" ± {cell['std']:.{digits}f}" if cell["n"] > 1 else "")


def _fmt_diff(diff: dict | None, digits: int) -> str:
    if diff is None:
        return ""
    text = f"{diff['mean']:+.{digits}f}"
    if diff.get("ci95"):
        lo, hi = diff["ci95"]
        text += f" [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    return text + {"better": " ✓", "worse": " ✗"}.get(diff.get("verdict") or "", "")


def markdown(summary: dict, header: str = "") -> str:
    """One table per evaluation set: a row per model, NLL/char and ROUGE-L with their paired differences to the
    baseline, NLL/token; then which methods beat their baseline and which do not."""
    lines = [header] if header else []
    rows = summary["rows"]
    for s in summary["sets"]:
        has_nll = any(f"nll_char/{s}" in r["metrics"] for r in rows.values())
        has_rouge = any(f"rouge_l/{s}" in r["metrics"] for r in rows.values())
        n = summary.get("sizes", {}).get(s)
        lines += ["", f"**{s}**" + (f" (n = {n})" if n else ""), ""]
        head = ["model", "tokenizer"]
        if has_nll:
            head += ["NLL/char", "Δ vs sft [95% CI]", "NLL/token"]
        if has_rouge:
            head += ["ROUGE-L", "Δ vs sft [95% CI]"]
        lines += ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
        for name, r in rows.items():
            m, v = r["metrics"], r["vs_baseline"]
            cells = [name, r["tokenizer"]]
            if has_nll:
                cells += [_fmt(m.get(f"nll_char/{s}"), 4), _fmt_diff(v.get(f"nll_char/{s}"), 4),
                          _fmt(m.get(f"nll_token/{s}"), 4)]
            if has_rouge:
                cells += [_fmt(m.get(f"rouge_l/{s}"), 2), _fmt_diff(v.get(f"rouge_l/{s}"), 2)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *verdict_lines(summary)]
    return "\n".join(lines).strip("\n") + "\n"


def verdict_lines(summary: dict) -> list[str]:
    """Plain sentences: per metric of the first set, which methods beat their baseline and which do not."""
    out = []
    first = summary["sets"][0] if summary["sets"] else None
    for metric in ("nll_char", "rouge_l"):
        key = f"{metric}/{first}"
        verdicts: dict[str, list[str]] = {}
        for name, r in summary["rows"].items():
            d = r["vs_baseline"].get(key)
            if d is not None and d.get("verdict"):
                verdicts.setdefault(d["verdict"], []).append(f"{name} (vs {r['baseline']})")
        if not verdicts:
            continue
        label, direction = METRICS[metric]
        out.append(f"{label} on {first} ({direction} is better; paired 95% interval over training seeds): "
                   + "; ".join(f"{v}: {', '.join(names)}" for v, names in
                               sorted(verdicts.items(), key=lambda kv: ["better", "no measurable difference",
                                                                        "worse"].index(kv[0]))) + ".")
    return out


def dev_curves(curves: dict[str, dict[int, list[float]]], path: Path, ylabel: str) -> bool:
    """curves[group][step] = values over seeds -> one line (mean) with a band (min..max) per group; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10").colors
    for i, (name, points) in enumerate(curves.items()):
        steps = sorted(points)
        if not steps:
            continue
        # Ten colours, then the same colours dashed, then dotted: no two groups share a line (a recipe has 12).
        color, style = colors[i % 10], ("-", "--", ":")[i // 10 % 3]
        mean = [statistics.fmean(points[s]) for s in steps]
        ax.plot(steps, mean, label=name, color=color, linestyle=style, marker="." if len(steps) < 30 else None)
        if any(len(points[s]) > 1 for s in steps):
            ax.fill_between(steps, [min(points[s]) for s in steps], [max(points[s]) for s in steps], alpha=0.15,
                            color=color)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title("dev loss per method (mean over training seeds, band: min-max)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def bar_chart(summary: dict, path: Path, set_name: str) -> bool:
    """NLL/char and ROUGE-L per model (mean over training seeds, error bars: std), the reference models as
    dashed lines; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(m, f"{m}/{set_name}") for m in ("nll_char", "rouge_l")
              if any(f"{m}/{set_name}" in r["metrics"] for r in summary["rows"].values())]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (metric, key) in zip(axes[0], panels):
        methods = [(n, r) for n, r in summary["rows"].items() if r["kind"] == "method" and key in r["metrics"]]
        xs = range(len(methods))
        ax.bar(xs, [r["metrics"][key]["mean"] for _, r in methods], yerr=[r["metrics"][key]["std"] for _, r in methods],
               capsize=3, color=["tab:gray" if r["baseline"] is None else "tab:blue" for _, r in methods])
        for (n, r), ls in zip([(n, r) for n, r in summary["rows"].items() if r["kind"] == "reference"
                               and key in r["metrics"]], ("--", ":", "-.", "--")):
            ax.axhline(r["metrics"][key]["mean"], ls=ls, color="k", lw=1, label=n)
        ax.set_xticks(list(xs), [n for n, _ in methods], rotation=45, ha="right", fontsize=8)
        label, direction = METRICS[metric]
        ax.set_title(f"{label} on {set_name} ({direction} is better)")
        values = [r["metrics"][key]["mean"] for _, r in methods]
        if metric.startswith("nll") and values:
            lo, hi = min(values), max(values)
            refs = [r["metrics"][key]["mean"] for r in summary["rows"].values() if r["kind"] == "reference"
                    and key in r["metrics"]]
            low = min([lo, *[x for x in refs if x < lo]])
            ax.set_ylim(max(0.0, low - 0.15 * (hi - low + 1e-9)), hi + 0.25 * (hi - low + 1e-9))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(summary: dict, folder: Path, table: str) -> None:
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.md").write_text(table)
