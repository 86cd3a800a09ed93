"""JSON as TGI's serde_json reads it, for everything a request carries (its body, a tool call's
`arguments` string): no NaN or Infinity, no number past a double, no lone surrogate, at most
`MAX_JSON_DEPTH` levels. An integer past 64 bits is read as a float, as serde_json reads it
into a value, so a Python integer of thousands of digits is never built."""

from __future__ import annotations

from typing import Any

import orjson

# serde_json's recursion limit. orjson stops at 1,024, deep enough that recursive code reading
# the value (repr, json.dumps, a chat template) could still overflow Python's stack.
MAX_JSON_DEPTH = 128


class JsonTooDeepError(ValueError):
    pass


def loads(raw: bytes | str) -> Any:
    """The JSON value; `ValueError` (orjson's `JSONDecodeError` or `JsonTooDeepError`) if
    it is none or nests too deep."""
    value = orjson.loads(raw)
    opened = (
        raw.count(b"[") + raw.count(b"{")
        if isinstance(raw, bytes)
        else (raw.count("[") + raw.count("{"))
    )
    if opened > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise JsonTooDeepError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels deep, walked without recursion."""
    pending = [(value, 1)]
    while pending:
        container, depth = pending.pop()
        if depth > limit:
            return True
        children = container.values() if isinstance(container, dict) else container
        pending.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
