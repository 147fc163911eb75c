"""The measuring half of bench/gpu_check.sh, which builds llama.cpp, writes the models and runs
this with PYTHONPATH and LLAMA_CPP_LIB_PATH pointing at that build.

For each model: start llama-server on it, send every inference route once to the service and
check each answer, warm both up, then measure aggregate tokens/s at each concurrency, streamed
and not, ours and llama-server interleaved (same prompts, temperature 0, fixed max_tokens), and
the time to the first streamed token; then each device's memory (nvidia-smi) and the runners'
own estimate (/engines/ps). Writes summary.txt and results.json; exit status 1 when any request
failed, with the reasons in the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, service_env, stop

from tests.netutil import free_port

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "sure": {"type": "boolean"},
    },
    "required": ["answer", "sure"],
    "additionalProperties": False,
}
CRASH_LINES = re.compile(r"killed by|exited with code|runner died|failed mid-request|Fatal Python")


def prompt(i: int) -> str:
    return f"Question {i}: what is {i} plus {i}? Answer:"


class Bad(Exception):
    """A reply that is not what the route should answer."""


@dataclass
class Check:
    args: argparse.Namespace
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.args.deadline - time.time()

    def timeout(self, most: float = 300.0) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=max(5.0, min(most, self.left())))


# -- processes ---------------------------------------------------------------------------------
def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        out.write(f"==== {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


async def wait_http(
    url: str, proc: subprocess.Popen[bytes], seconds: float, ready: str = ""
) -> str:
    """Poll GET url until 200 (and, if given, ``ready`` not in the body); the body."""
    end = time.monotonic() + seconds
    last = "no answer"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while time.monotonic() < end and proc.poll() is None:
            try:
                async with s.get(url) as r:
                    last = f"{r.status} {(await r.text())[:200]}"
                    if r.status == 200 and not (ready and ready in last):
                        return last[4:]
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.25)
    why = (
        f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {seconds}s"
    )
    raise Bad(f"{proc.args[0]} {why}: {last}")


# -- requests --------------------------------------------------------------------------------
async def fetch(url: str, check: Check, body: dict[str, Any] | None = None, raw: bool = False):
    """The JSON (or, raw, the text) of a 200 answer to GET url, or to POST body to url."""
    method = "GET" if body is None else "POST"
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, url, json=body, timeout=check.timeout()) as r,
        ):
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Bad(repr(exc)) from None
    if r.status != 200:
        raise Bad(f"{r.status} {text.strip()[:600]}")
    if raw:
        return text
    try:
        return json.loads(text)
    except ValueError:
        raise Bad(f"not JSON: {text[:200]!r}") from None


def sse(lines: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """The events of a finished SSE stream, with the index of their line; it must end with
    ``data: [DONE]``."""
    data = [(i, line[5:].strip()) for i, line in enumerate(lines) if line.startswith("data:")]
    if not data or data[-1][1] != "[DONE]":
        raise Bad(f"the stream does not end with 'data: [DONE]': {lines[-3:]!r}")
    try:
        return [(i, json.loads(d)) for i, d in data[:-1]]
    except ValueError:
        raise Bad(f"an event is not JSON: {data[:3]!r}") from None


def usage_tokens(doc: dict[str, Any]) -> int:
    tokens = (doc.get("usage") or {}).get("completion_tokens")
    if not isinstance(tokens, int):
        raise Bad(f"no usage.completion_tokens: {json.dumps(doc)[:300]}")
    return tokens


def text_of(doc: dict[str, Any]) -> str:
    """The text of the first choice: a completion's, a chat message's or a stream delta's."""
    choice = (doc.get("choices") or [{}])[0]
    text = choice.get("text") or (choice.get("message") or choice.get("delta") or {}).get("content")
    return text if isinstance(text, str) else ""


def said(doc: dict[str, Any]) -> str:
    text = text_of(doc)
    if not text:
        raise Bad(f"no text in the first choice: {json.dumps(doc)[:300]}")
    return f"{usage_tokens(doc)} tokens: {text[:40]!r}"


# -- the routes, once each -----------------------------------------------------------------------
async def chat(base: str, model: str, check: Check) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello, who are you?"}]}
    url = f"{base}/engines/llama.cpp/v1/chat/completions"
    return said(await fetch(url, check, {**body, "max_tokens": 16, "temperature": 0}))


async def completion(base: str, model: str, check: Check) -> str:
    body = {"model": model, "prompt": prompt(1), "max_tokens": 16, "temperature": 0}
    return said(await fetch(f"{base}/v1/completions", check, body))


async def embeddings(base: str, model: str, check: Check) -> str:
    body = {"model": model, "input": ["hello world", "the model"]}
    doc = await fetch(f"{base}/engines/v1/embeddings", check, body)
    vectors = [item.get("embedding") for item in doc.get("data") or []]
    sizes = {len(v) if isinstance(v, list) else 0 for v in vectors}
    if len(vectors) != 2 or len(sizes) != 1 or 0 in sizes:
        raise Bad(f"not two vectors of one size: {json.dumps(doc)[:300]}")
    if not all(isinstance(x, float) and math.isfinite(x) for v in vectors for x in v):
        raise Bad("a vector holds something other than finite numbers")
    return f"2 vectors of {sizes.pop()}"


async def json_schema(base: str, model: str, check: Check) -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Is 2 plus 2 four? Answer in JSON."}],
        "max_tokens": 64,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
    }
    text = text_of(await fetch(f"{base}/engines/v1/chat/completions", check, body))
    try:
        reply = json.loads(text)
    except ValueError:
        raise Bad(f"not JSON: {text[:200]!r}") from None
    if (
        not isinstance(reply, dict)
        or set(reply) != {"answer", "sure"}
        or reply["answer"] not in ("yes", "no")
        or not isinstance(reply["sure"], bool)
    ):
        raise Bad(f"does not match the schema: {text[:200]!r}")
    return text


async def chat_stream(base: str, model: str, check: Check) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    text = await fetch(f"{base}/v1/chat/completions", check, {**body, "max_tokens": 16}, raw=True)
    events = [e for _, e in sse(text.splitlines())]
    content = "".join(text_of(e) for e in events)
    if not content:
        raise Bad("no content in the stream")
    return f"{len(events)} events: {content[:40]!r}"


async def status(base: str, _model: str, check: Check) -> str:
    doc = await fetch(f"{base}/engines/status", check)
    said = str(doc.get("llama.cpp", "")) if isinstance(doc, dict) else ""
    if not said.startswith("Running"):
        raise Bad(f"not running: {doc}")
    if check.args.mode == "cuda" and "on GPU" not in said:
        raise Bad(f"the service's llama.cpp found no GPU: {said}")
    return said


async def ps(base: str, model: str, check: Check) -> str:
    rows = await runners(base, model, check)
    modes = sorted(row.get("mode") for row in rows)
    if modes != ["completion", "embedding"]:
        raise Bad(f"runners of {model}: {modes}, not one completion and one embedding runner")
    return ", ".join(f"{row['mode']} pid {row.get('pid')}" for row in rows)


async def runners(base: str, model: str, check: Check) -> list[dict[str, Any]]:
    rows = await fetch(f"{base}/engines/ps", check)
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "pid" in r for r in rows):
        raise Bad(f"/engines/ps: not a list of runners: {rows!r:.300}")
    # ps names a model by its one name, the id /v1/models lists (docker.io/bench/tiny:f16).
    listed = await fetch(f"{base}/engines/v1/models/{model}", check)
    name = listed.get("id") if isinstance(listed, dict) else None
    return [row for row in rows if row.get("model_name") == (name or model)]


ROUTES = [chat, completion, embeddings, json_schema, chat_stream, status, ps]


# -- throughput ------------------------------------------------------------------------------------
@dataclass
class Peer:
    name: str
    url: str
    model: str | None  # llama-server serves its one model whatever the request names

    def body(self, i: int, max_tokens: int, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return {**body, "model": self.model} if self.model else body


async def one(s: aiohttp.ClientSession, peer: Peer, body: dict[str, Any], check: Check) -> dict:
    """One completion: its tokens, latency and (streamed) time to the first text."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {}
    try:
        async with s.post(f"{peer.url}/v1/completions", json=body, timeout=check.timeout()) as r:
            if r.status != 200:
                raise Bad(f"{r.status} {(await r.text()).strip()[:600]}")
            if not body.get("stream"):
                out["tokens"] = usage_tokens(await r.json(content_type=None))
            else:
                timed = [(time.perf_counter(), raw.decode().strip()) async for raw in r.content]
                events = sse([line for _, line in timed])
                first = next((timed[i][0] for i, e in events if text_of(e)), None)
                if first is None:
                    raise Bad("no text in the stream")
                out["ttft"] = first - t0
                counts = [usage_tokens(e) for _, e in events if e.get("usage")]
                out["tokens"] = counts[-1] if counts else len(events)
    except (Bad, aiohttp.ClientError, TimeoutError, ValueError) as exc:
        out["error"] = str(exc) if isinstance(exc, Bad) else repr(exc)
    out["latency"] = time.perf_counter() - t0
    return out


async def wave(
    peer: Peer, check: Check, *, conc: int, n: int, max_tokens: int, stream: bool, first: int
) -> dict:
    """n requests (prompts first, first + 1, ...), conc at a time: completion tokens over wall
    time. Each wave has prompts of its own, so none finds its prompt cached by an earlier one."""
    gate = asyncio.Semaphore(conc)
    # A fresh connection a request: a kept-alive one that the server closes just as the next
    # request goes out fails it, a race of the client's, not the server's failure.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s:

        async def request(i: int) -> dict:
            async with gate:
                return await one(s, peer, peer.body(i, max_tokens, stream), check)

        t0 = time.perf_counter()
        done = await asyncio.gather(*(request(first + i) for i in range(n)))
        wall = time.perf_counter() - t0
    good = [r for r in done if "error" not in r]
    tokens = sum(r["tokens"] for r in good)
    ttfts = [r["ttft"] for r in good if "ttft" in r]
    return {
        "server": peer.name, "concurrency": conc, "stream": stream, "requests": n,
        "ok": len(good), "completion_tokens": tokens, "wall_s": round(wall, 3),
        "tok_per_s": round(tokens / wall, 1), "max_tokens": max_tokens,
        "short": sum(r["tokens"] < max_tokens for r in good),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1) if ttfts else None,
        "errors": [r["error"] for r in done if "error" in r][:3],
    }  # fmt: skip


def failed(check: Check, where: str, run: dict) -> None:
    if run["ok"] < run["requests"]:
        check.failures.append(
            f"{where}: {run['requests'] - run['ok']} of {run['requests']} requests failed: "
            f"{run['errors'][0]}"
        )


async def measure(peers: list[Peer], model: str, check: Check) -> list[dict]:
    a = check.args
    conc = [int(c) for c in a.conc.split(",")]
    for peer in peers:  # first requests and a full batch of short ones: loads, caches, kernels
        for c, tokens in ((1, 8), (max(conc), 16)):
            run = await wave(
                peer, check, conc=c, n=c, max_tokens=tokens, stream=False, first=100_000 + c
            )
            failed(check, f"{model} {peer.name} warm-up", run)
    runs = []
    plan = [(c, stream) for stream in (False, True) for c in conc]
    for k, (c, stream) in enumerate(plan):
        for peer in peers if k % 2 == 0 else peers[::-1]:  # interleaved: neither always first
            where = f"{model} {peer.name} C={c}{' streamed' if stream else ''}"
            if check.left() < a.reserve:
                check.skipped.append(f"{where}: {check.left():.0f}s left")
                continue
            try:
                first = 1000 * (2 * c + stream)
                run = await asyncio.wait_for(
                    wave(peer, check, conc=c, n=max(c, 4), max_tokens=a.max_tokens,
                         stream=stream, first=first),
                    check.left() - 5,
                )  # fmt: skip
            except TimeoutError:
                check.skipped.append(f"{where}: cut at the deadline")
                continue
            failed(check, where, run)
            runs.append(run)
            ttft = f", TTFT p50 {run['ttft_p50_ms']} ms" if stream else ""
            print(f"  {where}: {run['tok_per_s']} tok/s, {run['ok']}/{run['requests']} ok{ttft}")
    return runs


# -- memory --------------------------------------------------------------------------------------
def gpu_memory(labels: dict[int, str]) -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return ["no nvidia-smi: no GPU memory to show"]
    query = ["nvidia-smi", "--format=csv,noheader,nounits"]
    devices = subprocess.run(
        [*query, "--query-gpu=index,name,memory.used,memory.total"], capture_output=True, text=True
    ).stdout
    apps = subprocess.run(
        [*query, "--query-compute-apps=pid,used_memory"], capture_output=True, text=True
    ).stdout
    lines = []
    for row in devices.strip().splitlines():
        index, name, used, total = (x.strip() for x in row.split(","))
        lines.append(f"GPU {index} {name}: {used} of {total} MiB used")
    for row in apps.strip().splitlines():
        pid, used = (x.strip() for x in row.split(","))
        label = labels.get(int(pid) if pid.isdigit() else -1, "another process")
        lines.append(f"  pid {pid} ({label}): {used} MiB")
    return lines


# -- one model -----------------------------------------------------------------------------------
async def one_model(name: str, gguf: Path, base: str, check: Check) -> dict[str, Any]:
    a = check.args
    model = f"bench/{name}:f16"
    shape = gguf.with_suffix(".txt")
    doc: dict[str, Any] = {"model": model, "gguf": str(gguf), "checks": {}}
    doc["shape"] = shape.read_text().strip() if shape.exists() else str(gguf)
    port = free_port()
    server = start(
        [a.llama_server, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "-ngl", "999" if a.mode == "cuda" else "0", "-np", str(a.parallel),
         "-c", str(a.parallel * a.ctx), "-t", str(a.threads),
         "--no-repack", "--no-webui"],  # no repacked CPU weights: our runners use none either
        a.out / "llama-server.log",
    )  # fmt: skip
    try:
        for route in ROUTES:  # llama-server loads meanwhile
            t0 = time.perf_counter()
            try:
                result = {"ok": True, "said": await route(base, model, check)}
            except (Bad, LookupError, TypeError, AttributeError) as exc:
                result = {"ok": False, "said": str(exc) if isinstance(exc, Bad) else repr(exc)}
                check.failures.append(f"{name} ours {route.__name__}: {result['said']}")
            doc["checks"][route.__name__] = {
                **result,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        peers = []
        if doc["checks"]["completion"]["ok"] and doc["checks"]["status"]["ok"]:
            peers.append(Peer("ours", base, model))
        else:  # a runner that cannot load, or one on the CPU where a GPU was asked for
            check.skipped.append(f"{name} ours: not measured, its completion or status failed")
        try:
            await wait_http(f"http://127.0.0.1:{port}/health", server, min(180, check.left()))
            peers.append(Peer("llama-server", f"http://127.0.0.1:{port}", None))
        except Bad as exc:
            check.failures.append(f"{name} llama-server: {exc}")
        before = {(r["mode"], r["pid"]) for r in await runners(base, model, check)}
        doc["runs"] = await measure(peers, name, check)
        doc["runners"] = await runners(base, model, check)
        if {(r["mode"], r["pid"]) for r in doc["runners"]} != before:
            check.failures.append(f"{name}: a runner was started again during the run (crashed?)")
        labels = {r["pid"]: f"ours, {r['mode']} runner" for r in doc["runners"]}
        doc["gpu_memory"] = gpu_memory({**labels, server.pid: "llama-server"})
    except Bad as exc:
        check.failures.append(f"{name}: {exc}")
    finally:
        stop(server)
    with contextlib.suppress(Bad):  # room for the next model
        await fetch(f"{base}/engines/unload", check, {"all": True})
    return doc


def package(name: str, gguf: Path, env: dict[str, str], ctx: int) -> None:
    cmd = [sys.executable, "-m", "app", "package", "--gguf", str(gguf), "--context-size", str(ctx)]
    done = subprocess.run([*cmd, "--store", f"bench/{name}:f16"], cwd=REPO, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode:
        raise Bad(f"packaging {gguf} failed: {done.stderr.strip()[-600:]}")


async def run(check: Check) -> None:
    a = check.args
    store = a.work / "store"
    shutil.rmtree(store, ignore_errors=True)
    port = free_port()
    env = service_env(
        store, port, LOG_LEVEL="info", MODEL_RUNNER_PARALLEL=str(a.parallel),
        MODEL_RUNNER_THREADS=str(a.threads), MODEL_RUNNER_GPU_LAYERS="all",
        MODEL_RUNNER_KEEP_ALIVE="-1", MODEL_RUNNER_MAX_QUEUE="1024",
        MODEL_RUNNER_MEMORY_LIMIT="64g",  # the runners' estimates stay far below it
    )  # fmt: skip
    for spec in a.model:
        name, path = spec.split("=", 1)
        package(name, Path(path), env, a.ctx)
    base = f"http://127.0.0.1:{port}"
    service = start([sys.executable, "-m", "app", "serve"], a.out / "service.log", env)
    try:
        t0 = time.monotonic()
        await wait_http(f"{base}/", service, 60)
        await wait_http(f"{base}/engines/status", service, 60, "Installing")
        check.results["backend"] = (await fetch(f"{base}/engines/status", check))["llama.cpp"]
        check.results["service_start_s"] = round(time.monotonic() - t0, 1)
        print(f"service up in {check.results['service_start_s']}s: {check.results['backend']}")
        for spec in a.model:
            name, path = spec.split("=", 1)
            if check.left() < 2 * a.reserve:
                check.skipped.append(f"{name}: {check.left():.0f}s left")
                continue
            print(f"{name}:", flush=True)
            check.results.setdefault("models", {})[name] = await one_model(
                name, Path(path), base, check
            )
    finally:
        stop(service)


# -- report --------------------------------------------------------------------------------------
def table(doc: dict[str, Any]) -> list[str]:
    runs = {(r["server"], r["concurrency"], r["stream"]): r for r in doc.get("runs", [])}
    keys = sorted({(c, s) for _, c, s in runs}, key=lambda k: (k[1], k[0]))
    if not keys:
        return ["  nothing measured"]
    lines = [f"  {'C':>3} {'stream':>6} {'tok/s ours':>11} {'llama-server':>13} {'ratio':>6}"
             f" {'TTFT ms ours':>13} {'llama-server':>13} {'ratio':>6}"]  # fmt: skip

    def cell(server: str, key: tuple[int, bool], what: str) -> float | None:
        return (runs.get((server, *key)) or {}).get(what)

    def ratio(x: float | None, y: float | None) -> str:
        return f"{x / y:.2f}" if x and y else "-"

    for key in keys:
        ours, peer = cell("ours", key, "tok_per_s"), cell("llama-server", key, "tok_per_s")
        t_ours, t_peer = cell("ours", key, "ttft_p50_ms"), cell("llama-server", key, "ttft_p50_ms")
        lines.append(
            f"  {key[0]:>3} {'yes' if key[1] else 'no':>6} {ours or '-':>11} {peer or '-':>13}"
            f" {ratio(ours, peer):>6} {t_ours or '-':>13} {t_peer or '-':>13}"
            f" {ratio(t_ours, t_peer):>6}"
        )
    short = sum(r["short"] for r in runs.values())
    if short:
        lines.append(f"  ({short} requests stopped before max_tokens)")
    return lines


def report(check: Check) -> str:
    a = check.args
    r = check.results
    lines = [
        f"GPU check ({a.mode}): parallel {a.parallel}, threads {a.threads}, {a.ctx} tokens a slot,"
        f" max_tokens {a.max_tokens}, temperature 0",
        "tok/s: completion tokens / wall s, all requests together; TTFT: p50 time to the first"
        " streamed text; ratio: ours / llama-server",
        "steps: " + ", ".join(a.step) + f", service start {r.get('service_start_s', '-')}s",
        f"backend: {r.get('backend', '-')}",
    ]
    for doc in r.get("models", {}).values():
        lines += ["", f"== {doc['model']}: {doc['shape']}"]
        for route, c in doc["checks"].items():
            lines.append(f"  {route:<12} {'ok  ' if c['ok'] else 'FAIL'} {c['seconds']:>6}s "
                         f"{c['said'][:150]}")  # fmt: skip
        lines += table(doc)
        for row in doc.get("runners", []):
            where = ", ".join(f"{k} {v >> 20}" for k, v in row.get("memory_by_device", {}).items())
            lines.append(
                f"  ours, {row['mode']} runner: /engines/ps estimate {row['memory_estimate'] >> 20}"
                f" MiB{f' ({where})' if where else ''}, {row.get('context_size')} tokens x"
                f" {row.get('parallel')} slots"
            )
        lines += ["  " + line for line in doc.get("gpu_memory", [])]
    lines += [""] + [f"skipped: {s}" for s in check.skipped]
    if check.failures:
        lines += [f"FAILED: {f}" for f in check.failures]
        log = (a.out / "service.log").read_text(errors="replace").splitlines()
        said = [line.strip()[:300] for line in log if CRASH_LINES.search(line)][-5:]
        lines += ["service.log says:"] + ["  " + s for s in said] if said else []
    else:
        lines.append("every request answered well")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["cuda", "cpu"], required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH.gguf")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parallel", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--conc", required=True, help="concurrencies, e.g. 1,8,32,64")
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--ctx", type=int, required=True, help="tokens a slot")
    ap.add_argument("--deadline", type=float, required=True, help="epoch seconds")
    ap.add_argument("--reserve", type=float, default=15.0, help="no new run with less left")
    ap.add_argument("--step", action="append", default=[], help="'NAME TIME', for the summary")
    check = Check(ap.parse_args())
    check.args.out.mkdir(parents=True, exist_ok=True)
    for log in ("service.log", "llama-server.log"):
        (check.args.out / log).unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the servers are stopped
    try:
        asyncio.run(run(check))
    except Bad as exc:
        check.failures.append(str(exc))
    text = report(check)
    (check.args.out / "summary.txt").write_text(text)
    doc = {"settings": {k: str(v) for k, v in vars(check.args).items()}, **check.results,
           "failures": check.failures, "skipped": check.skipped}  # fmt: skip
    (check.args.out / "results.json").write_text(json.dumps(doc, indent=1))
    print(text, end="")
    return 1 if check.failures else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
