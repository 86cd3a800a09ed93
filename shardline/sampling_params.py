"""SamplingParams: every generation parameter, with vLLM's names; the one source of truth.

The REST layer maps TGI's `parameters` onto this class and the offline `LLM` API takes it
directly; both turn it into the gRPC messages the shards read with `to_proto()`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from shardline.proto import generate_pb2

_MAX_SEED = 2**64 - 1


class SamplingParamsError(ValueError):
    """A generation parameter is out of range; the message names it."""


@dataclass
class SamplingParams:
    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    typical_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    watermark: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def num_sequences(self) -> int:
        """How many sequences the engine generates for this request."""
        if self.use_beam_search:
            return self.beam_width
        return max(self.n, self.best_of or self.n)

    def validate(self) -> None:
        _check(self.n >= 1, "n", self.n, "must be at least 1")
        if self.best_of is not None:
            _check(self.best_of >= self.n, "best_of", self.best_of, f"must be >= n ({self.n})")
        _check_finite("presence_penalty", self.presence_penalty)
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "must be in [-2, 2]")
        _check_finite("frequency_penalty", self.frequency_penalty)
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty, "must be in [-2, 2]")
        _check_finite("repetition_penalty", self.repetition_penalty)
        _check(self.repetition_penalty > 0.0, "repetition_penalty", self.repetition_penalty, "must be strictly positive")
        _check_finite("temperature", self.temperature)
        _check(self.temperature >= 0.0, "temperature", self.temperature, "must be non-negative")
        _check_finite("top_p", self.top_p)
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k >= 0, "top_k", self.top_k, "must be -1 (disabled), 0 (disabled) or positive")
        _check_finite("min_p", self.min_p)
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "must be in [0, 1]")
        _check_finite("typical_p", self.typical_p)
        _check(0.0 < self.typical_p <= 1.0, "typical_p", self.typical_p, "must be in (0, 1]")
        if self.seed is not None:
            _check(0 <= self.seed <= _MAX_SEED, "seed", self.seed, "must fit in an unsigned 64-bit integer")
        if self.max_tokens is not None:
            _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be at least 1")
        _check(self.min_tokens >= 0, "min_tokens", self.min_tokens, "must be non-negative")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids, "must be non-negative token ids")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check(value >= 0, name, value, "must be non-negative")
        if self.use_beam_search:
            _check(self.beam_width >= 1, "beam_width", self.beam_width, "must be at least 1")
            _check(self.greedy or self.temperature == 1.0, "temperature", self.temperature, "is not used with beam search")
        _check_finite("length_penalty", self.length_penalty)

    def to_proto(
        self, max_new_tokens: int
    ) -> tuple[generate_pb2.NextTokenChooserParameters, generate_pb2.StoppingCriteriaParameters]:
        chooser = generate_pb2.NextTokenChooserParameters(
            temperature=1.0 if self.greedy else self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            typical_p=self.typical_p,
            do_sample=not self.greedy,
            seed=self.seed if self.seed is not None else random.getrandbits(63),
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            min_p=self.min_p,
            watermark=self.watermark,
        )
        stopping = generate_pb2.StoppingCriteriaParameters(
            max_new_tokens=max_new_tokens,
            stop_sequences=self.stop,
            ignore_eos_token=self.ignore_eos,
            min_new_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids,
        )
        return chooser, stopping


def _check(ok: bool, name: str, value: object, requirement: str) -> None:
    if not ok:
        raise SamplingParamsError(f"`{name}` {requirement} (got {value!r})")


def _check_finite(name: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value), name, value, "must be a finite number")
