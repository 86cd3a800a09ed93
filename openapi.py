"""Shardline's OpenAPI description of its TGI and OpenAI-compatible routes, kept consistent with
TGI's spec."""

from __future__ import annotations

import functools
from typing import Any

from shardline import __version__
from shardline.router.openapi_responses import responses_schemas


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


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
    content = {media_type: {"schema": _ref("ErrorResponse")} for media_type in media_types}
    return {code: {"description": text, "content": content} for code, text in described.items()}


def _post(operation: str, summary: str, request: str, answers: dict[str, Any], errors: str) -> dict:
    return {
        "post": {
            "operationId": operation,
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {
                "200": {"description": "Generated text", "content": answers},
                **_errors(errors),
            },
        }
    }


_TOKEN_PROPS = {
    "id": {"type": "integer", "format": "int32", "minimum": 0},
    "text": {"type": "string"},
    "logprob": _nullable({"type": "number", "format": "float"}),
}

_PARAMETERS = {
    "adapter_id": _nullable({"type": "string", "description": "Not supported: rejected with 422."}),
    "best_of": _nullable({"type": "integer", "minimum": 0, "exclusiveMinimum": True}),
    "decoder_input_details": {"type": "boolean", "default": False},
    "details": {"type": "boolean", "default": False},
    "do_sample": {"type": "boolean", "default": False},
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "grammar": _nullable(
        {
            "type": "object",
            "description": (
                'Constrained output: {"type": "json", "value": <JSON schema>} or '
                '{"type": "regex", "value": "<regex>"}'
            ),
        }
    ),
    "max_new_tokens": _nullable({"type": "integer", "format": "int32", "minimum": 0}),
    "repetition_penalty": _nullable({"type": "number", "minimum": 0, "exclusiveMinimum": True}),
    "return_full_text": _nullable({"type": "boolean"}),
    "seed": _nullable({"type": "integer", "format": "int64", "minimum": 0}),
    "stop": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "temperature": _nullable({"type": "number", "minimum": 0, "exclusiveMinimum": True}),
    "top_k": _nullable(
        {"type": "integer", "format": "int32", "minimum": 0, "exclusiveMinimum": True}
    ),
    "top_n_tokens": _nullable({"type": "integer", "format": "int32", "minimum": 0}),
    "top_p": _nullable(
        {
            "type": "number",
            "minimum": 0,
            "exclusiveMinimum": True,
            "maximum": 1,
            "exclusiveMaximum": True,
        }
    ),
    "truncate": _nullable({"type": "integer", "minimum": 0}),
    "typical_p": _nullable(
        {
            "type": "number",
            "minimum": 0,
            "exclusiveMinimum": True,
            "maximum": 1,
            "exclusiveMaximum": True,
        }
    ),
    "watermark": {
        "type": "boolean",
        "default": False,
        "description": "Kirchenbauer et al.'s watermark (WATERMARK_GAMMA, WATERMARK_DELTA)",
    },
    "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "min_tokens": _nullable({"type": "integer", "minimum": 0}),
    "ignore_eos": {"type": "boolean", "default": False},
    "skip_special_tokens": {"type": "boolean", "default": True},
    "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
}

_FINISH = _ref("FinishReason")
_SEED = _nullable({"type": "integer", "format": "int64", "minimum": 0})
_COUNT = {"type": "integer", "format": "int32", "minimum": 0}


_PROMPT = {"type": "string", "minLength": 1}


def _schemas() -> dict[str, Any]:
    generation_details = {
        "finish_reason": _FINISH,
        "generated_tokens": _COUNT,
        "seed": _SEED,
        "prefill": {"type": "array", "items": _ref("PrefillToken")},
        "tokens": {"type": "array", "items": _ref("Token")},
        "top_tokens": {"type": "array", "items": {"type": "array", "items": _ref("Token")}},
    }
    return {
        "GenerateParameters": {"type": "object", "properties": _PARAMETERS},
        "GenerateRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {"inputs": _PROMPT, "parameters": _ref("GenerateParameters")},
        },
        "CompatGenerateRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "inputs": _PROMPT,
                "parameters": _ref("GenerateParameters"),
                "stream": {"type": "boolean", "default": False},
            },
        },
        "FinishReason": {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]},
        "Token": {
            "type": "object",
            "required": ["id", "text", "logprob", "special"],
            "properties": {**_TOKEN_PROPS, "special": {"type": "boolean"}},
        },
        "PrefillToken": {
            "type": "object",
            "required": ["id", "text", "logprob"],
            "properties": _TOKEN_PROPS,
        },
        "SimpleToken": {
            "type": "object",
            "required": ["id", "text", "start", "stop"],
            "properties": {
                "id": _TOKEN_PROPS["id"],
                "text": {"type": "string"},
                "start": {"type": "integer", "minimum": 0},
                "stop": {"type": "integer", "minimum": 0},
            },
        },
        "TokenizeResponse": {"type": "array", "items": _ref("SimpleToken")},
        "BestOfSequence": {
            "type": "object",
            "required": [
                "generated_text",
                "finish_reason",
                "generated_tokens",
                "prefill",
                "tokens",
            ],
            "properties": {"generated_text": {"type": "string"}, **generation_details},
        },
        "Details": {
            "type": "object",
            "required": ["finish_reason", "generated_tokens", "prefill", "tokens"],
            "properties": {
                **generation_details,
                "best_of_sequences": _nullable({"type": "array", "items": _ref("BestOfSequence")}),
            },
        },
        "GenerateResponse": {
            "type": "object",
            "required": ["generated_text"],
            "properties": {
                "generated_text": {"type": "string"},
                "details": _nullable({"allOf": [_ref("Details")]}),
            },
        },
        "StreamDetails": {
            "type": "object",
            "required": ["finish_reason", "generated_tokens", "input_length"],
            "properties": {
                "finish_reason": _FINISH,
                "generated_tokens": _COUNT,
                "input_length": _COUNT,
                "seed": _SEED,
            },
        },
        "StreamResponse": {
            "type": "object",
            "required": ["index", "token"],
            "properties": {
                "index": _COUNT,
                "token": _ref("Token"),
                "top_tokens": {"type": "array", "items": _ref("Token")},
                "generated_text": _nullable({"type": "string"}),
                "details": _nullable({"allOf": [_ref("StreamDetails")]}),
            },
        },
        "ErrorResponse": {
            "type": "object",
            "required": ["error", "error_type"],
            "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
        },
        "Info": _info_schema(),
        **_openai_request_schemas(),
        **_openai_response_schemas(),
        **responses_schemas(),
    }


def _info_schema() -> dict[str, Any]:
    counts = (
        "max_concurrent_requests",
        "max_best_of",
        "max_stop_sequences",
        "max_input_tokens",
        "max_total_tokens",
        "validation_workers",
        "max_client_batch_size",
    )
    texts = ("model_id", "router", "version")
    optional_texts = ("model_sha", "model_dtype", "model_device_type", "model_pipeline_tag")
    optional_texts += ("sha", "docker_label")
    return {
        "type": "object",
        "required": [*texts[:1], *counts, *texts[1:]],
        "properties": {
            **{name: {"type": "integer", "minimum": 0} for name in counts},
            **{name: {"type": "string"} for name in texts},
            **{name: _nullable({"type": "string"}) for name in optional_texts},
        },
    }


@functools.cache
def openapi_spec() -> dict[str, Any]:
    json_answer = {"application/json": {"schema": _ref("GenerateResponse")}}
    sse_answer = {"text/event-stream": {"schema": _ref("StreamResponse")}}
    list_answer = {
        "application/json": {"schema": {"type": "array", "items": _ref("GenerateResponse")}}
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
                    "application/json": {"schema": _ref("SagemakerResponse")},
                    "text/event-stream": {"schema": _ref("SagemakerStreamResponse")},
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
            "/tokenize": {
                "post": {
                    "operationId": "tokenize",
                    "summary": "Tokenize the inputs",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("GenerateRequest")}},
                    },
                    "responses": {
                        "200": {
                            "description": "Token ids with their character spans",
                            "content": {"application/json": {"schema": _ref("TokenizeResponse")}},
                        },
                        **_error_responses(_REQUEST_ERRORS, "application/json"),
                    },
                }
            },
            "/info": _get("get_model_info", "Model and server limits", _ref("Info")),
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
                    "content": {"application/json": {"schema": _ref("ErrorResponse")}},
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

_UNSUPPORTED = "Not supported: rejected with 422 unless empty"
_NUMBER = _nullable({"type": "number"})
_STOP = _nullable(
    {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]}
)
# vLLM's extras, with SamplingParams' ranges.
_VLLM_EXTRAS = {
    "top_k": _nullable({"type": "integer", "minimum": -1, "description": "0 or -1: off"}),
    "min_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    "repetition_penalty": _nullable({"type": "number", "minimum": 0, "exclusiveMinimum": True}),
    "min_tokens": _nullable({"type": "integer", "minimum": 0}),
    "ignore_eos": _nullable({"type": "boolean"}),
    "stop_token_ids": _nullable({"type": "array", "items": {"type": "integer", "minimum": 0}}),
    "skip_special_tokens": _nullable({"type": "boolean"}),
}


def _openai_sampling() -> dict[str, Any]:
    return {
        "model": _nullable({"type": "string", "description": "Accepted, unused: one model"}),
        "user": _nullable({"type": "string"}),
        "stream": {"type": "boolean", "default": False},
        "stream_options": _nullable({"allOf": [_ref("StreamOptions")]}),
        "max_tokens": _nullable({"type": "integer", "minimum": 1}),
        "n": _nullable(
            {
                "type": "integer",
                "minimum": 1,
                "description": "Samples per prompt (at most --max-best-of); needs sampling",
            }
        ),
        "temperature": _nullable({"type": "number", "minimum": 0}),
        "top_p": _nullable(
            {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1}
        ),
        "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "seed": _SEED,
        "stop": _STOP,
        "logit_bias": _nullable(
            {
                "type": "object",
                "propertyNames": {"pattern": "^[0-9]+$"},
                "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                "description": "Token id (as a string) -> bias added to its logit",
            }
        ),
        **_VLLM_EXTRAS,
    }


def _openai_request_schemas() -> dict[str, Any]:
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    }
    content = {"oneOf": [{"type": "string"}, {"type": "array", "items": text_part}]}
    return {
        "StreamOptions": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}},
        },
        "Message": {
            "allOf": [
                {"type": "object", "required": ["content"], "properties": {"content": content}},
                {
                    "type": "object",
                    "required": ["role"],
                    "properties": {
                        "role": {"type": "string", "minLength": 1},
                        "name": _nullable({"type": "string"}),
                    },
                },
            ]
        },
        "ChatRequest": {
            "type": "object",
            "required": ["messages"],
            "properties": {
                **_openai_sampling(),
                "messages": {"type": "array", "items": _ref("Message"), "minItems": 1},
                "max_completion_tokens": _nullable({"type": "integer", "minimum": 1}),
                "logprobs": _nullable({"type": "boolean"}),
                "top_logprobs": _nullable({"type": "integer", "minimum": 0, "maximum": 5}),
                "response_format": _nullable(
                    {
                        "type": "object",
                        "description": (
                            '{"type": "text"}, {"type": "json_object"} or {"type": "json_schema",'
                            ' "json_schema": {"schema": ...}}: constrained output'
                        ),
                    }
                ),
                "tools": _nullable(
                    {
                        "type": "array",
                        "items": {"type": "object"},
                        "description": (
                            '{"type": "function", "function": {"name", "description", '
                            '"parameters": <JSON schema of an object>}}: the answer is one call, '
                            "its arguments constrained to the tool's schema"
                        ),
                    }
                ),
                "tool_choice": _nullable(
                    {
                        "oneOf": [
                            {"type": "string", "enum": ["auto", "none", "required"]},
                            {"type": "object"},
                        ],
                        "default": "auto",
                        "description": (
                            '"auto" (a tool or TGI\'s no_tool, then a text answer), "none", '
                            '"required", or {"type": "function", "function": {"name": ...}}'
                        ),
                    }
                ),
                "tool_prompt": _nullable(
                    {"type": "string", "description": "Appended to the last message with the tools"}
                ),
            },
        },
        "Prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "CompletionRequest": {
            "type": "object",
            "required": ["prompt"],
            "properties": {
                **_openai_sampling(),
                "prompt": _ref("Prompt"),
                "suffix": _nullable({"type": "string", "description": _UNSUPPORTED}),
                "echo": _nullable(
                    {"type": "boolean", "description": "The prompt comes back before the text"}
                ),
                "logprobs": _nullable(
                    {
                        "type": "integer",
                        "minimum": 0,
                        "maximum": 5,
                        "description": "Alternatives per token (OpenAI's legacy logprobs)",
                    }
                ),
                "best_of": _nullable(
                    {
                        "type": "integer",
                        "minimum": 1,
                        "description": "Samples per prompt (at most --max-best-of), of which the "
                        "`n` of highest mean logprob answer; not when streaming",
                    }
                ),
            },
        },
        "SagemakerRequest": {
            "oneOf": [
                _ref("CompatGenerateRequest"),
                _ref("ChatRequest"),
                _ref("CompletionRequest"),
            ]
        },
    }


def _openai_response_schemas() -> dict[str, Any]:
    def header(object_name: str) -> dict[str, Any]:
        return {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": [object_name]},
            "created": {"type": "integer", "format": "int64", "minimum": 0},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "string"},
        }

    required = ["id", "created", "model", "system_fingerprint", "choices"]
    logprobs = _nullable({"allOf": [_ref("ChatCompletionLogprobs")]})
    top_logprob = {"token": {"type": "string"}, "logprob": {"type": "number"}}
    return {
        "Usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {
                name: _COUNT for name in ("prompt_tokens", "completion_tokens", "total_tokens")
            },
        },
        "TextMessage": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"type": "string"},
                "content": {"type": "string"},
                "tool_call_id": _nullable({"type": "string"}),
            },
        },
        "ChatCompletionTopLogprob": {
            "type": "object",
            "required": ["token", "logprob"],
            "properties": top_logprob,
        },
        "ChatCompletionLogprob": {
            "type": "object",
            "required": ["token", "logprob", "top_logprobs"],
            "properties": {
                **top_logprob,
                "top_logprobs": {"type": "array", "items": _ref("ChatCompletionTopLogprob")},
            },
        },
        "ChatCompletionLogprobs": {
            "type": "object",
            "required": ["content"],
            "properties": {"content": {"type": "array", "items": _ref("ChatCompletionLogprob")}},
        },
        "ChatCompletionComplete": {
            "type": "object",
            "required": ["index", "message", "finish_reason"],
            "properties": {
                "index": _COUNT,
                "message": _ref("TextMessage"),
                "logprobs": logprobs,
                "finish_reason": {"type": "string", "enum": ["stop", "length", "tool_calls"]},
            },
        },
        "ChatCompletion": {
            "type": "object",
            "required": [*required, "usage"],
            "properties": {
                **header("chat.completion"),
                "choices": {"type": "array", "items": _ref("ChatCompletionComplete")},
                "usage": _ref("Usage"),
            },
        },
        "ChatCompletionChoice": {
            "type": "object",
            "required": ["index", "delta"],
            "properties": {
                "index": _COUNT,
                "delta": _ref("TextMessage"),
                "logprobs": logprobs,
                "finish_reason": _nullable(
                    {"type": "string", "enum": ["stop", "length", "tool_calls"]}
                ),
            },
        },
        "ChatCompletionChunk": {
            "type": "object",
            "required": required,
            "properties": {
                **header("chat.completion.chunk"),
                "choices": {"type": "array", "items": _ref("ChatCompletionChoice")},
                "usage": _nullable({"allOf": [_ref("Usage")]}),
            },
        },
        "CompletionComplete": {
            "type": "object",
            "required": ["index", "text", "finish_reason"],
            "properties": {
                "index": _COUNT,
                "text": {"type": "string"},
                "logprobs": _nullable({"allOf": [_ref("CompletionLogprobs")]}),
                "finish_reason": {
                    "type": "string",
                    "enum": ["", "stop", "length"],
                    "description": "Empty in the stream until the last chunk",
                },
            },
        },
        "CompletionLogprobs": {
            "type": "object",
            "description": "OpenAI's legacy logprobs; with echo the prompt's tokens come first",
            "required": ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
            "properties": {
                "tokens": {"type": "array", "items": {"type": "string"}},
                "token_logprobs": {"type": "array", "items": _nullable({"type": "number"})},
                "top_logprobs": {
                    "type": "array",
                    "items": _nullable(
                        {"type": "object", "additionalProperties": {"type": "number"}}
                    ),
                },
                "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            },
        },
        "CompletionFinal": {
            "type": "object",
            "required": [*required, "usage"],
            "properties": {
                **header("text_completion"),
                "choices": {"type": "array", "items": _ref("CompletionComplete")},
                "usage": _ref("Usage"),
            },
        },
        "Chunk": {
            "type": "object",
            "required": required,
            "properties": {
                **header("text_completion"),
                "choices": {"type": "array", "items": _ref("CompletionComplete")},
                "usage": _nullable({"allOf": [_ref("Usage")]}),
            },
        },
        "ModelInfo": {
            "type": "object",
            "required": ["id", "object", "created", "owned_by"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["model"]},
                "created": {"type": "integer", "format": "int64", "minimum": 0},
                "owned_by": {"type": "string"},
            },
        },
        "ChatTokenizeResponse": {
            "type": "object",
            "required": ["tokenize_response", "templated_text"],
            "properties": {
                "tokenize_response": _ref("TokenizeResponse"),
                "templated_text": {"type": "string"},
            },
        },
        "SagemakerResponse": {
            "oneOf": [
                _ref("GenerateResponse"),
                _ref("ChatCompletion"),
                _ref("CompletionFinal"),
            ]
        },
        "SagemakerStreamResponse": {
            "oneOf": [_ref("StreamResponse"), _ref("ChatCompletionChunk"), _ref("Chunk")]
        },
    }


def _openai_paths() -> dict[str, Any]:
    def answers(final: str, chunk: str) -> dict[str, Any]:
        return {
            "application/json": {"schema": _ref(final)},
            "text/event-stream": {"schema": _ref(chunk)},
        }

    models = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": _ref("ModelInfo")},
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
        "/chat_tokenize": {
            "post": {
                "operationId": "get_chat_tokenize",
                "summary": "Apply the chat template and tokenize the result",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ChatRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "The templated text and its tokens",
                        "content": {"application/json": {"schema": _ref("ChatTokenizeResponse")}},
                    },
                    **_error_responses(_REQUEST_ERRORS, "application/json"),
                },
            }
        },
    }
