"""OpenAI's chat/completions event streams: their ``data:`` payloads out of bytes as they
arrive, and a stream put back together as the one answer the same request, not streamed, would
have got (what DMR's request recorder keeps of a stream)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TRUNCATED = "...[truncated]"
DONE = b"[DONE]"  # the payload that ends a stream
# One event carries a token or a tool call's arguments: a "pending event" this long is no event.
_MAX_EVENT = 256 * 1024


class Payloads:
    """The ``data:`` payloads of an event stream fed as bytes in any chunking; ``max_event``
    bytes of an event not yet ended are dropped rather than kept growing (None: no bound)."""

    def __init__(self, max_event: int | None = None) -> None:
        self._pending = b""
        self._max_event = max_event

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        *events, self._pending = self._pending.split(b"\n\n")
        if self._max_event is not None and len(self._pending) > self._max_event:
            self._pending = b""
        lines = (line for event in events for line in event.split(b"\n"))
        return [line[6:] for line in lines if line.startswith(b"data: ")]


@dataclass
class _Call:
    id: str | None = None
    type: str = "function"
    name: str = ""
    arguments: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": "".join(self.arguments)}
        return {"id": self.id, "type": self.type, "function": function}


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    finish_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the runner's stop_sequence


class StreamAssembler:
    """Fed a stream's bytes as they pass (any chunking), keeps only what the whole answer
    holds, and at most ``limit`` characters of text: past it the text ends in TRUNCATED and
    the rest of the stream is only read for its ending (finish reasons, usage)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.error: dict[str, Any] | None = None  # a failure event, as the stream sent it
        self._payloads = Payloads(_MAX_EVENT)
        self._seen = False
        self._envelope: dict[str, Any] = {}
        self._chat = True
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None
        self._size = 0
        self._full = False

    def feed(self, data: bytes) -> None:
        for payload in self._payloads.feed(data):
            if payload != DONE:
                self._payload(payload)

    def result(self) -> dict[str, Any] | None:
        """The whole answer (chat.completion or text_completion); None before any chunk."""
        if not self._seen:
            return None
        kind = "chat.completion" if self._chat else "text_completion"
        body = {"id": None, "object": kind, **self._envelope}
        body["choices"] = [self._choice(i, c) for i, c in sorted(self._choices.items())]
        if self._usage is not None:
            body["usage"] = self._usage
        return body

    def _payload(self, raw: bytes) -> None:
        try:
            chunk = json.loads(raw)
        except ValueError:
            return
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            self.error = chunk
            return
        self._seen = True
        self._chat = chunk.get("object") != "text_completion"
        for key in ("id", "created", "model", "system_fingerprint"):
            if key in chunk:
                self._envelope[key] = chunk[key]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                self._merge(choice)

    def _merge(self, choice: dict[str, Any]) -> None:
        kept = self._choices.setdefault(int(choice.get("index") or 0), _Choice())
        if choice.get("finish_reason") is not None:
            kept.finish_reason = choice["finish_reason"]
        if "stop_sequence" in choice:
            kept.extra["stop_sequence"] = choice["stop_sequence"]
        if not self._chat:
            self._add(kept.text, choice.get("text"))
            return
        delta = choice.get("delta") or {}
        self._add(kept.text, delta.get("content"))
        self._add(kept.reasoning, delta.get("reasoning_content"))
        for call in delta.get("tool_calls") or ():
            slot = kept.calls.setdefault(int(call.get("index") or 0), _Call())
            slot.id = call.get("id") or slot.id
            slot.type = call.get("type") or slot.type
            function = call.get("function") or {}
            slot.name += function.get("name") or ""
            self._add(slot.arguments, function.get("arguments"))

    def _add(self, parts: list[str], text: Any) -> None:
        if not isinstance(text, str) or not text or self._full:
            return
        room = self.limit - self._size
        if len(text) > room:
            text, self._full = text[:room] + TRUNCATED, True
        parts.append(text)
        self._size += len(text)

    def _choice(self, index: int, choice: _Choice) -> dict[str, Any]:
        text = "".join(choice.text)
        if not self._chat:
            answer: dict[str, Any] = {"index": index, "text": text}
        else:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if choice.reasoning:
                message["reasoning_content"] = "".join(choice.reasoning)
            if choice.calls:
                # OpenAI: a message that only calls tools has null content.
                message["content"] = text or None
                message["tool_calls"] = [c.to_json() for _, c in sorted(choice.calls.items())]
            answer = {"index": index, "message": message}
        return {**answer, "logprobs": None, "finish_reason": choice.finish_reason, **choice.extra}
