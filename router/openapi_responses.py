"""The served spec's schemas of /v1/responses (OpenAI's Responses API, text; see
`router/responses_route.py`): the request's from `router/schemas/responses.py`, the answer's and
the stream events' here, kept apart from `router/openapi.py` for size."""

from __future__ import annotations

from typing import Any

from shardline.router.schemas.common import openapi_components
from shardline.router.schemas.responses import RESPONSES_REQUEST_MODELS

_STATUS = {"type": "string", "enum": ["in_progress", "completed", "incomplete", "failed"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def responses_schemas() -> dict[str, Any]:
    """The request's schemas come from its model; the answer's and the events' are written here."""
    return {
        **openapi_components(RESPONSES_REQUEST_MODELS),
        "ResponsesOutputMessage": {
            "type": "object",
            "required": ["type", "id", "status", "role", "content"],
            "properties": {
                "type": {"type": "string", "enum": ["message"]},
                "id": {"type": "string"},
                "status": _STATUS,
                "role": {"type": "string", "enum": ["assistant"]},
                "content": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["type", "text", "annotations"],
                        "properties": {
                            "type": {"type": "string", "enum": ["output_text"]},
                            "text": {"type": "string"},
                            "annotations": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
            },
        },
        "Response": {
            "type": "object",
            "required": ["id", "object", "created_at", "status", "model", "output"],
            "properties": {
                "id": {"type": "string"},
                "object": {"type": "string", "enum": ["response"]},
                "created_at": {"type": "integer", "minimum": 0},
                "status": _STATUS,
                "model": {"type": "string"},
                "output": {"type": "array", "items": _ref("ResponsesOutputMessage")},
                "incomplete_details": {"type": "object", "nullable": True},
                "usage": {
                    "type": "object",
                    "nullable": True,
                    "required": ["input_tokens", "output_tokens", "total_tokens"],
                    "properties": {
                        name: {"type": "integer", "minimum": 0}
                        for name in ("input_tokens", "output_tokens", "total_tokens")
                    },
                },
            },
        },
        "ResponseStreamEvent": {
            "type": "object",
            "required": ["type", "sequence_number"],
            "description": "One `event: <type>` / `data: <this>` SSE event: response.created, "
            "response.in_progress, response.output_item.added, response.content_part.added, "
            "response.output_text.delta..., response.output_text.done, "
            "response.content_part.done, response.output_item.done, then response.completed "
            "(response.incomplete when cut by max_output_tokens); error on a failure",
            "properties": {
                "type": {"type": "string"},
                "sequence_number": {"type": "integer", "minimum": 0},
            },
        },
    }
