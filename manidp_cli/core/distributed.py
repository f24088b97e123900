"""Data-parallel helpers over torch.distributed; a no-op world of one without torchrun.

Launch with PyTorch's own launcher, e.g. ``torchrun --nproc_per_node 2 -m manidp_cli prune ...``:
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK and the rendezvous, ``World.from_env`` joins it (nccl
on CUDA, gloo on CPU). Everything the method aggregates over data goes through ``all_reduce_sum``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from manidp_cli.errors import ManidpError


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' is the local GPU when there is one, else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ManidpError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ManidpError("--device cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> World:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return cls(rank, size, local_rank, resolve_device(device, local_rank))

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (float64 on the CPU for gloo; returned on the CPU)."""
        if not self.distributed:
            return values
        buffer = values.detach().to(self.device if self.device.type == "cuda" else "cpu", torch.float64).clone()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        return buffer.cpu()

    def all_gather_object(self, obj):
        if not self.distributed:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP does before each
        forward; needed after the last training step, before evaluating or exporting."""
        if not self.distributed:
            return
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


@contextlib.contextmanager
def joined(world: World):
    """Join the process group torchrun described (if any) for the duration of a run."""
    if not world.distributed or dist.is_initialized():
        yield world
        return
    backend = "nccl" if world.device.type == "cuda" else "gloo"
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
    try:
        yield world
    finally:
        dist.destroy_process_group()
