"""Guided decoding's parameters: a JSON schema (`guided_json`, a dict or its JSON text) or a regex
(`guided_regex`) that the output must match, checked here and sent to the shards as a grammar."""

from __future__ import annotations

import functools
import json
from typing import Any

import outlines_core

from shardline.param_checks import check, check_text
from shardline.proto import generate_pb2

# OpenAI's json_object: an object whose values are scalars, flat arrays or flat objects. Any depth
# would do, but outlines-core's automaton of unbounded JSON takes seconds to build per vocabulary.
_SCALAR: dict[str, Any] = {"type": ["string", "number", "boolean", "null"]}
JSON_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": {
        "anyOf": [
            _SCALAR,
            {"type": "array", "items": _SCALAR},
            {"type": "object", "additionalProperties": _SCALAR},
        ]
    },
}

_ERROR_CHARS = 200


def check_grammar(
    guided_json: dict[str, Any] | str | None, guided_regex: str | None, use_beam_search: bool
) -> None:
    """At most one of the two, no beam search, a schema outlines-core can build, a regex a
    string (SamplingParamsError otherwise)."""
    if guided_json is None and guided_regex is None:
        return
    check(
        guided_regex is None or guided_json is None,
        "guided_json",
        guided_json,
        "cannot be combined with guided_regex",
    )
    check(not use_beam_search, "use_beam_search", True, "cannot take a grammar")
    if guided_json is not None:
        schema = _schema_text(guided_json)
        check(
            _schema_error(schema) is None,
            "guided_json",
            guided_json,
            f"is not a usable JSON schema: {_schema_error(schema)}",
        )
    else:
        check(isinstance(guided_regex, str), "guided_regex", guided_regex, "must be a string")
        check_text("guided_regex", guided_regex)


def grammar_of(
    guided_json: dict[str, Any] | str | None, guided_regex: str | None
) -> tuple[int, str] | None:
    """(GrammarType, the schema's JSON text or the regex); None without guided decoding."""
    if guided_json is not None:
        return generate_pb2.GRAMMAR_TYPE_JSON, _schema_text(guided_json)
    if guided_regex is not None:
        return generate_pb2.GRAMMAR_TYPE_REGEX, guided_regex
    return None


def _schema_text(guided_json: dict[str, Any] | str) -> str:
    if isinstance(guided_json, str):
        check_text("guided_json", guided_json)
        return guided_json
    check(
        isinstance(guided_json, dict),
        "guided_json",
        guided_json,
        "must be a JSON schema (an object or its JSON text)",
    )
    return json.dumps(guided_json, sort_keys=True)


@functools.lru_cache(maxsize=256)
def _schema_error(schema: str) -> str | None:
    """Why outlines-core cannot turn this JSON schema into a regex; None if it can (cheap)."""
    try:
        outlines_core.json_schema.build_regex_from_schema(schema)
    except (ValueError, TypeError) as error:
        return str(error)[:_ERROR_CHARS]
    return None
