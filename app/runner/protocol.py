"""OpenAI's response shapes for the runner: plain dicts, and the SSE framing that carries them.

No engine logic here: serving hands over engine events and collected results, and this module
only decides what the client sees for them.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from app.engine.engine import Event, Failed, Finished, Token, TokenLogprob
from app.runner.tool_calls import ToolCall, ToolCalls

# What one SSE ``data:`` line carries: a JSON object, or the literal ``[DONE]``.
Payload = dict[str, Any] | str


def error_body(
    status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "type": kind, "param": param}}


def sse(payload: Payload) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class Reply:
    """One response's shapes, whole or as stream chunks; it keeps the id and timestamp that
    every chunk repeats, and the running text offset that completion logprobs report."""

    def __init__(self, chat: bool, model: str, include_usage: bool, logprobs: bool) -> None:
        self.chat = chat
        self.logprobs = logprobs
        self._offset = 0  # characters of completion text so far, for text_offset
        self.model = model
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def whole(
        self,
        text: str,
        logprobs: Sequence[TokenLogprob],
        done: Finished,
        calls: Sequence[ToolCall] = (),
    ) -> dict[str, Any]:
        choice = self._choice(text, done.reason, False, False, logprobs)
        _stopped_by(choice, done)
        if calls:
            # OpenAI: a message that only calls tools has null content.
            choice["message"] = {
                "role": "assistant",
                "content": text or None,
                "tool_calls": [self._call(c) for c in calls],
            }
        body = self._envelope([choice], False)
        body["usage"] = self._usage(done)
        return body

    def stream_start(self) -> list[Payload]:
        if not self.chat:
            return []
        # OpenAI opens a chat stream with the role and empty content.
        return [self._chunk([self._choice("", None, True, True)])]

    def stream_event(self, event: Event | ToolCalls) -> list[Payload]:
        """The SSE payloads for one engine event; the last event's end with ``[DONE]``."""
        if isinstance(event, ToolCalls):
            deltas = [{"index": i, **self._call(c)} for i, c in enumerate(event.calls)]
            choice = {"index": 0, "delta": {"tool_calls": deltas}, "logprobs": None}
            return [self._chunk([{**choice, "finish_reason": None}])]
        if isinstance(event, Token):
            return [self._chunk([self._choice(event.text, None, True, False, event.logprobs)])]
        if isinstance(event, Failed):
            # No "param" here, unlike error_body: streamed failures have always looked like this.
            return [{"error": {"code": 500, "message": event.message, "type": "server_error"}}]
        last = self._choice(None if self.chat else "", event.reason, True, False)
        _stopped_by(last, event)
        payloads: list[Payload] = [self._chunk([last])]
        if self.include_usage:
            body = self._envelope([], True)
            body["usage"] = self._usage(event)
            payloads.append(body)
        payloads.append("[DONE]")
        return payloads

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = self._envelope(choices, True)
        if self.include_usage:
            body["usage"] = None
        return body

    def _choice(
        self,
        text: str | None,
        finish: str | None,
        delta: bool,
        first: bool,
        logprobs: Sequence[TokenLogprob] = (),
    ) -> dict[str, Any]:
        lp = self._format_logprobs(logprobs) if self.logprobs and (logprobs or not delta) else None
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
        if delta:
            content: dict[str, Any] = {}
            if first:
                content["role"] = "assistant"
            if text is not None:
                content["content"] = text
            return {"index": 0, "delta": content, "logprobs": lp, "finish_reason": finish}
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": lp,
            "finish_reason": finish,
        }

    @staticmethod
    def _call(call: ToolCall) -> dict[str, Any]:
        return {
            "id": "call_" + uuid.uuid4().hex[:24],
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }

    def _format_logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        if self.chat:

            def one(token: str, raw: bytes, logprob: float) -> dict[str, Any]:
                return {"token": token, "logprob": logprob, "bytes": list(raw)}

            content = [
                {**one(e.token, e.bytes, e.logprob), "top_logprobs": [one(*t) for t in e.top]}
                for e in entries
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(self._offset)
            self._offset += len(e.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t: lp for t, _, lp in e.top} for e in entries],
            "text_offset": offsets,
        }

    def _envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = self.object + (".chunk" if chunk and self.chat else "")
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "model-runner",
            "choices": choices,
        }

    @staticmethod
    def _usage(done: Finished) -> dict[str, Any]:
        return {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
        }


def _stopped_by(choice: dict[str, Any], done: Finished) -> None:
    # Beyond OpenAI's shape, as llama-server's stopping_word: which stop string ended the
    # answer, where finish_reason "stop" alone cannot tell it from the model's end of turn
    # (Anthropic's stop_sequence is translated from it).
    if done.stop_sequence is not None:
        choice["stop_sequence"] = done.stop_sequence


def embeddings_body(
    vectors: Sequence[list[float]], encoding: str, model: str, prompt_tokens: int
) -> dict[str, Any]:
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, encoding)}
        for i, vector in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _encode(vector: list[float], encoding: str) -> Any:
    if encoding == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    return vector
