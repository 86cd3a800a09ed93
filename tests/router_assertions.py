"""Checks on router answers shared by the HTTP route tests: bodies against TGI's OpenAPI
schemas, TGI's error JSON, refusals and SSE events.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema

from tests.fake_shard import FakeShardClient

TGI_SPEC_PATH = Path(__file__).resolve().parent / "data" / "tgi-openapi.json"  # see data/README.md
TGI_SPEC = json.loads(TGI_SPEC_PATH.read_text())


def _as_json_schema(node):
    """OpenAPI 3.0 `nullable` becomes a JSON Schema union with null."""
    if isinstance(node, list):
        return [_as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {k: _as_json_schema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable"):
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


_COMPONENTS = _as_json_schema(copy.deepcopy(TGI_SPEC["components"]))


def assert_schema(instance, name: str) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": _COMPONENTS}
    jsonschema.validate(instance, schema)


def assert_error(body, error_type: str) -> None:
    assert_schema(body, "ErrorResponse")
    assert body["error_type"] == error_type


async def assert_refused(answer, error_type: str, message: str, fake: FakeShardClient) -> None:
    """A 422 in TGI's error JSON whose error names `message`, and nothing reached the shard."""
    error = await answer.json()
    assert answer.status == 422, error
    assert_error(error, error_type)
    assert message in error["error"]
    assert not fake.requests


def _sse_events(raw: bytes) -> list[dict]:
    chunks = raw.decode().split("\n\n")
    assert chunks[-1] == ""
    assert all(chunk.startswith("data:") for chunk in chunks[:-1])
    return [json.loads(chunk[len("data:") :]) for chunk in chunks[:-1]]
