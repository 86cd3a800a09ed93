"""Chunked prefill on a shard: the slice of each prompt one prefill pass runs, the pass itself,
and the prompts prefilled in part, whose KV blocks the shard holds between passes.

A request's first pass takes the blocks of its prompt's prefix found in the prefix cache and
allocates the rest; each pass writes the KV of its chunk (from the first token not cached) and
attends to the tokens before it through the cache. Only the pass that reaches the prompt's end
samples a first token and makes the request a row of a cached batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import torch

from shardline.proto import generate_pb2 as pb
from shardline.shards.batch import SequenceState, ShardBatch, build_block_table
from shardline.shards.kv_cache import BlockAllocator, KVCacheExhaustedError
from shardline.shards.model_runner import ModelRunner, PromptChunk, step_positions
from shardline.shards.prefix_cache import remember_prompt, reuse_cached_prefix
from shardline.shards.request_checks import InvalidRequestError
from shardline.shards.sampling.sampling import SamplingState
from shardline.shards.sequences.samples import sampling_rows
from shardline.shards.step_result import PendingStep


@dataclass
class PartialPrompt:
    """A prompt whose first `prefilled` tokens are in the KV cache."""

    sequence: SequenceState
    prefilled: int
    prompt_logprobs: list[float] = field(default_factory=list)
    cached: int = 0  # leading prompt tokens whose blocks came from the prefix cache


@dataclass
class ScheduledChunk:
    """One request's share of a prefill pass: its prompt tokens start .. end - 1."""

    request: pb.Request
    sequence: SequenceState
    start: int  # the first token the pass computes: the chunk's, or the first not cached
    end: int
    earlier_logprobs: list[float]  # of the prompt tokens before `start`, when asked for
    cached: int = 0  # leading prompt tokens whose blocks came from the prefix cache
    looked_up: bool = False  # this pass looked the prompt up in the prefix cache

    @property
    def completes(self) -> bool:
        return self.end == len(self.request.input_ids)

    def model_input(self) -> PromptChunk:
        prompt = self.request.input_ids
        targets = list(prompt[self.start + 1 : self.end + 1])
        return PromptChunk(
            token_ids=list(prompt[self.start : self.end]),
            start=self.start,
            logprob_targets=targets if self.request.decoder_input_details else None,
        )

    def prompt_logprobs(self, chunk_logprobs: list[float]) -> list[float]:
        """The logprobs of the prompt tokens up to this chunk's end (NaN for the first)."""
        first = [math.nan] if self.start == 0 else []
        return [*self.earlier_logprobs, *first, *chunk_logprobs]

    @property
    def computes(self) -> bool:
        """Whether any of the chunk's tokens is not cached (a chunk found whole in the prefix
        cache is prefilled without running)."""
        return self.start < self.end

    def partial(self, chunk_logprobs: list[float]) -> PartialPrompt:
        logprobs = self.prompt_logprobs(chunk_logprobs)
        return PartialPrompt(self.sequence, self.end, logprobs, self.cached)


@dataclass
class PrefillPass:
    """What one prefill pass made."""

    requests: list[pb.Request]  # those whose prompts the pass completed
    sampled_from: list[int]  # for each sampling row, the request (of `requests`) it samples after
    step: PendingStep | None  # the completed prompts' first tokens
    running_step: PendingStep | None  # the running batch's step, run in the same pass
    chunk_logprobs: dict[int, list[float]]  # by chunk row, the pass's own prompt logprobs
    forward_ns: int
    batch: ShardBatch | None = None  # the completed prompts' rows
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)  # by request
    # By request id, for the new prompts looked up in the prefix cache: the tokens found there.
    cached_tokens: dict[int, int] = field(default_factory=dict)


def run_prefill_pass(
    runner: ModelRunner,
    batch_id: int,
    chunks: list[ScheduledChunk],
    sampling: SamplingState | None,
    block_size: int,
    running: ShardBatch | None,
) -> PrefillPass:
    """The forward pass of the chunks that compute (with `running`'s decode step); the prompts
    it completes sample their first tokens with `sampling` and become the rows of a new batch.
    Chunks found whole in the prefix cache are left out (a completing one never is)."""
    computed = [row for row, chunk in enumerate(chunks) if chunk.computes]
    cached = {chunk.request.id: chunk.cached for chunk in chunks if chunk.looked_up}
    if not computed:
        running_step = None
        if running is not None:  # its blocks are grown (ShardEngine._running_step)
            positions = step_positions(running.sequences, 0)
            running_step = runner.decode(running, running.last_tokens, positions)
        return PrefillPass([], [], None, running_step, {}, forward_ns=0, cached_tokens=cached)
    runner_row = {row: index for index, row in enumerate(computed)}
    finishing = [row for row, chunk in enumerate(chunks) if chunk.completes]
    requests = [chunks[row].request for row in finishing]
    sampled_from = [r for r, _ in sampling_rows(requests)]
    table = build_block_table([chunks[row].sequence for row in computed], block_size)
    sample_rows = torch.tensor([runner_row[finishing[r]] for r in sampled_from], dtype=torch.long)
    output = runner.prefill(
        [chunks[row].model_input() for row in computed], sampling, table, sample_rows, running
    )
    result = PrefillPass(
        requests=requests,
        sampled_from=sampled_from,
        step=output.step,
        running_step=output.running_step,
        chunk_logprobs={computed[index]: lps for index, lps in output.prompt_logprobs.items()},
        forward_ns=output.forward_ns,
        cached_tokens=cached,
    )
    if sampling is None or output.step is None:
        return result
    finishing_rows = torch.tensor([runner_row[row] for row in finishing], dtype=torch.long)
    result.batch = ShardBatch(
        id=batch_id,
        sequences=[chunks[row].sequence for row in finishing],
        sampling=sampling,
        block_table=table.index_select(0, finishing_rows),
        last_tokens=output.step.next_tokens,
    )
    result.prompt_logprobs = {
        r: chunks[row].prompt_logprobs(result.chunk_logprobs[row])
        for r, row in enumerate(finishing)
        if row in result.chunk_logprobs
    }
    return result


def run_excess_ahead(
    runner: ModelRunner,
    batch_id: int,
    chunks: list[ScheduledChunk],
    limit: int | None,
    block_size: int,
) -> None:
    """Keeps the pass of `chunks` within `limit` tokens (the largest one warmup sized the memory
    for): where prompts found fewer tokens cached than the router expected, the excess runs
    first, in passes of at most `limit` tokens that write KV and sample nothing. A chunk that
    wants prompt logprobs is never split (its prompt was not looked up, the router budgeted it
    whole), nor the last token of a prompt."""
    excess = sum(chunk.end - chunk.start for chunk in chunks if chunk.computes) - (limit or 0)
    while limit and excess > 0:
        ahead, room = [], min(limit, excess)
        for chunk in chunks:
            last = chunk.end - 1 if chunk.completes else chunk.end
            take = min(room, last - chunk.start)
            if take <= 0 or chunk.request.decoder_input_details:
                continue
            ahead.append(replace(chunk, end=chunk.start + take))
            chunk.start += take
            room -= take
        if not ahead:
            return
        run_prefill_pass(runner, batch_id, ahead, None, block_size, None)
        excess -= min(limit, excess) - room


def remember_prompts(chunks: list[ScheduledChunk], allocator: BlockAllocator) -> None:
    """Indexes the full prompt blocks whose KV the pass of these chunks has written."""
    for chunk in chunks:
        remember_prompt(allocator, chunk.sequence, chunk.end)


def chunk_end(request: pb.Request) -> int:
    prompt_len = len(request.input_ids)
    if not request.chunk_len:
        return prompt_len
    return min(request.prefix_len + request.chunk_len, prompt_len)


class PartialPrompts:
    """The prompts prefilled in part, by request id."""

    def __init__(self) -> None:
        self._prompts: dict[int, PartialPrompt] = {}

    def check(self, request: pb.Request) -> None:
        """A new prompt must not be under way; a continued one must be, up to `prefix_len`."""
        partial = self._prompts.get(request.id)
        if request.prefix_len == 0:
            if partial is not None:
                raise InvalidRequestError(f"request {request.id} is already being prefilled")
            return
        if partial is None:
            raise InvalidRequestError(
                f"request {request.id} continues a prompt at token {request.prefix_len}, "
                "but none of it was prefilled"
            )
        if partial.prefilled != request.prefix_len:
            raise InvalidRequestError(
                f"request {request.id} continues its prompt at token {request.prefix_len}, "
                f"but {partial.prefilled} tokens were prefilled"
            )
        if partial.sequence.prompt_len != len(request.input_ids):
            raise InvalidRequestError(f"request {request.id} changed its prompt between chunks")

    def schedule(
        self,
        requests: Sequence[pb.Request],
        allocator: BlockAllocator,
        model_eos_ids: Iterable[int],
    ) -> list[ScheduledChunk]:
        """Each request's chunk: the earlier chunks of continued prompts taken back, the blocks
        of new prompts found cached or allocated (all or none)."""
        for request in requests:
            self.check(request)
        new = [request for request in requests if request.prefix_len == 0]
        blocks = self._blocks_of_new(new, allocator)
        continued = {r.id: self.take(r.id) for r in requests if r.prefix_len}
        chunks = []
        for request in requests:
            end = chunk_end(request)
            partial = continued.get(request.id)
            if partial is None:
                held, found = blocks[request.id]
                sequence = SequenceState.for_prompt(request, held, model_eos_ids)
                cached = len(found or ()) * allocator.block_size
                start = min(cached, end)
                chunk = ScheduledChunk(request, sequence, start, end, [], cached, found is not None)
            else:
                start = min(max(request.prefix_len, partial.cached), end)
                chunk = ScheduledChunk(
                    request, partial.sequence, start, end, partial.prompt_logprobs, partial.cached
                )
            chunks.append(chunk)
        return chunks

    @staticmethod
    def _blocks_of_new(
        requests: list[pb.Request], allocator: BlockAllocator
    ) -> dict[int, tuple[list[int], list[int] | None]]:
        """Each new prompt's blocks (those of its prefix found in the prefix cache, then new
        ones) and the blocks found cached (None: not looked up); all or none."""
        lookups = {request.id: reuse_cached_prefix(allocator, request) for request in requests}
        found = {request_id: blocks or [] for request_id, blocks in lookups.items()}
        needed = [
            allocator.blocks_for(len(request.input_ids)) - len(found[request.id])
            for request in requests
        ]
        if sum(needed) > allocator.num_free:
            for blocks in found.values():
                allocator.free(blocks)
            raise KVCacheExhaustedError(
                f"the prompts of {len(requests)} new requests need {sum(needed)} KV blocks, "
                f"{allocator.num_free} are free"
            )
        return {
            request.id: (found[request.id] + allocator.allocate(n), lookups[request.id])
            for request, n in zip(requests, needed, strict=True)
        }

    def take(self, request_id: int) -> PartialPrompt:
        return self._prompts.pop(request_id)

    def put(self, request_id: int, partial: PartialPrompt) -> None:
        self._prompts[request_id] = partial

    def drop(self, request_ids: list[int], allocator: BlockAllocator | None) -> None:
        """Frees the blocks of these requests' partial prompts; unknown ids are skipped."""
        for request_id in request_ids:
            partial = self._prompts.pop(request_id, None)
            if partial is not None and allocator is not None:
                allocator.free(partial.sequence.blocks)

    def drop_all(self, allocator: BlockAllocator | None) -> None:
        self.drop(list(self._prompts), allocator)
