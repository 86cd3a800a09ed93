"""Tool calling on /v1/chat/completions, as TGI does it.

The tools that `tool_choice` picks become one JSON grammar whose output is
`{"function": {"_name": <tool name>, <the tool's arguments>...}}`, one branch per tool, plus TGI's
`no_tool` branch when the choice is "auto". The tools reach the model through the chat template's
`tools` argument; a template that does not read `tools` gets them as JSON text appended to the last
message, with `tool_prompt`. The constrained output comes back as `message.tool_calls`, or streamed
as tool-call deltas. `no_tool` means the model chose to answer in words: the caller generates again
without tools (`NoToolChosen`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.meta
import outlines_core

from shardline.router.chat_template import TemplateError
from shardline.router.errors import ToolError

if TYPE_CHECKING:
    from shardline.router.schemas.openai import ChatRequest, Tool, ToolChoiceFunction

NO_TOOL = "no_tool"
DEFAULT_TOOL_PROMPT = (
    "Given the functions available, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt. Respond in the format "
    "{name: function name, parameters: dictionary of argument name and its value}."
    "Do not use variables."
)
TOOL_CALL_ID = "0"  # TGI numbers the calls of an answer; this server makes one call per answer
_CALL_PREFIX = re.compile(r'\s*\{\s*"function"\s*:\s*\{\s*"_name"\s*:\s*"([A-Za-z0-9_-]+)"')


class NoToolChosen(Exception):
    """The model picked `no_tool`: the request is to be answered again without tools."""


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]

    def offered(self) -> dict[str, Any]:
        """The tool as the chat template and the prompt see it (OpenAI's shape)."""
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": {**function, "parameters": self.parameters}}


_NO_TOOL_FUNCTION = Function(
    NO_TOOL, "Open ended response with no specific tool selected", {"type": "object"}
)


@dataclass(frozen=True)
class ToolCalling:
    """What a request with tools asks for: the tools offered, their grammar, the tool prompt."""

    functions: tuple[Function, ...]
    tool_prompt: str

    @property
    def grammar(self) -> dict[str, Any]:
        refs = [{"$ref": f"#/$functions/{f.name}"} for f in self.functions]
        return {
            "type": "object",
            "$functions": {f.name: _call_schema(f) for f in self.functions},
            "properties": {"function": {"anyOf": refs}},
            "required": ["function"],
            "additionalProperties": False,
        }


# ---- the request -------------------------------------------------------------------------------


def parse_tool_calling(request: ChatRequest) -> ToolCalling | None:
    """The tool calling a chat request asks for; None when it calls no tool."""
    functions = [_function(position, tool) for position, tool in enumerate(request.tools or [])]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise ToolError(f"`tools` names must be unique. Given: {names}")
    chosen = _choose(functions, "auto" if request.tool_choice is None else request.tool_choice)
    if not chosen:
        return None
    if request.response_format is not None:
        raise ToolError("`response_format` and `tools` cannot be used together")
    return ToolCalling(tuple(chosen), request.tool_prompt or DEFAULT_TOOL_PROMPT)


def _function(position: int, tool: Tool) -> Function:
    function = tool.function
    parameters = _usable_parameters(f"`tools[{position}]`", function.parameters)
    return Function(function.name, function.description, parameters)


def _usable_parameters(where: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The parameters' JSON schema: an object schema that outlines-core can constrain to."""
    if parameters is None:
        return {"type": "object", "properties": {}}
    if (
        not isinstance(parameters.get("properties", {}), dict)
        or not isinstance(parameters.get("required", []), list)
        or parameters.get("type", "object") != "object"
    ):
        raise ToolError(f"{where}.function.parameters must be a JSON schema of type object")
    try:
        outlines_core.json_schema.build_regex_from_schema(json.dumps(parameters))
    except (ValueError, TypeError) as error:
        raise ToolError(
            f"{where}.function.parameters is not a usable JSON schema: {error}"
        ) from error
    return parameters


def _choose(functions: list[Function], choice: str | ToolChoiceFunction) -> list[Function]:
    """The functions `tool_choice` leaves to the model (TGI's rules); [] calls no tool."""
    if choice == "none":
        return []
    if choice == "auto":
        return [*functions, _NO_TOOL_FUNCTION] if functions else []
    if choice == "required":
        if not functions:
            raise ToolError("`tool_choice` 'required' needs `tools`")
        return functions
    name = choice if isinstance(choice, str) else choice.function.name  # TGI takes a bare name
    for function in functions:
        if function.name == name:
            return [function]
    raise ToolError(f"Tool with name {name} not found")


def _call_schema(function: Function) -> dict[str, Any]:
    """One branch of the grammar: the tool's name as `_name`, then its arguments."""
    parameters = function.parameters
    name = {"type": "string", "const": function.name}
    return {
        "type": "object",
        "description": function.description or "",
        "properties": {"_name": name, **parameters.get("properties", {})},
        "required": ["_name", *parameters.get("required", [])],
        "additionalProperties": False,
    }


# ---- the prompt --------------------------------------------------------------------------------


def render_with_tools(tokenizer: Any, messages: list[dict[str, Any]], calling: ToolCalling) -> str:
    """The prompt with the tools: through the template's `tools`, else as text in the last
    message; the tool prompt ends the last message either way."""
    offered = [function.offered() for function in calling.functions]
    try:
        takes_tools = template_takes_tools(tokenizer.get_chat_template(tools=offered))
        tools_text = "" if takes_tools else f"\n{json.dumps(offered)}"
        last = messages[-1]
        text = f"{last['content']}\n---{tools_text}\n{calling.tool_prompt}"
        return tokenizer.apply_chat_template(
            [*messages[:-1], {**last, "content": text}],
            tools=offered if takes_tools else None,
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception as error:  # jinja2 errors, `raise_exception` in templates, no template
        raise TemplateError(f"the chat template failed: {error}") from error


@functools.lru_cache(maxsize=8)
def template_takes_tools(template: str) -> bool:
    return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))


# ---- the answer --------------------------------------------------------------------------------


def tool_call(generated_text: str) -> dict[str, Any]:
    """The answer's `tool_calls[0]`; raises NoToolChosen for `no_tool`."""
    try:
        call = json.loads(generated_text)["function"]
        name = call.pop("_name")
    except (ValueError, KeyError, TypeError) as error:
        raise ToolError(f"Failed to parse generated text: {generated_text!r}") from error
    if name == NO_TOOL:
        raise NoToolChosen
    arguments = json.dumps(call, ensure_ascii=False, separators=(",", ":"))
    function = {"description": None, "name": name, "arguments": arguments}
    return {"id": TOOL_CALL_ID, "type": "function", "function": function}


class ToolCallStream:
    """Turns the constrained text of a streamed answer into TGI's tool-call deltas: nothing
    until the tool's name is known, then the name with "{", then the arguments as they come.
    Closing braces are held back until more text shows they are not the call's last one."""

    def __init__(self) -> None:
        self._text = ""
        self._name: str | None = None
        self._arguments_at = 0
        self._sent = 0

    def push(self, text: str, final: bool) -> dict[str, Any] | None:
        """The delta for this piece of text; None when there is nothing to send yet."""
        self._text += text
        first = self._name is None
        if first and not self._find_name():
            return {"role": "assistant", "content": ""} if final else None
        arguments = self._arguments(final)
        piece, self._sent = arguments[self._sent :], len(arguments)
        if not (piece or first or final):
            return None
        function = {"name": self._name if first else None, "arguments": piece}
        call = {"index": 0, "id": TOOL_CALL_ID, "type": "function", "function": function}
        return {"role": "assistant", "tool_calls": [call]}

    def _find_name(self) -> bool:
        match = _CALL_PREFIX.match(self._text)
        if match is None:
            return False
        if match.group(1) == NO_TOOL:
            raise NoToolChosen
        self._name, self._arguments_at = match.group(1), match.end()
        return True

    def _arguments(self, final: bool) -> str:
        body = self._text[self._arguments_at :].lstrip()
        body = body[1:].lstrip() if body.startswith(",") else body
        if not final:
            return "{" + body.rstrip("} \t\r\n")
        if not _is_json(self._text):  # cut short (length, stop sequence): all of it
            return "{" + body
        return "{" + body.rstrip()[:-1].rstrip()  # the call's own closing brace goes


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
