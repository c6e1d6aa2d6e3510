"""What training stages share: seeding, AdamW parameter groups, the cosine schedule, checkpoints, metrics.

A checkpoint is a folder `step-NNNNNNNN/` holding the student (save_pretrained, safetensors), the extra modules
(projectors, discriminator) as safetensors, optimizer and scheduler state dicts, RNG states and the trainer state
(step, epoch, data position). It is written under a temporary name and renamed, so a killed run never leaves a
half checkpoint that looks finished. Everything is loaded with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch


CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def rng_state() -> dict:
    """Python, numpy, torch and CUDA RNG states as plain data and tensors (loadable with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["internal"].tolist()), p["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases and norm weights (1-D tensors) take no weight decay."""
    lname = name.lower()
    return param.ndim < 2 or lname.endswith(".bias") or "norm" in lname or ".ln_" in lname


def param_groups(student: torch.nn.Module, lr: float, weight_decay: float,
                 extra: list[tuple[torch.nn.Module, float]] = ()) -> list[dict]:
    """AdamW groups: the student's trainable parameters at `lr`, each extra module at its own lr; no weight decay
    on biases and norms. Empty groups are left out. Group order is fixed, so optimizer state restores by position."""
    groups = []
    for name, module, group_lr in [("student", student, lr)] + [(f"extra{i}", m, g) for i, (m, g) in enumerate(extra)]:
        decay, no_decay = [], []
        for pname, p in module.named_parameters():
            if p.requires_grad:
                (no_decay if _no_decay(pname, p) else decay).append(p)
        for params, wd, tag in ((decay, weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
            if params:
                groups.append({"params": params, "lr": group_lr, "weight_decay": wd, "name": f"{name}/{tag}"})
    return groups


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    min_lr: float = 1e-7) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0, then cosine decay from each group's lr to `min_lr` at `total_steps`."""

    def factor(base_lr: float):
        floor = min(min_lr / base_lr, 1.0) if base_lr > 0 else 0.0

        def f(step: int) -> float:
            if warmup_steps and step < warmup_steps:
                return (step + 1) / warmup_steps
            span = max(1, total_steps - warmup_steps)
            progress = min(1.0, (step - warmup_steps) / span)
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g["lr"]) for g in optimizer.param_groups])


def save_safetensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def load_safetensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))


def save_checkpoint(run_dir: Path, step: int, *, student, modules: dict, optimizers: dict, scheduler,
                    trainer_state: dict, keep: int = 2) -> Path:
    """Write `run_dir/checkpoints/step-N` atomically; keep the newest `keep` checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    student.save_pretrained(tmp / "student", safe_serialization=True)
    for name, module in modules.items():
        if module is not None:
            save_safetensors(module, tmp / f"{name}.safetensors")
    for name, opt in optimizers.items():
        if opt is not None:
            torch.save(opt.state_dict(), tmp / f"optimizer_{name}.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({**trainer_state, "rng": rng_state()}, tmp / TRAINER_STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)
                  and (p / TRAINER_STATE).is_file())


def load_checkpoint(folder: Path, *, modules: dict, optimizers: dict, scheduler) -> dict:
    """Restore modules, optimizers, scheduler and RNG states in place; return the trainer state."""
    folder = Path(folder)
    for name, module in modules.items():
        if module is not None:
            load_safetensors(module, folder / f"{name}.safetensors")
    for name, opt in optimizers.items():
        if opt is not None:
            opt.load_state_dict(torch.load(folder / f"optimizer_{name}.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    state = torch.load(folder / TRAINER_STATE, weights_only=True)
    set_rng_state(state.pop("rng"))
    return state


def peek_trainer_state(folder: Path) -> dict:
    """The trainer state of a checkpoint (step, epoch, position, ...) without restoring anything."""
    state = torch.load(Path(folder) / TRAINER_STATE, weights_only=True)
    state.pop("rng", None)
    return state


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temporary name and rename: a reader sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class MetricsLogger:
    """One JSON line per optimizer step, flushed at once (a killed run keeps every finished step); the same records
    go to the experiment trackers of --report-to (pipeline/trackers.py)."""

    def __init__(self, path: Path, enabled: bool = True, truncate_after_step: int | None = None,
                 trackers: list | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.trackers = list(trackers or []) if enabled else []
        if enabled and truncate_after_step is not None and self.path.exists():
            # On resume, drop lines of steps after the checkpoint: they will be written again.
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= truncate_after_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif enabled and truncate_after_step is None:
            self.path.write_text("")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({**clean, "time": round(time.time(), 3)}) + "\n")
        if self.trackers:
            from dskd_pipe.pipeline.trackers import tracker_values

            step_values = tracker_values(clean)
            if step_values is not None:
                for tracker in self.trackers:
                    tracker.log(*step_values)

    def close(self) -> None:
        """Finish the trackers (a wandb run is marked finished, TensorBoard files are closed)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
