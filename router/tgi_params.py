"""TGI's API onto the engine: a parsed `GenerateRequest` checked against the rules that hang on
the server's flags (`--max-best-of`, `--max-top-n-tokens`), mapped onto `SamplingParams` (which
checks the ranges) and validated by the `Validator`; `ResponseOptions` shape its answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardline.router.errors import ValidationError
from shardline.router.request_types import ValidRequest
from shardline.router.schemas.tgi import GenerateParameters, GenerateRequest
from shardline.router.validation import ValidationLimits, Validator, guided_decoding
from shardline.sampling_params import SamplingParams, SamplingParamsError


@dataclass(frozen=True)
class ResponseOptions:
    """What shapes the HTTP answer rather than the generation."""

    details: bool = False  # TGI's default: `details` only when asked
    return_full_text: bool = False


async def validate_generate(
    validator: Validator, generate: GenerateRequest, stream: bool
) -> tuple[ValidRequest, ResponseOptions]:
    parameters = generate.generation
    _check_tgi_rules(parameters, validator.limits, stream)
    request = await validator.validate(
        generate.inputs,
        tgi_sampling_params(parameters),
        truncate=parameters.truncate,
        top_n_tokens=parameters.top_n_tokens or 0,
        decoder_input_details=parameters.decoder_input_details,
    )
    options = ResponseOptions(
        details=parameters.details or parameters.decoder_input_details,
        return_full_text=parameters.return_full_text or False,
    )
    return request, options


def _check_tgi_rules(
    parameters: GenerateParameters, limits: ValidationLimits, stream: bool
) -> None:
    if parameters.best_of is not None:
        _check_best_of(parameters, limits, stream)
    if parameters.use_beam_search:
        _check_beam_search(parameters, limits, stream)
    top_n = parameters.top_n_tokens
    if top_n is not None and top_n > limits.max_top_n_tokens:
        raise ValidationError(
            f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n}"
        )
    if stream and parameters.decoder_input_details:
        raise ValidationError(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    if parameters.adapter_id is not None:
        raise ValidationError("`adapter_id` is not supported: no LoRA adapters are loaded")


def _check_best_of(parameters: GenerateParameters, limits: ValidationLimits, stream: bool) -> None:
    best_of = parameters.best_of
    if best_of > 1 and not parameters.samples:
        raise ValidationError("you must use sampling when `best_of` is > 1")
    if best_of > 1 and parameters.seed is not None:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    if limits.max_best_of == 1 and best_of != 1:
        raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
    if best_of > limits.max_best_of:
        raise ValidationError(
            f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}"
        )
    if best_of > 1 and stream:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")


def _check_beam_search(
    parameters: GenerateParameters, limits: ValidationLimits, stream: bool
) -> None:
    if stream:
        raise ValidationError(
            "`use_beam_search` is not supported when streaming tokens: the best beam is only "
            "known when the search ends"
        )
    if parameters.top_n_tokens:
        raise ValidationError("`top_n_tokens` is not supported with beam search")
    width = parameters.beam_width
    if width > limits.max_best_of:
        raise ValidationError(
            f"`beam_width` must be > 0 and <= {limits.max_best_of} (--max-best-of). Given: {width}"
        )


def tgi_sampling_params(parameters: GenerateParameters) -> SamplingParams:
    """TGI's `parameters` as `SamplingParams`, which checks their ranges. Unset (None) numbers
    take their neutral value: `or` is safe, as none of their zeros is both valid and not neutral."""
    p = parameters
    try:
        return SamplingParams(
            temperature=(p.temperature or 1.0) if p.samples else 0.0,
            top_k=p.top_k or 0,
            top_p=p.top_p or 1.0,
            typical_p=p.typical_p or 1.0,
            min_p=p.min_p or 0.0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            presence_penalty=p.presence_penalty or 0.0,
            seed=p.seed,
            stop=p.stop,
            include_stop_str_in_output=True,  # TGI's generated_text keeps the stop sequence
            stop_token_ids=p.stop_token_ids,
            ignore_eos=p.ignore_eos,
            max_tokens=p.max_new_tokens,
            min_tokens=p.min_tokens,
            skip_special_tokens=p.skip_special_tokens,
            best_of=p.best_of,
            watermark=p.watermark,
            cache_salt=p.cache_salt,
            **_beam_search(p),
            **guided_decoding(p.grammar, "grammar"),
        )
    except SamplingParamsError as error:
        raise ValidationError(str(error)) from error


def _beam_search(parameters: GenerateParameters) -> dict[str, Any]:
    """Every beam comes back: the best is the answer, the others its best_of_sequences."""
    if not parameters.use_beam_search:
        return {}
    return {
        "use_beam_search": True,
        "beam_width": parameters.beam_width,
        "n": parameters.beam_width,
        "length_penalty": parameters.length_penalty,
        "early_stopping": parameters.early_stopping,
    }
