"""`dskd-pipe probe`: how well a trained DSKD-CMA / CMA-GA attention aligns the two tokenisations
(spec/cma_ga.md "Probes and heatmaps").

For each store example (in store order, the first --limit): the student tokenisation of the stored text is built
as in training, a_t2s is recomputed with the run's student and projectors (pipeline/probes.cma_attention), and
compared with the ground-truth chunks from the character offsets (pipeline/probes.chunk_alignment).

Output folder: probe_report.json (totals and one row per example), probe_config.json, heatmap_NNNNN.png for the
--heatmaps examples (only when matplotlib is installed: pip install 'dskd-pipe[plot]').
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from dskd_pipe.cache.paths import check_out_location
from dskd_pipe.pipeline.config import (ConfigError, DistillConfig, ProbeConfig, load_config, option_problems, require,
                                       save_config)
from dskd_pipe.pipeline.loader import Collate, Side, teacher_hidden
from dskd_pipe.pipeline.methods import METHODS
from dskd_pipe.pipeline.models import default_device, eos_token_id, load_causal_lm, load_tokenizer, pad_token_id
from dskd_pipe.pipeline.objectives.dskd import build_projectors
from dskd_pipe.pipeline.probes import alignment_counts, chunk_alignment, cma_attention, label_offsets
from dskd_pipe.pipeline.progress import quiet_libraries
from dskd_pipe.pipeline.run_folder import RESOLVED_CONFIG
from dskd_pipe.pipeline.student import student_forward
from dskd_pipe.pipeline.teacher import expected_fingerprints
from dskd_pipe.pipeline.training import load_safetensors


REPORT = "probe_report.json"


def load_run(run_dir: str, data: str) -> DistillConfig:
    """The run's resolved distill config, with --data as given (the store check compares its fingerprint)."""
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no {RESOLVED_CONFIG}; --run must be a dskd-pipe distill output folder.")
    dcfg = load_config(DistillConfig, path, {"data": data})
    saved = Path(run_dir) / "projectors.safetensors"
    no_attention = (f"{run_dir} was trained with --method {dcfg.method}, which has no cross-model attention (its "
                    "projectors have no query); probe a run of a DSKD-CMA method (dskd-cma, cma-ga, ...).")
    if not METHODS.get(dcfg.method) or METHODS[dcfg.method].build_parts is None:
        raise ConfigError(no_attention)
    if not saved.is_file():
        raise ConfigError(f"{run_dir}: no projectors.safetensors (unfinished run?). Probe a finished distill run.")
    with safe_open(str(saved), "pt") as f:
        if "query.weight" not in set(f.keys()):
            raise ConfigError(no_attention)
    return dcfg


def _token_labels(tokenizer, ids, offsets, text: str) -> list[str]:
    """Tick labels: the token's text span, or its vocabulary string when the span is empty (EOS)."""
    out = []
    for tid, (a, b) in zip(ids, offsets):
        s = text[a:b] if b > a else tokenizer.convert_ids_to_tokens(int(tid))
        out.append(str(s).replace("\n", "\\n").replace("$", r"\$"))
    return out


def draw_heatmap(path: Path, attn, chunks, student_tokens: list[str], teacher_tokens: list[str], title: str) -> bool:
    """t2s attention (student rows on y, teacher columns on x) with the ground-truth chunks outlined.
    False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        return False
    s, t = attn.shape
    fig = Figure(figsize=(max(4.0, 0.28 * t + 2), max(3.0, 0.28 * s + 1.5)))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(attn.numpy(), cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
    for i in range(s):  # chunks are blocks: outline each row's run of chunk columns
        cols = torch.nonzero(chunks[i]).flatten()
        if cols.numel():
            lo, hi = int(cols.min()), int(cols.max())
            ax.add_patch(Rectangle((lo - 0.5, i - 0.5), hi - lo + 1, 1, fill=False, edgecolor="red", linewidth=0.8))
    ax.set_xticks(range(t), teacher_tokens, rotation=90, fontsize=6)
    ax.set_yticks(range(s), student_tokens, fontsize=6)
    ax.set_xlabel("teacher tokens")
    ax.set_ylabel("student tokens")
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def _rate(num: float, n: int):
    return num / n if n else None


@quiet_libraries
def run(cfg: ProbeConfig) -> Path:
    require(cfg, "run", "cache", "data", "out")
    if problems := option_problems(cfg):
        raise ConfigError("\n".join(problems))
    check_out_location(cfg.out, ConfigError)
    dcfg = load_run(cfg.run, cfg.data)
    device = cfg.device or default_device()
    from dskd_pipe.cache.reader import open_store

    reader = open_store(cfg.cache, expected=expected_fingerprints(dcfg))
    n = len(reader) if cfg.limit is None else min(cfg.limit, len(reader))
    bad = [i for i in cfg.heatmaps if not 0 <= i < n]
    if bad:
        raise ConfigError(f"--heatmaps {','.join(map(str, bad))}: out of range; the probe covers examples 0-{n - 1} "
                          "of the store (raise --limit).")
    e = reader.embeddings()
    teacher_embed, embed_scale = e["weight"].to(device), float(e["embed_scale"])
    teacher_tok = reader.tokenizer()
    student_tok = load_tokenizer(cfg.run, trust_remote_code=dcfg.trust_remote_code)
    side = Side(student_tok, eos_token_id(student_tok), pad_token_id(student_tok), dcfg.max_prompt_length,
                dcfg.max_length)
    collate = Collate(side.pad_id, int(reader.manifest.pad_id))
    student = load_causal_lm(cfg.run, dtype=torch.float32, device=device, trust_remote_code=dcfg.trust_remote_code)
    ds = student.get_input_embeddings().weight.shape[1]
    projectors = build_projectors(ds, teacher_embed.shape[1], with_query=True)
    load_safetensors(projectors, Path(cfg.run) / "projectors.safetensors")
    projectors.to(device).eval()
    student_embed = student.get_input_embeddings().weight

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "probe_config.json")
    rows, heatmaps = [], []
    total_hits = total_mass = total_chance = 0.0
    total_n = 0
    want = set(cfg.heatmaps)
    for start in range(0, n, cfg.batch_size):
        items, records = [], []
        for i in range(start, min(n, start + cfg.batch_size)):
            rec = reader.read(i)
            s = side.encode(rec["prompt"], rec["response"])
            items.append({"example_id": i, "ids": [int(x) for x in rec["ids"]], "prompt_len": int(rec["prompt_len"]),
                          "hidden": rec["hidden"], "prompt": rec["prompt"], "response": rec["response"],
                          "student_ids": s.ids, "student_prompt_len": s.prompt_len})
            records.append((rec, s))
        batch = {k: v.to(device) for k, v in collate(items).items()}
        batch["teacher_hidden"] = teacher_hidden(batch)  # [B, T, dt], zeros on pads, as pipeline/probes.py takes
        with torch.no_grad():
            hs, _ = student_forward(student, batch)
            a_t2s = cma_attention(batch, hs, student_embed, teacher_embed, projectors, embed_scale,
                                  dcfg.cma_std).cpu()  # [B, S, T]
        ms, mt = (batch["labels"] != -100).cpu(), (batch["teacher_labels"] != -100).cpu()
        for b, (rec, s) in enumerate(records):
            i = int(rec["example_id"])
            # Label position k is token ids[k + 1]: its offsets are offsets[1:] (pipeline/probes.py).
            chunks = chunk_alignment(label_offsets(rec["offsets"]), label_offsets(s.offsets), mt[b], ms[b])  # [S,T]
            hits, mass, count = alignment_counts(a_t2s[b], chunks, ms[b])
            # Chance: the in-chunk mass of a uniform attention over the teacher response.
            rows_c = chunks[ms[b] & chunks.any(-1)].float()
            chance = float(rows_c.sum() / max(1, int(mt[b].sum())))
            total_hits, total_mass, total_n, total_chance = (total_hits + hits, total_mass + mass, total_n + count,
                                                             total_chance + chance)
            rows.append({"example_id": i, "student_tokens": int(ms[b].sum()), "teacher_tokens": int(mt[b].sum()),
                         "probed_tokens": count, "alignment_accuracy": _rate(hits, count),
                         "in_chunk_mass": _rate(mass, count), "uniform_in_chunk_mass": _rate(chance, count)})
            if i in want:
                text = rec["prompt"] + rec["response"]
                sm, tm = ms[b], mt[b]
                s_lab = _token_labels(student_tok, s.ids[1:], label_offsets(s.offsets).tolist(), text)
                t_lab = _token_labels(teacher_tok, rec["ids"][1:], label_offsets(rec["offsets"]).tolist(), text)
                s_keep = torch.nonzero(sm).flatten().tolist()
                t_keep = torch.nonzero(tm).flatten().tolist()
                sub = a_t2s[b][sm][:, tm]  # [Ns, Nt] response x response
                path = out / f"heatmap_{i:05d}.png"
                title = (f"{Path(cfg.run).name}: example {i}, t2s attention (accuracy "
                         f"{(hits / count if count else float('nan')):.2f}, in-chunk mass "
                         f"{(mass / count if count else float('nan')):.2f})")
                if draw_heatmap(path, sub, chunks[sm][:, tm], [s_lab[k] for k in s_keep], [t_lab[k] for k in t_keep],
                                title):
                    heatmaps.append(str(path))
                else:
                    print(f"heatmap of example {i} skipped: matplotlib is not installed "
                          "(pip install 'dskd-pipe[plot]').")
                    want = set()

    report = {"run": str(cfg.run), "cache": str(cfg.cache), "data": str(cfg.data), "method": dcfg.method,
              "examples": n, "probed_tokens": total_n,
              "alignment_accuracy": _rate(total_hits, total_n), "in_chunk_mass": _rate(total_mass, total_n),
              "uniform_in_chunk_mass": _rate(total_chance, total_n), "heatmaps": heatmaps, "per_example": rows}
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")

    def fmt(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    print(f"{cfg.run} ({dcfg.method}): {n} examples, {total_n} student response tokens with a chunk\n"
          f"  alignment accuracy (argmax in own chunk) {fmt(report['alignment_accuracy'])}\n"
          f"  in-chunk attention mass                 {fmt(report['in_chunk_mass'])} "
          f"(uniform attention: {fmt(report['uniform_in_chunk_mass'])})\n"
          f"  report: {out / REPORT}" + (f"; {len(heatmaps)} heatmap(s) in {out}" if heatmaps else ""))
    return out
