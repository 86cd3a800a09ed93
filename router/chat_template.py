"""OpenAI chat messages checked and rendered into one prompt with the tokenizer's chat template.

Content may be a string or a list of `{"type": "text", "text": ...}` parts, joined as TGI joins
them. What this text-only server cannot honour (images, assistant tool calls) is a 422.
"""

from __future__ import annotations

from typing import Any

from shardline.router.errors import ValidationError


class TemplateError(ValidationError):
    """The chat template failed to render (TGI's `template_error`)."""

    error_type = "template_error"


def parse_messages(raw: Any) -> list[dict[str, str]]:
    """The conversation as `{"role", "content"[, "name"]}` dicts, ready for the template."""
    if not isinstance(raw, list) or not raw:
        raise ValidationError("`messages` is required and must be a non-empty list")
    return [_parse_message(position, message) for position, message in enumerate(raw)]


def _parse_message(position: int, message: Any) -> dict[str, str]:
    where = f"`messages[{position}]`"
    if not isinstance(message, dict):
        raise ValidationError(f"{where} must be a JSON object")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise ValidationError(f"{where}.role is required and must be a string")
    if message.get("tool_calls"):
        raise ValidationError(f"{where}.tool_calls: tool calls are not supported by this server")
    parsed = {"role": role, "content": _content_text(where, message.get("content"))}
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise ValidationError(f"{where}.name must be a string")
        parsed["name"] = name
    return parsed


def _content_text(where: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValidationError(f"{where}.content must be a string or a list of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            raise ValidationError(f"{where}.content: images are not supported by this model")
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValidationError(
                f'{where}.content parts must be {{"type": "text", "text": <string>}}'
            )
        texts.append(part["text"])
    return "".join(texts)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt the model continues: the template applied, with the assistant's turn opened."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as error:  # jinja2 errors, `raise_exception` in templates, no template
        raise TemplateError(f"the chat template failed: {error}") from error
