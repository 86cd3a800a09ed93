"""The prefix-cache index on its own: keys over the whole prefix and the salt, ownership,
least-recently-freed eviction only when the allocator needs room, and clearing."""

from __future__ import annotations

import pytest

from shardline.shards.kv_cache import KVCacheExhaustedError
from shardline.shards.prefix_cache import PrefixCachingAllocator

ROOT = ("salt", "")
BLOCK = 4


def _prompt_blocks(allocator: PrefixCachingAllocator, prompt: list[int]) -> list[int]:
    """A prompt's blocks, allocated, written (registered) and freed by its request."""
    blocks = allocator.allocate(allocator.blocks_for(len(prompt)))
    allocator.register(prompt, ROOT, blocks, len(prompt) // BLOCK)
    allocator.free(blocks)
    return blocks


def test_a_freed_prompt_stays_cached_and_counts_as_free() -> None:
    allocator = PrefixCachingAllocator(8, BLOCK)
    prompt = list(range(10, 20))  # two full blocks and a partial one
    blocks = _prompt_blocks(allocator, prompt)
    assert allocator.num_free == 8 and allocator.num_cached == 2
    assert allocator.lookup(prompt, ROOT, 5) == blocks[:2]
    assert allocator.lookup(prompt[:7], ROOT, 5) == blocks[:1]  # one full block matches
    assert allocator.lookup(prompt, ROOT, 1) == blocks[:1]


def test_a_key_is_the_whole_prefix_and_the_salt() -> None:
    allocator = PrefixCachingAllocator(8, BLOCK)
    prompt = list(range(10, 18))
    _prompt_blocks(allocator, prompt)
    other_first_block = [99, 11, 12, 13, *prompt[4:]]  # the second block's tokens alike
    assert allocator.lookup(other_first_block, ROOT, 2) == []
    assert allocator.lookup(prompt, ("salt", "tenant-b"), 2) == []


def test_taken_blocks_are_not_evicted_and_free_ones_go_least_recently_freed_first() -> None:
    allocator = PrefixCachingAllocator(4, BLOCK)
    older = _prompt_blocks(allocator, [1, 2, 3, 4])
    newer = _prompt_blocks(allocator, [5, 6, 7, 8])
    allocator.allocate(2)  # the two never-cached blocks: nothing evicted
    assert allocator.num_cached == 2
    allocator.allocate(1)
    assert allocator.lookup([1, 2, 3, 4], ROOT, 1) == []  # the older one went
    assert allocator.lookup([5, 6, 7, 8], ROOT, 1) == newer != older
    allocator.take(newer)
    with pytest.raises(KVCacheExhaustedError):
        allocator.allocate(1)
    allocator.free(newer)
    assert allocator.num_free == 1


def test_a_block_evicted_and_reused_never_matches_its_old_children() -> None:
    """The second block was keyed under the first block's identity: once that block is evicted
    and holds another prefix's first block, the old child must not be found under it."""
    allocator = PrefixCachingAllocator(2, BLOCK)
    blocks = allocator.allocate(2)
    allocator.register([1, 2, 3, 4, 5, 6, 7, 8], ROOT, blocks, 2)
    allocator.free(blocks[:1])  # the first block alone is evictable: its child is in use
    (reused,) = allocator.allocate(1)
    assert reused == blocks[0]
    allocator.register([9, 9, 9, 9], ROOT, [reused], 1)
    assert allocator.lookup([9, 9, 9, 9, 5, 6, 7, 8], ROOT, 2) == [reused]


def test_clear_empties_the_index_and_frees_every_evictable_block() -> None:
    allocator = PrefixCachingAllocator(6, BLOCK)
    _prompt_blocks(allocator, list(range(3, 15)))
    held = allocator.allocate(1)
    allocator.register([1, 1, 1, 1], ROOT, held, 1)
    assert allocator.clear() == 4
    assert allocator.num_cached == 0 and allocator.lookup(list(range(3, 15)), ROOT, 3) == []
    allocator.free(held)
    assert allocator.num_free == 6
    assert sorted(allocator.allocate(6)) == list(range(6))


def test_a_prefix_indexed_twice_keeps_the_first_block() -> None:
    allocator = PrefixCachingAllocator(6, BLOCK)
    first = allocator.allocate(2)
    second = allocator.allocate(2)
    prompt = list(range(20, 28))
    allocator.register(prompt, ROOT, first, 2)
    allocator.register(prompt, ROOT, second, 2)
    assert allocator.lookup(prompt, ROOT, 2) == first
    allocator.free(second)
    assert allocator.num_cached == 2 and allocator.num_free == 4


def test_a_freed_prompt_loses_its_tail_first() -> None:
    allocator = PrefixCachingAllocator(3, BLOCK)
    prompt = list(range(30, 42))
    blocks = _prompt_blocks(allocator, prompt)
    allocator.allocate(1)
    assert allocator.lookup(prompt, ROOT, 3) == blocks[:2]


def test_indexing_again_extends_a_chain_and_keeps_each_block_under_one_prefix() -> None:
    """A prompt's blocks indexed again with the tokens after them (its sequence ended) keep
    their keys and chain the new block under them; a block indexed under another prefix keeps
    that one and ends the chain."""
    allocator = PrefixCachingAllocator(8, BLOCK)
    blocks = allocator.allocate(3)
    prompt = list(range(40, 48))
    allocator.register(prompt, ROOT, blocks, 2)
    allocator.register([*prompt, 1, 2, 3, 4], ROOT, blocks, 3)
    assert allocator.num_cached == 3
    assert allocator.lookup([*prompt, 1, 2, 3, 4], ROOT, 3) == blocks
    assert allocator.lookup([*prompt[:4], 9, 9, 9, 9], ROOT, 2) == blocks[:1]
    head, tail = allocator.allocate(2)
    other = [5, 5, 5, 5, *prompt[4:], 6, 6, 6, 6]
    allocator.register(other, ROOT, [head, blocks[1], tail], 3)
    assert allocator.num_cached == 4  # the tail is not chained under blocks[1]'s prefix
    assert allocator.lookup(other, ROOT, 3) == [head]
