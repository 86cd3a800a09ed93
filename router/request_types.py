"""What flows between validation, the batcher and the routes; free of HTTP and gRPC."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

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

    @property
    def input_length(self) -> int:
        return len(self.input_ids)


@dataclass
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


@dataclass
class StreamEvent:
    """One generated token; `prefill` only on the first event, `finished` only on the last.

    `text` is the generated text this token releases (detokenized, stop sequences held back and
    cut): joined over the events it is `finished.generated_text`.
    """

    index: int
    token: Token
    text: str = ""
    top_tokens: list[Token] = field(default_factory=list)
    prefill: list[Token] = field(default_factory=list)
    finished: Finished | None = None
