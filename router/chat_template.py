"""OpenAI chat messages (`schemas/openai.py:ChatMessage`, which checks their shape) rendered
into one prompt with the tokenizer's chat template.

Content may be a string or a list of `{"type": "text", "text": ...}` parts, joined as TGI joins
them. Multi-turn tool use reaches the template as transformers' templates read it: an assistant
message's `tool_calls` with each call's `function.arguments` as an object (OpenAI clients send a
JSON string; it is parsed), and `tool` messages with their `tool_call_id`. A template that never
reads `tool_calls` cannot show the model its own calls: such a conversation is a 422
`template_error`, as is any template failure.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes

from shardline.router.errors import ValidationError
from shardline.router.schemas.openai import ChatMessage

Message = dict[str, Any]
"""`{"role", "content"[, "name"][, "tool_calls"][, "tool_call_id"]}`, ready for the template."""


class TemplateError(ValidationError):
    """The chat template failed to render (TGI's `template_error`)."""

    error_type = "template_error"


def template_messages(messages: list[ChatMessage]) -> list[Message]:
    """The conversation as chat templates read it: content as one string (its text parts
    joined), a call's arguments as an object."""
    return [_template_message(message) for message in messages]


def _template_message(message: ChatMessage) -> Message:
    fields = message.model_dump(include={"role", "name", "tool_call_id"}, exclude_none=True)
    if message.tool_calls:
        fields["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    return {**fields, "content": content_text(message.content)}


def content_text(content: str | list[Any] | None) -> str:
    """A message's content as one string: itself, or its text parts joined, as TGI joins them."""
    if content is None:
        return ""  # a call alone has no text
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


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
