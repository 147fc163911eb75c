"""DMR's record of recent inference requests (spec 6.2, ``GET /engines/requests``): the last
10 request/response pairs per model, in memory, dropped when the model's runner stops.

Recorded where every API meets the runners (InferenceService.serve), so the OpenAI routes and
the APIs that translate to chat completions (Anthropic, Responses, Ollama) are all seen, the
latter as the chat completion they asked for, as DMR records its proxied calls. What the HTTP
layer knows of a call (method, path, User-Agent) and which API translated it arrive through
the context variables below, so no HTTP object reaches the service.

Bodies are capped (BODY_CAP each way, the cut marked), so records cannot hold much memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

from app.json_body import ON_LOOP_BYTES
from app.protocols.openai_stream import StreamAssembler

MAX_RECORDS = 10  # per model, as DMR
BODY_CAP = 256 * 1024  # bytes of request and of response a record keeps
MEDIA_KEEP = 100  # characters of base64 media a recorded request keeps, as DMR
SUBSCRIBER_BACKLOG = 100  # events a follower may fall behind before it is let go
# How a request ends when its client goes away (or shutdown cuts it): what was answered is kept.
_CLIENT_LEFT = (asyncio.CancelledError, ConnectionError, GeneratorExit)

# Which API translated the request into the chat completion that reached the runner:
# "anthropic/messages", "openai/responses", "ollama/completion"; "" for the OpenAI routes.
# Set by those APIs' handlers; the HTTP middleware scopes it to one request.
request_origin: contextvars.ContextVar[str] = contextvars.ContextVar("request_origin", default="")
ANTHROPIC_MESSAGES = "anthropic/messages"  # DMR's spellings
OLLAMA_COMPLETION = "ollama/completion"
OPENAI_RESPONSES = "openai/responses"  # DMR sets none for these


@dataclass(frozen=True)
class Call:
    """The HTTP request being served, as far as a record tells of it."""

    method: str
    path: str
    user_agent: str


current_call: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "current_call", default=None
)


@dataclass(frozen=True)
class Record:
    """DMR's RequestResponsePair."""

    id: str
    model: str  # the reference as the request spelt it
    method: str
    url: str
    request: str
    response: str
    error: str
    timestamp: int
    status_code: int
    user_agent: str
    origin: str

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for key in ("response", "error", "user_agent", "origin"):  # Go's omitempty
            if not doc[key]:
                del doc[key]
        return doc


@dataclass
class _ModelRecords:
    config: dict[str, Any]
    records: deque[Record] = field(default_factory=lambda: deque(maxlen=MAX_RECORDS))


def _view(model_id: str, config: dict[str, Any], records: list[Record]) -> dict[str, Any]:
    """DMR's ModelRecordsResponse."""
    return {
        "count": len(records),
        "model": model_id,
        "config": config,
        "records": [r.to_json() for r in records],
    }


class Subscription:
    """One follower's events (each a ModelRecordsResponse list); None once it is closed."""

    def __init__(self, model_id: str | None) -> None:
        self.model_id = model_id
        self._queue: asyncio.Queue[list[dict[str, Any]] | None] = asyncio.Queue()
        self._closed = False

    def offer(self, event: list[dict[str, Any]]) -> None:
        if self._closed:
            return
        if self._queue.qsize() >= SUBSCRIBER_BACKLOG:
            self.close()  # it reads slower than requests finish: let it go, keep nothing more
            return
        self._queue.put_nowait(event)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    async def next(self) -> list[dict[str, Any]] | None:
        return await self._queue.get()


class Recorder:
    def __init__(self) -> None:
        self._models: dict[str, _ModelRecords] = {}
        self._subscribers: set[Subscription] = set()
        self._closed = False

    def recording(
        self, model_id: str, model: str, route: str, body: bytes, doc: Any, config: dict[str, Any]
    ) -> Recording:
        """A request on its way to a runner: listed at once, unanswered (``status_code`` 0, as
        DMR lists one); answered when its block ends."""
        return Recording(self, model_id, model, route, body, doc, config)

    def begin(self, model_id: str, config: dict[str, Any], record: Record) -> None:
        kept = self._models.setdefault(model_id, _ModelRecords(config))
        kept.config = config
        kept.records.append(record)

    def drop(self, model_id: str, record_id: str) -> None:
        kept = self._models.get(model_id)
        if kept is not None:
            kept.records = deque((r for r in kept.records if r.id != record_id), MAX_RECORDS)

    def answer(self, model_id: str, config: dict[str, Any], record: Record) -> None:
        """The request's record, answered, takes the place of its unanswered one (unless ten
        newer ones pushed it out, or the runner stopped) and goes to the followers."""
        kept = self._models.get(model_id)
        if kept is not None:
            for i, earlier in enumerate(kept.records):
                if earlier.id == record.id:
                    kept.records[i] = record
        if self._subscribers:
            event = [_view(model_id, config, [record])]
            for subscription in list(self._subscribers):
                if subscription.model_id in (None, model_id):
                    subscription.offer(event)

    def listing(self, model_id: str | None = None) -> list[dict[str, Any]]:
        """DMR's JSON answer: every model's records, or one model's."""
        return [
            _view(mid, kept.config, list(kept.records))
            for mid, kept in self._models.items()
            if model_id in (None, mid)
        ]

    def existing(self, model_id: str | None = None) -> list[list[dict[str, Any]]]:
        """The records kept, one event each, as a follower that asks for them gets them."""
        return [
            [_view(mid, kept.config, [record])]
            for mid, kept in self._models.items()
            if model_id in (None, mid)
            for record in kept.records
        ]

    def forget(self, model_id: str) -> None:
        """The model's runner stopped: its records go (DMR's RemoveModel)."""
        self._models.pop(model_id, None)

    def subscribe(self, model_id: str | None) -> Subscription:
        subscription = Subscription(model_id)
        if self._closed:
            subscription.close()
        else:
            self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def close(self) -> None:
        """Shutdown: followers' streams end now, not when the drain timeout cuts them."""
        self._closed = True
        for subscription in self._subscribers:
            subscription.close()
        self._subscribers.clear()


class Recording:
    """One request: what was asked (the media cut short, capped), then what came back, kept
    as it passes: a body up to BODY_CAP, an event stream reassembled. Used as a ``with`` block
    around the runner's answer; its end (normal, an error, the client leaving) records it."""

    def __init__(
        self,
        recorder: Recorder,
        model_id: str,
        model: str,
        route: str,
        body: bytes,
        doc: Any,
        config: dict[str, Any],
    ) -> None:
        self._recorder = recorder
        self._model_id = model_id
        self._config = config
        call = current_call.get()
        origin = request_origin.get()
        # A translated request reached the runner as DMR's proxy sends it.
        url = call.path if call is not None and not origin else f"/engines/v1/{route}"
        self._record = Record(
            id=f"{model_id}_{time.time_ns()}",
            model=model,
            method=call.method if call is not None else "POST",
            url=url,
            request="",
            response="",
            error="",
            timestamp=int(time.time()),
            status_code=0,
            user_agent=call.user_agent if call is not None else "",
            origin=origin,
        )
        self._request: str | asyncio.Future[str] = _request_text(body, doc)
        self._status: int | None = None
        self._stream: StreamAssembler | None = None
        self._body = bytearray()
        self._size = 0
        self._discarded = False
        self._when_request_text(self._begin)

    def _begin(self, request: str) -> None:
        if not self._discarded:
            self._recorder.begin(
                self._model_id, self._config, _replace(self._record, request=request)
            )

    def watch(
        self, status: int, event_stream: bool, chunks: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """The runner's answer, passed through unchanged and kept on the way."""
        self._status = status
        if event_stream:
            self._stream = StreamAssembler(BODY_CAP)
        return _Tee(chunks, self._keep)

    def discard(self) -> None:
        """The request never reached a runner that answered; it is tried again."""
        self._discarded = True
        self._recorder.drop(self._model_id, self._record.id)

    def __enter__(self) -> Recording:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._discarded:
            self._finish(exc)

    def _keep(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._stream is not None:
            self._stream.feed(chunk)
        elif len(self._body) < BODY_CAP:
            self._body += chunk[: BODY_CAP - len(self._body)]

    def _finish(self, exc: BaseException | None) -> None:
        status, response, error = self._status, self._response(), ""
        left = exc is None or isinstance(exc, _CLIENT_LEFT)
        if status is None:
            # Nothing was answered: DMR records 408 when its client went away first.
            status = 408 if left else 500
            error = "the request ended before any answer" if left else str(exc)
        elif not left:
            error = str(exc) or type(exc).__name__
        elif status >= 400:
            error = response
        elif self._stream is not None and self._stream.error is not None:
            error = json.dumps(self._stream.error, ensure_ascii=False)
        if error:  # as DMR: an error replaces the response
            error, response = _as_json(error), ""
        record = _replace(self._record, response=response, error=error, status_code=status)

        self._when_request_text(
            lambda text: self._recorder.answer(
                self._model_id, self._config, _replace(record, request=text)
            )
        )

    def _when_request_text(self, then: Callable[[str], None]) -> None:
        if isinstance(self._request, str):
            then(self._request)
        else:  # still being re-encoded off the loop; callbacks run in the order they were added
            self._request.add_done_callback(lambda done: then(done.result()))

    def _response(self) -> str:
        if self._stream is not None:
            whole = self._stream.result()
            return "" if whole is None else _encoded(whole)
        text = bytes(self._body).decode("utf-8", "ignore")
        return text + _cut_marker(self._size - len(self._body))


class _Tee:
    """An async iterator over ``chunks`` that shows each one to ``keep`` first (a plain
    iterator, not a generator: nothing is left to finalize if the reader stops early)."""

    def __init__(self, chunks: AsyncIterator[bytes], keep: Callable[[bytes], None]) -> None:
        self._chunks = chunks
        self._keep = keep

    def __aiter__(self) -> _Tee:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._chunks.__anext__()
        self._keep(chunk)
        return chunk


def _replace(record: Record, **changes: Any) -> Record:
    return Record(**{**asdict(record), **changes})


def _request_text(body: bytes, doc: Any) -> str | asyncio.Future[str]:
    """The request as recorded: media data cut to MEDIA_KEEP characters (re-encoded then,
    off the loop when large), the whole capped."""
    shortened = _without_media(doc)
    if shortened is None:
        return _capped(body)
    if len(body) <= ON_LOOP_BYTES:
        return _encoded(shortened)
    return asyncio.get_running_loop().run_in_executor(None, _encoded, shortened)


def _encoded(doc: Any) -> str:
    return _capped(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())


def _without_media(doc: Any) -> dict[str, Any] | None:
    """``doc`` with long ``image_url.url`` and ``input_audio.data`` values in its messages'
    content parts cut short (DMR's truncateMediaFields); None when none is. The parts cut are
    copied, the rest shared: the request itself is still being served."""
    messages = doc.get("messages") if isinstance(doc, dict) else None
    if not isinstance(messages, list):
        return None
    changed = False
    copied = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts = [_part_without_media(part) for part in content]
            if any(new is not old for new, old in zip(parts, content, strict=True)):
                message, changed = {**message, "content": parts}, True
        copied.append(message)
    return {**doc, "messages": copied} if changed else None


def _part_without_media(part: Any) -> Any:
    if not isinstance(part, dict):
        return part
    for outer, inner in (("image_url", "url"), ("input_audio", "data")):
        holder = part.get(outer)
        if isinstance(holder, dict) and isinstance(holder.get(inner), str):
            short = _shortened(holder[inner])
            if short is not holder[inner]:
                return {**part, outer: {**holder, inner: short}}
    return part


def _shortened(data: str) -> str:
    if len(data) <= MEDIA_KEEP:
        return data
    if data.startswith("data:"):  # keep the data URL's header, cut its payload
        head, comma, payload = data.partition(",")
        if not comma or len(payload) <= MEDIA_KEEP:
            return data
        return f"{head},{payload[:MEDIA_KEEP]}...[truncated {len(payload) - MEDIA_KEEP} chars]"
    return f"{data[:MEDIA_KEEP]}...[truncated {len(data) - MEDIA_KEEP} chars]"


def _capped(data: bytes) -> str:
    return data[:BODY_CAP].decode("utf-8", "ignore") + _cut_marker(len(data) - BODY_CAP)


def _cut_marker(cut: int) -> str:
    return f"...[truncated {cut} bytes]" if cut > 0 else ""


def _as_json(text: str) -> str:
    """An error as JSON: as it was when it is JSON, else ``{"error": text}`` (as DMR)."""
    try:
        json.loads(text)
    except ValueError:
        return json.dumps({"error": text.strip() or "unknown error"})
    return text
