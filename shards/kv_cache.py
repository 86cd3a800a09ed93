"""The paged KV cache: per-layer key/value block pools and the allocator that hands out blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCacheExhaustedError(RuntimeError):
    """Not enough free KV blocks for what was asked."""


class BlockAllocator:
    """A free list of fixed-size KV blocks with reference counts.

    A block is owned by one or more sequences: forks of a sequence (best_of / n samples, beams)
    share its full blocks by taking a reference, and a block returns to the free list when its
    last owner frees it.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"need positive num_blocks and block_size (got {num_blocks}, {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs: list[int] = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_fresh(self) -> int:
        """Blocks an allocation takes without evicting a cached prefix (prefix_cache.py)."""
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
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """One more owner for each of `blocks` (all allocated)."""
        for block in blocks:
            if self._refs[block] < 1:
                raise RuntimeError(f"KV block {block} is shared while free")
            self._refs[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drops one owner of each of `blocks`; a block without owners is free again."""
        for block in blocks:
            if self._refs[block] < 1:
                raise RuntimeError(f"KV block {block} is freed twice")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._unowned(block)

    def _unowned(self, block: int) -> None:
        """A block whose last owner freed it: free again (a prefix cache may keep it)."""
        self._free.append(block)


def keys_major_values(dtype: torch.dtype) -> bool:
    """Whether a V pool of `dtype` is stored keys-major: FP8, whose decode kernel's PV dot wants
    consecutive keys side by side and otherwise reads its value tile a byte a load."""
    return dtype.itemsize == 1


def is_keys_major(pool: torch.Tensor) -> bool:
    """Whether a pool [num_blocks, block_size, kv_heads, head_dim] holds a page's keys contiguous."""
    return pool.stride(1) == 1


def allocate_pool(
    shape: tuple[int, int, int, int],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    keys_major: bool = False,
) -> torch.Tensor:
    """A zeroed block pool [num_blocks, block_size, kv_heads, head_dim]; `keys_major`: stored
    [num_blocks, kv_heads, head_dim, block_size] (a page's KV head one [head_dim, block_size] run)."""
    if not keys_major:
        return torch.zeros(shape, dtype=dtype, device=device)
    num_blocks, block_size, num_kv_heads, head_dim = shape
    stored = torch.zeros(
        (num_blocks, num_kv_heads, head_dim, block_size), dtype=dtype, device=device
    )
    return stored.permute(0, 3, 1, 2)


@dataclass
class KVCache:
    """One (key, value) pair of block pools per layer: [num_blocks, block_size, kv_heads, head_dim].

    An FP8 value pool is stored keys-major (`keys_major_values`), a strided view of that shape.
    The pools start zeroed and the writers store no NaN in a keys-major V: the decode kernels
    read its stale slots unmasked, at zero weight (triton_tiles.paged_kv_tiles)."""

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
        keys_major = keys_major_values(dtype)
        layers = [
            (
                allocate_pool(shape, dtype=dtype, device=device),
                allocate_pool(shape, dtype=dtype, device=device, keys_major=keys_major),
            )
            for _ in range(num_layers)
        ]
        return cls(layers=layers, block_size=block_size)

    @property
    def num_blocks(self) -> int:
        return int(self.layers[0][0].shape[0])

    def copy_blocks(self, sources: list[int], targets: list[int]) -> None:
        """Copies the keys and values of block sources[i] into targets[i], in every layer."""
        if not sources:
            return
        device = self.layers[0][0].device
        src = torch.tensor(sources, dtype=torch.long, device=device)
        dst = torch.tensor(targets, dtype=torch.long, device=device)
        for pool in (pool.view(torch.uint8) for layer in self.layers for pool in layer):
            pool.index_copy_(0, dst, pool.index_select(0, src))  # as bytes: FP8 pools too


def bytes_per_block(
    *, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size
