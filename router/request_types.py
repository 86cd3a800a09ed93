"""What flows between validation, the batcher and the routes; free of HTTP and gRPC."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from shardline.sampling_params import SamplingParams


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass
class ValidRequest:
    """A validated, tokenized request, ready for the queue."""

    inputs: str
    input_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    top_n_tokens: int = 0
    decoder_input_details: bool = False
    grammar_index: bytes = b""  # params.grammar() compiled by the router's GrammarCompiler

    @property
    def input_length(self) -> int:
        return len(self.input_ids)

    def budget_tokens(self, block_size: int) -> int:
        """KV slots the request may need. Its sequences share the prompt's full blocks; each
        has its own copy of the partial last one and its own blocks for generated tokens."""
        count = self.params.num_sequences
        shared = self.input_length // block_size * block_size if count > 1 else 0
        own = -(-(self.input_length - shared + self.max_new_tokens) // block_size) * block_size
        return shared + count * own


@dataclass(slots=True)  # one per generated token: slots make it cheaper to build and read
class Token:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass
class Finished:
    """Carried by the last event of a request."""

    reason: FinishReason
    generated_text: str
    generated_tokens: int
    input_length: int
    seed: int | None
    stop_reason: str | int | None = None
    """vLLM's: the stop sequence that matched, or the stop token id; None for EOS or length."""
    cached_tokens: int = 0
    """Prompt tokens the shards found in their prefix cache (not computed)."""


@dataclass(slots=True)
class StreamEvent:
    """One generated token; `prefill` only on the first event, `finished` only on the last
    (of each sequence, for a request of several: the stream ends when all of them finished).

    `text` is the generated text this token releases (detokenized, stop sequences held back and
    cut): joined over the events it is `finished.generated_text`.
    """

    index: int
    token: Token
    text: str = ""
    sequence_index: int = 0  # which of the request's best_of / n samples or beams
    # empty tuples unless set: most events carry neither, and two new lists a token were two
    # more objects for the garbage collector's full passes to walk
    top_tokens: Sequence[Token] = ()
    prefill: Sequence[Token] = ()
    finished: Finished | None = None


def by_sequence(events: list[StreamEvent]) -> list[list[StreamEvent]]:
    """A request's events split by sequence (its n / best_of samples or beams), in order."""
    grouped: dict[int, list[StreamEvent]] = {}
    for event in events:
        grouped.setdefault(event.sequence_index, []).append(event)
    return [grouped[index] for index in sorted(grouped)]


def mean_logprob(sequence: list[StreamEvent]) -> float:
    """Per generated token: how TGI's best_of and OpenAI's best_of rank samples."""
    return sum(event.token.logprob or 0.0 for event in sequence) / len(sequence)
