"""Generation throughput and time to first token of this service beside llama-server, in one run,
2 threads each:

* model-runner: this service (runner process, continuous batching, MODEL_RUNNER_PARALLEL=8)
* llama-server: llama.cpp's own server (-np 8), built once from the llama.cpp tree that the pinned
  llama-cpp-python vendors (``bench/gpu_check.sh --cpu --build-only``; kept in
  bench/.llama-build/<pin>-cpu/ and built again when the pin changes: minutes on 2 cores)
* direct: the same work in-process with ``llama_cpp.Llama``, one request at a time
* llama-cpp-python server: ``llama_cpp.server``, in a venv of its own, made once in
  bench/.llama-build/python-server-<pin>/ (optional)

Every server is started once, then the rounds interleave them (the order rotating each round)
and the tables show each figure's median over the rounds, with ratio = model-runner /
llama-server.

Table 1, the default model (Gemma 3 270M Q4_K_M), 4096 tokens a slot: 8 prompts "Question i:
what is i plus i? Answer:", max_tokens 48, temperature 0, /v1/completions; tok/s = completion
tokens / wall time with C of the 8 requests in flight, C = 1, 2, 4, 8, not streamed; then
streamed at C = 1 and at C = 8 (the 8 started together, past a barrier): tok/s, and TTFT = time
to the first chunk with text, p50/p95 over the 8.

Table 2, per-request overhead: the tiny random model (bench/make_gguf.py's ``tiny``, kept in
bench/.gpu-check/models/), on which decoding costs almost nothing and which never ends a
generation by itself; 64 slots of 256 tokens (MODEL_RUNNER_PARALLEL=64, llama-server -np 64),
128 tokens a request, C = 1, 8, 64 not streamed and 64 streamed.

    .venv/bin/python bench/throughput.py [--rounds 3] [--no-llama-server] [--no-python-server]
        [--no-tiny]

Goals (issue 14), printed beside the figures, not asserted: at C=8, at least 1.05x
llama-server's tok/s, streamed and not; TTFT p50 at most llama-server's at C=1 and C=8; C=1
tok/s at least 1.0x llama-server's. Issue 4's, against direct: C=1 at least 0.97x direct; C=8 at
least 2x direct and 2x llama-cpp-python's server.
Note: llama.cpp's extra CPU buffer types (AMX repacking) crash on this project's Intel VMs, so
every contender here runs with them off, as the service does (llama-server: --no-repack).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, cli, gemma, service_env, start_service, stop, tiny_model, wait_http

from app.client import ServiceClient
from tests.netutil import free_port

PROMPTS = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(8)]
MAX_TOKENS = 48
THREADS = 2
PARALLEL = 8
CTX = 4096  # tokens a slot: the service's default for a model trained on more
TINY_PARALLEL = 64
TINY_CTX = 256  # the tiny model's prompts are about 25 tokens, and it writes 128
TINY_TOKENS = 128
TINY_REQUESTS = 32  # not streamed: max(32, 2C) requests a figure; streamed: the C together
PIN = re.search(r'"llama-cpp-python==([^"]+)"', (REPO / "pyproject.toml").read_text())[1]
PYTHON_SERVER_VENV = REPO / "bench" / ".llama-build" / f"python-server-{PIN}"
# Applied in every llama_cpp process of this benchmark (see the module docstring).
NO_EXTRA_BUFTS = """
import llama_cpp, llama_cpp.llama_cpp as low
_defaults = low.llama_model_default_params
def _params():
    p = _defaults()
    p.use_extra_bufts = False
    return p
low.llama_model_default_params = llama_cpp.llama_model_default_params = _params
"""
OURS, PEER, DIRECT, PYSERVER = "model-runner", "llama-server", "direct", "llama-cpp-python server"

Row = dict[str, float]


# -- HTTP client --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Server:
    name: str
    port: int
    model: str  # llama-server and llama-cpp-python's serve their one model whatever this says


def text_of(event: dict[str, Any]) -> str:
    if "error" in event:
        raise RuntimeError(f"error event: {event['error']}")
    choices = event.get("choices") or [{}]
    return choices[0].get("text") or ""


def request(
    server: Server, prompt: str, max_tokens: int, stream: bool, gate: threading.Barrier | None
) -> tuple[int, float | None]:
    """One completion on a connection of its own (made before ``gate``, so that requests held
    there go out together): its completion tokens and, streamed, the seconds to the first chunk
    with text."""
    body: dict[str, Any] = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    try:
        try:
            conn.connect()
        finally:
            if gate is not None:
                gate.wait()  # even when the connect failed: the others go on
        start = time.perf_counter()
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"{server.name}: HTTP {resp.status}: {resp.read()[:300]!r}")
        if not stream:
            return json.loads(resp.read())["usage"]["completion_tokens"], None
        first = None
        chunks = []
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                resp.read()  # to the end of the body: a client that hangs up here is rude
                break
            if first is None:  # only the chunks up to the first text are parsed as they come
                now = time.perf_counter()
                if text_of(json.loads(line[6:])):
                    first = now - start
            chunks.append(line)
        if first is None:
            raise RuntimeError(f"{server.name}: no text in the stream")
        usage = json.loads(chunks[-1][6:]).get("usage")
        if usage:
            return usage["completion_tokens"], first
        return sum(bool(text_of(json.loads(c[6:]))) for c in chunks), first
    finally:
        conn.close()


@dataclass
class Wave:
    tok_s: float
    tokens: int
    ttfts: list[float]  # seconds, sorted; streamed only


def wave(server: Server, conc: int, n: int, max_tokens: int, stream: bool) -> Wave:
    """n requests (the prompts in turn), conc at a time on as many threads; the first conc start
    together past a barrier, and the wall time runs from there to the last one's end."""
    assert n >= conc
    todo = iter(range(n))
    lock = threading.Lock()
    t0: list[float] = []
    gate = threading.Barrier(conc, action=lambda: t0.append(time.perf_counter()), timeout=120)

    def worker() -> list[tuple[int, float | None]]:
        done = []
        first = True
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return done
            prompt = PROMPTS[i % len(PROMPTS)]
            done.append(request(server, prompt, max_tokens, stream, gate if first else None))
            first = False

    with ThreadPoolExecutor(conc) as pool:
        futures = [pool.submit(worker) for _ in range(conc)]
        results = [r for f in futures for r in f.result()]
    wall = time.perf_counter() - t0[0]
    tokens = sum(t for t, _ in results)
    ttfts = sorted(t for _, t in results if t is not None)
    return Wave(tokens / wall, tokens, ttfts)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest rank: of 8 values, p50 is the 4th and p95 the 8th."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def ttft_ms(out: Row, label: str, w: Wave) -> None:
    out[f"TTFT p50 {label} ms"] = percentile(w.ttfts, 0.50) * 1000
    out[f"TTFT p95 {label} ms"] = percentile(w.ttfts, 0.95) * 1000


def warm_up(server: Server, conc: int) -> None:
    """Loads our runner, then a full batch of short requests (llama.cpp's first batches of each
    size are slow)."""
    request(server, PROMPTS[0], 8, False, None)
    wave(server, conc, conc, 8, False)


# -- table 1: the default model ----------------------------------------------------------------
def measure_gemma(server: Server) -> Row:
    out: Row = {}
    for c in (1, 2, 4, 8):
        out[f"C={c} tok/s"] = wave(server, c, len(PROMPTS), MAX_TOKENS, False).tok_s
    w = wave(server, 1, len(PROMPTS), MAX_TOKENS, True)
    out["C=1 streamed tok/s"] = w.tok_s
    ttft_ms(out, "C=1", w)
    w = wave(server, 8, len(PROMPTS), MAX_TOKENS, True)
    out["C=8 streamed tok/s"] = w.tok_s
    ttft_ms(out, "C=8", w)
    return out


def direct(model: Path) -> Callable[[], Row]:
    """In-process llama_cpp.Llama, one request at a time: C=1 tok/s and TTFT."""
    exec(NO_EXTRA_BUFTS, {})
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=CTX, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
    )
    llm.create_completion(PROMPTS[0], max_tokens=8, temperature=0)  # warm-up

    def measure() -> Row:
        start = time.perf_counter()
        tokens = sum(
            llm.create_completion(p, max_tokens=MAX_TOKENS, temperature=0)["usage"][
                "completion_tokens"
            ]
            for p in PROMPTS
        )
        out = {"C=1 tok/s": tokens / (time.perf_counter() - start)}
        ttfts = []
        for p in PROMPTS:
            start = time.perf_counter()
            for chunk in llm.create_completion(
                p, max_tokens=MAX_TOKENS, temperature=0, stream=True
            ):
                if chunk["choices"][0]["text"]:
                    ttfts.append(time.perf_counter() - start)
                    break
        ttft_ms(out, "C=1", Wave(0.0, 0, sorted(ttfts)))
        return out

    return measure


def python_server_python() -> Path:
    python = PYTHON_SERVER_VENV / "bin" / "python"
    if not python.exists():
        print(f"making {PYTHON_SERVER_VENV} (llama-cpp-python[server]=={PIN})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PYTHON_SERVER_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", f"llama-cpp-python[server]=={PIN}"]
        done = subprocess.run(pip, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout)
            shutil.rmtree(PYTHON_SERVER_VENV)  # no half-made venv taken for a whole one next time
            raise SystemExit(f"could not install llama-cpp-python[server]=={PIN}")
    return python


def start_python_server(model: Path, log: Path) -> tuple[subprocess.Popen[bytes], Server]:
    port = free_port()
    code = (
        NO_EXTRA_BUFTS + "\nimport runpy; runpy.run_module('llama_cpp.server', run_name='__main__')"
    )
    args = ["--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--n_threads", str(THREADS), "--n_threads_batch", str(THREADS)]
    args += ["--n_ctx", str(CTX), "--interrupt_requests", "False"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(python_server_python()), "-c", code, *args], stdout=out, stderr=subprocess.STDOUT
        )
    started(proc, port, "/v1/models", log)
    return proc, Server(PYSERVER, port, "x")


# -- servers ------------------------------------------------------------------------------------
def llama_server_binary() -> Path:
    """bench/gpu_check.sh's CPU build of llama-server, made first when missing."""
    proc = subprocess.Popen(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--build-only"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    last = ""
    for line in proc.stdout:
        if last:
            print(last, end="", flush=True)  # the build's progress; the path comes last
        last = line
    if proc.wait() != 0:
        raise SystemExit(f"bench/gpu_check.sh --cpu --build-only failed ({proc.returncode})")
    return Path(last.strip())


def started(proc: subprocess.Popen[bytes], port: int, path: str, log: Path) -> None:
    try:
        wait_http(ServiceClient(f"http://127.0.0.1:{port}", timeout=600), path, proc)
    except RuntimeError:
        stop(proc)
        sys.stderr.write("".join(log.read_text(errors="replace").splitlines(True)[-20:]))
        raise


def start_llama_server(
    binary: Path, model: Path, parallel: int, ctx: int, log: Path
) -> tuple[subprocess.Popen[bytes], Server]:
    libs = [str(binary.parent), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(libs)}
    usage = subprocess.run(
        [binary, "--help"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ).stdout
    port = free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-np", str(parallel), "-c", str(parallel * ctx), "-t", str(THREADS)]
    cmd += ["-tb", str(THREADS), "--no-repack"]  # no repacked CPU weights: our runners use none
    cmd += ["--no-webui"] if re.search(r"--no-webui(?![-\w])", usage) else []
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    started(proc, port, "/health", log)  # 200 once the model is loaded
    return proc, Server(PEER, port, "x")


def start_ours(
    store: Path, model: Path, name: str, parallel: int, ctx: int
) -> tuple[subprocess.Popen[bytes], Server]:
    env = service_env(
        store,
        free_port(),
        MODEL_RUNNER_THREADS=str(THREADS),
        MODEL_RUNNER_PARALLEL=str(parallel),
        MODEL_RUNNER_KEEP_ALIVE="-1",  # no unload between rounds
    )
    cli(env, "package", "--gguf", str(model), "--context-size", str(ctx), "--store", name)
    proc, _ = start_service(env)
    return proc, Server(OURS, int(env["MODEL_RUNNER_PORT"]), name)


def rounds(contenders: dict[str, Callable[[], Row]], n: int) -> dict[str, Row]:
    """n rounds of every contender in turn, the order rotated each round; each figure's median."""
    names = list(contenders)
    samples: dict[str, list[Row]] = {name: [] for name in names}
    for r in range(n):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            row = contenders[name]()
            samples[name].append(row)
            shown = ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k.startswith("C="))
            print(f"  round {r + 1}/{n} {name}: {shown}", flush=True)
    return {
        name: {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        for name, rows in samples.items()
    }


# -- tables -------------------------------------------------------------------------------------
GOALS = {  # issue 14: model-runner / llama-server
    "C=1 tok/s": (">=", 1.0),
    "C=8 tok/s": (">=", 1.05),
    "C=8 streamed tok/s": (">=", 1.05),
    "TTFT p50 C=1 ms": ("<=", 1.0),
    "TTFT p50 C=8 ms": ("<=", 1.0),
}


def table(results: dict[str, Row], metrics: list[str], goals: bool) -> None:
    others = [name for name in results if name not in (OURS, PEER)]
    head = f"{'':22}{OURS:>13}{PEER:>13}{'ratio':>8}"
    head += f"{'goal':>10}{'met':>5}" if goals else ""
    print(head + "".join(f"{name:>{max(13, len(name) + 2)}}" for name in others))

    def cell(name: str, metric: str, width: int = 13) -> str:
        value = results.get(name, {}).get(metric)
        return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}}"

    for metric in metrics:
        ours, peer = results[OURS].get(metric), results.get(PEER, {}).get(metric)
        ratio = ours / peer if ours is not None and peer else None
        line = f"{metric:22}{cell(OURS, metric)}{cell(PEER, metric)}"
        line += f"{ratio:7.2f}x" if ratio is not None else f"{'-':>8}"
        if goals:
            op, target = GOALS.get(metric, ("", 0.0))
            met = "-" if ratio is None or not op else "yes"
            if ratio is not None and (ratio < target if op == ">=" else ratio > target):
                met = "no"
            line += f"{f'{op} {target:.2f}x' if op else '':>10}{met if op else '':>5}"
        print(line + "".join(cell(name, metric, max(13, len(name) + 2)) for name in others))


def run_gemma(args: argparse.Namespace, binary: Path | None, tmp: Path) -> dict[str, Row]:
    model = gemma()
    procs: list[subprocess.Popen[bytes]] = []
    contenders: dict[str, Callable[[], Row]] = {}
    try:
        proc, ours = start_ours(tmp / "models", model, "ai/gemma3:bench", PARALLEL, CTX)
        procs.append(proc)
        servers = [ours]
        if binary is not None:
            proc, peer = start_llama_server(binary, model, PARALLEL, CTX, tmp / "llama-server.log")
            procs.append(proc)
            servers.append(peer)
        if not args.no_python_server:
            proc, pyserver = start_python_server(model, tmp / "python-server.log")
            procs.append(proc)
            servers.append(pyserver)
        for server in servers:
            warm_up(server, PARALLEL)
            contenders[server.name] = lambda server=server: measure_gemma(server)
        contenders[DIRECT] = direct(model)
        return rounds(contenders, args.rounds)
    finally:
        for proc in reversed(procs):
            stop(proc)


def measure_tiny(server: Server) -> Row:
    out: Row = {}
    for c in (1, 8, TINY_PARALLEL):
        n = max(TINY_REQUESTS, 2 * c)
        w = wave(server, c, n, TINY_TOKENS, False)
        out[f"C={c} tok/s"] = w.tok_s
        if w.tokens != n * TINY_TOKENS:
            print(
                f"  note: {server.name} C={c} wrote {w.tokens} tokens, not {TINY_TOKENS} a request"
            )
    w = wave(server, TINY_PARALLEL, TINY_PARALLEL, TINY_TOKENS, True)
    out[f"C={TINY_PARALLEL} streamed tok/s"] = w.tok_s
    ttft_ms(out, f"C={TINY_PARALLEL}", w)
    return out


def run_tiny(args: argparse.Namespace, binary: Path | None, tmp: Path) -> dict[str, Row]:
    model = tiny_model()
    procs: list[subprocess.Popen[bytes]] = []
    contenders: dict[str, Callable[[], Row]] = {}
    try:
        proc, ours = start_ours(
            tmp / "tiny-models", model, "bench/tiny:f16", TINY_PARALLEL, TINY_CTX
        )
        procs.append(proc)
        servers = [ours]
        if binary is not None:
            log = tmp / "llama-server-tiny.log"
            proc, peer = start_llama_server(binary, model, TINY_PARALLEL, TINY_CTX, log)
            procs.append(proc)
            servers.append(peer)
        for server in servers:
            warm_up(server, TINY_PARALLEL)
            contenders[server.name] = lambda server=server: measure_tiny(server)
        return rounds(contenders, args.rounds)
    finally:
        for proc in reversed(procs):
            stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--no-llama-server", action="store_true", help="skip llama-server")
    ap.add_argument(
        "--no-python-server",
        "--no-peer",
        action="store_true",
        help="skip llama-cpp-python's server",
    )
    ap.add_argument("--no-tiny", action="store_true", help="skip the tiny model's table")
    args = ap.parse_args()
    t0 = time.perf_counter()
    binary = None if args.no_llama_server else llama_server_binary()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"Gemma 3 270M Q4_K_M, {args.rounds} round(s)", flush=True)
        results = run_gemma(args, binary, Path(tmp))
        tiny = None if args.no_tiny else run_tiny(args, binary, Path(tmp))
    of = f"median of {args.rounds} round(s)"
    print(
        f"\nGemma 3 270M Q4_K_M: {THREADS} threads, {PARALLEL} slots of {CTX} tokens; 8 prompts, "
        f"max_tokens {MAX_TOKENS}, temperature 0; {of}; ratio = {OURS} / {PEER}; TTFT in ms"
    )
    metrics = [f"C={c} tok/s" for c in (1, 2, 4, 8)] + ["C=1 streamed tok/s", "C=8 streamed tok/s"]
    metrics += [f"TTFT {p} C={c} ms" for c in (1, 8) for p in ("p50", "p95")]
    table(results, metrics, goals=True)
    ours = results[OURS]
    line = (
        f"{OURS} vs {DIRECT} (issue 4): C=1 {ours['C=1 tok/s'] / results[DIRECT]['C=1 tok/s']:.2f}x"
        f" (goal >= 0.97x), C=8 {ours['C=8 tok/s'] / results[DIRECT]['C=1 tok/s']:.2f}x"
        " (goal >= 2x)"
    )
    if PYSERVER in results:
        line += f"; vs {PYSERVER} at C=8 {ours['C=8 tok/s'] / results[PYSERVER]['C=8 tok/s']:.2f}x"
        line += " (goal >= 2x)"
    print(line)
    if tiny is not None:
        print(
            f"\nPer-request overhead, the tiny random model: {THREADS} threads, {TINY_PARALLEL}"
            f" slots of {TINY_CTX} tokens; {TINY_TOKENS} tokens a request; not streamed,"
            f" max({TINY_REQUESTS}, 2C) requests; streamed, the {TINY_PARALLEL} together; {of}"
        )
        metrics = [f"C={c} tok/s" for c in (1, 8, TINY_PARALLEL)]
        metrics += [f"C={TINY_PARALLEL} streamed tok/s"]
        metrics += [f"TTFT {p} C={TINY_PARALLEL} ms" for p in ("p50", "p95")]
        table(tiny, metrics, goals=False)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
