"""The router's picture of the shards' prefix cache, for the prefill token budget.

The shards own the index (`shards/prefix_cache.py`): they alone decide what a prompt reuses,
and they answer, for each new prompt, how many of its tokens they found cached. The router
keeps a bounded, least-recently-used set of the full prompt blocks it had prefilled (a hash of
each block's whole prefix and the request's cache_salt), and before cutting a batch expects a
prompt to find as many leading blocks cached as this set holds: the batch's prefill budget then
counts only the tokens left to compute, so more prompts share one prefill. An expectation is
only ever an estimate (the shards may have evicted a block since): a prompt whose shards found
less computes more in that pass, and its chain is dropped from the set at once. The total token
budget does not use it (see DEVELOPERS.md, "Prefix caching").
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from shardline.router.metrics import RouterMetrics
from shardline.router.request_types import ValidRequest

if TYPE_CHECKING:
    from shardline.router.batcher import BatchingConfig
    from shardline.router.queue import Entry


def block_hashes(request: ValidRequest, block_size: int) -> list[int]:
    """A hash of each full block of the prompt together with everything before it."""
    hashes: list[int] = []
    previous = hash(("salt", request.params.cache_salt or ""))
    ids = request.input_ids
    for start in range(0, len(ids) - block_size + 1, block_size):
        previous = hash((previous, tuple(ids[start : start + block_size])))
        hashes.append(previous)
    return hashes


class PrefixCacheView:
    """What the router expects the shards' prefix cache to hold: at most `capacity` blocks."""

    def __init__(self, block_size: int, capacity: int, metrics: RouterMetrics) -> None:
        self.block_size = block_size
        self.capacity = capacity
        self._metrics = metrics
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._version = 0  # changes with `_blocks`: an entry's expectation is kept until then

    @classmethod
    def of(cls, config: BatchingConfig, metrics: RouterMetrics) -> PrefixCacheView:
        """Of the shards' whole KV capacity (the total token budget)."""
        return cls(config.block_size, config.max_batch_total_tokens // config.block_size, metrics)

    def expect(self, entry: Entry) -> None:
        """Sets the leading prompt tokens the shards should find cached (never the last one:
        its logits are computed); none for a request that bypasses the cache."""
        request = entry.request
        if request.decoder_input_details or entry.expected_at == self._version:
            return  # asked for every queued entry that fits, at every step: kept while it holds
        hashes = self._hashes(entry)
        usable = self._usable_blocks(entry)
        found = 0
        while found < usable and hashes[found] in self._blocks:
            found += 1
        entry.cached = found * self.block_size
        entry.expected_at = self._version

    def answered(self, entry: Entry, found_tokens: int | None) -> None:
        """A pass of the entry's prompt answered: the shards found `found_tokens` cached (None:
        not looked up in this pass), what the view held beyond is gone there; they now hold its
        first `entry.prefilled` tokens. Counts the lookup in the metrics."""
        hashes = self._hashes(entry)
        self._version += 1
        if found_tokens is not None:
            entry.cached = found_tokens
            self._metrics.prefix_cache_queries.inc(entry.request.input_length)
            self._metrics.prefix_cache_hits.inc(found_tokens)
            for block in hashes[found_tokens // self.block_size :]:
                self._blocks.pop(block, None)
        for block in reversed(hashes[: entry.prefilled // self.block_size]):  # tails go first
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def waits_for(self, entry: Entry, computing: set[int]) -> bool:
        """Whether the first full block the entry would compute is one that an entry before it
        in the batch being cut computes: it then waits a pass, and finds the block cached."""
        if entry.request.decoder_input_details:
            return False
        first = entry.cached // self.block_size
        return first < self._usable_blocks(entry) and self._hashes(entry)[first] in computing

    def computed(self, entry: Entry) -> list[int]:
        """The full blocks of the entry's prompt that the batch being cut computes."""
        start = max(entry.prefilled, entry.cached)
        end = start + entry.chunk
        return self._hashes(entry)[start // self.block_size : end // self.block_size]

    def _usable_blocks(self, entry: Entry) -> int:
        """The prompt's full blocks a lookup may find: never the one holding its last token,
        whose logits are computed."""
        return (entry.request.input_length - 1) // self.block_size

    def _hashes(self, entry: Entry) -> list[int]:
        if entry.prefix_hashes is None:  # once: a prompt shorter than a block has none
            entry.prefix_hashes = block_hashes(entry.request, self.block_size)
        return entry.prefix_hashes

    def clear(self) -> None:
        """The shards' index was emptied (ClearCache of everything)."""
        self._blocks.clear()
        self._version += 1
