"""OpenAI's Responses API (spec 2.5, 7.3) as plain data: requests validated and translated to
the internal chat completion request (app/service/chat.py), chat answers translated back into
Response objects. Streaming events are app/protocols/responses_stream.py; nothing here knows HTTP.

A Responses conversation is a list of items (messages, function calls, their outputs); a chat
conversation is a list of messages. One function maps items to messages, for a request's input
and for the output items of the response it continues (``previous_response_id``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.protocols.openai_errors import OpenAIError

# DMR answers these with a 400 (spec 7.3): they need features a local runner does not have.
_REFUSED = (
    "include",
    "stream_options",
    "top_logprobs",
    "conversation",
    "prompt",
    "service_tier",
    "safety_identifier",
)
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text")
_TOOL_CHOICES = ("auto", "none", "required")
_MAX_METADATA = 16
# The runner names chat completion fields in its errors; a Responses client sent these.
_PARAMS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}


def _bad(message: str, param: str | None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, code)


def responses_param(chat_param: str | None) -> str | None:
    """The Responses field behind a chat completion field that the runner refused."""
    return _PARAMS.get(chat_param, chat_param) if chat_param else None


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class Input:
    items: list[dict[str, Any]]  # as GET .../input_items lists them: typed, with ids
    messages: list[dict[str, Any]]  # the same as chat messages


@dataclass(frozen=True)
class ResponsesRequest:
    model: str
    input: Input
    instructions: str | None
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    stream: bool
    tools: list[dict[str, Any]]  # Responses' shape, as echoed
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    text: dict[str, Any]
    store: bool
    metadata: dict[str, str]
    previous_response_id: str | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _field(body: dict[str, Any], name: str, valid: Callable[[Any], bool], what: str) -> Any:
    """``body[name]``, None when absent or null, else a 400 unless ``valid``."""
    value = body.get(name)
    if value is not None and not valid(value):
        raise _bad(f"'{name}' must be {what}", name, "invalid_type")
    return value


def _refuse_unsupported(body: dict[str, Any]) -> None:
    # Null or empty is what an SDK sends for "not given": only a value is refused.
    for name in _REFUSED:
        if body.get(name) not in (None, [], {}, ""):
            raise _bad(f"'{name}' is not supported", name, "unsupported_parameter")
    if body.get("background") is True:
        raise _bad("background responses are not supported", "background", "unsupported_parameter")
    if body.get("truncation") not in (None, "disabled"):
        raise _bad(
            "'truncation' must be 'disabled': conversations are never truncated",
            "truncation",
            "unsupported_value",
        )


def parse_request(body: Any) -> ResponsesRequest:
    """A create request, validated; a OpenAIError (400 naming the field) for anything off.
    Fields this API does not know are ignored, as DMR's decoder ignores them."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None)
    _refuse_unsupported(body)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _bad("'model' is required", "model", "missing_required_parameter")
    if body.get("input") is None:
        raise _bad("'input' is required", "input", "missing_required_parameter")
    tools = _tools(_field(body, "tools", lambda v: isinstance(v, list), "a list") or [])
    return ResponsesRequest(
        model=model,
        input=parse_input(body["input"], "input"),
        instructions=_field(body, "instructions", lambda v: isinstance(v, str), "a string"),
        max_output_tokens=_field(
            body, "max_output_tokens", lambda v: _is_int(v) and v >= 1, "an integer of at least 1"
        ),
        temperature=_field(
            body, "temperature", lambda v: _is_number(v) and 0 <= v <= 2, "a number from 0 to 2"
        ),
        top_p=_field(
            body, "top_p", lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1"
        ),
        stream=bool(_field(body, "stream", lambda v: isinstance(v, bool), "a boolean")),
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice"), tools),
        parallel_tool_calls=_flag(body, "parallel_tool_calls"),
        text=_text(_field(body, "text", lambda v: isinstance(v, dict), "an object") or {}),
        store=_flag(body, "store"),
        metadata=_metadata(body.get("metadata")),
        previous_response_id=_field(
            body, "previous_response_id", lambda v: isinstance(v, str) and v, "a response id"
        ),
    )


def _flag(body: dict[str, Any], name: str) -> bool:
    """A boolean that OpenAI defaults to true."""
    value = _field(body, name, lambda v: isinstance(v, bool), "a boolean")
    return True if value is None else value


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if (
        not isinstance(value, dict)
        or len(value) > _MAX_METADATA
        or not all(isinstance(k, str) and len(k) <= 64 for k in value)
        or not all(isinstance(v, str) and len(v) <= 512 for v in value.values())
    ):
        raise _bad(
            f"'metadata' must be an object of at most {_MAX_METADATA} string values "
            "(keys up to 64 characters, values up to 512)",
            "metadata",
            "invalid_type",
        )
    return value


# Input items ------------------------------------------------------------------------------


def parse_input(value: Any, param: str) -> Input:
    """A string (one user message) or a list of items; ``param`` names it in errors."""
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _bad(f"'{param}' must be a string or a non-empty list of items", param)
    items = [_item(item, f"{param}[{i}]") for i, item in enumerate(value)]
    return Input(items, items_to_messages(items))


def _item(item: Any, where: str) -> dict[str, Any]:
    """One input item, checked, in the shape input_items lists (ids and status filled in)."""
    if not isinstance(item, dict):
        raise _bad(f"'{where}' must be an object", where)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        return _message_item(item, where)
    if kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str) or (not item[name] and name != "arguments"):
                raise _bad(f"'{where}.{name}' must be a string", f"{where}.{name}")
        return {
            "id": _given_id(item, "fc_"),
            "type": "function_call",
            "call_id": item["call_id"],
            "name": item["name"],
            "arguments": item["arguments"],
            "status": "completed",
        }
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str) or not item["call_id"]:
            raise _bad(f"'{where}.call_id' must be a string", f"{where}.call_id")
        output = item.get("output")
        if not isinstance(output, str):
            output = _parts(output, f"{where}.output", "input_text")
        return {
            "id": _given_id(item, "fco_"),
            "type": "function_call_output",
            "call_id": item["call_id"],
            "output": output,
            "status": "completed",
        }
    raise _bad(
        f"'{where}' has type {kind!r}: only message, function_call and function_call_output "
        "items are supported",
        f"{where}.type",
        "unsupported_value",
    )


def _message_item(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise _bad(
            f"'{where}.role' must be one of {', '.join(_ROLES)}", f"{where}.role", "invalid_value"
        )
    part = "output_text" if role == "assistant" else "input_text"
    content = item.get("content")
    parts = (
        [_text_part(part, content)]
        if isinstance(content, str)
        else _parts(content, f"{where}.content", part)
    )
    return {
        "id": _given_id(item, "msg_"),
        "type": "message",
        "role": role,
        "status": "completed",
        "content": parts,
    }


def _parts(value: Any, where: str, kind: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise _bad(f"'{where}' must be a string or a list of text parts", where)
    parts = []
    for i, part in enumerate(value):
        if (
            not isinstance(part, dict)
            or part.get("type") not in _TEXT_PARTS
            or not isinstance(part.get("text"), str)
        ):
            raise _bad(
                f"'{where}[{i}]' must be an input_text or output_text part: only text is supported",
                f"{where}[{i}]",
                "unsupported_value",
            )
        parts.append(_text_part(kind if part["type"] == kind else part["type"], part["text"]))
    return parts


def _text_part(kind: str, text: str) -> dict[str, Any]:
    if kind == "output_text":
        return {"type": "output_text", "text": text, "annotations": []}
    return {"type": kind, "text": text}


def _given_id(item: dict[str, Any], prefix: str) -> str:
    given = item.get("id")
    return given if isinstance(given, str) and given else new_id(prefix)


def _joined(parts: str | list[dict[str, Any]]) -> str:
    return parts if isinstance(parts, str) else "".join(p["text"] for p in parts)


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked items as chat messages: a function call joins the assistant message before it
    (chat carries an answer's text and its calls in one message)."""
    messages: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "message":
            role = _ROLES[item["role"]]
            messages.append({"role": role, "content": _joined(item["content"])})
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            content = _joined(item["output"])
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
    return messages


# Tools and output format ------------------------------------------------------------------


def _tools(raw: list[Any]) -> list[dict[str, Any]]:
    tools = []
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(
                f"'{where}' has type {kind!r}: only function tools are supported",
                f"{where}.type",
                "unsupported_value",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise _bad(f"'{where}.name' must be a name of 1 to 64 characters", f"{where}.name")
        checks = {"description": str, "parameters": dict, "strict": bool}
        for key, kind in checks.items():
            if tool.get(key) is not None and not isinstance(tool[key], kind):
                raise _bad(f"'{where}.{key}' has the wrong type", f"{where}.{key}", "invalid_type")
        tools.append({"type": "function", **{k: tool.get(k) for k in ("name", *checks)}})
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise _bad("'tools' names a function twice", "tools")
    return tools


def _tool_choice(choice: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any]:
    if choice is None:
        return "auto"
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if not any(t["name"] == name for t in tools):
            raise _bad(f"'tool_choice' names {name!r}, which is not in 'tools'", "tool_choice")
        return {"type": "function", "name": name}
    if choice not in _TOOL_CHOICES:
        raise _bad(
            "'tool_choice' must be 'auto', 'none', 'required' or "
            '{"type": "function", "name": ...}: only function tools are supported',
            "tool_choice",
            "unsupported_value",
        )
    if choice == "required" and not tools:
        raise _bad("'tool_choice' 'required' needs 'tools'", "tool_choice")
    return choice


def _text(text: dict[str, Any]) -> dict[str, Any]:
    fmt = text.get("format")
    if fmt is None:
        return {**text, "format": {"type": "text"}}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {**text, "format": {"type": kind}}
    if kind != "json_schema":
        raise _bad(
            "'text.format.type' must be 'text', 'json_object' or 'json_schema'",
            "text.format.type",
            "invalid_value",
        )
    if not isinstance(fmt.get("name"), str) or not fmt["name"]:
        raise _bad("'text.format.name' must be a string", "text.format.name")
    if not isinstance(fmt.get("schema"), dict):
        raise _bad("'text.format.schema' must be a JSON schema object", "text.format.schema")
    keys = ("type", "name", "schema", "description", "strict")
    return {**text, "format": {k: fmt[k] for k in keys if fmt.get(k) is not None}}


def _response_format(fmt: dict[str, Any]) -> dict[str, Any] | None:
    if fmt["type"] == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    spec = {k: v for k, v in fmt.items() if k != "type"}
    return {"type": "json_schema", "json_schema": spec}


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {k: tool[k] for k in ("name", "description", "parameters") if tool[k] is not None}
    return {"type": "function", "function": function}


# One response ------------------------------------------------------------------------------


@dataclass
class Turn:
    """One create request on its way: its id, and the chat conversation it continues."""

    request: ResponsesRequest
    history: list[dict[str, Any]] = field(default_factory=list)  # without instructions
    id: str = field(default_factory=lambda: new_id("resp_"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation so far, this request's input included, without instructions:
        a later response that continues this one brings its own (as OpenAI's do)."""
        return [*self.history, *self.request.input.messages]

    def chat_request(self) -> dict[str, Any]:
        req = self.request
        system = [{"role": "system", "content": req.instructions}] if req.instructions else []
        body: dict[str, Any] = {
            "model": req.model,
            "messages": [*system, *self.messages],
            "stream": req.stream,
        }
        if req.stream:
            body["stream_options"] = {"include_usage": True}  # Response objects carry usage
        optional = {
            "max_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "response_format": _response_format(req.text["format"]),
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if req.tools:
            choice = req.tool_choice
            if isinstance(choice, dict):
                choice = {"type": "function", "function": {"name": choice["name"]}}
            body["tools"] = [_chat_tool(t) for t in req.tools]
            body["tool_choice"] = choice
            body["parallel_tool_calls"] = req.parallel_tool_calls
        return body

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        usage: dict[str, Any] | None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The Response object, with the request fields that OpenAI's echo."""
        req = self.request
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "metadata": req.metadata,
            "model": req.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id,
            "store": req.store,
            "temperature": req.temperature,
            "text": req.text,
            "tool_choice": req.tool_choice,
            "tools": req.tools,
            "top_p": req.top_p,
            "truncation": "disabled",
            "usage": usage,
        }

    def from_chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """The Response object for a whole chat completion."""
        choice = (body.get("choices") or [{}])[0]
        status = finish_status(choice.get("finish_reason"))
        message = choice.get("message") or {}
        output = []
        calls = message.get("tool_calls") or []
        if message.get("content") or not calls:
            output.append(message_item(new_id("msg_"), message.get("content") or "", status))
        for call in calls:
            function = call.get("function") or {}
            output.append(
                function_call_item(
                    new_id("fc_"), call.get("id"), function.get("name"), function.get("arguments")
                )
            )
        return self.response(status, output, usage_from_chat(body.get("usage")))

    def conversation(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat conversation a later response continues: this one's, and its answer."""
        return [*self.messages, *items_to_messages(output)]


def finish_status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_text_part("output_text", text)]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def function_call_item(
    item_id: str, call_id: Any, name: Any, arguments: Any, status: str = "completed"
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": str(call_id or new_id("call_")),
        "name": str(name or ""),
        "arguments": arguments if isinstance(arguments, str) else "",
    }


def usage_from_chat(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(usage, dict):
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


# Listing input items -------------------------------------------------------------------------


def item_page(items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
    """GET .../input_items: ``order`` (asc, or desc: OpenAI's default), ``limit`` (1-100,
    20), ``after`` (an item id: the page starts past it)."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise _bad("'order' must be 'asc' or 'desc'", "order", "invalid_value")
    limit_text = query.get("limit", "20")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise _bad("'limit' must be an integer from 1 to 100", "limit", "invalid_value")
    ordered = items if order == "asc" else items[::-1]
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise _bad(f"'after' names {after!r}, which is not an item of this list", "after")
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[: int(limit_text)]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ordered) > len(page),
    }
