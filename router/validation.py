"""The router's validation, for every API and the offline `LLM`: tokenization, truncation, the
vocabulary and the length limits (the token budget resolved against the context). Bodies are
parsed by their models (router/schemas/) and mapped onto `SamplingParams` (tgi_params.py,
openai_params.py), which checks their ranges. Error messages are TGI's where TGI has one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from shardline.guided_decoding import JSON_OBJECT_SCHEMA
from shardline.router.client import request_proto
from shardline.router.errors import ValidationError
from shardline.router.grammar_compiler import GrammarCompiler
from shardline.router.request_types import ValidRequest
from shardline.router.schemas.common import Grammar
from shardline.sampling_params import SamplingParams, SamplingParamsError, check_text


@dataclass(frozen=True)
class ValidationLimits:
    max_input_tokens: int
    max_total_tokens: int
    vocab_size: int  # the model's embedding rows, which a tokenizer may outnumber
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4


T = TypeVar("T")


@dataclass(frozen=True)
class Encoding:
    ids: list[int]
    offsets: list[tuple[int, int]]


class Validator:
    def __init__(
        self,
        tokenizer: Any,
        limits: ValidationLimits,
        workers: int = 2,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        """`grammars` None: requests with a grammar are refused (--disable-grammar-support)."""
        self.tokenizer = tokenizer
        self.limits = limits
        self.workers = workers
        self.grammars = grammars
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenizer")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.grammars is not None:
            self.grammars.close()

    async def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        """The ids with each token's character span (the tokenize routes)."""
        return await self._in_pool(self._encode, text, add_special_tokens)

    async def encode_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids alone: a request's prompt (the spans cost ~15 % more tokenizer time)."""
        return await self._in_pool(self._ids, text, add_special_tokens)

    async def _in_pool(self, encode: Callable[[str, bool], T], text: str, special: bool) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, encode, text, special)
        except Exception as error:
            raise ValidationError(f"tokenizer error {error}") from error

    def _encode(self, text: str, add_special_tokens: bool) -> Encoding:
        encoded = self.tokenizer(
            text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
        )
        return Encoding(list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]])

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    async def validate(
        self,
        inputs: str,
        params: SamplingParams,
        truncate: int | None = None,
        top_n_tokens: int = 0,
        decoder_input_details: bool = False,
        add_special_tokens: bool = True,
    ) -> ValidRequest:
        """Tokenizes, truncates and checks the limits (see `token_budget`).

        `add_special_tokens` is False for chat prompts, whose template already wrote them.
        """
        limits = self.limits
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        try:
            check_text("inputs", inputs)  # the tokenizer and UTF-8 refuse a lone surrogate
        except SamplingParamsError as error:
            raise ValidationError(str(error)) from None
        if len(params.stop) > limits.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
                f"Given: {len(params.stop)}"
            )
        if truncate is not None and not 0 < truncate <= limits.max_input_tokens:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. "
                f"Given: {truncate}"
            )
        input_ids = await self.encode_ids(inputs, add_special_tokens)
        if truncate is not None:
            input_ids = input_ids[-truncate:]
        request = ValidRequest(
            inputs=inputs,
            input_ids=input_ids,
            params=params,
            max_new_tokens=self.token_budget(input_ids, params),
            top_n_tokens=top_n_tokens,
            decoder_input_details=decoder_input_details,
        )
        _check_encodable(request)
        request.grammar_index = await self.grammar_index(params)
        return request

    def token_budget(self, input_ids: list[int], params: SamplingParams) -> int:
        """The tokens this prompt may generate: `params.max_tokens`, or by default what the
        context leaves; the prompt is checked against the vocabulary and the length limits."""
        limits = self.limits
        if not input_ids:
            raise ValidationError("`inputs` has no tokens")
        self._check_vocabulary(input_ids)
        self._check_logit_bias(params)
        input_length = len(input_ids)
        max_new_tokens = params.max_tokens
        if max_new_tokens is None:
            max_new_tokens = max(limits.max_total_tokens - input_length, 0)
        if input_length + max_new_tokens > limits.max_total_tokens:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
            )
        if input_length > limits.max_input_tokens:
            raise ValidationError(
                f"`inputs` must have less than {limits.max_input_tokens} tokens. "
                f"Given: {input_length}"
            )
        if max_new_tokens <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if params.min_tokens > max_new_tokens:
            raise ValidationError(
                f"`min_tokens` must be <= `max_new_tokens` ({max_new_tokens}). "
                f"Given: {params.min_tokens}"
            )
        return max_new_tokens

    async def grammar_index(self, params: SamplingParams) -> bytes:
        """The compiled grammar, off the event loop and within the grammar budget (last: the
        cheap checks refuse a request first)."""
        grammar = params.grammar()
        if grammar is None:
            return b""
        if self.grammars is None:
            raise ValidationError("grammar is not supported")
        return await self.grammars.compile(*grammar)

    def _check_vocabulary(self, input_ids: list[int]) -> None:
        vocab_size = self.limits.vocab_size
        outside = next((token for token in input_ids if token >= vocab_size), None)
        if outside is not None:
            raise ValidationError(
                f"`inputs` has token id {outside}, outside the model's vocabulary of "
                f"{vocab_size} tokens (the tokenizer knows more tokens than the model)"
            )

    def _check_logit_bias(self, params: SamplingParams) -> None:
        outside = sorted(t for t in params.logit_bias or {} if t >= self.limits.vocab_size)
        if outside:
            raise ValidationError(
                f"`logit_bias` has token id {outside[0]}, outside the model's vocabulary of "
                f"{self.limits.vocab_size} tokens"
            )


def _check_encodable(request: ValidRequest) -> None:
    """Builds the parameters of the shard's message once, so that whatever cannot be encoded (a
    number beyond its field's width, text that is not UTF-8) fails this request alone, here,
    rather than the batch it would join. The prompt's ids are left out (checked against the
    vocabulary; copying them costs ~50 us a thousand tokens)."""
    try:
        request_proto(replace(request, input_ids=[]), request_id=0)
    except (ValueError, TypeError) as error:  # UnicodeEncodeError is a ValueError
        raise ValidationError(f"the request cannot be sent to the model: {error}") from error


def guided_decoding(spec: Grammar | None, name: str) -> dict[str, Any]:
    """SamplingParams' guided_json / guided_regex for a request's constrained output."""
    if spec is None or spec.type == "text":
        return {}
    if spec.type == "json_object":
        return {"guided_json": JSON_OBJECT_SCHEMA}
    if spec.type == "regex":
        return {"guided_regex": spec.value}
    if spec.type == "json":
        return {"guided_json": spec.value}
    config = spec.json_schema if spec.json_schema is not None else spec.value
    if not isinstance(config, dict) or "schema" not in config:
        raise ValidationError(f'`{name}` of type json_schema needs {{"schema": <JSON schema>}}')
    return {"guided_json": config["schema"]}
