"""Generation throughput and time to first token, in one run, on the default model (Gemma 3
270M Q4_K_M), 2 threads:

* model-runner (this service: runner process, continuous batching, MODEL_RUNNER_PARALLEL=8)
* direct: the same work in-process with ``llama_cpp.Llama``, one request at a time
* peer: llama-cpp-python's own OpenAI server (``llama_cpp.server``), in a venv of its own

Workload (as in the team's anchors): 8 prompts "Question i: what is i plus i? Answer:",
max_tokens 48, temperature 0; aggregate tok/s = completion tokens / wall time with C requests
in flight, C = 1, 2, 4, 8; TTFT = time to the first streamed text, p50/p95 over the 8.

    .venv/bin/python bench/throughput.py [--rounds 1] [--no-peer]

Goals (issue 4): C=1 at least 0.97x direct; C=8 at least 2x direct and 2x the peer.
Note: llama.cpp's extra CPU buffer types (AMX repacking) crash on this project's Intel VMs, so
every contender here runs with them off, as the service does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, cli, gemma, service_env, start_service, wait_http

from app.client import ServiceClient
from tests.netutil import free_port

PROMPTS = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(8)]
MAX_TOKENS = 48
THREADS = 2
PEER_VENV = REPO / "bench" / ".peer-venv"
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


# -- HTTP contenders ----------------------------------------------------------------------------
def http_once(client: ServiceClient, path: str, model: str, prompt: str) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    reply = client.request(
        "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return json.loads(reply.body)["usage"]["completion_tokens"]


def http_ttft(client: ServiceClient, path: str, model: str, prompt: str) -> float:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    for line in client.lines(
        "POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    ):
        text = json.loads(line[6:])["choices"][0].get("text") if line.startswith(b"data: {") else ""
        if first is None and text:
            first = time.perf_counter() - start
    assert first is not None
    return first


def measure_http(client: ServiceClient, path: str, model: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in (1, 2, 4, 8):
        with ThreadPoolExecutor(c) as pool:
            start = time.perf_counter()
            tokens = sum(pool.map(lambda p: http_once(client, path, model, p), PROMPTS))
            out[f"C={c}"] = tokens / (time.perf_counter() - start)
    for c in (1, 8):
        with ThreadPoolExecutor(c) as pool:
            ttfts = sorted(pool.map(lambda p: http_ttft(client, path, model, p), PROMPTS))
        out[f"ttft50 C={c}"] = statistics.median(ttfts) * 1000
        out[f"ttft95 C={c}"] = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] * 1000
    return out


# -- direct, in-process -----------------------------------------------------------------------
def measure_direct(model: Path) -> dict[str, float]:
    exec(NO_EXTRA_BUFTS, {})
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(model), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, verbose=False
    )
    llm.create_completion(PROMPTS[0], max_tokens=8, temperature=0)  # warm-up
    start = time.perf_counter()
    tokens = sum(
        llm.create_completion(p, max_tokens=MAX_TOKENS, temperature=0)["usage"]["completion_tokens"]
        for p in PROMPTS
    )
    out = {"C=1": tokens / (time.perf_counter() - start)}
    ttfts = []
    for p in PROMPTS:
        start = time.perf_counter()
        for chunk in llm.create_completion(p, max_tokens=MAX_TOKENS, temperature=0, stream=True):
            if chunk["choices"][0]["text"]:
                ttfts.append(time.perf_counter() - start)
                break
    ttfts.sort()
    out["ttft50 C=1"] = statistics.median(ttfts) * 1000
    out["ttft95 C=1"] = ttfts[-1] * 1000
    return out


# -- run ----------------------------------------------------------------------------------------
def peer_python() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "llama-cpp-python[server]==0.3.36"],
            check=True,
        )
    return python


def run(model: Path, with_peer: bool) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = service_env(
            Path(tmp) / "models",
            free_port(),
            MODEL_RUNNER_THREADS=str(THREADS),
            MODEL_RUNNER_PARALLEL="8",
        )
        cli(env, "package", "--gguf", str(model), "--store", "ai/gemma3:bench")
        service, client = start_service(env)
        try:
            http_once(client, "/v1/completions", "ai/gemma3:bench", PROMPTS[0])  # load + warm up
            results["model-runner"] = measure_http(client, "/v1/completions", "ai/gemma3:bench")
        finally:
            service.terminate()
            service.wait()
    results["direct"] = measure_direct(model)
    if with_peer:
        port = free_port()
        code = (
            NO_EXTRA_BUFTS
            + "\nimport runpy; runpy.run_module('llama_cpp.server', run_name='__main__')"
        )
        peer = subprocess.Popen(
            [
                str(peer_python()),
                "-c",
                code,
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_threads",
                str(THREADS),
                "--n_ctx",
                "2048",
                "--interrupt_requests",
                "False",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = ServiceClient(f"http://127.0.0.1:{port}", timeout=600)
        try:
            wait_http(client, "/v1/models", peer)
            http_once(client, "/v1/completions", "x", PROMPTS[0])
            results["llama-cpp-python server"] = measure_http(client, "/v1/completions", "x")
        finally:
            peer.terminate()
            peer.wait()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python's server")
    args = ap.parse_args()
    results = run(gemma(), not args.no_peer)
    cols = ["C=1", "C=2", "C=4", "C=8", "ttft50 C=1", "ttft95 C=1", "ttft50 C=8", "ttft95 C=8"]
    print(f"{'':26}" + "".join(f"{c:>12}" for c in cols))
    for name, row in results.items():
        print(f"{name:26}" + "".join(f"{row[c]:12.1f}" if c in row else f"{'-':>12}" for c in cols))
    direct = results["direct"]["C=1"]
    ours = results["model-runner"]
    ratio: Callable[[float], str] = lambda x: f"{x:.2f}x"  # noqa: E731
    print(
        f"model-runner vs direct: C=1 {ratio(ours['C=1'] / direct)} (goal >= 0.97x), "
        f"C=8 {ratio(ours['C=8'] / direct)} (goal >= 2x)"
    )
    if "llama-cpp-python server" in results:
        peer = results["llama-cpp-python server"]
        print(
            f"model-runner vs llama-cpp-python server at C=8: {ratio(ours['C=8'] / peer['C=8'])} "
            "(goal >= 2x)"
        )


if __name__ == "__main__":
    main()
