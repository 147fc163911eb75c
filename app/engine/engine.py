"""Continuous batching over one llama_context.

One thread owns the context. Each step it admits waiting requests into free sequence slots,
then runs a single ``llama_decode`` that advances every generating sequence by one token and
prefills admitted prompts in chunks (so a long prompt never stalls the others for long).
Tokens go back through each request's ``sink``, called on the engine thread after each step
for all of that step's events; the runner hands them to its event loop in one wake-up.

A slot keeps the tokens of its last request in the KV cache: the next request that shares a
prefix with them (a chat's earlier turns) only prefills the rest, as llama-server's
``cache_prompt`` does. A cancelled request stops at the next step and its slot is free at once.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import llama_cpp as L
import numpy as np

from app.engine.llama import Batch, LlamaError, Model, logits_row, logits_rows
from app.engine.sampling import Sampler, SamplingParams
from app.engine.text import Detokenizer, StopMatcher


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    bytes: bytes
    logprob: float
    top: list[tuple[str, bytes, float]]


@dataclass(frozen=True)
class Token:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop", "length" or, in the runner's log only, "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    first_token_at: float  # time.perf_counter() when its first token (or its end) was sampled
    stop_sequence: str | None = None  # the stop string that ended it, if one did


@dataclass(frozen=True)
class Failed:
    message: str


Event = Token | Finished | Failed


@dataclass
class EngineStats:
    """Where the engine thread's time goes: in ``llama_decode``, and in whole steps (admission,
    the batch, decode, sampling, events). The difference is the engine's own overhead."""

    steps: int = 0
    step_s: float = 0.0
    decode_s: float = 0.0


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    sink: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; n: the chosen token's and n best
    cancelled: bool = False


@dataclass(eq=False)
class _Slot:
    seq: int
    cached: list[int] = field(default_factory=list)  # tokens in the KV cache, in order
    request: Request | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet decoded
    sampler: Sampler | None = None
    next_token: int | None = None
    generated: int = 0
    reused: int = 0
    first_token_at: float = 0.0
    detok: Detokenizer = field(default_factory=Detokenizer)
    stops: StopMatcher = field(default_factory=lambda: StopMatcher([]))


class Engine:
    def __init__(
        self, model: Model, ctx_size: int, parallel: int, threads: int, batch_size: int = 512
    ) -> None:
        self.model = model
        self.ctx_size = ctx_size
        self.parallel = parallel
        self.batch_size = batch_size
        self.threads = threads
        params = L.llama_context_default_params()
        params.n_ctx = ctx_size * parallel
        params.n_batch = batch_size
        params.n_ubatch = batch_size
        params.n_seq_max = parallel
        params.n_threads = threads
        params.n_threads_batch = threads
        # A KV stream per sequence, as llama-server has with -np N: in one unified cache every
        # token attends over all sequences' cells (masked), which grows with the square of the
        # concurrency (64 sequences of 130 tokens: 30 ms a step instead of 8 ms on 2 cores).
        # Prefix reuse stays within a slot, so nothing needs cells shared across sequences.
        params.kv_unified = False
        # Sliding-window layers keep the whole context, so a reused prompt prefix attends to
        # exactly what it would have if decoded afresh.
        params.swa_full = True
        # Flash attention wherever this build and device support it (GPUs, mostly).
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_AUTO
        params.no_perf = True
        self.ctx = L.llama_init_from_model(model.ptr, params)
        if not self.ctx:
            raise LlamaError("llama.cpp could not create a context (out of memory?)")
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = Batch(batch_size + parallel)
        self.slots = [_Slot(seq=i) for i in range(parallel)]
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: list[Request] = []
        # A step's events, handed to their sinks once the step is done (and counted).
        self._outbox: list[tuple[Request, Event]] = []
        self.stats = EngineStats()
        self._sampling = (
            ThreadPoolExecutor(threads, thread_name_prefix="sampling") if threads > 1 else None
        )
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    # -- API (any thread) ---------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        self._queue.put(request)

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        self._queue.put(None)  # wake the loop if it is idle

    def occupancy(self) -> tuple[int, int]:
        """Slots running a request, and requests waiting for one. Read from another thread for
        a gauge: it may be a step old, never torn (each figure is one read under the GIL)."""
        return sum(s.request is not None for s in self.slots), len(self._waiting)

    def close(self) -> None:
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            return  # still inside llama_decode: freeing the context now would crash it
        if self._sampling is not None:
            self._sampling.shutdown()
        for slot in self.slots:
            if slot.sampler:
                slot.sampler.close()
        L.llama_free(self.ctx)

    # -- engine thread --------------------------------------------------------------------------
    def _run(self) -> None:
        stats = self.stats
        while not self._stopping:
            try:
                busy = any(s.request for s in self.slots)
                self._take_new(block=not busy and not self._waiting)
                began = time.perf_counter()
                self._drop_cancelled()
                self._admit()
                if any(s.request for s in self.slots):
                    self._step()
                    stats.steps += 1
                    stats.step_s += time.perf_counter() - began
            except Exception as exc:
                # Whatever broke fails the requests in flight, never the engine: the next
                # request starts from a clean cache.
                self._fail_all(f"inference failed: {exc}")
            outbox, self._outbox = self._outbox, []
            for request, event in outbox:
                request.sink(event)

    def _fail_all(self, message: str) -> None:
        for slot in self.slots:
            self._forget_cache(slot)
            if slot.request:
                self._finish(slot, Failed(message))

    def _forget_cache(self, slot: _Slot) -> None:
        L.llama_memory_seq_rm(self.memory, slot.seq, -1, -1)
        slot.cached = []

    def _take_new(self, block: bool) -> None:
        try:
            item = self._queue.get(block=block, timeout=None if block else 0)
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._waiting.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        for request in self._waiting:
            if request.cancelled:  # before it had a slot: its line says so all the same
                _report(request, Finished("cancelled", len(request.prompt), 0, 0, 0.0))
        self._waiting = [r for r in self._waiting if not r.cancelled]
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                _report(slot.request, self._done(slot, "cancelled"))
                self._release(slot)

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s in self.slots if s.request is None]
            if not free:
                return
            request = self._waiting.pop(0)
            # The free slot whose cache shares the longest prefix with this prompt.
            slot = max(free, key=lambda s: _common_prefix(s.cached, request.prompt))
            reuse = max(
                0, min(_common_prefix(slot.cached, request.prompt), len(request.prompt) - 1)
            )
            if not L.llama_memory_seq_rm(self.memory, slot.seq, reuse, -1):
                # Some caches (recurrent models) cannot drop a tail: start the slot afresh.
                self._forget_cache(slot)
                reuse = 0
            slot.cached = slot.cached[:reuse]
            slot.request = request
            slot.pending = request.prompt[reuse:]
            slot.reused = reuse
            slot.generated = 0
            slot.first_token_at = 0.0
            slot.next_token = None
            slot.detok = Detokenizer()
            slot.stops = StopMatcher(request.stop)
            try:
                slot.sampler = Sampler(self.model, request.sampling)
            except LlamaError as exc:
                self._finish(slot, Failed(str(exc)))

    def _step(self) -> None:
        # The step's batch as plain lists, filled into the llama_batch at once: each generating
        # sequence's next token, then prompt chunks. ``sampled`` are the slots that get logits,
        # in batch order, which is the order of llama.cpp's output rows.
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        outputs: list[int] = []
        sampled: list[_Slot] = []
        for slot in self.slots:
            if slot.request is not None and slot.next_token is not None:
                outputs.append(len(tokens))
                sampled.append(slot)
                tokens.append(slot.next_token)
                positions.append(len(slot.cached))
                seqs.append(slot.seq)
                slot.cached.append(slot.next_token)
                slot.next_token = None
        budget = self.batch_size - len(tokens)
        for slot in self.slots:
            if slot.request is None or not slot.pending or budget <= 0:
                continue
            chunk, slot.pending = slot.pending[:budget], slot.pending[budget:]
            start = len(slot.cached)
            tokens.extend(chunk)
            positions.extend(range(start, start + len(chunk)))
            seqs.extend([slot.seq] * len(chunk))
            slot.cached.extend(chunk)
            budget -= len(chunk)
            if not slot.pending:  # the prompt's last token: its logits give the first token
                outputs.append(len(tokens) - 1)
                sampled.append(slot)
        if not tokens:
            return
        self.batch.fill(tokens, positions, seqs, outputs)
        began = time.perf_counter()
        rc = L.llama_decode(self.ctx, self.batch.ptr)
        self.stats.decode_s += time.perf_counter() - began
        if rc != 0:
            raise LlamaError(f"llama_decode returned {rc}")
        for slot, index, token in zip(
            sampled, outputs, self._choose(sampled, outputs), strict=True
        ):
            try:
                self._advance(slot, index, token)
            except Exception as exc:  # fails this request only
                self._forget_cache(slot)
                self._finish(slot, Failed(f"inference failed: {exc}"))

    def _choose(self, sampled: list[_Slot], outputs: list[int]) -> list[int]:
        """Each slot's next token: greedy ones by argmax, the others through their chains.

        A chain copies the whole vocabulary into candidates and filters them, ~250 µs a
        sequence with a 262k vocabulary: at 64 sequences, 16 ms a step on one thread. The
        chains run on the engine's threads instead (idle between decodes; the calls release the
        GIL), each chain on one thread at a time."""
        tokens = self._greedy_tokens(sampled)
        chains = [
            (i, s.sampler, outputs[i])
            for i, (s, t) in enumerate(zip(sampled, tokens, strict=True))
            if t is None and s.sampler is not None
        ]

        def run(part: list[tuple[int, Sampler, int]]) -> list[tuple[int, int]]:
            return [(i, sampler.sample(self.ctx, index)) for i, sampler, index in part]

        if len(chains) > 1 and self._sampling is not None:
            # llama.cpp puts its output rows in batch order on the first read of the logits:
            # done here, on this thread, the pool's reads only read.
            L.llama_get_logits(self.ctx)
            n = self.threads
            parts = self._sampling.map(run, [chains[k::n] for k in range(n)])
            picked = dict(pair for part in parts for pair in part)
        else:
            picked = dict(run(chains))
        return [picked[i] if t is None else t for i, t in enumerate(tokens)]

    def _greedy_tokens(self, sampled: list[_Slot]) -> list[int | None]:
        """The argmax of each plain-greedy slot's logits row (None for the others), in one
        numpy call when every slot is greedy, as in a benchmark or a batch of extractions."""
        greedy = [s.sampler is not None and s.sampler.plain_greedy for s in sampled]
        if not any(greedy):
            return [None] * len(sampled)
        rows = logits_rows(self.ctx, len(sampled), self.model.info.n_vocab)
        if all(greedy):
            return rows.argmax(axis=1).tolist()
        return [int(rows[i].argmax()) if g else None for i, g in enumerate(greedy)]

    def _advance(self, slot: _Slot, index: int, token: int) -> None:
        """The slot's next ``token``, chosen from the logits at batch ``index``."""
        request = slot.request
        assert request is not None
        if not slot.first_token_at:
            slot.first_token_at = time.perf_counter()
        if self.model.is_eog(token):
            self._emit_rest(slot)
            self._finish(slot, self._done(slot, "stop"))
            return
        slot.generated += 1
        piece = self.model.piece(token)
        text, stopped = slot.stops.feed(slot.detok.feed(piece))
        logprobs = ()
        if request.top_logprobs is not None:
            logprobs = (self._logprob(index, token, piece, request.top_logprobs),)
        if text or logprobs:
            self._outbox.append((request, Token(text, logprobs)))
        if stopped:
            self._finish(slot, self._done(slot, "stop"))
            return
        if slot.generated >= request.max_tokens or len(slot.cached) + 1 >= self.ctx_size:
            self._emit_rest(slot)
            self._finish(slot, self._done(slot, "length"))
            return
        slot.next_token = token

    def _logprob(self, index: int, token: int, piece: bytes, n_top: int) -> TokenLogprob:
        """Log-probabilities from the model's raw distribution (before sampling shapes it)."""
        row = logits_row(self.ctx, index, self.model.info.n_vocab).astype(np.float64)
        top = row.max()
        logz = top + np.log(np.exp(row - top).sum())
        best = np.argpartition(-row, n_top)[:n_top] if n_top else np.array([], dtype=int)
        best = best[np.argsort(-row[best])]
        alternatives = []
        for t in best.tolist():
            raw = self.model.piece(t)
            alternatives.append((raw.decode("utf-8", "replace"), raw, float(row[t] - logz)))
        return TokenLogprob(
            piece.decode("utf-8", "replace"), piece, float(row[token] - logz), alternatives
        )

    def _emit_rest(self, slot: _Slot) -> None:
        assert slot.request is not None
        rest, _ = slot.stops.feed(slot.detok.flush())
        rest += slot.stops.flush()
        if rest:
            self._outbox.append((slot.request, Token(rest)))

    def _done(self, slot: _Slot, reason: str) -> Finished:
        assert slot.request is not None
        return Finished(
            reason=reason,
            prompt_tokens=len(slot.request.prompt),
            completion_tokens=slot.generated,
            cached_tokens=slot.reused,
            first_token_at=slot.first_token_at,
            stop_sequence=slot.stops.matched,
        )

    def _finish(self, slot: _Slot, event: Event) -> None:
        assert slot.request is not None
        self._outbox.append((slot.request, event))
        _report(slot.request, event)
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        """Free the slot now. Its prompt stays cached for reuse; any undecoded tail goes."""
        slot.pending = []
        slot.next_token = None
        if slot.sampler is not None:
            slot.sampler.close()
            slot.sampler = None
        slot.request = None


def _report(request: Request, event: Event) -> None:
    """One stderr line per request; the front logs its runners' stderr."""
    if isinstance(event, Finished):
        text = (
            f"request done: reason={event.reason} prompt_tokens={event.prompt_tokens} "
            f"cached_tokens={event.cached_tokens} completion_tokens={event.completion_tokens}"
        )
    else:
        text = f"request failed: {event}"
    print(text, file=sys.stderr, flush=True)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
