"""What training stages share: seeding, AdamW parameter groups, the cosine schedule, checkpoints, metrics.

A checkpoint is a folder `step-NNNNNNNN/` holding the trained module (student, projectors, discriminator) and the
optimizer states through torch.distributed.checkpoint (sharded as trained: a run saved by N processes resumes on
M), each process's RNG states and the trainer state (step, epoch, data position, scheduler). It is written under a
temporary name and renamed, so a killed run never leaves a half checkpoint that looks finished. Everything is
loaded with `torch.load(weights_only=True)` or DCP (tensors only). The run's final outputs are ordinary
safetensors folders (stages/distill.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dskd_pipe.pipeline.distributed import Processes, all_reduce_sum, barrier

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


class CheckpointError(OSError):
    """A checkpoint could not be written (a full disk) or read (another version, another model)."""


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen parameters (a LoRA student's base model) come from --student on every start: not stored.
    return StateDictOptions(ignore_frozen_params=True, **kw)


def _training_state(model: torch.nn.Module, optimizers: dict) -> dict:
    """{"model": ..., "optimizer_NAME": ...} as torch.distributed.checkpoint sees them: keyed by parameter names,
    sharded tensors (FSDP2's DTensors) kept sharded, so a state saved by N processes loads into M."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model, options=_state_options())}
    for name, opt in optimizers.items():
        if opt is not None:
            state[f"optimizer_{name}"] = get_optimizer_state_dict(model, opt, options=_state_options())
    return state


def _state_bytes(state) -> int:
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_state_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _newest_file(folder: Path) -> Path:
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else Path(folder)


def _no_space(where: Path, needed: int, free: int) -> CheckpointError:
    return CheckpointError(f"{where}: no space left for the checkpoint (about {_gib(needed)} needed, {_gib(free)} "
                           "free). Free some space and run the same command with --resume: it continues from the "
                           "last complete checkpoint.")


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, optimizers: dict, scheduler,
                    trainer_state: dict, procs: Processes = Processes(), keep: int = 2) -> Path:
    """Write `run_dir/checkpoints/step-N` atomically; keep the newest `keep` checkpoints. Every process calls it.

    state/: the trained module and the optimizers through torch.distributed.checkpoint (each process writes its
    shards; `model` is the module as trained: plain, DDP or FSDP2); rng-R.pt: each process's RNG states;
    trainer_state.pt (written last, by rank 0): step, epoch, data position, the scheduler, the number of processes.
    Everything goes to a temporary folder renamed when complete, so a killed run or a full disk never leaves a
    half checkpoint that looks finished. A disk without room for it (checked first, and any failed write on a
    disk left without room) raises CheckpointError naming the file and the space needed; the temporary folder
    is removed and the earlier checkpoints stay.
    """
    import torch.distributed.checkpoint as dcp

    rank, world = procs.rank, procs.world
    root = Path(run_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(procs)
    state = _training_state(model, optimizers)
    # Every process's shards, plus 1% and 1 MiB for the metadata, RNG and trainer files (a shared folder).
    needed = int(_sum_over_processes(_state_bytes(state), procs) * 1.01) + 2**20
    failed: CheckpointError | None = None
    free = shutil.disk_usage(root).free
    if free < needed:
        failed = _no_space(final, needed, free)
    else:
        try:
            with _one_process_quiet(world):
                dcp.save(state, checkpoint_id=str(tmp / "state"), no_dist=world == 1)
            torch.save(rng_state(), tmp / f"rng-{rank}.pt")
            barrier(procs)
            if rank == 0:
                torch.save({**trainer_state, "scheduler": scheduler.state_dict(), "world": world},
                           tmp / TRAINER_STATE)
        except Exception:  # a full disk surfaces as OSError, or as RuntimeError from torch's zip writer
            free = shutil.disk_usage(root).free
            if free >= 2**20 and free >= needed - _folder_bytes(tmp):
                raise
            failed = _no_space(_newest_file(tmp), needed, free)
    if _sum_over_processes(failed is not None, procs):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier(procs)
        raise failed or CheckpointError(f"{final}: another process found no space for its part of the checkpoint "
                                        "(its message names the file). Free some space and run the same command "
                                        "with --resume.")
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(procs)
    return final


@contextlib.contextmanager
def _one_process_quiet(world: int):
    """DCP warns that it works "in a single process" each time it does; with one process that is what was asked."""
    with warnings.catch_warnings():
        if world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _sum_over_processes(n: int, procs: Processes) -> int:
    return int(all_reduce_sum(torch.tensor([int(n)], dtype=torch.int64, device=procs.device), procs))


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)
                  and (p / TRAINER_STATE).is_file())


def load_checkpoint(folder: Path, *, model: torch.nn.Module, optimizers: dict, scheduler,
                    procs: Processes = Processes(), restore_rng: bool = True) -> dict:
    """Restore the trained module, the optimizers, the scheduler and this process's RNG states in place (every
    process calls it, with any number of processes); return the trainer state (step, epoch, position, ...).

    `model` as in save_checkpoint. A process without its own RNG file (more processes than at saving) keeps its
    seeded RNG.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = Path(folder)
    if not (folder / "state").is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint of this dskd-pipe version (no state/ folder). Finish that "
                              "run with the version that started it, or start again in another --out.")
    state = _training_state(model, optimizers)
    stored = set(dcp.FileSystemReader(str(folder / "state")).read_metadata().state_dict_metadata)
    missing = [k for k in _flat_keys(state["model"], "model") if k not in stored]
    if missing:
        raise CheckpointError(f"{folder / 'state'}: does not fit this run's model (no {missing[0]}, "
                              f"{len(missing)} missing). Resume with the same --student, --method and LoRA settings.")
    # Parameters that had no optimizer state when saved (no gradient yet) get none now either.
    without_state = {k.split(".state.", 1)[1].rsplit(".", 1)[0] for k in _flat_keys(state, "")
                     if ".state." in k and k.lstrip(".") not in stored}
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    try:
        with _one_process_quiet(procs.world):
            dcp.load(state, checkpoint_id=str(folder / "state"), no_dist=procs.world == 1,
                     planner=DefaultLoadPlanner(allow_partial_load=True))
    except Exception as e:  # DCP wraps a shape mismatch in its own exception types
        raise CheckpointError(f"{folder / 'state'}: does not fit this run's model ({str(e).splitlines()[0][:300]}). "
                              "Resume with the same --student, --method and LoRA settings.") from None
    set_model_state_dict(model, state["model"], options=_state_options(strict=False))
    params = {_canonical(n): p for n, p in model.named_parameters()}
    for name, opt in optimizers.items():
        if opt is not None:
            set_optimizer_state_dict(model, opt, state[f"optimizer_{name}"], options=_state_options())
            for fqn in without_state:
                if fqn in params:
                    opt.state.pop(params[fqn], None)
    trainer = torch.load(folder / TRAINER_STATE, weights_only=True)
    scheduler.load_state_dict(trainer.pop("scheduler"))
    trainer.pop("world", None)
    rng = folder / f"rng-{procs.rank}.pt"
    if restore_rng and rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    return trainer


def _flat_keys(tree, prefix: str) -> list[str]:
    """DCP's flattened keys ("model.student.fc.weight", "optimizer_student.state.proj.bias.exp_avg")."""
    if isinstance(tree, dict):
        return [k for key, v in tree.items() for k in _flat_keys(v, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(tree, (list, tuple)):
        return [k for i, v in enumerate(tree) for k in _flat_keys(v, f"{prefix}.{i}")]
    return [prefix]


def _canonical(name: str) -> str:
    """A parameter name as DCP's state dicts write it: without DDP's "module." or checkpoint wrappers' prefixes."""
    for wrapper in ("module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def peek_trainer_state(folder: Path) -> dict:
    """The trainer state of a checkpoint (step, epoch, position, ...) without restoring anything."""
    state = torch.load(Path(folder) / TRAINER_STATE, weights_only=True)
    for key in ("rng", "scheduler", "world"):
        state.pop(key, None)
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
