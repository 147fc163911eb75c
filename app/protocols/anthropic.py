"""Anthropic's Messages API in terms of OpenAI chat completions, the service's one internal chat
representation (app/service/chat.py): a request checked and translated, and the answer, whole
or streamed, translated back. Plain dicts in and out; no HTTP.

Whether a stop sequence ended an answer: the runner's choice names it (``stop_sequence``), since
``finish_reason: "stop"`` is the same for a stop string and the model's end of turn.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.protocols.openai_calls import arguments_object

Event = tuple[str, dict[str, Any]]  # an SSE event's name and its data


class InvalidRequest(ValueError):
    """What Anthropic refuses with ``invalid_request_error``: the message names the field."""


# Hints on billing, routing, caching and effort, and `thinking`: none changes what the answer
# is made of here (the model thinks, or not, as its template has it; no thinking blocks).
_IGNORED = frozenset(
    {
        "metadata",
        "service_tier",
        "speed",
        "inference_geo",
        "cache_control",
        "diagnostics",
        "user_profile_id",
        "workspace_id",
        "thinking",
    }
)
_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "output_config",
        "max_tokens",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
    }
)
_TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Blocks a model wrote in an earlier turn that Anthropic leaves out of the prompt too.
_DROPPED_BLOCKS = frozenset({"thinking", "redacted_thinking"})
_TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}
# Anthropic's error type for each status the service answers.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    chat: dict[str, Any]  # the OpenAI chat completion request to ask the runner


def parse_request(body: Any, counting: bool = False) -> MessagesRequest:
    """A Messages request (or, ``counting``, a count_tokens one) as a chat completion request.
    Counting asks for one token, whatever ``max_tokens`` says (the runner reports the prompt's
    tokens with an answer), and ignores the fields that only shape the answer."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    for name in body:
        if name not in _FIELDS and name not in _IGNORED:
            raise InvalidRequest(f"{name}: not supported")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model: a model name is required")
    _check_output_config(body.get("output_config"))
    tools = _tools(body.get("tools"))
    chat: dict[str, Any] = {
        "model": model,
        "messages": _system(body.get("system")) + _messages(body.get("messages")),
        "max_tokens": 1 if counting else _max_tokens(body.get("max_tokens")),
    }
    if tools:
        chat["tools"] = tools
    chat.update(_tool_choice(body.get("tool_choice"), tools))
    if not counting:
        chat.update(_sampling(body))
        stops = _strings(body.get("stop_sequences"), "stop_sequences")
        if stops:
            chat["stop"] = stops
        if _flag(body.get("stream"), "stream"):
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
    return MessagesRequest(model, chat)


def _check_output_config(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise InvalidRequest("output_config: must be an object")
    for name in value:
        if name != "effort":  # a hint; `format` (structured output) would be a promise
            raise InvalidRequest(f"output_config.{name}: not supported")


def _max_tokens(value: Any) -> int:
    if value is None:
        raise InvalidRequest("max_tokens: Field required")
    if not _is_int(value) or value < 1:
        raise InvalidRequest("max_tokens: must be an integer of at least 1")
    return int(value)


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is None:
            continue
        if not _is_number(value) or not 0 <= value <= 1:
            raise InvalidRequest(f"{name}: must be a number from 0 to 1")
        out[name] = value
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < 0:
            raise InvalidRequest("top_k: must be an integer of at least 0")
        out["top_k"] = top_k
    return out


def _system(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    text = value if isinstance(value, str) else "\n\n".join(_texts(value, "system"))
    return [{"role": "system", "content": text}]


def _texts(value: Any, where: str) -> list[str]:
    """A list of text blocks' texts (a system prompt, a tool result)."""
    if not isinstance(value, list):
        raise InvalidRequest(f"{where}: must be a string or a list of text blocks")
    texts = []
    for i, block in enumerate(value):
        if _block_type(block, f"{where}.{i}") != "text":
            raise InvalidRequest(f"{where}.{i}.type: only text blocks are supported here")
        texts.append(_text(block, f"{where}.{i}"))
    return texts


@dataclass
class _Turn:
    """One turn's blocks, sorted by what they become in a chat completion request."""

    role: str
    texts: list[str] = field(default_factory=list)
    calls: list[dict[str, Any]] = field(default_factory=list)  # assistant: tool_calls
    results: list[dict[str, Any]] = field(default_factory=list)  # user: role "tool" messages


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages: must be a non-empty list of messages")
    turns: list[_Turn] = []
    for i, message in enumerate(value):
        turn = _turn(message, f"messages.{i}")
        if turns and turns[-1].role == turn.role:  # Anthropic joins consecutive turns too
            last = turns[-1]
            last.texts += turn.texts
            last.calls += turn.calls
            last.results += turn.results
        else:
            turns.append(turn)
    return [m for turn in turns for m in _chat_messages(turn)]


def _turn(message: Any, where: str) -> _Turn:
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where}: must be an object with a role and content")
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequest(f"{where}.role: must be 'user' or 'assistant'")
    turn = _Turn(role)
    content = message.get("content")
    if isinstance(content, str):
        turn.texts.append(content)
        return turn
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content: must be a string or a list of content blocks")
    for i, block in enumerate(content):
        at = f"{where}.content.{i}"
        kind = _block_type(block, at)
        if kind == "text":
            turn.texts.append(_text(block, at))
        elif kind == "tool_use" and role == "assistant":
            turn.calls.append(_tool_call(block, at))
        elif kind == "tool_result" and role == "user":
            turn.results.append(_tool_message(block, at))
        elif kind in _DROPPED_BLOCKS and role == "assistant":
            continue
        elif kind in ("tool_use", "tool_result"):
            raise InvalidRequest(f"{at}.type: a {kind} block cannot be in a {role} message")
        else:
            raise InvalidRequest(f"{at}.type: {kind!r} blocks are not supported")
    return turn


def _chat_messages(turn: _Turn) -> list[dict[str, Any]]:
    text = "\n\n".join(turn.texts)
    if turn.role == "assistant":
        if not turn.calls:
            return [{"role": "assistant", "content": text}]
        return [{"role": "assistant", "content": text or None, "tool_calls": turn.calls}]
    # The results answer the calls of the turn before: they come first, as OpenAI wants them.
    if turn.results and not turn.texts:
        return turn.results
    return [*turn.results, {"role": "user", "content": text}]


def _block_type(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise InvalidRequest(f"{where}: must be a content block with a type")
    return block["type"]


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise InvalidRequest(f"{where}.text: must be a string")
    return text


def _tool_call(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"{where}.id: must be a string")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{where}.name: must be a string")
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{where}.input: must be an object")
    function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
    return {"id": call_id, "type": "function", "function": function}


def _tool_message(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"{where}.tool_use_id: must be a string")
    content = block.get("content", "")
    text = content if isinstance(content, str) else "\n\n".join(_texts(content, f"{where}.content"))
    is_error = _flag(block.get("is_error"), f"{where}.is_error")
    if is_error:  # a tool message has no error flag: the model reads it in the text
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest("tools: must be a list of tools")
    return [_tool(tool, f"tools.{i}") for i, tool in enumerate(value)]


def _tool(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict):
        raise InvalidRequest(f"{where}: must be an object")
    kind = tool.get("type")
    if kind not in (None, "custom"):  # Anthropic's server tools run on Anthropic's servers
        raise InvalidRequest(f"{where}.type: {kind!r} tools are not supported, only custom tools")
    name = tool.get("name")
    if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
        raise InvalidRequest(f"{where}.name: must be 1 to 64 letters, digits, '_' or '-'")
    description = tool.get("description", "")
    if not isinstance(description, str):
        raise InvalidRequest(f"{where}.description: must be a string")
    schema = tool.get("input_schema")
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise InvalidRequest(f"{where}.input_schema: must be a JSON schema of type 'object'")
    function = {"name": name, "description": description, "parameters": schema}
    return {"type": "function", "function": function}


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """``tool_choice`` and ``parallel_tool_calls`` for the chat request."""
    if value is None:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in (*_TOOL_CHOICES, "tool"):
        raise InvalidRequest("tool_choice.type: must be 'auto', 'any', 'tool' or 'none'")
    names = [t["function"]["name"] for t in tools]
    out: dict[str, Any] = {}
    if kind == "tool":
        name = value.get("name")
        if name not in names:
            raise InvalidRequest(f"tool_choice.name: {name!r} is not the name of a tool in tools")
        out["tool_choice"] = {"type": "function", "function": {"name": name}}
    elif kind == "any" and not tools:
        raise InvalidRequest("tool_choice: 'any' needs tools")
    elif tools:
        out["tool_choice"] = _TOOL_CHOICES[kind]
    serial = _flag(value.get("disable_parallel_tool_use"), "tool_choice.disable_parallel_tool_use")
    if tools and serial:
        out["parallel_tool_calls"] = False
    return out


def _strings(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise InvalidRequest(f"{where}: must be a list of non-empty strings")
    return value


def _flag(value: Any, where: str) -> bool:
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"{where}: must be a boolean")
    return bool(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# Answers.


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object for a status; any other 4xx is an invalid request."""
    kind = _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def input_tokens(body: dict[str, Any]) -> int:
    """A count_tokens answer's figure, out of the one-token chat completion it asked for."""
    return int((body.get("usage") or {}).get("prompt_tokens") or 0)


def message(body: dict[str, Any], request: MessagesRequest) -> dict[str, Any]:
    """A whole chat completion as an Anthropic message."""
    choices = body.get("choices") or [{}]
    choice = choices[0]
    answer = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if answer.get("content"):
        content.append({"type": "text", "text": answer["content"]})
    for call in answer.get("tool_calls") or []:
        function = call.get("function") or {}
        arguments = arguments_object(function.get("arguments"))
        content.append(_tool_use(function.get("name", ""), arguments))
    reason, sequence = _stop_reason(choice)
    usage = _usage(body.get("usage"))
    return _envelope(_new_id("msg_"), request.model, content, (reason, sequence), usage)


def _envelope(
    message_id: str,
    model: str,
    content: list[dict[str, Any]],
    stop: tuple[str | None, str | None],
    usage: dict[str, int],
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop[0],
        "stop_sequence": stop[1],
        "usage": usage,
    }


def _tool_use(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": _new_id("toolu_"), "name": name, "input": arguments}


def _usage(usage: dict[str, Any] | None) -> dict[str, int]:
    usage = usage or {}
    return {
        "input_tokens": int(usage.get("prompt_tokens") or 0),
        "output_tokens": int(usage.get("completion_tokens") or 0),
    }


def _stop_reason(choice: dict[str, Any]) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for a chat choice's end."""
    finish, sequence = choice.get("finish_reason"), choice.get("stop_sequence")
    if finish in _STOP_REASONS:
        return _STOP_REASONS[finish], None
    if finish == "stop" and isinstance(sequence, str):
        return "stop_sequence", sequence
    return "end_turn", None


class StreamTranslator:
    """A chat completion's chunks in, Anthropic's stream events out: ``start()``, ``feed()``
    each chunk, then ``finish()`` once the chunks end (unless ``failed``: the runner's error
    was the last event)."""

    def __init__(self, request: MessagesRequest) -> None:
        self.request = request
        self.failed = False
        self._id = _new_id("msg_")
        self._index = -1  # the open block's index; -1: none yet
        self._open: Any = None  # what the open block holds: "text", or ("call", its index)
        self._end: dict[str, Any] = {}  # the choice that says how the answer ended
        self._usage: dict[str, Any] | None = None

    def start(self) -> list[Event]:
        # Input tokens are known only at the end: message_delta carries them then.
        usage = {"input_tokens": 0, "output_tokens": 0}
        message = _envelope(self._id, self.request.model, [], (None, None), usage)
        return [_event("message_start", message=message), _event("ping")]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if "error" in chunk:
            self.failed = True
            error = chunk["error"]
            text = error.get("message") if isinstance(error, dict) else None
            return [error_event(500, str(text or error))]
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        events: list[Event] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._block("text", {"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": delta["content"]}))
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            if choice.get("finish_reason"):
                self._end = choice
        return events

    def finish(self) -> list[Event]:
        reason, sequence = _stop_reason(self._end)
        return [
            *self._close(),
            _event(
                "message_delta",
                delta={"stop_reason": reason, "stop_sequence": sequence},
                usage=_usage(self._usage),
            ),
            _event("message_stop"),
        ]

    def _call(self, call: dict[str, Any]) -> list[Event]:
        function = call.get("function") or {}
        start = _tool_use(function.get("name") or "", {})
        events = self._block(("call", call.get("index", 0)), start)
        if function.get("arguments"):
            delta = {"type": "input_json_delta", "partial_json": function["arguments"]}
            events.append(self._delta(delta))
        return events

    def _block(self, holds: Any, start: dict[str, Any]) -> list[Event]:
        """Open a block for ``holds`` unless it is the one open, closing that one."""
        if self._open == holds:
            return []
        events = self._close()
        self._index += 1
        self._open = holds
        events.append(_event("content_block_start", index=self._index, content_block=start))
        return events

    def _close(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [_event("content_block_stop", index=self._index)]

    def _delta(self, delta: dict[str, Any]) -> Event:
        return _event("content_block_delta", index=self._index, delta=delta)


def error_event(status: int, message: str) -> Event:
    return "error", error_body(status, message)


def _event(name: str, **data: Any) -> Event:
    return name, {"type": name, **data}
