"""What the OpenAI-style requests (chat completions, completions, the Responses API) share in
mapping their models onto `SamplingParams`, which checks every range."""

from __future__ import annotations

from typing import Any

from shardline.router.errors import ValidationError
from shardline.router.schemas.openai import OpenAIRequest, Sampling, VllmSampling
from shardline.router.validation import guided_decoding
from shardline.sampling_params import SamplingParams, SamplingParamsError

_PASSED_ON = frozenset(VllmSampling.model_fields)


def requested_max_tokens(request: Sampling) -> int | None:
    """The token budget a request asks for: chat's `max_completion_tokens` (OpenAI's newer
    name) wins over `max_tokens`; the Responses API's is `max_output_tokens`. None: what the
    context leaves (`Validator.validate`)."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = getattr(request, name, None)
        if value is not None:
            return value
    return None


def sampling_params(request: Sampling, **extra: Any) -> SamplingParams:
    """`SamplingParams` of the request's sampling fields (vLLM's names) and the API's `extra`."""
    passed = request.model_dump(include=_PASSED_ON, exclude_none=True)
    try:
        return SamplingParams(max_tokens=requested_max_tokens(request), **passed, **extra)
    except SamplingParamsError as error:
        raise ValidationError(str(error)) from error


def openai_extras(request: OpenAIRequest, response_format: Any) -> dict[str, Any]:
    """Chat's and completions' further parameters: `n`, `logit_bias` and the constrained output
    (`response_format`, or a tool's grammar)."""
    return {
        "n": request.n or 1,
        **_logit_bias(request.logit_bias),
        **guided_decoding(response_format, "response_format"),
    }


def include_usage(request: OpenAIRequest) -> bool:
    if request.stream_options is None or not request.stream_options.model_fields_set:
        return False
    if not request.stream:
        raise ValidationError("`stream_options` is only allowed when `stream` is true")
    return bool(request.stream_options.include_usage)


def _logit_bias(value: dict[str, float] | None) -> dict[str, Any]:
    """SamplingParams' logit_bias of OpenAI's, whose keys are token ids as strings (the
    numbers' range is SamplingParams' to check)."""
    if value is None:
        return {}
    return {"logit_bias": {int(key): number for key, number in value.items()}}
