"""`dskd-pipe`: parses flags into a stage config and calls the stage's `run`. Flags override the config file."""
from __future__ import annotations

import os
import sys

import click

from dskd_pipe.pipeline.config import CacheConfig, ConfigError, DistillConfig, ScoreConfig, choices


def _choice(cls, name: str) -> click.Choice:
    """The flag's choices as declared on the config field (pipeline/config.py `option`)."""
    return click.Choice(choices(cls, name))


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
@click.option("--teacher", default=None, help="Teacher model: hub id or local folder.")
@click.option("--data", default=None, help="Training data: JSONL/JSON/Parquet file or datasets name.")
@click.option("--out", default=None,
              help="Store folder, or an fsspec URL (s3://bucket/path, gs://...; needs s3fs / gcsfs).")
@click.option("--limit", type=int, default=None, help="Use the first N usable records.")
@click.option("--skip-bad", is_flag=True, default=None, help="Skip (and count) malformed records.")
@click.option("--shard", default=None, help="I/N: this process writes part I of N.")
@click.option("--topk", type=int, default=None, help="Also store per-token top-k logits (0 = off).")
@click.option("--batch-tokens", type=int, default=None, help="Padded tokens per teacher forward.")
@click.option("--chunk-tokens", type=int, default=None,
              help="Rows per inner chunk, the unit of reads and checksums (default 32).")
@click.option("--shard-tokens", type=int, default=None, help="Rows per shard file, the unit of writes and resumes "
              "(default 8192; a multiple of --chunk-tokens).")
@click.option("--compression", type=_choice(CacheConfig, "compression"), default=None)
@click.option("--hidden-storage", type=_choice(CacheConfig, "hidden_storage"), default=None,
              help="Hidden states in the teacher's dtype (exact, default) or fp8: e4m3 with a scale per token, "
              "d_model + 4 bytes per token, near-exact logits (BENCHMARKS.md).")
@click.option("--device", default=None)
@click.option("--device-map", default=None, help="auto: one teacher spread over the node's GPUs by accelerate (a "
              "teacher larger than one GPU); one process.")
@click.option("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on GPU, fp32 on CPU).")
@click.option("--max-length", type=int, default=None)
@click.option("--max-prompt-length", type=int, default=None)
@click.option("--progress/--no-progress", default=None, help="The progress line (examples/s, tokens written, ETA).")
@click.option("--quiet", is_flag=True, default=None, help="Print only warnings and the final lines.")
@click.option("--trust-remote-code", is_flag=True, default=None)
def cache_teacher(config_path, **flags) -> None:
    """Run the teacher once over the data and write the teacher-state store."""
    from dskd_pipe.pipeline.config import CacheConfig, load_config
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
@click.option("--cache", default=None, help="Teacher-state store (offline distillation).")
@click.option("--sample-cache", "sample_caches", multiple=True, help="Store of student samples (on-policy); repeat "
              "for several. KD only: the student's CE stays on --cache's gold data.")
@click.option("--teacher", default=None, help="Teacher model run on the fly instead of --cache (online).")
@click.option("--student", default=None, help="Student model: hub id or local folder.")
@click.option("--method", default=None, help="sft, kd, dskd, dskd-cma, cma-ga, dskd-v2, dskd-v2-eta, dwa-kd, "
              "mined, uld, alm, chunk-attention, chunk-projection, or one an installed package adds: `dskd-pipe "
              "methods` lists them all (README \"Methods\").")
@click.option("--method-option", "method_options", multiple=True, help="NAME=VALUE: an option of the method's own "
              "(`dskd-pipe methods` lists them); repeat for several.")
@click.option("--data", default=None, help="Training data: the file the store was built from.")
@click.option("--out", default=None, help="Output folder: an HF model folder + projectors, metrics, checkpoints.")
@click.option("--dev-data", default=None, help="Dev set: dev loss (and --dev-rouge) each epoch keeps out/best.")
@click.option("--dev-rouge", is_flag=True, default=None, help="Also ROUGE-L on --dev-data each epoch (3 sampled "
              "passes, no_repeat_ngram 0, as published); the best epoch becomes the run's output.")
@click.option("--dev-rouge-greedy", is_flag=True, default=None, help="One greedy pass instead of the sampled ones.")
@click.option("--dev-rouge-passes", type=int, default=None, help="Sampled passes per dev evaluation (default 3).")
@click.option("--limit", type=int, default=None, help="Train on the first N examples.")
@click.option("--dev-limit", type=int, default=None, help="Evaluate on the first N dev examples (default 1000).")
@click.option("--skip-bad", is_flag=True, default=None)
@click.option("--epochs", type=int, default=None)
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (0 = the epochs decide).")
@click.option("--micro-batch-size", type=int, default=None)
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=None)
@click.option("--projector-lr", type=float, default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--warmup-steps", type=int, default=None)
@click.option("--max-grad-norm", type=float, default=None, help="0 = no clipping.")
@click.option("--kd-rate", type=float, default=None, help="lambda in (1-lambda) CE + lambda KD.")
@click.option("--kd-temperature", type=float, default=None)
@click.option("--divergence", type=click.Choice(["fkl", "rkl", "sfkl", "srkl", "js", "akl", "tvd"]), default=None)
@click.option("--lambda-ga", type=float, default=None, help="CMA-GA generator weight.")
@click.option("--ga-start-step", type=int, default=None, help="CMA-GA starts at this optimizer step.")
@click.option("--overlap-top-k", type=int, default=None, help="DSKDv2: ideal init from the first k shared tokens.")
@click.option("--report-to", "report_to", multiple=True, help="Also log the metrics to tensorboard (out/tensorboard), "
              "wandb (offline in out/wandb unless logged in), all (every installed one) or none; repeat or use commas.")
@click.option("--tensorboard", is_flag=True, default=None, help="Same as --report-to tensorboard.")
@click.option("--kd-warmup-steps", type=int, default=None, help="DWA-KD: linear ramp of KD_t2s (default 300; 0 = off).")
@click.option("--dtw-gamma-steps", type=int, default=None, help="DWA-KD: gamma 2.0 -> 0.8 over N steps, then held "
              "(default 3570; 0 = over the whole run).")
# Reference-mode choices (README "Fidelity"): the default first, then the released code's behaviour.
@click.option("--cma-std", type=_choice(DistillConfig, "cma_std"), default=None,
              help="DSKD-CMA stds over the teacher's real tokens (default) or the whole padded batch (released).")
@click.option("--same-vocab-teacher-temperature", is_flag=True, default=None,
              help="DSKD/DSKDv2: also divide the t2s target by --teacher-temperature (the release does not).")
@click.option("--teacher-temperature", type=float, default=None)
@click.option("--ga-mode", type=_choice(DistillConfig, "ga_mode"), default=None,
              help="CMA-GA: the paper's trained D (default) or the released code's fixed random D.")
@click.option("--v2-mean-weighting", type=_choice(DistillConfig, "v2_mean_weighting"), default=None,
              help="DSKDv2: weight per-micro-batch means by tokens (default) or equally (released).")
@click.option("--v2-agreement-threshold", type=float, default=None,
              help="DSKDv2: the released test that drops the agreement mask above this ratio (released: 1.0).")
@click.option("--eta-unmapped", type=_choice(DistillConfig, "eta_unmapped"), default=None,
              help="DSKDv2-ETA: drop teacher predictions with no student string (default) or train on unk (released).")
@click.option("--dwa-weights", type=_choice(DistillConfig, "dwa_weights"), default=None,
              help="DWA-KD student weights: rescale(H g) (paper eq. 12, default) or rescale(H) g (released).")
@click.option("--dtw-inputs", type=_choice(DistillConfig, "dtw_inputs"), default=None)
@click.option("--dtw-positions", type=_choice(DistillConfig, "dtw_positions"), default=None,
              help="DWA-KD Soft-DTW on response positions (default) or the first n from index 0 (released).")
@click.option("--dtw-reduction", type=_choice(DistillConfig, "dtw_reduction"), default=None)
@click.option("--kd-warmup-terms", type=_choice(DistillConfig, "kd_warmup_terms"), default=None)
@click.option("--disc-lr", type=float, default=None)
@click.option("--disc-every", type=int, default=None, help="CMA-GA: a discriminator update every k optimizer steps.")
# Options from the quality benchmark's diagnosis (BENCHMARKS.md), off by default.
@click.option("--t2s-kd-rows", type=_choice(DistillConfig, "t2s_kd_rows"), default=None,
              help="DSKD-CMA family: KD_t2s on the rows whose t2s argmax is right (default), on every row, or none.")
@click.option("--projector-warmup-steps", type=int, default=None,
              help="DSKD-CMA family: the first N steps train only the projectors on the KD terms (default 0).")
@click.option("--t2s-values", type=_choice(DistillConfig, "t2s_values"), default=None,
              help="DSKD-CMA family: t2s values from the teacher's hidden state and its gold target embedding "
              "(default, published) or from the hidden state alone.")
@click.option("--ga-directions", is_flag=True, default=None,
              help="CMA-GA: D judges the directions of keys and queries (each L2-normalised), not their norms.")
@click.option("--disc-spectral-norm", is_flag=True, default=None,
              help="CMA-GA: spectral normalisation on every linear layer of D.")
@click.option("--ga-reachable-keys", is_flag=True, default=None,
              help="CMA-GA: D sees each key projected onto the span the query projector can reach (what a query "
              "can match), not the whole key.")
@click.option("--alm-temperature", type=float, default=None, help="ALM: binarisation temperature (published 100).")
@click.option("--alm-debias", type=_choice(DistillConfig, "alm_debias"), default=None,
              help="ALM: chunks merged by the teacher's word-start probability and closed on a word start "
              "(space+merge, published), closed only (space), or the plain form (none).")
@click.option("--alm-merge-threshold", type=float, default=None,
              help="ALM space+merge: a merged chunk ends where the teacher's word-start probability exceeds this "
              "(0.1).")
@click.option("--alm-mean", type=_choice(DistillConfig, "alm_mean"), default=None,
              help="ALM: the mean over the merged chunks (default) or over the released code's count, merged twice.")
@click.option("--prefix-chars", type=int, default=None,
              help="prefix-kd: match the distributions over the next token's first N non-space bytes (default 1).")
@click.option("--prefix-temper", type=_choice(DistillConfig, "prefix_temper"), default=None,
              help="prefix-kd: --kd-temperature on the events' distribution (default) or on the token logits before "
              "they are summed by event.")
@click.option("--loss-balance", type=_choice(DistillConfig, "loss_balance"), default=None,
              help="alm, prefix-kd and compositions: combine the parts by --kd-rate (default) or by gradient "
              "magnitude on the student's last block (tokenkit's approx_gradmag_preserve_mag).")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps (0 = epoch ends only).")
@click.option("--resume", is_flag=True, default=None, help="Continue from the newest checkpoint in --out.")
@click.option("--init-from", default=None, help="Start from another run's last checkpoint (weights, optimizer, "
              "step): the next on-policy round.")
@click.option("--schedule-steps", type=int, default=None, help="Length of the LR schedule (0 = this run's steps).")
@click.option("--seed", type=int, default=None)
@click.option("--num-workers", type=int, default=None, help="DataLoader workers reading the store (-1 = auto, the "
              "default: 0 on CPU, on a GPU one per free core up to 8; README \"Keeping the GPU fed\").")
@click.option("--prefetch-factor", type=int, default=None, help="Micro-batches each worker prepares ahead (2).")
@click.option("--device", default=None)
@click.option("--dtype", default=None, help="bfloat16 (autocast, default on GPU) | float32.")
@click.option("--gradient-checkpointing", is_flag=True, default=None)
@click.option("--fsdp", is_flag=True, default=None, help="Under torchrun: FSDP2 (shards the student, its gradients "
              "and optimizer states across the processes) instead of DDP.")
@click.option("--lora-rank", type=int, default=None, help="> 0: LoRA on --lora-targets (needs peft).")
@click.option("--lora-alpha", type=float, default=None)
@click.option("--max-length", type=int, default=None)
@click.option("--max-prompt-length", type=int, default=None)
@click.option("--progress/--no-progress", default=None, help="The progress line (step, loss terms, tokens/s, "
              "ETA) on stderr: rewritten in place in a terminal, one plain line every few steps in a log.")
@click.option("--quiet", is_flag=True, default=None, help="Print only warnings and the final lines.")
@click.option("--trust-remote-code", is_flag=True, default=None)
def distill(config_path, **flags) -> None:
    """Train a student (SFT, KD, DSKD, DSKD-CMA, CMA-GA, DSKDv2, DWA-KD, MinED, ULD) from a store or a teacher."""
    from dskd_pipe.pipeline.config import DistillConfig, load_config
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


def _score_options(f):
    """Flags shared by `score` and `generate`; each overrides the config file when given."""
    for opt in reversed([
        click.option("--config", "config_path", default="score_default", show_default=True,
                     help="TOML/JSON config; the default is the published protocol (configs/score_default.toml)."),
        click.option("--limit", type=int, default=None, help="Use the first N usable records of each set (a set's "
                     "own NAME=PATH@N wins)."),
        click.option("--literal-n", type=_choice(ScoreConfig, "literal_n"), default=None,
                     help="Where a literal <n> is a newline: prompts and references (default), prompts only (the "
                     "released loaders), none."),
        click.option("--skip-bad", is_flag=True, default=None, help="Skip (and count) malformed records."),
        click.option("--greedy/--sample", default=None, help="Greedy decoding instead of sampling."),
        click.option("--temperature", type=float, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--top-k", type=int, default=None, help="0 = off."),
        click.option("--no-repeat-ngram-size", type=int, default=None, help="0 = off."),
        click.option("--max-new-tokens", type=int, default=None),
        click.option("--max-prompt-length", type=int, default=None),
        click.option("--batch-size", type=int, default=None, help="Prompts per generate call (sorted by length)."),
        click.option("--device", default=None),
        click.option("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)."),
        click.option("--progress/--no-progress", default=None, help="The progress line (examples/s, ETA) on stderr."),
        click.option("--quiet", is_flag=True, default=None, help="Print only warnings and the final lines."),
        click.option("--trust-remote-code", is_flag=True, default=None),
    ]):
        f = opt(f)
    return f


@main.command("score")
@click.option("--model", "models", multiple=True, help="Model (hub id, folder or NAME=PATH); repeat to compare.")
@click.option("--data", "data", multiple=True, help="Evaluation set (file or NAME=PATH, optionally @N: its first N "
              "records, e.g. unni=unni.jsonl@10000); repeat for several.")
@click.option("--out", default=None, help="Output folder (generations, report.json, report.md).")
@click.option("--seed", "seeds", type=int, multiple=True, help="Seeds, one pass each (default 10 20 30 40 50).")
@click.option("--in-domain", default=None, help="The in-distribution set (default: the first --data).")
@_score_options
def score(config_path, **flags) -> None:
    """ROUGE-L of one or more models on evaluation sets with the published protocol; resumable."""
    from dskd_pipe.pipeline.config import ScoreConfig, load_config
    from dskd_pipe.stages.score import run

    out = run(load_config(ScoreConfig, config_path, flags))
    click.echo((out / "report.md").read_text(), nl=False)
    click.echo(f"report: {out / 'report.md'}")


@main.command("generate")
@click.option("--model", default=None, help="Model whose responses become the targets (hub id or folder).")
@click.option("--data", default=None, help="Prompts: a data file (JSONL/JSON/Parquet) or datasets name.")
@click.option("--out", default=None, help="New JSONL data file: the records with output = the generation.")
@click.option("--seed", type=int, default=None, help="Sampling seed (default: the first seed of the config, 10).")
@_score_options
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
@click.option("--run", "run_dir", default=None, help="A dskd-cma or cma-ga distill output folder.")
@click.option("--cache", default=None, help="The teacher-state store the run was trained from.")
@click.option("--data", default=None, help="The data file the store was built from.")
@click.option("--out", default=None, help="Output folder: probe_report.json and heatmap PNGs.")
@click.option("--limit", type=int, default=None, help="Probe the first N store examples.")
@click.option("--heatmaps", default=None, help="Store example indices to draw, e.g. 0,3,7 (needs matplotlib).")
@click.option("--batch-size", type=int, default=None, help="1 (default) is exact per example.")
@click.option("--device", default=None)
def probe(config_path, run_dir, heatmaps, **flags) -> None:
    """Alignment accuracy and t2s attention heatmaps of a trained cross-model attention (DSKD-CMA, CMA-GA)."""
    from dskd_pipe.pipeline.config import ProbeConfig, load_config
    from dskd_pipe.stages.probe import run

    if heatmaps is not None:
        try:
            flags["heatmaps"] = tuple(int(x) for x in heatmaps.split(",") if x.strip())
        except ValueError:
            raise ConfigError(f"--heatmaps '{heatmaps}': expected example indices like 0,3,7.") from None
    flags["run"] = run_dir
    run(load_config(ProbeConfig, config_path, flags))


# --- on-policy (stages/on_policy.py) ---
@main.command("on-policy")
@click.option("--config", "config_path", default=None, help="TOML/JSON config (or an on_policy.json).")
@click.option("--distill", "distill_config", default=None, help="The distill config every round uses (method, "
              "student, data, cache = the gold store, hyper-parameters).")
@click.option("--out", default=None, help="Output folder: round-0/, round-1/, ...; a rerun keeps finished steps.")
@click.option("--teacher", default=None, help="Teacher for the sample stores (default: the gold store's).")
@click.option("--rounds", type=int, default=None, help="Refresh rounds after the first phase.")
@click.option("--share", type=float, default=None, help="Share of the gold prompts the student answers per round.")
@click.option("--start-epochs", type=int, default=None, help="Epochs on gold data before the first round.")
@click.option("--epochs-per-round", type=int, default=None)
@click.option("--temperature", type=float, default=None, help="Student sampling temperature.")
@click.option("--top-p", type=float, default=None)
@click.option("--max-new-tokens", type=int, default=None)
@click.option("--teacher-device", default=None, help="Device of the cache-teacher process (its own GPU if you like).")
@click.option("--teacher-dtype", default=None, help="Default: the gold store's dtype.")
@click.option("--nproc-per-node", type=int, default=None, help="Each round's distill under torchrun with N "
              "processes (global batch: micro-batch x accumulation x N).")
def on_policy(config_path, distill_config, **flags) -> None:
    """Distil in refresh rounds on the student's own samples (DSKDv2 on-policy), the teacher in its own process."""
    from dskd_pipe.pipeline.config import OnPolicyConfig, load_config
    from dskd_pipe.stages.on_policy import StepFailed, run

    flags["distill"] = distill_config
    try:
        student = run(load_config(OnPolicyConfig, config_path, flags))
    except StepFailed as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    click.echo(f"student: {student}")


if __name__ == "__main__":  # `torchrun ... -m dskd_pipe.pipeline.cli distill ...`
    main()
