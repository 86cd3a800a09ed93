"""TGI's OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models and
/chat_tokenize, plus /invocations dispatching on the body's shape as TGI does.

Bodies are parsed by their models (`router/schemas/openai.py`), mapped onto `SamplingParams`
(`router/openai_params.py`: vLLM's names, so vLLM's extras come for free), and every prompt goes
through `Validator.validate`, as for TGI's own routes; `n` samples of a prompt are
the sequences of one request, as `best_of` on /generate. Tools are TGI's tool calling
(`router/tools.py`). Serving is `router/openai_serving.py`, the bodies `router/openai_bodies.py`.
What this server cannot do (suffix) is a 422, never silently ignored.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from aiohttp import web

from shardline.router.chat_template import render_chat, template_messages
from shardline.router.errors import ToolError, ValidationError
from shardline.router.http import RouterContext, context, read_json
from shardline.router.openai_bodies import present
from shardline.router.openai_params import (
    include_usage,
    openai_extras,
    sampling_params,
)
from shardline.router.openai_serving import OpenAIJob, serve
from shardline.router.schemas.openai import ChatRequest, CompletionRequest, parse_openai
from shardline.router.tools import parse_tool_calling, render_with_tools

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    request = parse_openai(ChatRequest, body, ctx.validator.limits)
    messages = template_messages(request.messages)
    calling = parse_tool_calling(request)
    job = _plain_chat_job(ctx, request, render_chat(ctx.validator.tokenizer, messages))
    if calling is None:
        return job
    if job.params.n > 1:
        raise ToolError("`n` > 1 is not supported with `tools`")
    return replace(
        job,
        prompts=[render_with_tools(ctx.validator.tokenizer, messages, calling)],
        params=sampling_params(
            request, **openai_extras(request, None), guided_json=calling.grammar
        ),
        tools=calling,
        without_tools=job,
    )


def _plain_chat_job(ctx: RouterContext, request: ChatRequest, prompt: str) -> OpenAIJob:
    return OpenAIJob(
        chat=True,
        prompts=[prompt],
        params=sampling_params(request, **openai_extras(request, request.response_format)),
        stream=bool(request.stream),
        include_usage=include_usage(request),
        top_logprobs=_top_logprobs(request),
    )


def _completion_job(ctx: RouterContext, body: Any) -> OpenAIJob:
    request = parse_openai(CompletionRequest, body, ctx.validator.limits)
    if request.suffix:
        raise ValidationError("`suffix` is not supported by this server")
    extras = openai_extras(request, request.response_format)
    return OpenAIJob(
        chat=False,
        prompts=_prompts(request.prompt, ctx.validator.limits.max_client_batch_size),
        params=sampling_params(request, **extras, **_best_of(request)),
        stream=bool(request.stream),
        include_usage=include_usage(request),
        top_logprobs=request.logprobs,
        echo=bool(request.echo),
    )


def _best_of(request: CompletionRequest) -> dict[str, Any]:
    """OpenAI's `best_of`: that many samples, the `n` of highest mean logprob per token answer
    (all of them billed); the best are known only at the end, so not when streaming."""
    if request.best_of is None:
        return {}
    if request.best_of > (request.n or 1) and request.stream:
        raise ValidationError("`best_of` > `n` is not supported when streaming tokens")
    return {"best_of": request.best_of}


def _top_logprobs(request: ChatRequest) -> int | None:
    """None: no logprobs; else how many alternatives each token gets."""
    if not request.logprobs:
        if request.top_logprobs is not None:
            raise ValidationError("`top_logprobs` requires `logprobs` to be true")
        return None
    return request.top_logprobs or 0


def _prompts(prompt: str | list[str], limit: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not 0 < len(prompts) <= limit:
        raise ValidationError(
            f"`prompt` must hold between 1 and {limit} prompts (max_client_batch_size). "
            f"Given: {len(prompts)}"
        )
    return prompts
