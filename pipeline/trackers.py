"""`--report-to tensorboard|wandb|all|none`: a run's metrics also go to experiment trackers (the transformers / TRL
convention). metrics.jsonl is always written; trackers are extra views of the same records.

- tensorboard: scalars in OUT/tensorboard (`tensorboard --logdir OUT/tensorboard`). A resumed run purges the
  events after its checkpoint, so the curves have no doubled steps.
- wandb: optional (`pip install wandb`) and safe without a network. Unless WANDB_MODE says otherwise, the run is
  online only when wandb has credentials (`wandb login` or WANDB_API_KEY), else offline in OUT/wandb, to upload
  later with `wandb sync`. The run id is kept in OUT/wandb/run_id so that --resume continues the same run. If wandb
  cannot start (no network, a server error), the run goes on without it, with a warning.

Step records log as train/NAME, dev records as eval/NAME (dev_loss -> eval/loss), at the optimizer step.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from pathlib import Path

from dskd_pipe.pipeline.config import ConfigError

TRACKERS = ("tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name]) is not None


def resolve_report_to(report_to: tuple[str, ...] | list[str] | str = (), tensorboard: bool = False
                      ) -> tuple[str, ...]:
    """The trackers to open: names from --report-to (repeated or comma-separated; 'all' = every installed one,
    'none' = none) plus the older --tensorboard flag. Unknown names and missing packages are reported together."""
    if isinstance(report_to, str):
        report_to = (report_to,)
    names = [n.strip().lower() for value in report_to for n in str(value).split(",") if n.strip()]
    problems = [f"--report-to '{n}': choose from {', '.join(TRACKERS)}, all or none." for n in names
                if n not in (*TRACKERS, "all", "none")]
    if "none" in names and len(set(names)) > 1:
        problems.append("--report-to none cannot be combined with other trackers.")
    if problems:
        raise ConfigError("\n".join(problems))
    if "none" in names:
        return ()
    chosen = [t for t in TRACKERS if _installed(t)] if "all" in names else names
    if tensorboard:
        chosen.append("tensorboard")
    chosen = list(dict.fromkeys(chosen))
    missing = [t for t in chosen if not _installed(t)]
    if missing:
        raise ConfigError("\n".join(f"--report-to {t} needs the `{PACKAGES[t]}` package: pip install {PACKAGES[t]}"
                                    for t in missing))
    return tuple(chosen)


def tracker_values(record: dict) -> tuple[int, dict[str, float]] | None:
    """(step, {train/NAME or eval/NAME: value}) of a metrics record, or None when it has no step."""
    step = record.get("step")
    if not isinstance(step, int):
        return None
    dev = any(k.startswith("dev_") for k in record)
    values = {}
    for key, value in record.items():
        if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[f"eval/{key.removeprefix('dev_')}" if dev else f"train/{key}"] = float(value)
    return step, values


class TensorBoardTracker:
    """Scalars in `folder` through torch.utils.tensorboard (needs the `tensorboard` package)."""

    def __init__(self, folder: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at or after it (from the killed run past its checkpoint) are dropped
        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> str:
    """WANDB_MODE when set; else online with credentials, offline without (never an interactive login prompt)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    import wandb

    try:
        return "online" if wandb.login(prompt=False) else "offline"
    except Exception:  # a broken settings file must not stop training
        return "offline"


class WandbTracker:
    """A wandb run in `folder` (offline unless credentials exist); the id persists for --resume."""

    def __init__(self, folder: Path, name: str, config: dict, resume: bool, note=print):
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.mode = wandb_mode()
        # console="off": wandb must not wrap stdout/stderr (the progress line rewrites its own line);
        # silent: its banner lines would bury the progress line; the one line below says where the run is.
        settings = wandb.Settings(console="off", silent=True, init_timeout=60)
        # dir: wandb writes into dir/wandb, which is `folder`
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dskd-pipe"), name=name, id=run_id,
                              resume="allow", dir=str(folder.parent), config=config, mode=self.mode, settings=settings)
        where = self.run.url if self.mode == "online" else f"{folder} (upload: wandb sync {folder}/offline-run-*)"
        note(f"wandb: {self.mode} run {run_id}: {where}")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(names: tuple[str, ...], out: Path, config: dict, resume_step: int | None = None,
                  note=print, warn=None) -> list:
    """The trackers of `names` for the run in `out`. A tracker that fails to start is left out with a warning: a
    dashboard must never stop a training run (metrics.jsonl has every record)."""
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True))
    trackers = []
    for name in names:
        try:
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(out / "tensorboard", resume_step))
            elif name == "wandb":
                trackers.append(WandbTracker(out / "wandb", out.name, config, resume_step is not None, note))
        except Exception as e:  # wandb raises its own error types (network, auth, server)
            warn(f"--report-to {name} could not start ({' '.join(str(e).split())[:300]}); the run goes on "
                 "without it (metrics.jsonl has every record).")
    return trackers


__all__ = ["TRACKERS", "resolve_report_to", "open_trackers", "tracker_values", "TensorBoardTracker",
           "WandbTracker", "wandb_mode"]
