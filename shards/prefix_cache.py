"""Prefix caching: full KV blocks of prompts, found again by the whole prefix they end.

A full prompt block is keyed by its own token ids and the identity of the cached block before
it; the first block of a prompt by the request's cache root (its `cache_salt`). A key thus names
the whole prefix exactly: the index is a dict, which compares the token ids of a key, so a hash
collision is only ever a miss. A block's identity is its id with an epoch that changes whenever
the block leaves the index, so a key made under an evicted parent never matches whatever that
block holds next.

Cached blocks are owned like any others (reference-counted; forks and requests that hit them
share them). A cached block whose last owner frees it stays in the index, evictable: it counts
as free, and the allocator hands it out again (least recently freed first, a prompt's tail
before its head) only when no never-cached block is left. Prompt blocks are indexed once their KV is written (after the
prefill pass that reached them), a sequence's generated tokens when it ends (all but its last
token, whose KV is never written): a chat's next turn finds the last turn's reply too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardline.proto import generate_pb2 as pb
from shardline.shards.kv_cache import BlockAllocator

if TYPE_CHECKING:
    from shardline.shards.batch import SequenceState

logger = logging.getLogger(__name__)

Root = tuple[str, str]
Parent = Root | tuple[int, int]
BlockKey = tuple[Parent, tuple[int, ...]]


@dataclass
class PrefixCacheCounters:
    """Prompt tokens looked up in the index, and those found there (vLLM's queries and hits)."""

    queried_tokens: int = 0
    hit_tokens: int = 0


def cache_root(request: pb.Request) -> Root:
    """What, besides the token ids, a request's KV depends on: its tenant's salt (the model,
    its weights and revision are the shard's own and fixed while its index lives)."""
    return ("salt", request.cache_salt)


class PrefixCachingAllocator(BlockAllocator):
    """A BlockAllocator that keeps full prompt blocks in an index after their owners free them."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self._index: dict[BlockKey, int] = {}
        self._keys: dict[int, BlockKey] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._epochs = [0] * num_blocks
        self.counters = PrefixCacheCounters()

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks in the index, in use or evictable."""
        return len(self._keys)

    def free(self, blocks: list[int]) -> None:
        """As BlockAllocator's, last block first: a freed prompt's tail is evicted before its
        head, which other prompts are likelier to share (a chain without its head is lost)."""
        super().free(blocks[::-1])

    def allocate(self, count: int) -> list[int]:
        """Never-cached blocks first; then the least recently freed cached ones, evicted."""
        short = count - len(self._free)
        if 0 < short <= len(self._evictable):
            for _ in range(short):
                block, _ = self._evictable.popitem(last=False)
                self._uncache(block)
                self._free.append(block)
        return super().allocate(count)

    def lookup(self, token_ids: Sequence[int], root: Root, max_blocks: int) -> list[int]:
        """The cached blocks holding the leading full blocks of `token_ids` (at most
        `max_blocks`), in order; not taken."""
        blocks: list[int] = []
        parent: Parent = root
        for number in range(max_blocks):
            block = self._index.get((parent, self._block_tokens(token_ids, number)))
            if block is None:
                break
            blocks.append(block)
            parent = (block, self._epochs[block])
        return blocks

    def take(self, blocks: list[int]) -> None:
        """One more owner for each of `blocks` (found by `lookup`): an evictable one is kept."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
                self._refs[block] = 1
            else:
                self.share([block])

    def register(self, token_ids: Sequence[int], root: Root, blocks: list[int], count: int) -> None:
        """Indexes the first `count` blocks of a prompt whose KV they hold (owned by the caller).
        A block whose prefix is indexed already under another block stays private; the blocks
        after it are keyed under the indexed one, which holds the same prefix. A block indexed
        under the same parent already (its earlier chunk, or its prompt when its sequence ends)
        holds these very tokens: the same parent means the same prefix, and a block's owners
        share its tokens. Its key is not made again."""
        parent: Parent = root
        for number in range(count):
            own = blocks[number]
            key = self._keys.get(own)
            if key is not None and key[0] == parent:  # indexed here before: its tokens match
                parent = (own, self._epochs[own])
                continue
            key = (parent, self._block_tokens(token_ids, number))
            block = self._index.get(key)
            if block is None and own not in self._keys:
                block = own
                self._index[key] = block
                self._keys[block] = key
            if block is None:
                return
            parent = (block, self._epochs[block])

    def clear(self) -> int:
        """Empties the index; the evictable blocks are free again. Returns the blocks it held."""
        dropped = len(self._keys)
        for block in list(self._keys):
            self._uncache(block)
        self._free.extend(self._evictable)
        self._evictable.clear()
        return dropped

    def _unowned(self, block: int) -> None:
        if block in self._keys:
            self._evictable[block] = None
        else:
            super()._unowned(block)

    def _uncache(self, block: int) -> None:
        del self._index[self._keys.pop(block)]
        self._epochs[block] += 1

    def _block_tokens(self, token_ids: Sequence[int], number: int) -> tuple[int, ...]:
        start = number * self.block_size
        return tuple(token_ids[start : start + self.block_size])


def reuse_cached_prefix(allocator: BlockAllocator, request: pb.Request) -> list[int] | None:
    """The cached blocks of a new prompt's leading full blocks, taken; its last token is always
    left to compute (its logits sample the first token). None (not looked up) when caching is
    off, or for a request that wants its prompt logprobs (`decoder_input_details`), computed in
    full."""
    if not isinstance(allocator, PrefixCachingAllocator) or request.decoder_input_details:
        return None
    prompt = request.input_ids  # sliced per block looked up: most prompts miss at once
    usable = (len(prompt) - 1) // allocator.block_size
    blocks = allocator.lookup(prompt, cache_root(request), usable)
    allocator.take(blocks)
    allocator.counters.queried_tokens += len(prompt)
    allocator.counters.hit_tokens += len(blocks) * allocator.block_size
    return blocks


def remember_prompt(allocator: BlockAllocator, seq: SequenceState, prefilled: int) -> None:
    """Indexes the full blocks of the first `prefilled` prompt tokens (their KV is written)."""
    if isinstance(allocator, PrefixCachingAllocator):
        count = prefilled // allocator.block_size
        allocator.register(seq.prompt_ids, seq.cache_root, seq.blocks, count)


def new_allocator(num_blocks: int, block_size: int, prefix_caching: bool) -> BlockAllocator:
    kind = PrefixCachingAllocator if prefix_caching else BlockAllocator
    return kind(num_blocks, block_size)


def cached_block_count(allocator: BlockAllocator | None) -> int:
    return allocator.num_cached if isinstance(allocator, PrefixCachingAllocator) else 0


def clear_prefix_cache(allocator: BlockAllocator | None) -> None:
    """Empties the index (ClearCache of everything), logging the blocks it held."""
    if isinstance(allocator, PrefixCachingAllocator):
        logger.info("prefix cache cleared: %d blocks were indexed", allocator.clear())


def remember_sequence(allocator: BlockAllocator, seq: SequenceState) -> None:
    """Indexes the full blocks of an ending sequence's prompt and generated tokens (those whose
    KV is written), before its blocks are freed. A beam's tokens are its search's, not the
    sequence's: its prompt's prefill indexed what it can."""
    complete = bool(seq.generated_ids) and len(seq.generated_ids) == seq.generated
    if isinstance(allocator, PrefixCachingAllocator) and complete:
        tokens = seq.prompt_ids + tuple(seq.generated_ids)  # a tuple's slices are tuples
        count = seq.num_cached // allocator.block_size
        allocator.register(tokens, seq.cache_root, seq.blocks, count)
