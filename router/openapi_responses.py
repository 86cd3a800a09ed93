"""The served spec's schemas of /v1/responses (OpenAI's Responses API, text; see
`router/responses_route.py`), kept apart from `router/openapi.py` for size."""

from __future__ import annotations

from typing import Any

_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {
        "type": {"type": "string", "enum": ["input_text", "output_text", "text"]},
        "text": {"type": "string"},
    },
}
_STATUS = {"type": "string", "enum": ["in_progress", "completed", "incomplete", "failed"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def responses_schemas() -> dict[str, Any]:
    return {
        "ResponsesInputMessage": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "type": {"type": "string", "enum": ["message"]},
                "role": {"type": "string", "enum": ["user", "assistant", "system", "developer"]},
                "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]},
            },
        },
        "ResponsesRequest": {
            "type": "object",
            "required": ["input"],
            "properties": {
                "model": {"type": "string", "nullable": True},
                "input": {
                    "oneOf": [
                        {"type": "string", "minLength": 1},
                        {"type": "array", "items": _ref("ResponsesInputMessage"), "minItems": 1},
                    ]
                },
                "instructions": {"type": "string", "nullable": True},
                "max_output_tokens": {"type": "integer", "minimum": 1, "nullable": True},
                "temperature": {"type": "number", "minimum": 0, "nullable": True},
                "top_p": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
                "stream": {"type": "boolean", "default": False},
                "text": {
                    "type": "object",
                    "nullable": True,
                    "description": '{"format": {"type": "text" | "json_object" | '
                    '"json_schema", "schema": ...}}: constrained output',
                },
                "store": {
                    "type": "boolean",
                    "nullable": True,
                    "description": "Nothing is stored: true is a 422",
                },
                "metadata": {"type": "object", "nullable": True},
                "user": {"type": "string", "nullable": True},
                "previous_response_id": {
                    "type": "string",
                    "nullable": True,
                    "description": "Not supported (nothing is stored): a 422",
                },
                "tools": {
                    "type": "array",
                    "items": {"type": "object"},
                    "nullable": True,
                    "description": "Not supported on this route: a non-empty list is a 422",
                },
            },
        },
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
