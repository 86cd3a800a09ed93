"""Batch state on a shard: the sequences of one cached batch, their KV blocks and block table."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from shardline.proto import generate_pb2
from shardline.shards.kv_cache import BlockAllocator, KVCache
from shardline.shards.prefix_cache import Root, cache_root, remember_sequence
from shardline.shards.sampling.sampling import SamplingState
from shardline.shards.sequences.beam_search import BeamSearch
from shardline.shards.sequences.forking import fork_sequences
from shardline.shards.sequences.stopping import StopRule
from shardline.shards.utils.transfer import to_device


@dataclass
class SequenceState:
    """One generating sequence (a sample or a beam of a request): its KV blocks, which it may
    share with its forks, and its token-level stopping rules."""

    request_id: int
    prompt_len: int
    stop: StopRule
    seed: int
    top_n_tokens: int
    blocks: list[int]
    generated: int = 0
    sequence_index: int = 0
    # What the prefix cache indexes the sequence's blocks by when it ends: its prompt, the
    # tokens it generated (a beam's are its search's: left empty) and its request's cache root.
    prompt_ids: tuple[int, ...] = ()
    generated_ids: list[int] = field(default_factory=list)
    cache_root: Root = ("salt", "")

    @property
    def num_cached(self) -> int:
        """Tokens whose K/V are in the cache: the prompt and all generated tokens but the last."""
        # Read for every row at every step: a conditional costs less than max().
        return self.prompt_len + self.generated - 1 if self.generated else self.prompt_len

    @functools.cached_property
    def max_total_tokens(self) -> int:
        """Kept: summed over the batch at every step; neither term changes."""
        return self.prompt_len + self.stop.max_new_tokens

    @classmethod
    def for_prompt(
        cls, request: generate_pb2.Request, blocks: list[int], model_eos_ids: Iterable[int]
    ) -> SequenceState:
        return cls(
            request_id=request.id,
            prompt_len=len(request.input_ids),
            stop=StopRule.of(request, model_eos_ids),
            seed=request.parameters.seed,
            top_n_tokens=request.top_n_tokens,
            blocks=blocks,
            prompt_ids=tuple(request.input_ids),
            cache_root=cache_root(request),
        )

    def record(self, token_id: int) -> int:
        """Counts a generated token and returns why the sequence stops (NONE: it goes on)."""
        self.generated += 1
        self.generated_ids.append(token_id)
        return self.stop.finish_reason(token_id, self.generated)


@dataclass
class ShardBatch:
    """A cached batch: sequences still generating, in row order, with their sampling state.

    The beams of a beam-search request are consecutive rows; `beams` holds each such request's
    search state.

    `block_table` is kept on the host ([num_seqs, max_blocks] int32, zero-padded) and updated
    in place when a sequence takes a new block, so a decode step builds its inputs with a few
    tensor ops instead of a Python loop over sequences.
    """

    id: int
    sequences: list[SequenceState]
    sampling: SamplingState
    block_table: torch.Tensor
    last_tokens: torch.Tensor
    beams: dict[int, BeamSearch] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.sequences)

    # A batch's `sequences` never change (a step that drops or forks rows makes a new batch):
    # what depends on them alone is computed once, not at every step's `to_proto`.

    @functools.cached_property
    def request_ids(self) -> list[int]:
        """Each request once, in row order."""
        return list(dict.fromkeys(seq.request_id for seq in self.sequences))

    @functools.cached_property
    def max_tokens(self) -> int:
        return sum(seq.max_total_tokens for seq in self.sequences)

    def to_proto(self) -> generate_pb2.CachedBatch:
        return generate_pb2.CachedBatch(
            id=self.id,
            request_ids=self.request_ids,
            size=self.size,
            max_tokens=self.max_tokens,
            current_tokens=sum(seq.num_cached for seq in self.sequences),
        )

    def free_all(self, allocator: BlockAllocator) -> None:
        for seq in self.sequences:
            remember_sequence(allocator, seq)
            allocator.free(seq.blocks)
            seq.blocks = []

    def keep(self, indices: list[int], allocator: BlockAllocator) -> ShardBatch | None:
        """Keeps the rows at `indices` (in that order) and frees the blocks of every other row."""
        if indices == list(range(self.size)):
            return self
        return self.regroup(indices, allocator, cache=None)

    def regroup(
        self,
        parents: list[int],
        allocator: BlockAllocator,
        cache: KVCache | None,
        last_tokens: torch.Tensor | None = None,
        sampling: SamplingState | None = None,
    ) -> ShardBatch | None:
        """The batch whose row i continues row parents[i]: a row named twice or more forks (its
        blocks shared, its partial last block copied), a row not named is freed. `last_tokens`
        and `sampling` default to the parents' own."""
        forked = fork_sequences(self.sequences, parents, allocator, cache)
        if not parents:
            return None
        index = torch.tensor(parents, dtype=torch.long)
        table = self.block_table.index_select(0, index)
        for row, block in forked.copied:
            table[row, len(forked.sequences[row].blocks) - 1] = block
        if last_tokens is None:
            device = self.last_tokens.device
            last_tokens = self.last_tokens.index_select(0, to_device(index, device))
        request_ids = {seq.request_id for seq in forked.sequences}
        return ShardBatch(
            id=self.id,
            sequences=forked.sequences,
            sampling=sampling if sampling is not None else self.sampling.filter(parents),
            block_table=table,
            last_tokens=last_tokens,
            beams={rid: search for rid, search in self.beams.items() if rid in request_ids},
        )

    @classmethod
    def concatenate(cls, batches: list[ShardBatch]) -> ShardBatch:
        if len(batches) == 1:
            return batches[0]
        width = max(batch.block_table.shape[1] for batch in batches)
        tables = [
            torch.nn.functional.pad(batch.block_table, (0, width - batch.block_table.shape[1]))
            for batch in batches
        ]
        return cls(
            id=batches[0].id,
            sequences=[seq for batch in batches for seq in batch.sequences],
            sampling=SamplingState.concatenate([batch.sampling for batch in batches]),
            block_table=torch.cat(tables),
            last_tokens=torch.cat([batch.last_tokens for batch in batches]),
            beams={rid: search for batch in batches for rid, search in batch.beams.items()},
        )


def build_block_table(sequences: list[SequenceState], block_size: int) -> torch.Tensor:
    """A zero-padded [num_seqs, max_blocks] table wide enough for each sequence's whole life."""
    width = max(-(-seq.max_total_tokens // block_size) for seq in sequences)
    table = np.zeros((len(sequences), width), dtype=np.int32)
    for row, seq in enumerate(sequences):  # numpy: a torch row write costs ~4x more on the host
        table[row, : len(seq.blocks)] = seq.blocks
    return torch.from_numpy(table)
