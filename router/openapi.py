"""Shardline's OpenAPI description of its TGI routes, kept consistent with TGI's spec."""

from __future__ import annotations

import functools
from typing import Any

from shardline import __version__


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _errors(media_type: str = "application/json") -> dict[str, Any]:
    described = {
        "422": "Input validation error",
        "424": "Generation error",
        "429": "Model is overloaded",
        "500": "Incomplete generation",
    }
    return {
        code: {"description": text, "content": {media_type: {"schema": _ref("ErrorResponse")}}}
        for code, text in described.items()
    }


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
    "best_of": _nullable({"type": "integer", "minimum": 0, "exclusiveMinimum": 0}),
    "decoder_input_details": {"type": "boolean", "default": False},
    "details": {"type": "boolean", "default": True},
    "do_sample": {"type": "boolean", "default": False},
    "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
    "grammar": _nullable({"type": "object", "description": "Not supported: rejected with 422."}),
    "max_new_tokens": _nullable({"type": "integer", "format": "int32", "minimum": 0}),
    "repetition_penalty": _nullable({"type": "number", "exclusiveMinimum": 0}),
    "return_full_text": _nullable({"type": "boolean"}),
    "seed": _nullable({"type": "integer", "format": "int64", "minimum": 0}),
    "stop": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "temperature": _nullable({"type": "number", "exclusiveMinimum": 0}),
    "top_k": _nullable({"type": "integer", "format": "int32", "exclusiveMinimum": 0}),
    "top_n_tokens": _nullable({"type": "integer", "format": "int32", "minimum": 0}),
    "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
    "truncate": _nullable({"type": "integer", "minimum": 0}),
    "typical_p": _nullable({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}),
    "watermark": {"type": "boolean", "default": False, "description": "true is rejected with 422."},
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
            "properties": {"inputs": {"type": "string"}, "parameters": _ref("GenerateParameters")},
        },
        "CompatGenerateRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "inputs": {"type": "string"},
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
            "/invocations": compat,
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
                        }
                    },
                }
            },
            "/info": _get("get_model_info", "Model and server limits", _ref("Info")),
            "/health": {
                "get": {
                    "operationId": "health",
                    "summary": "200 when every shard answers",
                    "responses": {
                        "200": {"description": "Healthy"},
                        "503": {
                            "description": "A shard does not answer",
                            "content": {"application/json": {"schema": _ref("ErrorResponse")}},
                        },
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
