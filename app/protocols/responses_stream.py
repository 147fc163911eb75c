"""Chat completion chunks in, Responses streaming events out (OpenAI's event sequence).

Each output item opens (``response.output_item.added``), grows by deltas and closes
(``response.output_item.done``) before the next one opens, so a client can render items in
order as they come: the answer's text as a message item, then each tool call as a
function_call item. The stream ends with ``response.completed`` (``response.incomplete`` when
the token limit cut the answer, as OpenAI does), or ``error`` and ``response.failed``.
"""

from __future__ import annotations

import copy
from typing import Any

from app.protocols.responses import (
    Turn,
    finish_status,
    function_call_item,
    message_item,
    new_id,
    usage_from_chat,
)

Event = dict[str, Any]


class ResponseStream:
    """One streamed response; feed it each chat chunk, then finish (or fail) it once."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.output: list[dict[str, Any]] = []
        self.response: dict[str, Any] | None = None  # the final object, once finished
        self._sequence = 0
        self._open: dict[str, Any] | None = None  # the item that deltas grow
        self._call_index: int | None = None  # its chat tool call index, for a function call
        self._usage: dict[str, Any] | None = None
        self._finish_reason: str | None = None
        self.failed = False  # once failed, the stream is over: feed no more

    def start(self) -> list[Event]:
        snapshot = self.turn.response("in_progress", [], None)
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """The events for one chat chunk; for a runner's error chunk, the failure's."""
        error = chunk.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else None
            return self.fail(str(message or error))
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        events: list[Event] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text(delta["content"])
            for call in delta.get("tool_calls") or []:
                events += self._call(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> list[Event]:
        status = finish_status(self._finish_reason)
        events = self._close(status)
        if not self.output:  # an empty answer is still a message, as a whole answer has
            events += self._text("")
            events += self._close(status)
        self.response = self.turn.response(status, self.output, usage_from_chat(self._usage))
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return [*events, self._event(kind, response=self.response)]

    def fail(self, message: str) -> list[Event]:
        """The stream ends without an answer: the runner failed, or the service shuts down."""
        self.failed = True
        error = {"code": "server_error", "message": message}
        failed = self.turn.response("failed", self.output, usage_from_chat(self._usage), error)
        return [
            self._event("error", code="server_error", message=message, param=None),
            self._event("response.failed", response=failed),
        ]

    # Items ---------------------------------------------------------------------------------

    def _text(self, text: str) -> list[Event]:
        events: list[Event] = []
        item = self._open
        if item is None or item["type"] != "message":
            events += self._close("completed")
            item = message_item(new_id("msg_"), "", "in_progress")
            events += self._open_item(item)
            part = item["content"][0]
            events.append(self._event("response.content_part.added", **self._at(0), part=part))
        if text:
            item["content"][0]["text"] += text
            events.append(
                self._event("response.output_text.delta", **self._at(0), delta=text, logprobs=[])
            )
        return events

    def _call(self, delta: dict[str, Any]) -> list[Event]:
        # OpenAI's chat streams send a call's id and name first, then its arguments in pieces,
        # all under one index; the runner sends each call whole. Both are read the same way.
        events: list[Event] = []
        index = delta.get("index", 0)
        function = delta.get("function") or {}
        item = self._open
        if item is None or item["type"] != "function_call" or index != self._call_index:
            events += self._close("completed")
            item = function_call_item(
                new_id("fc_"), delta.get("id"), function.get("name"), "", "in_progress"
            )
            events += self._open_item(item)
            self._call_index = index
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item["arguments"] += arguments
            events.append(
                self._event("response.function_call_arguments.delta", **self._at(), delta=arguments)
            )
        return events

    def _open_item(self, item: dict[str, Any]) -> list[Event]:
        self._open = item
        self.output.append(item)
        return [
            self._event("response.output_item.added", output_index=len(self.output) - 1, item=item)
        ]

    def _close(self, status: str) -> list[Event]:
        item, self._open = self._open, None
        if item is None:
            return []
        events: list[Event] = []
        if item["type"] == "message":
            part = item["content"][0]
            events.append(
                self._event(
                    "response.output_text.done", **self._at(0), text=part["text"], logprobs=[]
                )
            )
            events.append(self._event("response.content_part.done", **self._at(0), part=part))
            item["status"] = status
        else:
            arguments = item["arguments"]
            events.append(
                self._event(
                    "response.function_call_arguments.done", **self._at(), arguments=arguments
                )
            )
            item["status"] = "completed"
        events.append(self._event("response.output_item.done", **self._at(), item=item))
        return events

    def _at(self, content_index: int | None = None) -> dict[str, Any]:
        """Where the latest item's events point: its id and place (and its content part's)."""
        where: dict[str, Any] = {
            "item_id": self.output[-1]["id"],
            "output_index": len(self.output) - 1,
        }
        if content_index is not None:
            where["content_index"] = content_index
        return where

    def _event(self, kind: str, **fields: Any) -> Event:
        # A snapshot: the open item keeps changing after its event is out.
        event = {"type": kind, "sequence_number": self._sequence, **copy.deepcopy(fields)}
        self._sequence += 1
        return event
