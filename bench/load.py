"""Mixed load on a freshly started service: N clients for T seconds of chat completions
(streamed and not), completions (streamed and not) and embeddings, every response checked.

    .venv/bin/python bench/load.py [--clients 16] [--seconds 20] [--parallel 4]
                                   [--mix round-robin|random] [--seed 0] [--max-tokens 24]
                                   [--model NAME]

Without ``--model`` it serves the tiny random model of the tests (written in a second); with it,
a model already in the store (``MODELS_PATH``, else ~/.docker/models), e.g. ``ai/gemma3``. The
same model serves the embeddings (the service starts an embedding runner for it).

Prints requests done, errors by status and by kind, p50/p99 latency per kind, generated tokens/s,
and the RSS of the service and its runners before and after. Every response is checked: OpenAI's
JSON shape, SSE framing (``data:`` lines only, ``data: [DONE]`` last), usage against what was
generated, embeddings' count and dimension. Exits 1 on any malformed response, connection error
or 5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from common import cli, service_env, start_service, stop

from app.client import ServiceClient
from app.settings import Settings
from tests.netutil import free_port
from tests.tiny_gguf import write_tiny_gguf

KINDS = ("chat", "chat-stream", "completion", "completion-stream", "embeddings")
TINY_DIM = 64  # write_tiny_gguf's default hidden size


class Malformed(Exception):
    """A 200 whose body breaks OpenAI's shape, the SSE framing or its own usage counts."""


def expect(ok: bool, what: str) -> None:
    if not ok:
        raise Malformed(what)


@dataclass(frozen=True)
class Request:
    kind: str
    path: str
    body: dict[str, Any]

    @property
    def stream(self) -> bool:
        return self.kind.endswith("-stream")

    @property
    def chat(self) -> bool:
        return self.kind.startswith("chat")


@dataclass
class Outcome:
    kind: str
    latency: float
    status: int | None = None  # None: the connection failed before a status came
    problem: str | None = None  # why a 200 was malformed, or a non-200's body
    tokens: int = 0  # completion tokens generated


def make_request(kind: str, i: int, model: str, max_tokens: int) -> Request:
    """Request ``i`` of ``kind``: prompts differ, and so do max_tokens and whether logprobs are
    asked, so runs mix lengths, and half the generations can be counted token by token."""
    if kind == "embeddings":
        inputs = [f"load test {i} input {j}" for j in range(1 + i % 3)]
        return Request(kind, "/v1/embeddings", {"model": model, "input": inputs})
    body: dict[str, Any] = {"model": model, "max_tokens": 1 + i % max_tokens, "seed": i}
    text = f"Question {i}: what is {i} plus {i}?"
    chat = kind.startswith("chat")
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text + " Answer:"
    if i % 2:
        # One logprobs entry per generated token: the exact count usage must match.
        body.update({"logprobs": True, "top_logprobs": 0} if chat else {"logprobs": 0})
    if kind.endswith("-stream"):
        body.update(stream=True, stream_options={"include_usage": True})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return Request(kind, path, body)


# -- checks: each returns the completion tokens, or raises Malformed -------------------------
def check_usage(usage: Any, finish: Any, req: Request, counted: int | None, pieces: int) -> int:
    """``counted``: tokens counted from logprobs (exact); ``pieces``: text pieces seen, a lower
    bound (a piece may hold several tokens' text, and a token may add no text)."""
    expect(isinstance(usage, dict), "no usage object")
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    expect(isinstance(prompt, int) and prompt > 0, f"usage.prompt_tokens {prompt!r}")
    expect(isinstance(completion, int), f"usage.completion_tokens {completion!r}")
    expect(usage.get("total_tokens") == prompt + completion, "usage.total_tokens is not the sum")
    limit = req.body["max_tokens"]
    expect(finish in ("stop", "length"), f"finish_reason {finish!r}")
    if finish == "length":
        expect(completion == limit, f"finish 'length' after {completion} of {limit} tokens")
    else:
        expect(completion < limit, f"finish 'stop' at {completion} of max_tokens {limit}")
    expect(pieces <= completion, f"{pieces} text pieces but completion_tokens {completion}")
    if counted is not None:
        expect(counted == completion, f"{counted} logprobs but completion_tokens {completion}")
    return completion


def logprob_count(choice: dict[str, Any], chat: bool) -> int | None:
    lp = choice.get("logprobs")
    if lp is None:
        return None
    entries = lp.get("content") if chat else lp.get("tokens")
    expect(isinstance(entries, list), "logprobs without its list")
    return len(entries)


def check_whole(req: Request, body: Any) -> int:
    expect(body.get("object") == ("chat.completion" if req.chat else "text_completion"), "object")
    choices = body.get("choices")
    expect(isinstance(choices, list) and len(choices) == 1, "choices is not one choice")
    choice = choices[0]
    if req.chat:
        message = choice.get("message") or {}
        expect(message.get("role") == "assistant", "message.role is not assistant")
        text = message.get("content")
    else:
        text = choice.get("text")
    expect(isinstance(text, str), "no text")
    counted = logprob_count(choice, req.chat)
    expect(("logprobs" in req.body) == (counted is not None), "logprobs not as asked")
    return check_usage(body.get("usage"), choice.get("finish_reason"), req, counted, 0)


def sse_payloads(raw: str) -> list[Any]:
    """The JSON payloads of an SSE body, after checking its framing."""
    expect(raw.endswith("\n\n"), "stream does not end with a blank line")
    events = raw[:-2].split("\n\n")
    expect(events[-1] == "data: [DONE]", "stream does not end with data: [DONE]")
    payloads = []
    for event in events[:-1]:
        expect(event.startswith("data: {") and "\n" not in event, f"SSE event {event[:40]!r}")
        payloads.append(json.loads(event[6:]))
    return payloads


def check_stream(req: Request, raw: str) -> int:
    chunks = sse_payloads(raw)
    expect(len(chunks) >= 2, "stream with fewer than two chunks")
    *body, usage_chunk = chunks
    expect(all("error" not in c for c in chunks), "stream carries an error")
    expect(len({c.get("id") for c in chunks}) == 1, "chunks with different ids")
    kind = "chat.completion.chunk" if req.chat else "text_completion"
    expect(all(c.get("object") == kind for c in chunks), f"a chunk's object is not {kind}")
    expect(usage_chunk.get("choices") == [], "last chunk (usage) has choices")
    expect(all(c.get("usage") is None for c in body), "usage before the last chunk")
    choices = [c["choices"][0] for c in body if len(c.get("choices") or []) == 1]
    expect(len(choices) == len(body), "a chunk without exactly one choice")
    finishes = [c.get("finish_reason") for c in choices]
    expect(all(f is None for f in finishes[:-1]), "finish_reason before the last chunk")
    if req.chat:
        expect(choices[0]["delta"].get("role") == "assistant", "first delta has no role")
        texts = [c["delta"].get("content") or "" for c in choices]
    else:
        texts = [c.get("text") for c in choices]
    expect(all(isinstance(t, str) for t in texts), "a chunk without text")
    counts = [logprob_count(c, req.chat) for c in choices]
    counted = sum(n or 0 for n in counts) if "logprobs" in req.body else None
    pieces = sum(1 for t in texts if t)
    return check_usage(usage_chunk.get("usage"), finishes[-1], req, counted, pieces)


def check_embeddings(req: Request, body: Any, dims: set[int]) -> int:
    data = body.get("data")
    expect(body.get("object") == "list" and isinstance(data, list), "not a list of embeddings")
    wanted = len(req.body["input"])
    expect(len(data) == wanted, f"{len(data)} embeddings for {wanted} inputs")
    for index, item in enumerate(data):
        vec = item.get("embedding")
        expect(item.get("index") == index, "embedding index out of order")
        expect(isinstance(vec, list) and all(isinstance(x, float) for x in vec), "not floats")
        dims.add(len(vec))
        # The service L2-normalizes; a vector far from unit length is corrupt.
        expect(abs(math.fsum(x * x for x in vec) - 1.0) < 1e-3, "embedding not unit length")
    expect(len(dims) == 1, f"embeddings of different dimensions: {sorted(dims)}")
    usage = body.get("usage") or {}
    prompt = usage.get("prompt_tokens")
    expect(isinstance(prompt, int) and prompt > 0, f"usage.prompt_tokens {prompt!r}")
    expect(usage.get("total_tokens") == prompt, "usage.total_tokens is not prompt_tokens")
    return 0


# -- load --------------------------------------------------------------------------------------
class Load:
    def __init__(self, base: str, model: str, max_tokens: int, dims: set[int]) -> None:
        self.base = base
        self.model = model
        self.max_tokens = max_tokens
        self.dims = dims  # dimensions seen; one expected

    async def send(self, session: aiohttp.ClientSession, kind: str, i: int) -> Outcome:
        req = make_request(kind, i, self.model, self.max_tokens)
        began = time.perf_counter()
        out = Outcome(kind, 0.0)
        try:
            async with session.post(self.base + req.path, json=req.body) as resp:
                out.status = resp.status
                raw = await resp.text()
                out.latency = time.perf_counter() - began
                if resp.status != 200:
                    out.problem = raw[:200]
                    return out
                out.tokens = self.check(req, resp.content_type, raw)
        except Malformed as exc:
            out.problem = f"{kind}: {exc}"
        except (ValueError, AttributeError, KeyError, TypeError, IndexError) as exc:
            out.problem = f"{kind}: unparsable ({type(exc).__name__}: {exc})"
        except (aiohttp.ClientError, TimeoutError) as exc:
            out.status, out.problem = None, f"{type(exc).__name__}: {exc}"
            out.latency = time.perf_counter() - began
        return out

    def check(self, req: Request, content_type: str, raw: str) -> int:
        want = "text/event-stream" if req.stream else "application/json"
        expect(content_type == want, f"Content-Type {content_type} (wanted {want})")
        if req.stream:
            return check_stream(req, raw)
        body = json.loads(raw)
        expect(isinstance(body, dict), "body is not a JSON object")
        if req.kind == "embeddings":
            return check_embeddings(req, body, self.dims)
        return check_whole(req, body)


def schedule(mix: str, seed: int) -> Iterator[tuple[str, int]]:
    """(kind, request number) for each request, shared by every client."""
    rng = random.Random(seed)
    for i in itertools.count():
        yield (KINDS[i % len(KINDS)] if mix == "round-robin" else rng.choice(KINDS)), i


async def run_load(
    load: Load, args: Any, snapshot: Callable[[], dict[str, float | None]]
) -> tuple[dict[str, float | None], list[Outcome], float]:
    """Warm up, take ``snapshot`` (the RSS before), then run the clients: what they got and the
    wall time from the first request to the last answer."""
    # One connection per client: the connector bounds what is in flight, and keep-alive
    # spares a TCP handshake a request, so the client side stays cheap on two cores.
    connector = aiohttp.TCPConnector(limit=args.clients)
    timeout = aiohttp.ClientTimeout(total=300)
    outcomes: list[Outcome] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        for kind in KINDS:  # start both runners and warm them before the clock starts
            warm = await load.send(session, kind, 0)
            if warm.status != 200 or warm.problem:
                raise SystemExit(f"warm-up {kind} failed: {warm.status} {warm.problem}")
        before = snapshot()
        jobs = schedule(args.mix, args.seed)
        deadline = time.monotonic() + args.seconds

        async def client() -> None:
            while time.monotonic() < deadline:
                outcomes.append(await load.send(session, *next(jobs)))

        began = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(args.clients)))
        return before, outcomes, time.perf_counter() - began


# -- memory ------------------------------------------------------------------------------------
def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def memory(client: ServiceClient, service_pid: int) -> dict[str, float | None]:
    """RSS by process: the service, and each runner that /engines/ps names with a pid."""
    rows = json.loads(client.request("GET", "/engines/ps").body)
    procs = {f"service (pid {service_pid})": service_pid}
    for row in rows:
        if row.get("pid"):
            procs[f"runner {row['model_name']} {row['mode']} (pid {row['pid']})"] = row["pid"]
    return {label: rss_mib(pid) for label, pid in procs.items()}


# -- report ------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def report(outcomes: list[Outcome], wall: float, mem: tuple[dict, dict], args: Any) -> bool:
    """Prints the tables; True when nothing was malformed, dropped or a 5xx."""
    ok = [o for o in outcomes if o.status == 200 and o.problem is None]
    malformed = [o for o in outcomes if o.status == 200 and o.problem is not None]
    dropped = [o for o in outcomes if o.status is None]
    statuses = Counter(o.status for o in outcomes if o.status not in (None, 200))
    print(
        f"\n{args.clients} clients, {args.seconds:g} s, {args.mix} mix, "
        f"MODEL_RUNNER_PARALLEL={args.parallel}, model {args.model or 'tiny (random)'}"
    )
    print(f"requests done {len(outcomes)}, ok {len(ok)}, in {wall:.1f} s")
    tokens = sum(o.tokens for o in ok)
    print(f"generated tokens {tokens}, {tokens / wall:.1f} tokens/s, {len(ok) / wall:.1f} req/s")
    errors = {"connection error": len(dropped), "malformed": len(malformed)}
    errors.update({f"HTTP {s}": n for s, n in sorted(statuses.items())})
    print("errors: " + ", ".join(f"{k} {v}" for k, v in errors.items()))
    by_kind: dict[str, list[float]] = defaultdict(list)
    for o in ok:
        by_kind[o.kind].append(o.latency * 1000)
    print(f"\n{'kind':<20}{'ok':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for kind in KINDS:
        lat = by_kind.get(kind, [])
        cells = [percentile(lat, 0.5), percentile(lat, 0.99), max(lat)] if lat else []
        print(f"{kind:<20}{len(lat):>6}" + "".join(f"{c:>10.0f}" for c in cells))
    before, after = mem
    print(f"\n{'RSS MiB':<56}{'before':>9}{'after':>9}")
    for label in dict.fromkeys([*before, *after]):
        cells = [m.get(label) for m in (before, after)]
        print(f"{label:<56}" + "".join(f"{'-' if c is None else f'{c:.1f}':>9}" for c in cells))
    problems = Counter(o.problem for o in [*malformed, *dropped])
    problems.update(f"HTTP {o.status}: {o.problem}" for o in outcomes if (o.status or 0) >= 500)
    for problem, n in problems.most_common(10):
        print(f"  {n} x {problem}")
    fine = not (malformed or dropped or any(s >= 500 for s in statuses))
    print(f"\nresponses checked: {'all well-formed' if fine else 'FAILURES (see above)'}")
    return fine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--parallel", type=int, default=4, help="MODEL_RUNNER_PARALLEL")
    ap.add_argument("--mix", choices=("round-robin", "random"), default="round-robin")
    ap.add_argument("--seed", type=int, default=0, help="for --mix random")
    ap.add_argument("--max-tokens", type=int, default=24, help="requests ask 1 to this many")
    ap.add_argument("--model", help="a stored model instead of the tiny random one")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Settings.from_env().models_path if args.model else Path(tmp) / "models"
        env = service_env(models, free_port(), MODEL_RUNNER_PARALLEL=str(args.parallel))
        proc, client = start_service(env)
        try:
            if not args.model:
                gguf = write_tiny_gguf(Path(tmp) / "tiny.gguf")
                cli(env, "package", "--gguf", str(gguf), "--load", "tiny")
            dims = set() if args.model else {TINY_DIM}
            load = Load(env["MODEL_RUNNER_HOST"], args.model or "tiny", args.max_tokens, dims)
            snapshot = functools.partial(memory, client, proc.pid)
            before, outcomes, wall = asyncio.run(run_load(load, args, snapshot))
            fine = report(outcomes, wall, (before, snapshot()), args)
        finally:
            stop(proc)
    sys.exit(0 if fine else 1)


if __name__ == "__main__":
    main()
