"""The paged KV cache: per-layer key/value block pools and the allocator that hands out blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCacheExhaustedError(RuntimeError):
    """Not enough free KV blocks for what was asked."""


class BlockAllocator:
    """A free list of fixed-size KV blocks; every block is either free or owned by one sequence."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"need positive num_blocks and block_size (got {num_blocks}, {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise KVCacheExhaustedError(
                f"the KV cache has {len(self._free)} free blocks of {self.block_size} tokens, "
                f"{count} are needed"
            )
        blocks = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


@dataclass
class KVCache:
    """One (key, value) pair of block pools per layer: [num_blocks, block_size, kv_heads, head_dim]."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    block_size: int

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        layers = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        return cls(layers=layers, block_size=block_size)

    @property
    def num_blocks(self) -> int:
        return int(self.layers[0][0].shape[0])


def bytes_per_block(
    *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size
