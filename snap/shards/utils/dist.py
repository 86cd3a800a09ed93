"""Tensor-parallel process group: who this rank is and the two collectives the layers need."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TPGroup:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums `t` in place over the ranks and returns it."""
        if self.world_size > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates every rank's `t` along `dim`, in rank order."""
        if self.world_size == 1:
            return t
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=dim)


def init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device
) -> TPGroup:
    """Joins the tensor-parallel group: NCCL on CUDA devices, gloo otherwise.

    One rank needs no process group. NCCL's environment variables are read as they are.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return TPGroup()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            device_id=device if device.type == "cuda" else None,
        )
    return TPGroup(rank=rank, world_size=world_size, group=dist.group.WORLD)
