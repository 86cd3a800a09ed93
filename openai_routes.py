"""TGI's OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models and
/chat_tokenize, plus /invocations dispatching on the body's shape as TGI does.

Parameters map onto `SamplingParams` (vLLM's names, so vLLM's extras come for free) and every
prompt goes through `Validator.validate`, as for TGI's own routes; `n` samples of a prompt are
the sequences of one request, as `best_of` on /generate. Tools are TGI's tool calling
(`router/tools.py`). Serving is `router/openai_serving.py`, the bodies `router/openai_bodies.py`.
What this server cannot do (logit_bias, suffix, best_of beyond n) is a 422, never silently ignored.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from shardline.router.chat_template import parse_messages, render_chat
from shardline.router.errors import ValidationError
from shardline.router.http import RouterContext, context, read_json
from shardline.router.openai_bodies import present
from shardline.router.openai_serving import OpenAIJob, serve
from shardline.router.tools import ToolError, parse_tool_calling, render_with_tools
from shardline.router.validation import guided_decoding
from shardline.sampling_params import SamplingParams, SamplingParamsError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# SamplingParams checks their types and ranges; the names are vLLM's, as OpenAI clients send.
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
)
_COMMON_FIELDS = (
    *_SAMPLING_FIELDS,
    "model",
    "user",
    "stream",
    "stream_options",
    "max_tokens",
    "n",
    "logit_bias",
    "logprobs",
)
_CHAT_FIELDS = frozenset(
    {
        *_COMMON_FIELDS,
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "tool_prompt",
    }
)
_COMPLETION_FIELDS = frozenset(
    {*_COMMON_FIELDS, "prompt", "echo", "suffix", "best_of", "response_format"}
)


# ---- routes ------------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, chat_job, present, await read_json(request))


async def completions(request: web.Request) -> web.StreamResponse:
    return await serve(request, _completion_job, present, await read_json(request))


async def models(request: web.Request) -> web.Response:
    model_id = context(request).info["model_id"]
    model = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": model_id}
    return web.json_response({"object": "list", "data": [model]})


async def chat_tokenize(request: web.Request) -> web.Response:
    ctx = context(request)
    text = chat_job(ctx, await read_json(request)).prompts[0]
    encoding = await ctx.validator.encode(text, add_special_tokens=False)
    tokens = [
        {"id": token_id, "text": text[start:stop], "start": start, "stop": stop}
        for token_id, (start, stop) in zip(encoding.ids, encoding.offsets, strict=True)
    ]
    return web.json_response({"tokenize_response": tokens, "templated_text": text})


def sagemaker_invocations(compat_generate: Handler) -> Handler:
    """/invocations: a chat body (`messages`), a completion body (`prompt`), else TGI's own."""

    async def invocations(request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if isinstance(body, dict) and "messages" in body:
            return await serve(request, chat_job, present, body)
        if isinstance(body, dict) and "prompt" in body:
            return await serve(request, _completion_job, present, body)
        return await compat_generate(request)

    return invocations


OPENAI_ROUTES = [
    web.post("/v1/chat/completions", chat_completions),
    web.post("/v1/completions", completions),
    web.get("/v1/models", models),
    web.post("/chat_tokenize", chat_tokenize),
]


# ---- parsing -----------------------------------------------------------------------------------


def chat_job(ctx: RouterContext, body: Any) -> OpenAIJob:
    fields = _fields(body, _CHAT_FIELDS)
    _reject_logit_bias(fields)
    messages = parse_messages(fields.get("messages"))
    calling = parse_tool_calling(fields)
    job = _plain_chat_job(ctx, fields, render_chat(ctx.validator.tokenizer, messages))
    if calling is None:
        return job
    if job.params.n > 1:
        raise ToolError("`n` > 1 is not supported with `tools`")
    return replace(
        job,
        prompts=[render_with_tools(ctx.validator.tokenizer, messages, calling)],
        params=sampling_params(ctx, fields, job.max_tokens, {"guided_json": calling.grammar}),
        tools=calling,
        without_tools=job,
    )


def _plain_chat_job(ctx: RouterContext, fields: dict[str, Any], prompt: str) -> OpenAIJob:
    max_tokens = fields.get("max_completion_tokens", fields.get("max_tokens"))
    guided = guided_decoding(fields.get("response_format"), "response_format")
    return OpenAIJob(
        chat=True,
        prompts=[prompt],
        params=sampling_params(ctx, fields, max_tokens, guided),
        max_tokens=max_tokens,
        stream=_bool(fields, "stream"),
        include_usage=_include_usage(fields),
        top_logprobs=_top_logprobs(fields, ctx.validator.limits.max_top_n_tokens),
    )


def _completion_job(ctx: RouterContext, body: Any) -> OpenAIJob:
    fields = _fields(body, _COMPLETION_FIELDS)
    _reject_unsupported_completion(fields)
    max_tokens = fields.get("max_tokens")
    guided = guided_decoding(fields.get("response_format"), "response_format")
    params = sampling_params(ctx, fields, max_tokens, guided)
    if fields.get("best_of", params.n) != params.n:
        raise ValidationError(
            f"`best_of` must equal `n` ({params.n}): this server returns every sample"
        )
    return OpenAIJob(
        chat=False,
        prompts=_prompts(fields.get("prompt"), ctx.validator.limits.max_client_batch_size),
        params=params,
        max_tokens=max_tokens,
        stream=_bool(fields, "stream"),
        include_usage=_include_usage(fields),
        top_logprobs=_legacy_logprobs(fields, ctx.validator.limits.max_top_n_tokens),
        echo=_bool(fields, "echo"),
    )


def _fields(body: Any, known: frozenset[str]) -> dict[str, Any]:
    """The body's known fields without nulls (null means absent); unknown ones are ignored, as
    TGI ignores them."""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    return {name: value for name, value in body.items() if value is not None and name in known}


def _bool(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be a boolean (got {value!r})")
    return value


def sampling_params(
    ctx: RouterContext, fields: dict[str, Any], max_tokens: Any, guided: dict[str, Any]
) -> SamplingParams:
    """`SamplingParams` of an OpenAI body's fields (vLLM's names)."""
    for name in ("ignore_eos", "skip_special_tokens"):
        _bool(fields, name)
    sampling = {name: fields[name] for name in _SAMPLING_FIELDS if name in fields}
    sampling.update(guided)
    try:
        return SamplingParams(max_tokens=max_tokens, n=_n(ctx, fields), **sampling)
    except SamplingParamsError as error:
        raise ValidationError(str(error)) from error


def _n(ctx: RouterContext, fields: dict[str, Any]) -> int:
    """Samples per prompt: the sequences of one request, as many as `best_of` may ask."""
    n, limit = fields.get("n", 1), ctx.validator.limits.max_best_of
    if type(n) is not int or not 0 < n <= limit:
        raise ValidationError(f"`n` must be > 0 and <= {limit} (--max-best-of). Given: {n!r}")
    return n


def _include_usage(fields: dict[str, Any]) -> bool:
    options = fields.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ValidationError('`stream_options` must be {"include_usage": <boolean>}')
    if options and not _bool(fields, "stream"):
        raise ValidationError("`stream_options` is only allowed when `stream` is true")
    return _bool(options, "include_usage")


def _top_logprobs(fields: dict[str, Any], limit: int) -> int | None:
    top = fields.get("top_logprobs")
    if not _bool(fields, "logprobs"):
        if top is not None:
            raise ValidationError("`top_logprobs` requires `logprobs` to be true")
        return None
    top = 0 if top is None else top
    if type(top) is not int or not 0 <= top <= limit:
        raise ValidationError(f"`top_logprobs` must be >= 0 and <= {limit}. Given: {top!r}")
    return top


def _legacy_logprobs(fields: dict[str, Any], limit: int) -> int | None:
    """Completions' `logprobs`: how many alternatives each token gets (OpenAI allows 5)."""
    top = fields.get("logprobs")
    if top is not None and (type(top) is not int or not 0 <= top <= limit):
        raise ValidationError(f"`logprobs` must be >= 0 and <= {limit}. Given: {top!r}")
    return top


def _prompts(prompt: Any, limit: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ValidationError("`prompt` is required and must be a string or a list of strings")
    if not 0 < len(prompts) <= limit:
        raise ValidationError(
            f"`prompt` must hold between 1 and {limit} prompts (max_client_batch_size). "
            f"Given: {len(prompts)}"
        )
    return prompts


def _reject_unsupported_completion(fields: dict[str, Any]) -> None:
    if fields.get("suffix"):
        raise ValidationError("`suffix` is not supported by this server")
    _reject_logit_bias(fields)


def _reject_logit_bias(fields: dict[str, Any]) -> None:
    if fields.get("logit_bias"):
        raise ValidationError("`logit_bias` is not supported by this server")
