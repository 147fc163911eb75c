"""OpenAI's Responses API over the internal chat client: responses kept in memory so that a
later request continues one (``previous_response_id``), and each create request answered whole
or as a stream of events.

Stored responses live an hour (DMR's DefaultTTL) unless the request said ``store: false``, and
only in this process: a restart forgets them, as DMR's do.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from app import errors
from app.protocols.openai_errors import OpenAIError
from app.protocols.responses import ResponsesRequest, Turn, responses_param
from app.protocols.responses_stream import Event, ResponseStream
from app.service.chat import ChatAnswer, ChatFailed, chat
from app.service.inference import InferenceService, RunnerDied

TTL_S = 3600.0
MAX_COUNT = 10_000
# Each record counts the text it added to its conversation (what it shares with the response
# it continues is counted there): past this, the oldest go first, however young.
MAX_CHARS = 256 * 2**20


@dataclass
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    conversation: list[dict[str, Any]]  # chat messages, this response's answer included
    expires: float
    chars: int


class ResponseStore:
    """Stored responses by id, oldest first: with one TTL for all, the oldest expire first."""

    def __init__(
        self,
        ttl_s: float = TTL_S,
        max_count: int = MAX_COUNT,
        max_chars: int = MAX_CHARS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_count = max_count
        self.max_chars = max_chars
        self.clock = clock
        self._records: OrderedDict[str, Stored] = OrderedDict()
        self._chars = 0

    def __len__(self) -> int:
        self._expire()
        return len(self._records)

    def save(self, turn: Turn, response: dict[str, Any]) -> None:
        conversation = turn.conversation(response["output"])
        added = conversation[len(turn.history) :]
        record = Stored(
            response=response,
            input_items=turn.request.input.items,
            conversation=conversation,
            expires=self.clock() + self.ttl_s,
            chars=_chars(added),
        )
        self._records[response["id"]] = record
        self._chars += record.chars
        while len(self._records) > self.max_count or self._chars > self.max_chars:
            self._drop(next(iter(self._records)))
        self._expire()

    def get(self, response_id: str) -> Stored | None:
        self._expire()
        return self._records.get(response_id)

    def delete(self, response_id: str) -> bool:
        self._expire()
        if response_id not in self._records:
            return False
        self._drop(response_id)
        return True

    def _expire(self) -> None:
        now = self.clock()
        while self._records:
            oldest = next(iter(self._records))
            if self._records[oldest].expires > now:
                return
            self._drop(oldest)

    def _drop(self, response_id: str) -> None:
        self._chars -= self._records.pop(response_id).chars


def _chars(messages: list[dict[str, Any]]) -> int:
    """About the memory a conversation's messages hold: their text, calls included."""
    total = 0
    for message in messages:
        total += len(message.get("content") or "") + 64
        for call in message.get("tool_calls") or []:
            total += len(call["function"]["arguments"]) + len(call["function"]["name"]) + 64
    return total


def not_found(response_id: str) -> OpenAIError:
    return OpenAIError(404, f"Response with id '{response_id}' not found.")


class ResponsesService:
    def __init__(self, store: ResponseStore | None = None) -> None:
        self.store = store or ResponseStore()

    def begin(self, request: ResponsesRequest) -> Turn:
        """The request's turn, continuing the response it names: 404 when that is unknown
        (never stored, expired or deleted)."""
        previous = request.previous_response_id
        if previous is None:
            return Turn(request)
        stored = self.store.get(previous)
        if stored is None:
            raise OpenAIError(
                404,
                f"Previous response with id '{previous}' not found.",
                "previous_response_id",
                "previous_response_not_found",
            )
        return Turn(request, list(stored.conversation))

    async def answer(
        self, inference: InferenceService, turn: Turn, backend: str | None
    ) -> dict[str, Any]:
        """The whole Response object (stored when the request asked for it)."""
        async with _chat(inference, turn, backend) as answer:
            assert answer.body is not None
            response = turn.from_chat(answer.body)
        self.keep(turn, response)
        return response

    @contextlib.asynccontextmanager
    async def stream(
        self, inference: InferenceService, turn: Turn, backend: str | None
    ) -> AsyncIterator[LiveResponse]:
        """A streamed response: the model is found and the runner has accepted the request on
        entry (else the errors raise here, before anything is sent); leaving the block stops
        the runner's work on it."""
        async with _chat(inference, turn, backend) as answer:
            assert answer.chunks is not None
            yield LiveResponse(self, turn, answer.chunks)

    def get(self, response_id: str) -> Stored:
        stored = self.store.get(response_id)
        if stored is None:
            raise not_found(response_id)
        return stored

    def delete(self, response_id: str) -> None:
        if not self.store.delete(response_id):
            raise not_found(response_id)

    def keep(self, turn: Turn, response: dict[str, Any]) -> None:
        if turn.request.store:
            self.store.save(turn, response)


class LiveResponse:
    """A response being streamed: its events, and the ending for a stream cut short."""

    def __init__(
        self, service: ResponsesService, turn: Turn, chunks: AsyncIterator[dict[str, Any]]
    ) -> None:
        self._service = service
        self._chunks = chunks
        self._stream = ResponseStream(turn)

    async def events(self) -> AsyncIterator[Event]:
        stream = self._stream
        for event in stream.start():
            yield event
        try:
            async for chunk in self._chunks:
                for event in stream.feed(chunk):
                    yield event
                if stream.failed:
                    return
        except RunnerDied as exc:
            for event in stream.fail(str(exc)):
                yield event
            return
        ending = stream.finish()
        assert stream.response is not None
        # Kept before the client hears of it: it may ask for it back at once.
        self._service.keep(stream.turn, stream.response)
        for event in ending:
            yield event

    def cut(self, why: str) -> list[Event]:
        return self._stream.fail(why)


@contextlib.asynccontextmanager
async def _chat(
    inference: InferenceService, turn: Turn, backend: str | None
) -> AsyncIterator[ChatAnswer]:
    """chat(), its refusals in the Responses API's terms; errors from the caller's block pass
    untouched."""
    model = turn.request.model
    async with contextlib.AsyncExitStack() as stack:
        try:
            answer = await stack.enter_async_context(chat(inference, turn.chat_request(), backend))
        except ChatFailed as exc:
            raise OpenAIError(exc.status, str(exc), responses_param(exc.param)) from None
        except errors.UnknownModel:
            raise OpenAIError(
                404, f"The model '{model}' does not exist.", "model", "model_not_found"
            ) from None
        except errors.BadRequest as exc:  # the request was checked: only the model name is left
            raise OpenAIError(400, str(exc), "model") from None
        yield answer
