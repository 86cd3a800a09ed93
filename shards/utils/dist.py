"""Tensor-parallel process group: who this rank is and the two collectives the layers need; and
the pipeline stage the group forms (shards/utils/pipeline.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from shardline.shards.utils.pipeline import PipelineStage


@dataclass
class TPGroup:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None
    stage: PipelineStage = field(default_factory=PipelineStage)

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
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device: torch.device,
    pipeline_size: int = 1,
    partition: tuple[int, ...] | None = None,
    timeout_s: float | None = None,
) -> TPGroup:
    """Joins the world: NCCL on CUDA devices, gloo otherwise; `pipeline_size` stages of
    `world_size / pipeline_size` tensor-parallel ranks (consecutive ranks form a stage).

    One rank needs no process group. NCCL's environment variables are read as they are;
    `timeout_s` bounds the rendezvous and every collective (torch's default otherwise).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if world_size % pipeline_size:
        raise ValueError(f"{world_size} ranks cannot form {pipeline_size} pipeline stages")
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
            timeout=None if timeout_s is None else timedelta(seconds=timeout_s),
        )
    tp_size = world_size // pipeline_size
    index = rank // tp_size
    stage = PipelineStage(index, pipeline_size, tp_size, rank, partition, dist.group.WORLD)
    if pipeline_size == 1:
        return TPGroup(rank=rank, world_size=world_size, group=dist.group.WORLD, stage=stage)
    # every rank creates every stage's group, in the same order
    groups = [
        dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pipeline_size)
    ]
    return TPGroup(rank=rank % tp_size, world_size=tp_size, group=groups[index], stage=stage)
