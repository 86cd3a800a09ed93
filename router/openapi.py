"""Shardline's OpenAPI description of its TGI and OpenAI-compatible routes, kept consistent with
TGI's spec: the bodies' schemas come from their models (router/schemas/), the route table and
its answers are here."""

from __future__ import annotations

import functools
from typing import Any

from shardline import __version__
from shardline.router.openapi_responses import responses_schemas
from shardline.router.schemas.common import openapi_components, ref
from shardline.router.schemas.openai import OPENAI_REQUEST_MODELS
from shardline.router.schemas.openai_answers import OPENAI_ANSWER_MODELS
from shardline.router.schemas.tgi import CompatGenerateRequest, GenerateRequest
from shardline.router.schemas.tgi_responses import TGI_RESPONSE_MODELS

_REQUEST_ERRORS = {
    "400": "Malformed body: not JSON, invalid UTF-8, NaN or Infinity, nested over 128 levels",
    "413": "Body larger than --payload-limit",
    "415": "Content-Type of a form or of plain text: the body must be JSON",
    "422": "Input validation error",
}
_GENERATION_ERRORS = {
    **_REQUEST_ERRORS,
    "424": "Generation error",
    "429": "Model is overloaded",
    "500": "Incomplete generation",
}


def _errors(media_type: str = "application/json") -> dict[str, Any]:
    """A generating route's errors: JSON, as TGI's spec also lists them in `media_type` (a
    stream's; Shardline answers an error before the stream's first event in JSON, and one
    after it as an event of the 200 stream)."""
    return _error_responses(_GENERATION_ERRORS, "application/json", media_type)


def _error_responses(described: dict[str, str], *media_types: str) -> dict[str, Any]:
    content = {media_type: {"schema": ref("ErrorResponse")} for media_type in media_types}
    return {code: {"description": text, "content": content} for code, text in described.items()}


def _operation(operation: str, summary: str, request: str, responses: dict[str, Any]) -> dict:
    body = {"required": True, "content": {"application/json": {"schema": ref(request)}}}
    return {
        "post": {
            "operationId": operation,
            "summary": summary,
            "requestBody": body,
            "responses": responses,
        }
    }


def _post(operation: str, summary: str, request: str, answers: dict[str, Any], errors: str) -> dict:
    answer = {"200": {"description": "Generated text", "content": answers}}
    return _operation(operation, summary, request, {**answer, **_errors(errors)})


def _tokenize(operation: str, summary: str, request: str, answer: tuple[str, str]) -> dict:
    """A route that answers without generating: only the request's errors."""
    description, schema = answer
    content = {"application/json": {"schema": ref(schema)}}
    responses = {
        "200": {"description": description, "content": content},
        **_error_responses(_REQUEST_ERRORS, "application/json"),
    }
    return _operation(operation, summary, request, responses)


def _schemas() -> dict[str, Any]:
    tgi_requests = {
        "GenerateRequest": GenerateRequest,
        "CompatGenerateRequest": CompatGenerateRequest,
    }
    # /invocations takes and answers TGI's, the chat or the completion body.
    sagemaker = {
        "SagemakerRequest": ("CompatGenerateRequest", "ChatRequest", "CompletionRequest"),
        "SagemakerResponse": ("GenerateResponse", "ChatCompletion", "CompletionFinal"),
        "SagemakerStreamResponse": ("StreamResponse", "ChatCompletionChunk", "Chunk"),
    }
    return {
        **openapi_components(tgi_requests),
        **openapi_components(TGI_RESPONSE_MODELS),
        **openapi_components(OPENAI_REQUEST_MODELS),
        **openapi_components(OPENAI_ANSWER_MODELS),
        **{name: {"oneOf": [ref(body) for body in bodies]} for name, bodies in sagemaker.items()},
        **responses_schemas(),
    }


@functools.cache
def openapi_spec() -> dict[str, Any]:
    json_answer = {"application/json": {"schema": ref("GenerateResponse")}}
    sse_answer = {"text/event-stream": {"schema": ref("StreamResponse")}}
    list_answer = {
        "application/json": {"schema": {"type": "array", "items": ref("GenerateResponse")}}
    }
    compat = _post(
        "compat_generate",
        "Generate text, or a stream of tokens when `stream` is true",
        "CompatGenerateRequest",
        {**list_answer, **sse_answer},
        "application/json",
    )
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Shardline",
            "description": "Text generation server",
            "version": __version__,
        },
        "paths": {
            "/": compat,
            "/invocations": _post(
                "sagemaker_compatibility",
                "TGI's, the chat or the completion request, told apart by their fields",
                "SagemakerRequest",
                {
                    "application/json": {"schema": ref("SagemakerResponse")},
                    "text/event-stream": {"schema": ref("SagemakerStreamResponse")},
                },
                "application/json",
            ),
            **_openai_paths(),
            "/generate": _post(
                "generate", "Generate text", "GenerateRequest", json_answer, "application/json"
            ),
            "/generate_stream": _post(
                "generate_stream",
                "Generate a stream of tokens (Server-Sent Events)",
                "GenerateRequest",
                sse_answer,
                "text/event-stream",
            ),
            "/tokenize": _tokenize(
                "tokenize",
                "Tokenize the inputs",
                "GenerateRequest",
                ("Token ids with their character spans", "TokenizeResponse"),
            ),
            "/info": _get("get_model_info", "Model and server limits", ref("Info")),
            "/health": _health("health", "200 when every shard answers"),
            "/ping": _health("ping", "TGI's alias of /health (SageMaker's health check)"),
            "/v2/health/live": _get(
                "kserve_health_live",
                "Liveness: the router answers (asks no shard)",
                {
                    "type": "object",
                    "required": ["live"],
                    "properties": {"live": {"type": "boolean"}},
                },
            ),
            "/docs": {
                "get": {
                    "operationId": "swagger_ui",
                    "summary": "Swagger UI over /openapi.json",
                    "responses": {
                        "200": {
                            "description": "HTML page",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
        "components": {"schemas": _schemas()},
    }


def _health(operation: str, summary: str) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "responses": {
                "200": {"description": "Healthy"},
                "503": {
                    "description": "A shard does not answer",
                    "content": {"application/json": {"schema": ref("ErrorResponse")}},
                },
            },
        }
    }


def _get(operation: str, summary: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "get": {
            "operationId": operation,
            "summary": summary,
            "responses": {
                "200": {"description": summary, "content": {"application/json": {"schema": schema}}}
            },
        }
    }


# ---- the OpenAI-compatible routes --------------------------------------------------------------

# ---- the OpenAI-compatible routes --------------------------------------------------------------


def _openai_paths() -> dict[str, Any]:
    def answers(final: str, chunk: str) -> dict[str, Any]:
        return {
            "application/json": {"schema": ref(final)},
            "text/event-stream": {"schema": ref(chunk)},
        }

    models = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": ref("ModelInfo")},
        },
    }
    return {
        "/v1/chat/completions": _post(
            "chat_completions",
            "OpenAI chat completion, or its chunks (then `data: [DONE]`) when `stream` is true",
            "ChatRequest",
            answers("ChatCompletion", "ChatCompletionChunk"),
            "application/json",
        ),
        "/v1/completions": _post(
            "completions",
            "OpenAI completion, n choices per prompt, or its chunks when `stream` is true",
            "CompletionRequest",
            answers("CompletionFinal", "Chunk"),
            "application/json",
        ),
        "/v1/responses": _post(
            "responses",
            "OpenAI Responses API (text): a response, or its events when `stream` is true",
            "ResponsesRequest",
            answers("Response", "ResponseStreamEvent"),
            "application/json",
        ),
        "/v1/models": _get("openai_get_model_info", "The served model", models),
        "/chat_tokenize": _tokenize(
            "get_chat_tokenize",
            "Apply the chat template and tokenize the result",
            "ChatRequest",
            ("The templated text and its tokens", "ChatTokenizeResponse"),
        ),
    }
