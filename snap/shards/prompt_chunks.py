"""Chunked prefill on a shard: the slice of each prompt one prefill pass runs, and the prompts
prefilled in part, whose KV blocks the shard holds between passes.

A request's first pass allocates the blocks of its whole prompt; each pass writes the KV of its
chunk and attends to the chunks before it through the cache. Only the pass that reaches the
prompt's end samples a first token and makes the request a row of a cached batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from shardline.proto import generate_pb2 as pb
from shardline.shards.batch import SequenceState
from shardline.shards.kv_cache import BlockAllocator
from shardline.shards.model_runner import PromptChunk
from shardline.shards.request_checks import InvalidRequestError


@dataclass
class PartialPrompt:
    """A prompt whose first `prefilled` tokens are in the KV cache."""

    sequence: SequenceState
    prefilled: int
    prompt_logprobs: list[float] = field(default_factory=list)


@dataclass
class ScheduledChunk:
    """One request's share of a prefill pass: its prompt tokens start .. end - 1."""

    request: pb.Request
    sequence: SequenceState
    start: int
    end: int
    earlier_logprobs: list[float]  # of the prompt tokens before `start`, when asked for

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

    def partial(self, chunk_logprobs: list[float]) -> PartialPrompt:
        return PartialPrompt(self.sequence, self.end, self.prompt_logprobs(chunk_logprobs))


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
