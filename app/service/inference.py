"""Inference requests, end to end (spec 5.1): find the model, lease its runner, forward the
body unchanged, and after a crash before any answer, once more on a fresh runner."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from app import errors
from app.durations import KeepAlive
from app.logging import get_logger
from app.oci import reference
from app.scheduler.launch import COMPLETION, EMBEDDING, ModelFiles, RunnerKey
from app.scheduler.process import RunnerProcess, describe_exit, last_words
from app.scheduler.scheduler import Scheduler
from app.service.backend import check_backend
from app.service.metrics import noted
from app.service.recorder import Recorder
from app.store import IndexEntry, ModelNotFound, ModelStore

log = get_logger("inference")

# The path suffix decides the runner's mode and the runner's route (spec 5.1).
ROUTES = {
    "chat/completions": COMPLETION,
    "completions": COMPLETION,
    "embeddings": EMBEDDING,
}
_PASSED_HEADERS = ("Content-Type", "Cache-Control")
# A runner that crashed is exiting; this long is allowed for its last words to arrive.
_LAST_WORDS_S = 2
_RUNNER_GONE = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)


class RunnerDied(Exception):
    """The runner died under the request; the message says how, with its last words.
    ``started`` tells whether part of the answer was already passed on."""

    def __init__(self, message: str, started: bool) -> None:
        super().__init__(message)
        self.started = started


@dataclass
class Reply:
    """The runner's answer, its body passed on as it comes."""

    status: int
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]

    @property
    def is_event_stream(self) -> bool:
        return self.headers.get("Content-Type", "").startswith("text/event-stream")


class InferenceService:
    def __init__(
        self, store: ModelStore, scheduler: Scheduler, recorder: Recorder | None = None
    ) -> None:
        self.store = store
        self.scheduler = scheduler
        self.recorder = recorder if recorder is not None else Recorder()

    async def resolve(self, model: str) -> IndexEntry:
        try:
            return noted(await asyncio.to_thread(self.store.resolve, model))
        except reference.InvalidReference:
            raise errors.BadRequest(f"Invalid model reference: {model!r}") from None
        except ModelNotFound:
            raise errors.model_not_found(model) from None

    @contextlib.asynccontextmanager
    async def serve(
        self,
        route: str,
        body: bytes,
        doc: Any,
        backend: str | None,
        preload_only: bool = False,
        keep_alive: KeepAlive | None = None,
    ) -> AsyncIterator[Reply | None]:
        """The runner's reply to an OpenAI request (``doc`` is ``body`` parsed); None when
        ``preload_only`` (``docker model run -d``): the runner is loaded, nothing is asked.
        ``keep_alive``: the request's own (Ollama's), else the model's.
        Raises RunnerDied, from here or while reading the chunks."""
        check_backend(backend)
        name = _model_name(doc)
        entry = await self.resolve(name)
        mode = ROUTES[route]
        for retry in (True, False):
            async with contextlib.AsyncExitStack() as stack:
                process = await stack.enter_async_context(self._lease(entry, mode, keep_alive))
                if preload_only:
                    yield None
                    return
                config = self.scheduler.configs.effective(RunnerKey(entry.id, mode)).to_json()
                recording = stack.enter_context(
                    self.recorder.recording(entry.id, name, route, body, doc, config)
                )
                try:
                    upstream = await stack.enter_async_context(process.post(route, body))
                except _RUNNER_GONE as exc:
                    await process.wait_exit(_LAST_WORDS_S)
                    if retry and not process.alive:
                        # It crashed before this request reached it (another request killed
                        # it): a fresh runner can still serve this one.
                        recording.discard()
                        continue
                    raise RunnerDied(_failure(exc, process), started=False) from None
                headers = {h: upstream.headers[h] for h in _PASSED_HEADERS if h in upstream.headers}
                reply = Reply(upstream.status, headers, _chunks(upstream, process))
                reply.chunks = recording.watch(reply.status, reply.is_event_stream, reply.chunks)
                yield reply
                return

    async def load(self, entry: IndexEntry, mode: str, keep_alive: KeepAlive | None = None) -> None:
        """Have the model's runner loaded (preload, ``_configure``), asking it nothing."""
        async with self._lease(entry, mode, keep_alive):
            pass

    def _lease(
        self, entry: IndexEntry, mode: str, keep_alive: KeepAlive | None
    ) -> contextlib.AbstractAsyncContextManager[RunnerProcess]:
        # The runner answers with the model's one name (its /v1/models id), however the
        # request spelled it.
        return self.scheduler.lease(
            RunnerKey(entry.id, mode), entry.name, lambda: self._files(entry), keep_alive
        )

    def _files(self, entry: IndexEntry) -> ModelFiles:
        bundle = self.store.bundle(entry)
        return ModelFiles(
            gguf=bundle.gguf,
            shards=bundle.shards,
            chat_template=bundle.chat_template,
            context_size=int(bundle.config.get("context_size") or 0) or None,
        )


def _model_name(doc: Any) -> str:
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, str) or not model.strip():
        raise errors.BadRequest("model is required")
    return model


async def _chunks(upstream: aiohttp.ClientResponse, process: RunnerProcess) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
    except _RUNNER_GONE as exc:
        await process.wait_exit(_LAST_WORDS_S)
        raise RunnerDied(_failure(exc, process), started=True) from None


def _failure(exc: Exception, process: RunnerProcess) -> str:
    # How it died and its own last words; not the connection's internals, nor the lines it
    # logged for other requests.
    if process.alive:
        message = f"the model runner failed: it stopped answering ({type(exc).__name__})"
    else:
        code, tail = process.exit_code, process.tail()
        # A signal leaves no words of its own unless it was a crash that Python reported.
        said = last_words(tail) if (code or 0) > 0 or "Fatal Python error" in tail else ""
        message = f"the model runner failed: it {describe_exit(code)}{said}"
    log.error("runner failed mid-request", error=message)
    return message
