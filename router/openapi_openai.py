"""The served spec's schemas of the OpenAI-compatible answers (chat completions, completions,
their chunks, /chat_tokenize's and SageMaker's), kept apart from `router/openapi.py` for size;
the requests' come from `router/schemas/openai.py`."""

from __future__ import annotations

from typing import Any

from shardline.router.schemas.common import nullable, ref

COUNT = {"type": "integer", "format": "int32", "minimum": 0}


def openai_response_schemas() -> dict[str, Any]:
    def header(object_name: str) -> dict[str, Any]:
        return {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": [object_name]},
            "created": {"type": "integer", "format": "int64", "minimum": 0},
            "model": {"type": "string"},
            "system_fingerprint": {"type": "string"},
        }

    required = ["id", "created", "model", "system_fingerprint", "choices"]
    logprobs = nullable({"allOf": [ref("ChatCompletionLogprobs")]})
    top_logprob = {"token": {"type": "string"}, "logprob": {"type": "number"}}
    return {
        "Usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {
                name: COUNT for name in ("prompt_tokens", "completion_tokens", "total_tokens")
            },
        },
        "TextMessage": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"type": "string"},
                "content": {"type": "string"},
                "tool_call_id": nullable({"type": "string"}),
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
                "top_logprobs": {"type": "array", "items": ref("ChatCompletionTopLogprob")},
            },
        },
        "ChatCompletionLogprobs": {
            "type": "object",
            "required": ["content"],
            "properties": {"content": {"type": "array", "items": ref("ChatCompletionLogprob")}},
        },
        "ChatCompletionComplete": {
            "type": "object",
            "required": ["index", "message", "finish_reason"],
            "properties": {
                "index": COUNT,
                "message": ref("TextMessage"),
                "logprobs": logprobs,
                "finish_reason": {"type": "string", "enum": ["stop", "length", "tool_calls"]},
            },
        },
        "ChatCompletion": {
            "type": "object",
            "required": [*required, "usage"],
            "properties": {
                **header("chat.completion"),
                "choices": {"type": "array", "items": ref("ChatCompletionComplete")},
                "usage": ref("Usage"),
            },
        },
        "ChatCompletionChoice": {
            "type": "object",
            "required": ["index", "delta"],
            "properties": {
                "index": COUNT,
                "delta": ref("TextMessage"),
                "logprobs": logprobs,
                "finish_reason": nullable(
                    {"type": "string", "enum": ["stop", "length", "tool_calls"]}
                ),
            },
        },
        "ChatCompletionChunk": {
            "type": "object",
            "required": required,
            "properties": {
                **header("chat.completion.chunk"),
                "choices": {"type": "array", "items": ref("ChatCompletionChoice")},
                "usage": nullable({"allOf": [ref("Usage")]}),
            },
        },
        "CompletionComplete": {
            "type": "object",
            "required": ["index", "text", "finish_reason"],
            "properties": {
                "index": COUNT,
                "text": {"type": "string"},
                "logprobs": nullable({"allOf": [ref("CompletionLogprobs")]}),
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
                "token_logprobs": {"type": "array", "items": nullable({"type": "number"})},
                "top_logprobs": {
                    "type": "array",
                    "items": nullable(
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
                "choices": {"type": "array", "items": ref("CompletionComplete")},
                "usage": ref("Usage"),
            },
        },
        "Chunk": {
            "type": "object",
            "required": required,
            "properties": {
                **header("text_completion"),
                "choices": {"type": "array", "items": ref("CompletionComplete")},
                "usage": nullable({"allOf": [ref("Usage")]}),
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
                "tokenize_response": ref("TokenizeResponse"),
                "templated_text": {"type": "string"},
            },
        },
        "SagemakerResponse": {
            "oneOf": [
                ref("GenerateResponse"),
                ref("ChatCompletion"),
                ref("CompletionFinal"),
            ]
        },
        "SagemakerStreamResponse": {
            "oneOf": [ref("StreamResponse"), ref("ChatCompletionChunk"), ref("Chunk")]
        },
    }
