"""Function tools on chat completions: the request's ``tools`` and ``tool_choice``, how they
reach the prompt, and the JSON schema that forces a call.

Templates that know tools (Hermes, Qwen, Llama 3.x, Mistral: they read the Jinja ``tools``
variable) get them and the conversation's ``tool_calls`` / ``role: "tool"`` messages as the
model was trained on them, as llama.cpp's ``--jinja`` does. Templates that know nothing of
tools (Gemma's, ChatML) get a system instruction with the tools' schemas and the tool turns as
plain text, and the model answers with a JSON object, the generic format the parser reads.
``required`` and a named function are enforced with a grammar in that generic format, so even a
model that never saw a tool produces a call whose arguments match the schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta

from app.runner.params import ParamError

_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Tools:
    tools: list[Tool]
    choice: str  # "auto", "required", or "function" (``forced`` names it); "none" is no Tools
    forced: str | None
    raw: list[dict[str, Any]]  # as sent: the template renders them in OpenAI's shape

    @property
    def names(self) -> set[str]:
        return {t.name for t in self.tools}

    def forced_schema(self) -> dict[str, Any] | None:
        """The generic call's schema when a call is required: one call, to one of the tools
        (``required``) or to the named one."""
        if self.choice == "auto":
            return None
        chosen = [t for t in self.tools if self.forced in (None, t.name)]
        options = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                "required": ["name", "arguments"],
            }
            for t in chosen
        ]
        return options[0] if len(options) == 1 else {"anyOf": options}


def parse_tools(body: dict[str, Any]) -> Tools | None:
    """The request's tools; None when it has none, or ``tool_choice`` is ``"none"``."""
    raw = body.get("tools")
    choice = body.get("tool_choice")
    if raw is None or raw == []:
        if choice not in (None, "none", "auto"):
            raise ParamError("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(raw, list):
        raise ParamError("'tools' must be a list of function tools", "tools")
    tools = [_tool(i, item) for i, item in enumerate(raw)]
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ParamError("'tools' names a function twice", "tools")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ParamError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    forced = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise ParamError(
                "'tool_choice' must be 'auto', 'none', 'required' or "
                '{"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if name not in names:
            raise ParamError(
                f"'tool_choice' names {name!r}, which is not in 'tools'", "tool_choice"
            )
        choice, forced = "function", name
    elif choice not in _CHOICES:
        raise ParamError(
            f"'tool_choice' must be one of {', '.join(_CHOICES)} or a function, not {choice!r}",
            "tool_choice",
        )
    if choice == "none":
        return None
    return Tools(tools, choice, forced, raw)


def _tool(i: int, item: Any) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(item, dict) or item.get("type") != "function":
        raise ParamError(f"'{where}' must be {{'type': 'function', 'function': {{...}}}}", "tools")
    function = item.get("function")
    if not isinstance(function, dict):
        raise ParamError(f"'{where}.function' must be an object", "tools")
    name = function.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ParamError(f"'{where}.function.name' must be a name of 1 to 64 characters", "tools")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise ParamError(f"'{where}.function.description' must be a string", "tools")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ParamError(
            f"'{where}.function.parameters' must be a JSON schema of type 'object'", "tools"
        )
    return Tool(name, description, parameters)


def template_knows_tools(source: str) -> bool:
    """Whether a chat template reads the ``tools`` variable (and so renders tool turns)."""
    try:
        names = meta.find_undeclared_variables(jinja2.Environment().parse(source))
    except jinja2.TemplateError:
        return False
    return "tools" in names


def prompt_messages(
    messages: list[dict[str, Any]], tools: Tools | None, native: bool
) -> list[dict[str, Any]]:
    """The conversation as the template renders it: a native template gets tool calls'
    arguments as objects (as Hugging Face templates expect them); any other gets the tools
    as a system instruction and tool turns as text, merged so that roles still alternate."""
    if native:
        return [_native(m) for m in messages]
    out: list[dict[str, Any]] = []
    if tools is not None:
        out.append({"role": "system", "content": _instruction(tools)})
    called: dict[str, str] = {}  # tool_call_id -> function name, to label the results
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            role = "user"
            name = called.get(str(message.get("tool_call_id"))) or message.get("name") or "tool"
            content = f"Result of {name}:\n{content}"
        elif role == "assistant" and isinstance(message.get("tool_calls"), list):
            calls = [c for c in message["tool_calls"] if isinstance(c, dict)]
            for call in calls:
                function = call.get("function") if isinstance(call.get("function"), dict) else {}
                called[str(call.get("id"))] = str(function.get("name"))
            content = "\n".join(filter(None, [content, *map(_call_text, calls)]))
        if out and out[-1]["role"] == role:
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{content}"}
        else:
            out.append({"role": role, "content": content})
    return out


def _instruction(tools: Tools) -> str:
    lines = [
        "You can call these functions. To call one, answer with only a JSON object of the form"
        ' {"name": <function name>, "arguments": <arguments object>}; to call several, answer'
        ' {"tool_calls": [<call>, ...]}. Otherwise answer normally.',
        "Functions:",
    ]
    for tool in tools.tools:
        spec = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        lines.append(json.dumps(spec, ensure_ascii=False))
    return "\n".join(lines)


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    arguments = _arguments(function.get("arguments"))
    return json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)


def _native(message: dict[str, Any]) -> dict[str, Any]:
    # SDKs send an answer back as they got it, with null fields ("tool_calls": null) that
    # templates test for presence ('tool_calls' in message), not for a value.
    message = {k: v for k, v in message.items() if v is not None}
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    fixed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            call = {
                **call,
                "function": {**function, "arguments": _arguments(function.get("arguments"))},
            }
        fixed.append(call)
    return {**message, "tool_calls": fixed}


def _arguments(value: Any) -> Any:
    """OpenAI sends arguments as JSON text; templates write them out as objects."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
