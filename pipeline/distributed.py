"""Several processes on torch's own engines: the process group, DDP or FSDP2 around what is trained, gradient sync.

Under torchrun (WORLD_SIZE > 1) every process holds the same trained module (`Trainee` of pipeline/step.py: the
student, the method's projectors and its adversary). `wrap` hands it to
- DistributedDataParallel (default): a full replica per process, gradients all-reduced in buckets during the
  backward of the last micro-batch of a step (`no_sync` on the others);
- FSDP2 (`fully_shard`, --fsdp): one unit per transformer block, then the root; parameters, gradients and
  optimizer states sharded across the processes; on GPU bf16 parameters with fp32 gradient reduction.
Both average gradients over the processes; the stage divides each process's loss by the GLOBAL supervised token
count of the step and multiplies it by `world`, so the averaged gradient is that of one batch of the whole step.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Processes:
    """This process's place: rank of world, its device, and the engine around the trained module."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    engine: str = "none"  # "none" (one process) | "ddp" | "fsdp"

    @property
    def main(self) -> bool:
        """Rank 0 prints the final lines and writes the outputs."""
        return self.rank == 0


def setup(device: str, fsdp: bool = False) -> Processes:
    """Initialise torch.distributed under torchrun (WORLD_SIZE > 1): NCCL on GPUs (one per local rank), gloo on CPU.

    `device`: the requested device ("" = cuda when available, else cpu)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return Processes(0, 1, device, "none")
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available() and not device.startswith("cpu"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if not dist.is_initialized():
        # torchrun's store outlives a restart (--max-restarts); the processes of a new attempt would read the dead
        # ones' addresses from it (gloo: "connectFullMesh ... Connection refused"). Each attempt gets its own keys.
        store, rank, world = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"dskd-pipe/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", store=store, rank=rank,
                                world_size=world)
    return Processes(dist.get_rank(), dist.get_world_size(), device, "fsdp" if fsdp else "ddp")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the classes transformers names in `_no_split_modules` (GPT2Block,
    LlamaDecoderLayer, Qwen2DecoderLayer, ...), found under a peft wrapper too."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__}: no transformer blocks found (no _no_split_modules); FSDP needs "
                         "them to shard the model block by block.")
    return blocks


def wrap(module: nn.Module, procs: Processes, blocks: list[nn.Module] = (), find_unused_parameters: bool = False,
         bf16: bool = False) -> nn.Module:
    """`module` under the engine of `procs` (itself for one process).

    fsdp: `fully_shard` each of `blocks`, then `module` (the root also holds what no block does: embeddings, head,
    final norm, projectors, the discriminator); `bf16` = bf16 parameters in compute, fp32 gradient reduction
    (GPU). ddp: DistributedDataParallel; `find_unused_parameters` when some trained parameters take no part in
    some steps (CMA-GA's discriminator outside its steps).
    """
    if procs.engine == "none":
        return module
    if procs.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(procs.device).index] if procs.device.startswith("cuda") else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(procs.device).type, (procs.world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def gradient_sync(model: nn.Module, procs: Processes, sync: bool):
    """Context for one micro-batch's forward and backward: gradients are reduced across processes only when
    `sync` (the last micro-batch of a step); the others accumulate locally."""
    if procs.engine == "ddp" and not sync:
        return model.no_sync()
    if procs.engine == "fsdp":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The sum over processes (in place); logs and token counts, never gradients (the engines reduce those)."""
    if procs.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def barrier(procs: Processes) -> None:
    if procs.world > 1:
        import torch.distributed as dist

        dist.barrier()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2's gradient norm, parameters): the full value; else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


__all__ = ["Processes", "setup", "transformer_blocks", "wrap", "gradient_sync", "all_reduce_sum", "barrier",
           "local_tensor"]
