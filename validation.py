"""TGI's request validation: JSON shape, parameter ranges, limits, tokenization and truncation.

TGI's `parameters` (plus vLLM's extras) are mapped onto `SamplingParams`, the one source of
truth; `Validator.validate` is shared with callers that build `SamplingParams` themselves.
Error messages are TGI's where TGI has one.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from shardline.router.client import request_proto
from shardline.router.errors import ValidationError
from shardline.router.grammar_compiler import GrammarCompiler
from shardline.router.request_types import ValidRequest
from shardline.sampling_params import JSON_OBJECT_SCHEMA, SamplingParams, SamplingParamsError

_MAX_SEED = 2**64 - 1

# name -> accepted JSON type; every other key of `parameters` is rejected.
_PARAMETER_TYPES: dict[str, str] = {
    "best_of": "int",
    "decoder_input_details": "bool",
    "details": "bool",
    "do_sample": "bool",
    "frequency_penalty": "float",
    "grammar": "any",
    "max_new_tokens": "int",
    "repetition_penalty": "float",
    "return_full_text": "bool",
    "seed": "int",
    "stop": "list[str]",
    "temperature": "float",
    "top_k": "int",
    "top_n_tokens": "int",
    "top_p": "float",
    "truncate": "int",
    "typical_p": "float",
    "watermark": "bool",
    "adapter_id": "str",
    "presence_penalty": "float",
    "min_p": "float",
    "min_tokens": "int",
    "ignore_eos": "bool",
    "skip_special_tokens": "bool",
    "stop_token_ids": "list[int]",
    # Beam search (vLLM's names): the best beam is the answer, the others its best_of_sequences.
    "use_beam_search": "bool",
    "beam_width": "int",
    "length_penalty": "float",
    "early_stopping": "any",
}


@dataclass(frozen=True)
class ValidationLimits:
    max_input_tokens: int
    max_total_tokens: int
    vocab_size: int  # the model's embedding rows, which a tokenizer may outnumber
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4


@dataclass(frozen=True)
class ResponseOptions:
    """What shapes the HTTP answer rather than the generation."""

    details: bool = False  # TGI's default: `details` only when asked
    return_full_text: bool = False


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
        loop = asyncio.get_running_loop()
        try:
            encoded = await loop.run_in_executor(self._pool, self._encode, text, add_special_tokens)
        except Exception as error:
            raise ValidationError(f"tokenizer error {error}") from error
        return encoded

    def _encode(self, text: str, add_special_tokens: bool) -> Encoding:
        encoded = self.tokenizer(
            text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
        )
        return Encoding(list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]])

    async def validate_generate(
        self, body: Any, stream: bool
    ) -> tuple[ValidRequest, ResponseOptions]:
        """Validates a TGI `GenerateRequest` JSON body."""
        inputs, parameters = parse_generate_body(body)
        params = _Parameters(parameters)
        self._check_tgi_rules(params, stream)
        sampling = params.sampling_params()
        request = await self.validate(
            inputs,
            sampling,
            max_new_tokens=params.get("max_new_tokens"),
            truncate=params.get("truncate"),
            top_n_tokens=params.get("top_n_tokens") or 0,
            decoder_input_details=params.get("decoder_input_details", False),
        )
        options = ResponseOptions(
            details=params.get("details", False) or params.get("decoder_input_details", False),
            return_full_text=params.get("return_full_text") or False,
        )
        return request, options

    def _check_tgi_rules(self, params: _Parameters, stream: bool) -> None:
        best_of = params.get("best_of")
        if best_of is not None:
            self._check_best_of(best_of, params, stream)
        if params.get("use_beam_search", False):
            self._check_beam_search(params, stream)
        if params.get("max_new_tokens") is not None and params.get("max_new_tokens") <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        top_n = params.get("top_n_tokens")
        if top_n is not None and not 0 <= top_n <= self.limits.max_top_n_tokens:
            raise ValidationError(
                f"`top_n_tokens` must be >= 0 and <= {self.limits.max_top_n_tokens}. Given: {top_n}"
            )
        if stream and params.get("decoder_input_details", False):
            raise ValidationError(
                "`decoder_input_details` == true is not supported when streaming tokens"
            )
        _reject_unsupported(params)

    def _check_best_of(self, best_of: int, params: _Parameters, stream: bool) -> None:
        if best_of > 1 and not params.sampling:
            raise ValidationError("you must use sampling when `best_of` is > 1")
        if best_of > 1 and params.get("seed") is not None:
            raise ValidationError("`seed` must not be set when `best_of` > 1")
        if self.limits.max_best_of == 1 and best_of != 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if not 0 < best_of <= self.limits.max_best_of:
            raise ValidationError(
                f"`best_of` must be > 0 and <= {self.limits.max_best_of}. Given: {best_of}"
            )
        if best_of > 1 and stream:
            raise ValidationError("`best_of` != 1 is not supported when streaming tokens")

    def _check_beam_search(self, params: _Parameters, stream: bool) -> None:
        if stream:
            raise ValidationError(
                "`use_beam_search` is not supported when streaming tokens: the best beam is only "
                "known when the search ends"
            )
        if params.get("top_n_tokens"):
            raise ValidationError("`top_n_tokens` is not supported with beam search")
        width = params.get("beam_width", 1)
        if not 0 < width <= self.limits.max_best_of:
            raise ValidationError(
                f"`beam_width` must be > 0 and <= {self.limits.max_best_of} (--max-best-of). "
                f"Given: {width}"
            )

    async def validate(
        self,
        inputs: str,
        params: SamplingParams,
        max_new_tokens: int | None = None,
        truncate: int | None = None,
        top_n_tokens: int = 0,
        decoder_input_details: bool = False,
        add_special_tokens: bool = True,
    ) -> ValidRequest:
        """Tokenizes, truncates and checks the limits; `max_new_tokens` defaults to fit.

        `add_special_tokens` is False for chat prompts, whose template already wrote them.
        """
        limits = self.limits
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        _check_unicode(inputs)
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
        input_ids = (await self.encode(inputs, add_special_tokens)).ids
        if truncate is not None:
            input_ids = input_ids[-truncate:]
        self._check_vocabulary(input_ids)
        input_length = len(input_ids)
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
        request = ValidRequest(
            inputs=inputs,
            input_ids=input_ids,
            params=params,
            max_new_tokens=max_new_tokens,
            top_n_tokens=top_n_tokens,
            decoder_input_details=decoder_input_details,
        )

        _check_encodable(request)
        request.grammar_index = await self._grammar_index(params)
        return request

    async def _grammar_index(self, params: SamplingParams) -> bytes:
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


def _check_unicode(inputs: str) -> None:
    """A lone surrogate (JSON's "\\ud800") is no text: the tokenizer and UTF-8 refuse it."""
    try:
        inputs.encode()
    except UnicodeEncodeError as error:
        raise ValidationError(
            f"`inputs` is not valid Unicode: it holds a lone surrogate at position {error.start}"
        ) from error


def _check_encodable(request: ValidRequest) -> None:
    """Builds the parameters of the shard's message once, so that whatever cannot be encoded (a
    number beyond its field's width, text that is not UTF-8) fails this request alone, here,
    rather than the batch it would join. The prompt's ids are left out (checked against the
    vocabulary; copying them costs ~50 us a thousand tokens)."""
    try:
        request_proto(replace(request, input_ids=[]), request_id=0)
    except (ValueError, TypeError) as error:  # UnicodeEncodeError is a ValueError
        raise ValidationError(f"the request cannot be sent to the model: {error}") from error


def parse_generate_body(body: Any) -> tuple[str, dict[str, Any]]:
    """Checks the shape of `{"inputs": str, "parameters": {...}}`."""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise ValidationError("`inputs` is required and must be a string")
    parameters = body.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise ValidationError("`parameters` must be a JSON object")
    return inputs, parameters


class _Parameters:
    """Typed access to TGI's `parameters` object; null means absent."""

    def __init__(self, raw: dict[str, Any]) -> None:
        """Unknown names are ignored, as TGI ignores them."""
        self._values = {
            name: _typed(name, value)
            for name, value in raw.items()
            if value is not None and name in _PARAMETER_TYPES
        }

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    @property
    def sampling(self) -> bool:
        """TGI samples when asked to, or when any warper is set."""
        warpers = ("temperature", "top_k", "top_p", "typical_p", "min_p")
        return self.get("do_sample", False) or any(self.get(n) is not None for n in warpers)

    def sampling_params(self) -> SamplingParams:
        temperature = self._positive("temperature", 1.0, "`temperature` must be strictly positive")
        repetition_penalty = self._positive(
            "repetition_penalty", 1.0, "`repetition_penalty` must be strictly positive"
        )
        top_k = self.get("top_k")
        if top_k is not None and top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        seed = self.get("seed")
        if seed is not None and not 0 <= seed <= _MAX_SEED:
            raise ValidationError("`seed` must be >= 0 and fit in an unsigned 64-bit integer")
        try:
            return SamplingParams(
                temperature=temperature if self.sampling else 0.0,
                top_k=top_k or 0,
                top_p=self._open_unit("top_p"),
                typical_p=self._open_unit("typical_p"),
                min_p=self._closed_range("min_p", 0.0, 0.0, 1.0),
                repetition_penalty=repetition_penalty,
                frequency_penalty=self._closed_range("frequency_penalty", 0.0, -2.0, 2.0),
                presence_penalty=self._closed_range("presence_penalty", 0.0, -2.0, 2.0),
                seed=seed,
                stop=self.get("stop", []),
                stop_token_ids=self.get("stop_token_ids", []),
                ignore_eos=self.get("ignore_eos", False),
                max_tokens=self.get("max_new_tokens"),
                min_tokens=self.get("min_tokens", 0),
                skip_special_tokens=self.get("skip_special_tokens", True),
                best_of=self.get("best_of"),
                **self._beam_search(),
                **guided_decoding(self.get("grammar"), "grammar"),
            )
        except SamplingParamsError as error:
            raise ValidationError(str(error)) from error

    def _beam_search(self) -> dict[str, Any]:
        """Every beam comes back: the best is the answer, the others its best_of_sequences."""
        if not self.get("use_beam_search", False):
            return {}
        width = self.get("beam_width", 1)
        return {
            "use_beam_search": True,
            "beam_width": width,
            "n": width,
            "length_penalty": self.get("length_penalty", 1.0),
            "early_stopping": self.get("early_stopping", False),
        }

    def _positive(self, name: str, default: float, message: str) -> float:
        value = self.get(name, default)
        if value <= 0.0:
            raise ValidationError(message)
        return value

    def _open_unit(self, name: str) -> float:
        value = self.get(name)
        if value is None:
            return 1.0
        if not 0.0 < value < 1.0:
            raise ValidationError(f"`{name}` must be > 0.0 and < 1.0")
        return value

    def _closed_range(self, name: str, default: float, low: float, high: float) -> float:
        value = self.get(name, default)
        if not low <= value <= high:
            raise ValidationError(f"`{name}` must be >= {low} and <= {high}")
        return value


def _reject_unsupported(params: _Parameters) -> None:
    if params.get("watermark", False):
        raise ValidationError("`watermark` is not supported by this server")
    if params.get("adapter_id") is not None:
        raise ValidationError("`adapter_id` is not supported: no LoRA adapters are loaded")


_GRAMMAR_TYPES = ("json", "regex", "json_schema", "json_object", "text")


def guided_decoding(spec: Any, name: str) -> dict[str, Any]:
    """SamplingParams' guided_json / guided_regex for TGI's `grammar` ({"type": "json" | "regex",
    "value": ...} or {"type": "json_schema", "value": {"schema": ...}}) or OpenAI's
    `response_format` ({"type": "text" | "json_object"} or {"type": "json_schema",
    "json_schema": {"schema": ...}}); both fields take either shape."""
    if spec is None:
        return {}
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in _GRAMMAR_TYPES:
        raise ValidationError(f"`{name}` must be an object whose `type` is one of {_GRAMMAR_TYPES}")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"guided_json": JSON_OBJECT_SCHEMA}
    if kind == "regex":
        return {"guided_regex": spec.get("value")}
    if kind == "json":
        return {"guided_json": spec.get("value")}
    config = spec.get("json_schema", spec.get("value"))
    if not isinstance(config, dict) or "schema" not in config:
        raise ValidationError(f'`{name}` of type json_schema needs {{"schema": <JSON schema>}}')
    return {"guided_json": config["schema"]}


def _typed(name: str, value: Any) -> Any:
    kind = _PARAMETER_TYPES[name]
    ok = {
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "float": lambda v: (
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ),
        "str": lambda v: isinstance(v, str),
        "list[str]": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "list[int]": lambda v: (
            isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        ),
        "any": lambda v: True,
    }[kind](value)
    if not ok:
        expected = {"float": "a finite number", "list[int]": "a list of token ids"}.get(kind, kind)
        raise ValidationError(f"`{name}` must be {expected} (got {value!r})")
    return value
