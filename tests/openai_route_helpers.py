"""Helpers shared by the OpenAI-compatible route tests: a user message, the tiny chat template,
posting a streamed request and reading its SSE payloads.
"""

from __future__ import annotations

import json

USER = [{"role": "user", "content": "the city"}]


def templated(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sse_payloads(raw: bytes) -> list:
    chunks = raw.decode().split("\n\n")
    assert chunks[-1] == "" and all(chunk.startswith("data:") for chunk in chunks[:-1])
    return [chunk[len("data:") :].strip() for chunk in chunks[:-1]]


async def post_stream(router, path: str, body: dict) -> list[dict]:
    answer = await router.post(path, json=body)
    assert answer.status == 200 and answer.headers["Content-Type"] == "text/event-stream"
    payloads = sse_payloads(await answer.read())
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]
