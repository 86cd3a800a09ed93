"""OpenAI chat messages checked and rendered into one prompt with the tokenizer's chat template.

Content may be a string or a list of `{"type": "text", "text": ...}` parts, joined as TGI joins
them. Multi-turn tool use reaches the template as transformers' templates read it: an assistant
message's `tool_calls` with each call's `function.arguments` as an object (OpenAI clients send a
JSON string; it is parsed), and `tool` messages with their `tool_call_id`. A template that never
reads `tool_calls` cannot show the model its own calls: such a conversation is a 422
`template_error`, as is any template failure. Images are a 422.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes

from shardline.router import json_limits
from shardline.router.errors import ValidationError

Message = dict[str, Any]
"""`{"role", "content"[, "name"][, "tool_calls"][, "tool_call_id"]}`, ready for the template."""


class TemplateError(ValidationError):
    """The chat template failed to render (TGI's `template_error`)."""

    error_type = "template_error"


def parse_messages(raw: Any) -> list[Message]:
    """The conversation as the chat template reads it."""
    if not isinstance(raw, list) or not raw:
        raise ValidationError("`messages` is required and must be a non-empty list")
    return [_parse_message(position, message) for position, message in enumerate(raw)]


def _parse_message(position: int, message: Any) -> Message:
    where = f"`messages[{position}]`"
    if not isinstance(message, dict):
        raise ValidationError(f"{where} must be a JSON object")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ValidationError(f"{where}.role is required and must be a string")
    parsed: Message = {"role": role}
    content = message.get("content")
    if message.get("tool_calls") not in (None, []):
        if role != "assistant":
            raise ValidationError(f"{where}.tool_calls: only assistant messages call tools")
        parsed["tool_calls"] = _parse_tool_calls(where, message["tool_calls"])
        content = "" if content is None else content  # a call alone has no text
    parsed["content"] = content_text(where, content)
    for field in ("name", "tool_call_id"):
        value = message.get(field)
        if value is not None:
            parsed[field] = _string(f"{where}.{field}", value)
    return parsed


def _string(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{where} must be a string")
    return value


def content_text(where: str, content: Any, text_types: tuple[str, ...] = ("text",)) -> str:
    """A message's content as one string: itself, or its parts of `text_types` joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValidationError(f"{where}.content must be a string or a list of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            raise ValidationError(f"{where}.content: images are not supported by this model")
        if kind not in text_types or not isinstance(part.get("text"), str):
            raise ValidationError(
                f'{where}.content parts must be {{"type": "{text_types[0]}", "text": <string>}} '
                f"(type {kind!r} is not supported)"
            )
        texts.append(part["text"])
    return "".join(texts)


# ---- tool calls --------------------------------------------------------------------------------


def _parse_tool_calls(where: str, calls: Any) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise ValidationError(f"{where}.tool_calls must be a list of tool calls")
    return [
        _parse_tool_call(f"{where}.tool_calls[{index}]", call) for index, call in enumerate(calls)
    ]


def _parse_tool_call(where: str, call: Any) -> dict[str, Any]:
    """OpenAI's `{"id", "type": "function", "function": {"name", "arguments"}}`, arguments as
    an object (what transformers' templates expect)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise ValidationError(
            f'{where} must be {{"id": ..., "type": "function", "function": {{"name": ..., '
            '"arguments": ...}}'
        )
    name = _string(f"{where}.function.name", function.get("name"))
    arguments = _arguments(f"{where}.function.arguments", function.get("arguments"))
    call_id = _string(f"{where}.id", call.get("id"))
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _arguments(where: str, arguments: Any) -> dict[str, Any]:
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json_limits.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValidationError(f"{where} must be a JSON object or a string holding one")
    return arguments


# ---- rendering ---------------------------------------------------------------------------------


def render_chat(tokenizer: Any, messages: list[Message]) -> str:
    """The prompt the model continues: the template applied, with the assistant's turn opened."""
    with _template_errors():
        _require_tool_call_rendering(tokenizer.get_chat_template(), messages)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@contextlib.contextmanager
def _template_errors() -> Iterator[None]:
    """Any failure of the template (jinja2 errors, `raise_exception`, no template) as a 422."""
    try:
        yield
    except TemplateError:
        raise
    except Exception as error:
        raise TemplateError(f"the chat template failed: {error}") from error


def _require_tool_call_rendering(template: str, messages: list[Message]) -> None:
    """Raises TemplateError when the conversation holds tool calls the template never reads."""
    first = next((i for i, message in enumerate(messages) if "tool_calls" in message), None)
    if first is not None and not _reads_tool_calls(template):
        raise TemplateError(
            f"the model's chat template cannot render tool calls (`messages[{first}]`"
            ".tool_calls): it never reads `tool_calls`"
        )


@functools.lru_cache(maxsize=8)
def _reads_tool_calls(template: str) -> bool:
    environment = jinja2.Environment(extensions=[jinja2.ext.loopcontrols])
    nodes = environment.parse(template).find_all((jinja2.nodes.Getattr, jinja2.nodes.Const))
    return any(
        getattr(node, "attr", getattr(node, "value", None)) == "tool_calls" for node in nodes
    )
