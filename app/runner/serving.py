"""What the runner does for a request: request bodies to engine jobs, engine events back out.

Nothing here knows HTTP: routes read the body and render what comes back through protocol.
Every refusal is a ``ParamError``, which routes answer as an OpenAI 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from app.engine.embed import Embedder
from app.engine.engine import Engine, Event, Failed, Finished, Request, Token, TokenLogprob
from app.engine.llama import LlamaError, Model, TooManyTokens
from app.runner.metrics import CHAT, COMPLETION, RunnerMetrics, Watch
from app.runner.params import (
    Generation,
    ParamError,
    parse_generation,
    parse_inputs,
    parse_messages,
    parse_prompt,
    schema_grammar,
)
from app.runner.render import Renderer, render_request
from app.runner.tool_calls import ToolCall, ToolCallParser, ToolCalls
from app.runner.tools import Tools, parse_tools, prompt_messages


@dataclass
class Runtime:
    """The loaded model and whichever side of it this runner serves (engine or embedder)."""

    model: Model
    name: str
    ctx_size: int
    engine: Engine | None = None
    embedder: Embedder | None = None
    renderer: Renderer | None = None  # completion mode only
    template_tools: bool = False  # the chat template renders tools itself
    mailbox: Mailbox | None = None  # made on the event loop by the first request
    metrics: RunnerMetrics = dataclasses.field(default_factory=RunnerMetrics)

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise ParamError("this model runs in embedding mode")
        return self.engine

    def require_embedder(self) -> Embedder:
        if self.embedder is None:
            raise ParamError(
                "this model runs in completion mode; embeddings need an embedding runner"
            )
        return self.embedder


@dataclass(frozen=True)
class Collected:
    """A whole generation: its text, the logprobs of every token, how it ended, and the tool
    calls found in it."""

    text: str
    logprobs: list[TokenLogprob]
    done: Finished
    calls: list[ToolCall]


class Mailbox:
    """Engine events onto the event loop: one wake-up per engine step, not one per token.

    ``call_soon_threadsafe`` writes to the loop's self-pipe at every call; with 64 sequences
    that was 64 system calls and as many wake-ups a step. Events posted while a delivery is
    pending join it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []

    def post(self, queue: asyncio.Queue[Event], event: Event) -> None:
        """Called on the engine thread."""
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a delivery is already scheduled
        # A closed loop: the runner is shutting down and nobody is waiting.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class InFlight:
    """A submitted job's parameters and the queue its engine events arrive on.

    A whole (not streamed) answer wakes the event loop once, when it ends: its tokens are
    ``held`` on the engine thread meanwhile, and only the last event is queued. With tools, the
    text goes through a tool-call parser: what is not a call comes out as text, the calls as one
    ``ToolCalls`` event before ``Finished`` (whose reason becomes ``tool_calls``).
    """

    def __init__(
        self,
        params: Generation,
        queue: asyncio.Queue[Event],
        held: list[Token] | None = None,
        parser: ToolCallParser | None = None,
    ) -> None:
        self.params = params
        self._queue = queue
        self._held = held if held is not None else []
        self._parser = parser

    async def batches(self) -> AsyncIterator[list[Event | ToolCalls]]:
        """Every event up to and including the last (``Finished`` or ``Failed``), in lists of
        those that have arrived by the time the caller asks again: a stream that fell behind
        catches up in one write."""
        async for batch in self._arrived():
            yield self._parsed(batch)

    async def collect(self) -> Collected | Failed:
        queued: list[Event] = []
        async for batch in self._arrived():
            queued.extend(batch)
        # The held tokens are all in once the last event is here.
        events = self._parsed([*self._held, *queued])
        last = events[-1]
        if isinstance(last, Failed):
            return last
        assert isinstance(last, Finished)
        tokens = [e for e in events if isinstance(e, Token)]
        calls = [c for e in events if isinstance(e, ToolCalls) for c in e.calls]
        logprobs = [lp for t in tokens for lp in t.logprobs]
        return Collected("".join(t.text for t in tokens), logprobs, last, calls)

    async def _arrived(self) -> AsyncIterator[list[Event]]:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and isinstance(batch[-1], Token):
                batch.append(self._queue.get_nowait())
            yield batch
            if not isinstance(batch[-1], Token):
                return

    def _parsed(self, events: list[Event]) -> list[Event | ToolCalls]:
        parser = self._parser
        if parser is None:
            return list(events)
        out: list[Event | ToolCalls] = []
        for event in events:
            if isinstance(event, Token):
                text = parser.feed(event.text)
                if text or event.logprobs:
                    out.append(Token(text, event.logprobs))
                continue
            if isinstance(event, Finished):
                rest, calls = parser.finish()
                if rest:
                    out.append(Token(rest))
                if calls:
                    out.append(ToolCalls(calls))
                    event = dataclasses.replace(event, reason="tool_calls")
            out.append(event)
        return out


@asynccontextmanager
async def generate(
    rt: Runtime, engine: Engine, body: dict[str, Any], chat: bool
) -> AsyncIterator[InFlight]:
    """Check the request, submit it, and cancel the job when the caller is done with it."""
    watch = Watch(CHAT if chat else COMPLETION)
    # Parsing (a JSON schema's grammar included), rendering, tokenizing and compiling the grammar
    # all run off the event loop: on it, one large or hostile request stalls every stream. In as
    # few hops as they allow: each costs a request's time to first token a thread wake-up.
    if chat:
        assert rt.renderer is not None
        params, tools, request = await asyncio.to_thread(_chat_job, rt, body)
        text = await rt.renderer.render(request)
        tokens, field = await asyncio.to_thread(_chat_tokens, rt, text), "messages"
    else:
        params, tokens = await asyncio.to_thread(_completion_job, rt, body)
        tools, field = None, "prompt"
    if not tokens:
        raise ParamError(f"the {field} is empty", field)
    if len(tokens) >= rt.ctx_size:
        raise _too_long(str(len(tokens)), rt.ctx_size, field)
    max_tokens = min(params.max_tokens or rt.ctx_size, rt.ctx_size - len(tokens))
    if rt.mailbox is None:
        rt.mailbox = Mailbox(asyncio.get_running_loop())
    mailbox = rt.mailbox
    queue: asyncio.Queue[Event] = asyncio.Queue()
    held: list[Token] = []

    def sink(event: Event) -> None:  # on the engine thread
        if isinstance(event, Token):
            if not params.stream:
                held.append(event)
                return
        else:
            watch.saw_end(event)
        mailbox.post(queue, event)

    job = Request(
        prompt=tokens,
        max_tokens=max_tokens,
        sampling=params.sampling,
        stop=params.stop,
        top_logprobs=params.top_logprobs,
        sink=sink,
    )
    engine.submit(job)
    try:
        parser = ToolCallParser(tools.names) if tools else None
        yield InFlight(params, queue, held, parser)
    finally:
        # Client gone or done: either way the slot is free for the next request at once.
        engine.cancel(job)
        rt.metrics.generation_over(watch)


def _checked_generation(
    rt: Runtime, body: dict[str, Any], chat: bool, tools: Tools | None = None
) -> Generation:
    """The request's parameters, its grammar compiled: the response format's, or, when a tool
    call is required, the one that writes a call whatever the model."""
    params = parse_generation(body, rt.model.info.n_vocab, chat)
    field, what = "response_format", "this schema"
    schema = tools.forced_schema() if tools else None
    if schema is not None:
        grammar = schema_grammar(schema, "tools")
        params = dataclasses.replace(
            params, sampling=dataclasses.replace(params.sampling, grammar=grammar)
        )
        field, what = "tools", "these tools"
    grammar = params.sampling.grammar
    if grammar and not rt.model.grammar_compiles(grammar):
        raise ParamError(f"llama.cpp cannot compile the grammar for {what}", field)
    return params


def _completion_job(rt: Runtime, body: dict[str, Any]) -> tuple[Generation, list[int]]:
    params = _checked_generation(rt, body, chat=False)
    prompt = parse_prompt(body, rt.model.info.n_vocab)
    if isinstance(prompt, list):
        return params, prompt
    return params, _tokenize(rt, prompt, True, "prompt")


def _chat_job(rt: Runtime, body: dict[str, Any]) -> tuple[Generation, Tools | None, bytes]:
    tools = parse_tools(body)
    params = _checked_generation(rt, body, chat=True, tools=tools)
    messages = prompt_messages(parse_messages(body), tools, rt.template_tools)
    native_tools = tools.raw if tools and rt.template_tools else None
    return params, tools, render_request(messages, native_tools)


def _chat_tokens(rt: Runtime, text: str) -> list[int]:
    bos = rt.model.info.bos_text
    # Templates that write the BOS themselves must not get a second one from the tokenizer.
    add_bos = rt.model.info.add_bos and not (bos and text.startswith(bos))
    return _tokenize(rt, text, add_bos, "messages")


def _tokenize(rt: Runtime, text: str, add_bos: bool, field: str) -> list[int]:
    try:
        return rt.model.tokenize_at_most(text, rt.ctx_size - 1, add_bos)
    except TooManyTokens as exc:
        raise _too_long(f"at least {exc.at_least}", rt.ctx_size, field) from None


def _too_long(count: str, ctx_size: int, field: str) -> ParamError:
    return ParamError(
        f"the prompt is {count} tokens, more than the context size of {ctx_size} tokens allows "
        "(it must leave room for at least one more)",
        field,
    )


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    encoding: str  # "float" or "base64"
    prompt_tokens: int


async def embed(rt: Runtime, embedder: Embedder, body: dict[str, Any]) -> Embeddings:
    started = time.perf_counter()
    inputs = await asyncio.to_thread(parse_inputs, body, rt.model.info.n_vocab)
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ParamError("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dims = body.get("dimensions")
    if dims is not None and dims != rt.model.info.n_embd:
        raise ParamError(
            f"'dimensions' is not supported: this model's embeddings have {rt.model.info.n_embd}",
            "dimensions",
        )
    vectors: list[list[float]] = []
    used = 0
    for item in inputs:
        tokens = item if isinstance(item, list) else await asyncio.to_thread(_tokens_of, rt, item)
        used += len(tokens)
        try:
            vectors.append(await asyncio.to_thread(embedder.embed, tokens))
        except LlamaError as exc:
            raise ParamError(str(exc), "input") from None
    rt.metrics.embedded(used, time.perf_counter() - started)
    return Embeddings(vectors, encoding, used)


def _tokens_of(rt: Runtime, text: str) -> list[int]:
    try:
        return rt.model.tokenize_at_most(text, rt.ctx_size, True)
    except TooManyTokens as exc:
        raise ParamError(
            f"input is at least {exc.at_least} tokens, more than the context size {rt.ctx_size}",
            "input",
        ) from None
