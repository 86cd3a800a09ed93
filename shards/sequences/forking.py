"""Forking sequences on the paged KV cache: children share their parent's full blocks.

A sequence's blocks are all full except possibly the last, which the next decode step writes
into. A fork takes a reference on every full block (BlockAllocator counts owners) and gets its
own copy of the partial last block, in every layer's key and value pools, before any child
writes to it; the first child of a parent takes the parent's blocks over without copying. A
sequence that no child takes over frees its blocks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from shardline.shards.kv_cache import BlockAllocator, KVCache, KVCacheExhaustedError
from shardline.shards.prefix_cache import remember_sequence

if TYPE_CHECKING:
    from shardline.shards.batch import SequenceState


@dataclasses.dataclass
class ForkResult:
    sequences: list[SequenceState]
    # (new row, block) pairs: the copied last block that replaces the parent's in that row.
    copied: list[tuple[int, int]]


def fork_sequences(
    sequences: list[SequenceState],
    parents: list[int],
    allocator: BlockAllocator,
    cache: KVCache | None,
) -> ForkResult:
    """The sequences of the new rows, row i continuing sequences[parents[i]]."""
    taken = set(parents)
    for row, seq in enumerate(sequences):
        if row not in taken:
            remember_sequence(allocator, seq)
            allocator.free(seq.blocks)
            seq.blocks = []
    copies = _copies_needed(sequences, parents, allocator.block_size)
    if copies > allocator.num_free:
        raise KVCacheExhaustedError(
            f"forking needs {copies} KV blocks for partial-block copies, "
            f"{allocator.num_free} are free"
        )
    new_blocks = allocator.allocate(copies)
    moved: set[int] = set()
    result = ForkResult(sequences=[], copied=[])
    for row, parent in enumerate(parents):
        seq = sequences[parent]
        if parent not in moved:
            moved.add(parent)
            result.sequences.append(seq)
            continue
        child = dataclasses.replace(
            seq, blocks=list(seq.blocks), generated_ids=list(seq.generated_ids)
        )
        if _has_partial_block(seq, allocator.block_size):
            allocator.share(child.blocks[:-1])
            child.blocks[-1] = new_blocks.pop()
            result.copied.append((row, child.blocks[-1]))
        else:
            allocator.share(child.blocks)
        result.sequences.append(child)
    _copy_last_blocks(cache, result, sequences, parents)
    return result


def _has_partial_block(seq: SequenceState, block_size: int) -> bool:
    return bool(seq.blocks) and seq.num_cached % block_size != 0


def _copies_needed(sequences: list[SequenceState], parents: list[int], block_size: int) -> int:
    seen: set[int] = set()
    copies = 0
    for parent in parents:
        if parent in seen and _has_partial_block(sequences[parent], block_size):
            copies += 1
        seen.add(parent)
    return copies


def _copy_last_blocks(
    cache: KVCache | None, result: ForkResult, sequences: list[SequenceState], parents: list[int]
) -> None:
    if not result.copied:
        return
    if cache is None:
        raise RuntimeError("the KV cache is not allocated: call Warmup first")
    sources = [sequences[parents[row]].blocks[-1] for row, _ in result.copied]
    cache.copy_blocks(sources, [block for _, block in result.copied])
