"""What training stages share: seeding, AdamW parameter groups, the cosine schedule, checkpoints, metrics.

A checkpoint is a folder `step-NNNNNNNN/` holding the trained module (student, projectors, discriminator) and the
optimizer states through torch.distributed.checkpoint (sharded as trained: a run saved by N processes resumes on
M), and trainer_state.json (step, epoch, data position, scheduler, and the size of every file of the checkpoint). It is
written under a temporary name and renamed, so a killed run never leaves a half checkpoint that looks finished; a file
cut short later (a copy, a full disk) is found by its size, and the run resumes from the previous checkpoint.

Loading runs no code from the folder: DCP's tensors are read with `torch.load(weights_only=True)`, its other values
likewise (`_SafePlanner`), its pickled metadata with an unpickler that admits only DCP's own metadata classes
(`_MetadataUnpickler`), and the trainer state is JSON. No RNG state is stored: every random draw of a micro-batch
comes from (seed, step, micro-batch index) (`micro_batch_seed`). The run's final outputs are ordinary safetensors
folders (stages/distill.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from torch.distributed.checkpoint.api import CheckpointException

from dskd_pipe.cache.paths import bad_name, links_leaving
from dskd_pipe.pipeline.distributed import Processes, all_reduce_sum, barrier

CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"  # written last: a checkpoint without it is unfinished
OLD_TRAINER_STATE = "trainer_state.pt"  # checkpoints of dskd-pipe before issue 24 (pickles): named, never loaded


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The RNG seed of micro-batch `index` (counted over all processes) of optimizer step `step`. Every random draw
    of a micro-batch (dropout) comes from these three numbers alone, not from the process that runs it or from what
    ran before, so 1 process x k micro-batches, N processes x k/N and a resumed run draw the same masks."""
    digest = hashlib.sha256(f"dskd-pipe/{seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def rng_state() -> dict:
    """Python, numpy, torch and CUDA RNG states (kept in memory around an evaluation; never written)."""
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


class TrainingDiverged(ArithmeticError):
    """A loss term, a gradient or the weights are no longer finite: the run stops before saving anything of it."""


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
    shards; `model` is the module as trained: plain, DDP or FSDP2); trainer_state.json (written last, by rank 0):
    step, epoch, data position, the scheduler, the number of processes and the size of every file above.
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
    # Every process's shards, plus 1% and 1 MiB for the metadata and trainer files (a shared folder).
    needed = int(_sum_over_processes(_state_bytes(state), procs) * 1.01) + 2**20
    failed: CheckpointError | None = None
    free = shutil.disk_usage(root).free
    if free < needed:
        failed = _no_space(final, needed, free)
    else:
        try:
            with _one_process_quiet(world):
                dcp.save(state, checkpoint_id=str(tmp / "state"), no_dist=world == 1)
            barrier(procs)
            if rank == 0:
                files = {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
                write_trainer_state(tmp / TRAINER_STATE, {**trainer_state, "scheduler": scheduler.state_dict(),
                                                          "world": world, "files": files})
        except (Exception, CheckpointException):  # a full disk: OSError, or DCP's wrapper (a BaseException)
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


def write_trainer_state(path: Path, state: dict) -> None:
    """The trainer state as JSON (plain numbers, lists and strings: nothing to unpickle)."""
    Path(path).write_text(json.dumps(state, indent=1) + "\n")


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
    """Finished checkpoints of a run, oldest first (those of older dskd-pipe versions too, so they are never taken
    for an empty folder; `checkpoint_problem` names them)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)
                  and ((p / TRAINER_STATE).is_file() or (p / OLD_TRAINER_STATE).is_file()))


def _read_trainer_state(folder: Path) -> dict:
    path = Path(folder) / TRAINER_STATE
    if not path.is_file() and (Path(folder) / OLD_TRAINER_STATE).is_file():
        raise CheckpointError(f"{folder}: a checkpoint of an older dskd-pipe ({OLD_TRAINER_STATE}, a pickle, which "
                              "this version does not load: a crafted one would run code). Finish that run with the "
                              "version that started it, or start again in another --out.")
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
            raise ValueError("not a trainer state")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged ({' '.join(str(e).split())[:120]}).") from None
    return state


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint in `folder` cannot be loaded as written (a file missing, cut short or of another size, a
    path or link leading out of it, an older format), or None when it is whole."""
    folder = Path(folder)
    try:
        files = _read_trainer_state(folder)["files"]
    except CheckpointError as e:
        return str(e).removeprefix(f"{folder}: ")
    for rel, size in files.items():
        if (why := bad_name(rel)) is not None:
            return f"{TRAINER_STATE} names {rel!r}, {why}"
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != size:
            cut = path.stat().st_size < size
            return f"{rel} is {'cut short' if cut else 'of another size'} ({path.stat().st_size} of {size} bytes)"
    if leaving := links_leaving(folder):
        return f"{leaving[0]} is a link to outside the checkpoint"
    return None


def usable_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint of `run_dir` that is whole; each newer damaged one is named through `warn` and
    skipped. CheckpointError when there are checkpoints and none is whole; None when there are none."""
    checkpoints = list_checkpoints(run_dir)
    problems = []
    for folder in reversed(checkpoints):
        problem = checkpoint_problem(folder)
        if problem is None:
            for skipped, why in problems:
                warn(f"{skipped}: {why}; skipped, continuing from {folder.name}.")
            return folder
        problems.append((folder, problem))
    if problems:
        folder, why = problems[0]
        raise CheckpointError(f"{folder}: {why}; no earlier checkpoint is whole "
                              f"({', '.join(f.name for f, _ in problems)}). Start again in another --out.")
    return None


def _safe_reader(path: Path):
    """A DCP reader of `path` that unpickles nothing but DCP's metadata classes and reads only files inside it."""
    import torch.distributed.checkpoint as dcp

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata_file = Path(self.path) / ".metadata"
            try:
                with open(metadata_file, "rb") as f:
                    metadata = _MetadataUnpickler(f, metadata_file).load()
            except CheckpointError:
                raise
            except Exception as e:  # cut short, not a pickle, another torch's classes
                raise CheckpointError(f"{metadata_file}: damaged ({type(e).__name__}: "
                                      f"{' '.join(str(e).split())[:120]}).") from None
            if type(metadata).__name__ != "Metadata" or not isinstance(getattr(metadata, "storage_data", None), dict):
                raise CheckpointError(f"{metadata_file}: not the metadata of a checkpoint.")
            for info in metadata.storage_data.values():
                if bad_name(getattr(info, "relative_path", None), plain=True) is not None:
                    raise CheckpointError(f"{metadata_file}: names the file {getattr(info, 'relative_path', None)!r}, "
                                          "outside the checkpoint: not loaded.")
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file admitting only the classes such a file holds (DCP's metadata dataclasses,
    torch.Size, dtypes, layouts, paths): anything else, which a crafted file would use to run code, is refused."""

    ALLOWED = {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
        ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}

    def __init__(self, file, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in self.ALLOWED or dtype:
            return super().find_class(module, name)
        raise CheckpointError(f"{self.where}: holds a '{module}.{name}', which checkpoint metadata never holds: not "
                              "loaded (a crafted file runs code this way). Use a checkpoint written by dskd-pipe, or "
                              "start again in another --out.")


def _safe_planner():
    """DCP's load planner reading the checkpoint's non-tensor values (optimizer settings) with weights_only=True:
    the stock planner unpickles them without limits."""
    from torch.distributed.checkpoint import default_planner

    class SafePlanner(default_planner.DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"checkpoint value {read_item.dest_index.fqn}: not loaded "
                                      f"({' '.join(str(e).split())[:160]}).") from None
            if self.flatten_state_dict:  # as the stock load_bytes, with its own helper
                default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner(allow_partial_load=True)


def load_checkpoint(folder: Path, *, model: torch.nn.Module, optimizers: dict, scheduler,
                    procs: Processes = Processes()) -> dict:
    """Restore the trained module, the optimizers and the scheduler in place (every process calls it, with any
    number of processes); return the trainer state (step, epoch, position, ...). `model` as in save_checkpoint.
    Nothing in the folder is unpickled beyond DCP's own metadata classes (see the module's docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    folder = Path(folder)
    if not (folder / "state").is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint of this dskd-pipe version (no state/ folder). Finish that "
                              "run with the version that started it, or start again in another --out.")
    if (problem := checkpoint_problem(folder)) is not None:
        raise CheckpointError(f"{folder}: {problem}.")
    trainer = _read_trainer_state(folder)
    state = _training_state(model, optimizers)
    stored = set(_safe_reader(folder / "state").read_metadata().state_dict_metadata)
    missing = [k for k in _flat_keys(state["model"], "model") if k not in stored]
    if missing:
        raise CheckpointError(f"{folder / 'state'}: does not fit this run's model (no {missing[0]}, "
                              f"{len(missing)} missing). Resume with the same --student, --method and LoRA settings.")
    # Parameters that had no optimizer state when saved (no gradient yet) get none now either.
    without_state = {k.split(".state.", 1)[1].rsplit(".", 1)[0] for k in _flat_keys(state, "")
                     if ".state." in k and k.lstrip(".") not in stored}
    try:
        with _one_process_quiet(procs.world):
            dcp.load(state, storage_reader=_safe_reader(folder / "state"), no_dist=procs.world == 1,
                     planner=_safe_planner())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps each process's error (a BaseException)
        cause = _first_failure(e)
        if isinstance(cause, CheckpointError):  # our own refusal of a value, raised inside DCP
            raise CheckpointError(f"{folder / 'state'}: {cause}") from None
        raise CheckpointError(f"{folder / 'state'}: does not fit this run's model "
                              f"({' '.join(str(cause).split())[:300]}). Resume with the same --student, --method and "
                              "LoRA settings.") from None
    set_model_state_dict(model, state["model"], options=_state_options(strict=False))
    params = {_canonical(n): p for n, p in model.named_parameters()}
    for name, opt in optimizers.items():
        if opt is not None:
            set_optimizer_state_dict(model, opt, state[f"optimizer_{name}"], options=_state_options())
            for fqn in without_state:
                if fqn in params:
                    opt.state.pop(params[fqn], None)
    scheduler.load_state_dict(trainer.pop("scheduler"))
    for key in ("world", "files"):
        trainer.pop(key, None)
    return trainer


def _first_failure(e: BaseException) -> BaseException:
    """The first process's own exception inside DCP's CheckpointException (`e` itself otherwise)."""
    for failure in (getattr(e, "failures", None) or {}).values():
        return failure[0] if isinstance(failure, tuple) else failure
    return e


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
    state = _read_trainer_state(folder)
    for key in ("scheduler", "world", "files"):
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
