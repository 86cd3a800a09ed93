"""SamplingParams: every generation parameter, with vLLM's names; the one source of truth.

The REST layer maps TGI's `parameters` onto this class and the offline `LLM` API takes it
directly; both turn it into the gRPC messages the shards read with `to_proto()`.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from shardline.guided_decoding import check_grammar, grammar_of
from shardline.param_checks import SamplingParamsError as SamplingParamsError
from shardline.param_checks import (
    as_float32,
    as_list,
    check,
    check_finite,
    check_int,
    check_range,
    check_text,
    is_int,
    is_number,
)
from shardline.proto import generate_pb2

logger = logging.getLogger(__name__)

# Seeds are uint64 in the shard protocol (TGI's `seed` too).
MAX_SEED = 2**64 - 1
# The shard protocol's widths: counts, token ids and top_k are uint32, floats are float32.
MAX_UINT32 = 2**32 - 1
# vLLM's thresholds: below the first a temperature means greedy, below the second (and above 0)
# it is raised to the second, as dividing logits by it would overflow.
GREEDY_TEMPERATURE = 1e-5
MIN_TEMPERATURE = 1e-2
# OpenAI's documented range of a logit_bias value.
LOGIT_BIAS_LIMIT = 100.0
PENALTY_LIMIT = 2.0  # presence and frequency penalties lie in [-2, 2], as in OpenAI's API


@dataclass
class SamplingParams:
    """vLLM's SamplingParams, plus TGI's typical_p and watermark and vLLM's beam search fields.

    As in vLLM: temperature 0 means greedy (and resets top_p, top_k and min_p, here typical_p
    too), a temperature in (0, 0.01) is raised to 0.01, top_k -1 means 0 (off), seed -1 means
    none, stop may be one string, duplicate stop_token_ids are dropped, logprobs -1 means the
    whole vocabulary. watermark is TGI's flag (Kirchenbauer et al.'s green-list watermark, not
    with beam search). logit_bias maps token ids to a bias in [-100, 100] added to their logits
    (OpenAI's range; the router and LLM check the ids against the vocabulary). guided_json (a
    JSON schema, as a dict or JSON text) and guided_regex constrain the output as vLLM's do
    (TGI's `grammar`); at most one, no beam search. include_stop_str_in_output keeps a matched
    stop string at the end of the text, as vLLM's does. cache_salt (vLLM's) keeps the request's
    prefix-cache hits among requests of the same salt: a non-empty string, or None.
    """

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
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    use_beam_search: bool = False
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    watermark: bool = False
    logit_bias: dict[int, float] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        self._normalize()
        self.validate()
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if self.temperature < GREEDY_TEMPERATURE:
            self.top_p, self.top_k, self.min_p, self.typical_p = 1.0, 0, 0.0, 1.0

    def _normalize(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = as_list(self.stop)
        self.stop_token_ids = as_list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        if self.seed == -1:
            self.seed = None
        if is_number(self.temperature) and 0.0 < self.temperature < MIN_TEMPERATURE:
            logger.warning(
                "temperature %s raised to %s to keep the logits finite",
                self.temperature,
                MIN_TEMPERATURE,
            )
            self.temperature = MIN_TEMPERATURE

    @property
    def greedy(self) -> bool:
        """No randomness: temperature 0, or beam search (which ranks beams, never samples)."""
        return self.use_beam_search or self.temperature < GREEDY_TEMPERATURE

    @property
    def num_sequences(self) -> int:
        """How many sequences the engine generates for this request."""
        if self.use_beam_search:
            return self.beam_width
        return max(self.n, self.best_of or self.n)

    def validate(self) -> None:
        self._validate_counts()
        self._validate_penalties()
        self._validate_warpers()
        self._validate_stopping()
        self._validate_outputs()
        self._validate_beam_search()
        self._validate_grammar()
        if self.temperature < GREEDY_TEMPERATURE and not self.use_beam_search:
            check(self.num_sequences == 1, "n", self.n, "must be 1 with greedy sampling")
        check(
            isinstance(self.watermark, bool), "watermark", self.watermark, "must be true or false"
        )
        self._validate_logit_bias()
        if self.cache_salt is not None:
            salted = isinstance(self.cache_salt, str) and bool(self.cache_salt)
            check(salted, "cache_salt", self.cache_salt, "must be a non-empty string")

    def _validate_counts(self) -> None:
        check_int("n", self.n, minimum=1, maximum=MAX_UINT32)
        if self.best_of is not None:
            check_int("best_of", self.best_of, minimum=self.n, maximum=MAX_UINT32)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=0, maximum=MAX_SEED)

    def _validate_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            check_range(name, getattr(self, name), -PENALTY_LIMIT, PENALTY_LIMIT)
        check_finite("repetition_penalty", self.repetition_penalty)
        check(
            as_float32(self.repetition_penalty) > 0.0,
            "repetition_penalty",
            self.repetition_penalty,
            "must be > 0",
        )

    def _validate_warpers(self) -> None:
        check_finite("temperature", self.temperature)
        check(self.temperature >= 0.0, "temperature", self.temperature, "must be >= 0")
        check_finite("top_p", self.top_p)
        check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "must be in (0, 1]")
        check_int(
            "top_k",
            self.top_k,
            minimum=0,
            maximum=MAX_UINT32,
            requirement=f"must be -1 or 0 (off), or in [1, {MAX_UINT32}]",
        )
        check_range("min_p", self.min_p, 0.0, 1.0)
        check_finite("typical_p", self.typical_p)
        check(0.0 < self.typical_p <= 1.0, "typical_p", self.typical_p, "must be in (0, 1]")

    def _validate_stopping(self) -> None:
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens, minimum=1, maximum=MAX_UINT32)
        check_int("min_tokens", self.min_tokens, minimum=0, maximum=MAX_UINT32)
        if self.max_tokens is not None:
            check(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                self.min_tokens,
                f"must be <= max_tokens ({self.max_tokens})",
            )
        check(
            isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            self.stop,
            "must hold non-empty strings",
        )
        for stop in self.stop:
            check_text("stop", stop)
        check(
            isinstance(self.stop_token_ids, list)
            and all(is_int(t) and 0 <= t <= MAX_UINT32 for t in self.stop_token_ids),
            "stop_token_ids",
            self.stop_token_ids,
            f"must hold token ids in [0, {MAX_UINT32}]",
        )

    def _validate_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        check(isinstance(self.logit_bias, dict), "logit_bias", self.logit_bias, "must be a dict")
        for token_id, bias in self.logit_bias.items():
            requirement = "must map token ids (integers >= 0) to biases"
            check_int("logit_bias", token_id, 0, MAX_UINT32, requirement)
            check_finite("logit_bias", bias)
            in_range = -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT
            check(in_range, "logit_bias", {token_id: bias}, "values must be in [-100, 100]")

    def _validate_outputs(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                check_int(name, value, minimum=-1, requirement="must be >= 0, or -1 (all)")

    def _validate_beam_search(self) -> None:
        check_finite("length_penalty", self.length_penalty)
        check(
            self.early_stopping in (True, False, "never"),
            "early_stopping",
            self.early_stopping,
            "must be true, false or 'never'",
        )
        if not self.use_beam_search:
            return
        check_int("beam_width", self.beam_width, minimum=1, maximum=MAX_UINT32)
        check(self.n <= self.beam_width, "n", self.n, f"must be <= beam_width ({self.beam_width})")
        check(self.best_of is None, "best_of", self.best_of, "is not used with beam search")
        check(
            self.temperature in (0.0, 1.0),
            "temperature",
            self.temperature,
            "must be 0 or 1 with beam search (beams are ranked, not sampled)",
        )
        for name, neutral in _BEAM_SEARCH_NEUTRAL.items():
            value = getattr(self, name)
            check(value == neutral, name, value, "is not supported with beam search")

    def _validate_grammar(self) -> None:
        check_grammar(self.guided_json, self.guided_regex, self.use_beam_search)

    def grammar(self) -> tuple[int, str] | None:
        """(GrammarType, the schema's JSON text or the regex); None without guided decoding.
        Whether it compiles is only known over the model's vocabulary: the router's
        GrammarCompiler tells, under its time budget."""
        return grammar_of(self.guided_json, self.guided_regex)

    def _grammar_fields(self) -> dict[str, Any]:
        grammar = self.grammar()
        return {} if grammar is None else {"grammar_type": grammar[0], "grammar": grammar[1]}

    def beam_search_proto(self) -> generate_pb2.BeamSearchParameters | None:
        """The shard's beam search message; None without beam search."""
        if not self.use_beam_search:
            return None
        return generate_pb2.BeamSearchParameters(
            beam_width=self.beam_width,
            length_penalty=self.length_penalty,
            early_stopping=_EARLY_STOPPING[self.early_stopping],
            num_return_sequences=self.n,
        )

    def to_proto(
        self, max_new_tokens: int, sequence_index: int = 0
    ) -> tuple[generate_pb2.NextTokenChooserParameters, generate_pb2.StoppingCriteriaParameters]:
        """The shard messages for sequence `sequence_index` of this request.

        Each of the n / best_of sequences of a seeded request gets seed + sequence_index (as
        vLLM does), so they differ from one another and stay reproducible; an unseeded request
        gets a fresh random seed per call.
        """
        if self.seed is None:
            seed = random.getrandbits(63)
        else:
            seed = (self.seed + sequence_index) % (MAX_SEED + 1)
        chooser = generate_pb2.NextTokenChooserParameters(
            temperature=1.0 if self.greedy else self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            typical_p=self.typical_p,
            do_sample=not self.greedy,
            seed=seed,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            min_p=self.min_p,
            watermark=self.watermark,
            logit_bias=self.logit_bias or {},
            **self._grammar_fields(),
        )
        stopping = generate_pb2.StoppingCriteriaParameters(
            max_new_tokens=max_new_tokens,
            ignore_eos_token=self.ignore_eos,
            min_new_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids,
        )
        return chooser, stopping


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's parameters of `LLM.beam_search`: every one of the beam_width beams comes back."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            use_beam_search=True,
            beam_width=self.beam_width,
            n=self.beam_width,
            max_tokens=self.max_tokens,
            ignore_eos=self.ignore_eos,
            temperature=self.temperature,
            length_penalty=self.length_penalty,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


# Beam search ranks beams by their logprobs: these settings have no meaning there (penalties
# would need each beam's own token history; stop strings a text match on hidden beams).
_BEAM_SEARCH_NEUTRAL: dict[str, object] = {
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "stop": [],
    "logprobs": None,
    "watermark": False,
}

_EARLY_STOPPING = {
    False: generate_pb2.EARLY_STOPPING_HEURISTIC,
    True: generate_pb2.EARLY_STOPPING_ALWAYS,
    "never": generate_pb2.EARLY_STOPPING_NEVER,
}
