"""Pipeline parallelism: the stage a rank belongs to, the layers it holds, and the hand-offs.

The world of `world_size` ranks is split into `size` stages of `tp_size` consecutive ranks
(stage s holds ranks s * tp_size ... (s + 1) * tp_size - 1, a tensor-parallel group). Stage s
holds a contiguous run of the decoder layers (`layers`); the first also the embedding, the last
the final norm and the LM head. A forward pass hands its activations from each rank to the rank
of the same tensor-parallel position in the next stage (`send` / `receive`), and the last stage,
which alone has logits, sends what it sampled back to the same position of every earlier stage
(`send_back` / `receive_from_last`: the receives are posted at once and waited on later) and
shares its prompt logprobs with every rank (`share`), so that every rank keeps the same
batches, sampling state and answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


def even_partition(num_layers: int, stages: int) -> tuple[int, ...]:
    """An even split; the layers left over go to the middle stages first, then the first, then
    the last (which holds the LM head and samples)."""
    if num_layers < stages:
        raise ValueError(f"{num_layers} layers cannot be split into {stages} pipeline stages")
    counts = [num_layers // stages] * stages
    preference = [*range(1, stages - 1), 0, stages - 1][:stages]
    for stage in preference[: num_layers % stages]:
        counts[stage] += 1
    return tuple(counts)


@dataclass(frozen=True)
class PipelineStage:
    """This rank's stage. The default is the one stage of a model that is not pipelined."""

    index: int = 0
    size: int = 1
    tp_size: int = 1
    world_rank: int = 0
    partition: tuple[int, ...] | None = None
    group: dist.ProcessGroup | None = None  # every rank of the world

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.size - 1

    @property
    def world_size(self) -> int:
        return self.size * self.tp_size

    def layers(self, num_layers: int) -> range:
        """The indices of the decoder layers this stage holds."""
        counts = self.partition or even_partition(num_layers, self.size)
        if sum(counts) != num_layers:
            raise ValueError(
                f"the layer partition {','.join(map(str, counts))} covers {sum(counts)} layers; "
                f"the model has {num_layers}"
            )
        start = sum(counts[: self.index])
        return range(start, start + counts[self.index])

    def send(self, tensors: Sequence[torch.Tensor]) -> None:
        """Hands this stage's activations to the same tensor-parallel rank of the next stage."""
        for tensor in tensors:
            dist.send(tensor.contiguous(), self.world_rank + self.tp_size, group=self.group)

    def receive(
        self, count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        """The `count` activations the previous stage sent, each of `shape`."""
        tensors = [torch.empty(shape, dtype=dtype, device=device) for _ in range(count)]
        for tensor in tensors:
            dist.recv(tensor, self.world_rank - self.tp_size, group=self.group)
        return tensors

    def send_back(self, tensors: Sequence[torch.Tensor]) -> None:
        """Hands the last stage's `tensors` to the same tensor-parallel rank of every earlier
        stage."""
        position = self.world_rank % self.tp_size
        for stage in range(self.size - 1):
            for tensor in tensors:
                dist.send(tensor, stage * self.tp_size + position, group=self.group)

    def receive_from_last(self, tensors: Sequence[torch.Tensor]) -> Callable[[], None]:
        """Posts the receives of the last stage's `tensors` (in place); the function returned
        waits until they are in."""
        source = (self.size - 1) * self.tp_size + self.world_rank % self.tp_size
        works = [dist.irecv(tensor, source, group=self.group) for tensor in tensors]

        def arrived() -> None:
            for work in works:
                work.wait()

        return arrived

    def gather(self, value: object) -> list[object]:
        """Every rank's `value` (picklable), in rank order."""
        if self.world_size == 1:
            return [value]
        gathered: list[object] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def share(self, tensors: Sequence[torch.Tensor]) -> None:
        """Copies the last stage's `tensors` into every rank's (in place; same shapes)."""
        source = (self.size - 1) * self.tp_size
        for tensor in tensors:
            dist.broadcast(tensor, source, group=self.group)


SINGLE_STAGE = PipelineStage()
