"""The scheduler end to end: residency, memory-aware eviction, keep_alive, queue limits,
the /engines control routes, the preload manifest with /readyz, and shutdown."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.client import ClientError
from tests.conftest import REPO, Server, new_server
from tests.registry import LocalRegistry, Proxy
from tests.tiny_gguf import write_tiny_gguf

JSON = {"Content-Type": "application/json"}
MIB = 1024 * 1024


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """Three distinct tiny models (different weights, so different IDs). A long training context
    lets a stream run for seconds (4096 tokens per slot by default), so tests can act mid-stream."""
    return {
        name: write_tiny_gguf(tmp_path / f"{name}.gguf", seed=i, ctx=32768)
        for i, name in enumerate("abc")
    }


@pytest.fixture
def start(tmp_path: Path, models: dict[str, Path]) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def run(**env: str) -> Server:
        srv = new_server(tmp_path, **env)
        srv.start()
        started.append(srv)
        for name, gguf in models.items():
            srv.cli("package", "--gguf", str(gguf), "--load", name)
        return srv

    yield run
    for srv in started:
        srv.discard()


def call(srv: Server, method: str, path: str, body: Any = None) -> tuple[int, Any, dict]:
    data = json.dumps(body).encode() if body is not None else None
    resp = srv.tcp.request(method, path, data, JSON if data else None)
    text = resp.body.decode()
    try:
        value = json.loads(text) if text else None
    except ValueError:
        value = text
    return resp.status, value, dict(resp.headers)


def chat(srv: Server, model: str, n: int = 3) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": n}
    return call(srv, "POST", "/engines/v1/chat/completions", body)[0]


def ps(srv: Server) -> dict[str, dict[str, Any]]:
    """The runners by their models' short names (ps shows a model's one name, its first tag)."""
    rows = call(srv, "GET", "/engines/ps")[1]
    return {
        row["model_name"].removeprefix("docker.io/ai/").removesuffix(":latest"): row for row in rows
    }


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


class Stream:
    """A streaming completion read line by line from a thread-free HTTP connection."""

    def __init__(self, srv: Server, model: str, max_tokens: int = 4000) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        body = {"model": model, "prompt": "once", "max_tokens": max_tokens, "stream": True}
        self.conn.request("POST", "/v1/completions", json.dumps(body), JSON)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status

    def first(self) -> str:
        return self.resp.readline().decode()

    def rest(self) -> str:
        text = self.resp.read().decode()
        self.conn.close()
        return text


def finish_reason(sse: str) -> str | None:
    events = [json.loads(ln[6:]) for ln in sse.splitlines() if ln.startswith("data: {")]
    reasons = [e["choices"][0]["finish_reason"] for e in events if e.get("choices")]
    return reasons[-1] if reasons else None


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    return thread, out


# -- residency ----------------------------------------------------------------------------
def test_chat_and_embedding_models_stay_loaded_together(start: Callable[..., Server]):
    srv = start()
    assert chat(srv, "a") == 200
    status, body, _ = call(srv, "POST", "/v1/embeddings", {"model": "b", "input": "hello"})
    assert status == 200 and body["data"][0]["embedding"]
    rows = ps(srv)
    assert rows["a"]["mode"] == "completion" and rows["b"]["mode"] == "embedding"
    for row in rows.values():
        assert "in_use" not in row and "loading" not in row
        assert row["keep_alive"] == "5m0s" and row["backend_name"] == "llama.cpp"
        assert row["last_used"] != "0001-01-01T00:00:00Z"
        assert alive(row["pid"])
    assert chat(srv, "a") == 200  # served by the same runner
    assert ps(srv)["a"]["pid"] == rows["a"]["pid"]


def test_memory_estimate_bounds_the_runner(start: Callable[..., Server]):
    srv = start()
    assert chat(srv, "a", 20) == 200
    row = ps(srv)["a"]
    status = Path(f"/proc/{row['pid']}/status").read_text()
    peak = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1]) * 1024
    assert 0 < peak <= row["memory_estimate"]


# -- memory-aware eviction -----------------------------------------------------------------
def test_least_recently_used_idle_model_makes_room(start: Callable[..., Server]):
    srv = start(MODEL_RUNNER_MEMORY_LIMIT="400MiB")  # two tiny runners fit, three do not
    assert chat(srv, "a") == 200
    assert chat(srv, "b") == 200
    assert chat(srv, "a") == 200  # b is now the least recently used
    b_pid = ps(srv)["b"]["pid"]
    assert chat(srv, "c") == 200
    assert set(ps(srv)) == {"a", "c"}
    wait_for("b's runner to exit", lambda: not alive(b_pid))
    assert "stopping idle runner for room" in srv.log()


def test_model_larger_than_the_limit_is_503_with_the_numbers(start: Callable[..., Server]):
    srv = start(MODEL_RUNNER_MEMORY_LIMIT="40MiB")
    status, body, _ = call(srv, "POST", "/v1/completions", {"model": "a", "prompt": "x"})
    assert status == 503
    text = body["error"]["message"]
    assert "needs about" in text and "MiB" in text and "40 MiB" in text
    assert "MODEL_RUNNER_MEMORY_LIMIT" in text
    assert ps(srv) == {}


def test_busy_model_is_drained_never_cut(start: Callable[..., Server]):
    srv = start(MODEL_RUNNER_MEMORY_LIMIT="250MiB")  # one tiny runner at a time
    stream = Stream(srv, "a")
    assert stream.status == 200 and stream.first().startswith("data: ")
    thread, result = in_background(lambda: chat(srv, "b"))
    wait_for("a to be draining", lambda: ps(srv).get("a", {}).get("draining"))
    assert thread.is_alive()  # b waits for a's request; a is not killed
    rest = stream.rest()
    assert finish_reason(rest) == "length" and rest.rstrip().endswith("data: [DONE]")
    thread.join(30)
    assert result == [200]
    assert set(ps(srv)) == {"b"}


# -- queue limit ---------------------------------------------------------------------------
def test_full_queue_answers_503_at_once(start: Callable[..., Server]):
    srv = start(MODEL_RUNNER_PARALLEL="1", MODEL_RUNNER_MAX_QUEUE="1")
    running = Stream(srv, "a")
    assert running.first().startswith("data: ")
    queued = Stream(srv, "a", 5)
    wait_for("a queued request", lambda: ps(srv)["a"].get("waiting") == 1)
    status, body, headers = call(srv, "POST", "/v1/completions", {"model": "a", "prompt": "x"})
    assert status == 503
    assert ps(srv)["a"].get("waiting") == 1  # refused at once, not after the queue moved
    text = body["error"]["message"]
    assert "too many requests for docker.io/ai/a:latest" in text
    assert "MODEL_RUNNER_MAX_QUEUE=1" in text
    assert int(headers["Retry-After"]) > 0
    assert finish_reason(running.rest()) == "length"
    assert finish_reason(queued.rest()) == "length"
    assert chat(srv, "a") == 200  # room again


# -- keep_alive ----------------------------------------------------------------------------
def test_keep_alive_zero_and_never_per_model(start: Callable[..., Server]):
    srv = start()
    for model, keep in (("a", "0"), ("b", "-1")):
        status, _, _ = call(
            srv, "POST", "/engines/_configure", {"model": model, "keep_alive": keep}
        )
        assert status == 202
    # "0": the preload itself leaves at once; so does every request's runner.
    assert chat(srv, "a") == 200
    wait_for("a to unload when idle", lambda: "a" not in ps(srv), timeout=10)
    wait_for("b to preload", lambda: "b" in ps(srv) and "loading" not in ps(srv)["b"])
    assert ps(srv)["b"]["keep_alive"] == "-1" and "expires_in_s" not in ps(srv)["b"]


# -- _configure, unload, status, df --------------------------------------------------------
def test_configure_then_ps(start: Callable[..., Server]):
    srv = start()
    body = {
        "model": "a",
        "context-size": 512,
        "keep_alive": "10m",
        "runtime-flags": ["--parallel", "2", "--threads", "1"],
    }
    status, text, _ = call(srv, "POST", "/engines/llama.cpp/_configure", body)
    assert (status, text) == (202, None)
    row = wait_for("the background preload", lambda: ps(srv).get("a"))
    wait_for("it to finish loading", lambda: "loading" not in ps(srv)["a"])
    row = ps(srv)["a"]
    assert (row["context_size"], row["parallel"], row["keep_alive"]) == (512, 2, "10m0s")
    (entry,) = call(srv, "GET", "/engines/_configure?model=a")[1]
    assert entry["Mode"] == "completion" and entry["ModelID"].startswith("sha256:")
    assert entry["Model"] == "docker.io/ai/a:latest"
    assert entry["Config"]["context-size"] == 512 and entry["Config"]["keep_alive"] == "10m0s"
    # Same config again: nothing to do, the runner stays.
    assert call(srv, "POST", "/engines/_configure", body)[0] == 202
    assert ps(srv)["a"]["pid"] == row["pid"]


def test_configure_answers_bad_input_and_a_busy_runner(start: Callable[..., Server]):
    # Every rule is tested on the parser (tests/test_runner_config.py); here, the statuses.
    srv = start()
    for body, status, message in (
        ({"model": "a", "runtime-flags": ["--log-file", "x"]}, 400, 'runtime flag "--log-file"'),
        ({"model": "nope"}, 404, "model not found"),
        ({}, 400, "model is required"),
    ):
        got, text, _ = call(srv, "POST", "/engines/_configure", body)
        assert got == status and message in text
    stream = Stream(srv, "a")
    assert stream.first()
    status, text, _ = call(srv, "POST", "/engines/_configure", {"model": "a", "context-size": 256})
    assert (status, text.strip()) == (409, "runner already active")
    assert finish_reason(stream.rest()) == "length"


def test_unload_spares_busy_runners(start: Callable[..., Server]):
    srv = start()
    assert chat(srv, "a") == 200 and chat(srv, "b") == 200
    stream = Stream(srv, "c")
    assert stream.first()
    assert call(srv, "POST", "/engines/unload", {"models": ["a"]})[1] == {"unloaded_runners": 1}
    assert set(ps(srv)) == {"b", "c"}
    assert call(srv, "POST", "/engines/unload", {"all": True})[1] == {"unloaded_runners": 1}
    assert set(ps(srv)) == {"c"}  # busy: left alone
    assert finish_reason(stream.rest()) == "length"
    assert call(srv, "POST", "/engines/unload", {"models": ["nope"]})[0] == 404
    assert call(srv, "POST", "/engines/unload", {"all": "false"})[0] == 400


def test_status_and_df(start: Callable[..., Server]):
    srv = start()
    status = wait_for(
        "the backend probe",
        lambda: (
            (s := call(srv, "GET", "/engines/status")[1])["llama.cpp"].startswith("Running") and s
        ),
    )
    assert "on CPU" in status["llama.cpp"]  # no GPU offload in this build
    df = call(srv, "GET", "/engines/df")[1]
    assert df["models_disk_usage"] >= 3 * 600_000 and df["default_backend_disk_usage"] > 0
    assert "device=CPU" in srv.log()


# -- preload manifest and readiness --------------------------------------------------------
def test_manifest_pulls_and_preloads_then_ready(
    tmp_path: Path, registry: LocalRegistry, models: dict[str, Path]
):
    # package --push talks to the registry directly: no service needed for it.
    new_server(tmp_path).cli(
        "package", "--gguf", str(models["a"]), "--push", f"{registry.host}/org/a:v1"
    )
    with Proxy(registry.port, rate=256 * 1024) as proxy:  # ~3 s for the tiny model
        manifest = tmp_path / "models.yaml"
        manifest.write_text(
            f"models:\n"
            f"  - model: 127.0.0.1:{proxy.port}/org/a:v1\n"
            f"    preload: true\n"
            f"    pin: true\n"
            f"    context_size: 1024\n"
            f"  - model: local/emb:v1\n"
            f"    gguf: {models['b'].name}\n"  # relative to the manifest
            f"    mode: embedding\n"
        )
        srv = new_server(tmp_path, MODEL_RUNNER_MANIFEST=str(manifest))
        srv.start()
        try:
            status, body, _ = call(srv, "GET", "/readyz")
            assert status == 503 and body["status"] == "not ready"
            pulling = wait_for(
                "pull progress",
                lambda: next(
                    (
                        m
                        for m in call(srv, "GET", "/readyz")[1]["models"]
                        if m["state"] == "pulling"
                    ),
                    None,
                ),
            )
            # Byte counts move in DMR's 1 MiB progress steps; this model is smaller than one.
            assert pulling["total"] >= pulling["completed"] >= 0
            assert call(srv, "GET", "/healthz")[0] == 200  # alive while not ready
            body = wait_for(
                "readiness", lambda: (r := call(srv, "GET", "/readyz"))[0] == 200 and r[1]
            )
            states = {m["model"]: m for m in body["models"]}
            assert states[f"127.0.0.1:{proxy.port}/org/a:v1"] == {
                "model": f"127.0.0.1:{proxy.port}/org/a:v1",
                "mode": "completion",
                "state": "ready",
                "loaded": True,
            }
            assert states["local/emb:v1"]["loaded"] is False
            row = ps(srv)[f"127.0.0.1:{proxy.port}/org/a:v1"]
            assert row["pinned"] and row["context_size"] == 1024 and row["keep_alive"] == "-1"
            status, body, _ = call(
                srv, "POST", "/v1/embeddings", {"model": "local/emb:v1", "input": "x"}
            )
            assert status == 200
            # _configure changes only what it names: the manifest's context size stays.
            pulled = f"127.0.0.1:{proxy.port}/org/a:v1"
            body = {"model": pulled, "keep_alive": "1h"}
            assert call(srv, "POST", "/engines/_configure", body)[0] == 202
            (entry,) = call(srv, "GET", f"/engines/_configure?model={pulled}")[1]
            assert entry["Config"]["context-size"] == 1024
            assert entry["Config"]["keep_alive"] == "1h0m0s"
            assert "pulling model" in srv.log() and "preload done" in srv.log()
        finally:
            srv.stop()


def test_manifest_error_keeps_readyz_503_with_the_message(tmp_path: Path):
    manifest = tmp_path / "models.yaml"
    manifest.write_text("models:\n  - model: 127.0.0.1:1/org/missing:v1\n")
    srv = new_server(tmp_path, MODEL_RUNNER_MANIFEST=str(manifest))
    srv.start()
    try:
        body = wait_for(
            "the pull to fail",
            lambda: (b := call(srv, "GET", "/readyz")[1])["models"][0]["state"] == "error" and b,
        )
        assert call(srv, "GET", "/readyz")[0] == 503
        assert "next try in 5 s" in body["models"][0]["message"]  # it keeps trying
    finally:
        srv.stop()


def test_malformed_manifest_stops_start_up_with_file_and_line(tmp_path: Path):
    # Every rule is tested on the parser (tests/test_preload_manifest.py); here, start-up.
    manifest = tmp_path / "models.yaml"
    manifest.write_text("models:\n  - model: ai/x\n    colour: red\n")
    srv = new_server(tmp_path, MODEL_RUNNER_MANIFEST=str(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        cwd=REPO,
        env=srv.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{manifest}:3: models[0]: unknown key 'colour'" in lines[0]


def test_models_env_preloads_a_list(tmp_path: Path, models: dict[str, Path]):
    srv = new_server(tmp_path)
    srv.start()
    srv.cli("package", "--gguf", str(models["a"]), "--load", "a")
    srv.stop()
    srv.extra_env["MODEL_RUNNER_MODELS"] = "a"
    srv.start()
    try:
        wait_for("readiness", lambda: call(srv, "GET", "/readyz")[0] == 200)
        assert "a" in ps(srv)
    finally:
        srv.stop()


# -- shutdown -----------------------------------------------------------------------------
def refused(srv: Server) -> bool:
    try:
        srv.tcp.request("GET", "/")
    except ClientError:
        return True
    return False


def long_stream(srv: Server, model: str, tokens: int) -> Stream:
    """A stream of ``tokens`` tokens (seconds of work), already under way."""
    body = {"model": model, "context-size": tokens + 64}
    assert call(srv, "POST", "/engines/_configure", body)[0] == 202
    wait_for("the new context", lambda: ps(srv).get(model, {}).get("context_size") == tokens + 64)
    stream = Stream(srv, model, tokens)
    assert stream.status == 200 and stream.first().startswith("data: ")
    return stream


def test_sigterm_lets_streams_finish_then_exits_zero(start: Callable[..., Server]):
    srv = start(MODEL_RUNNER_SHUTDOWN_TIMEOUT="60s")
    assert chat(srv, "b") == 200
    stream = long_stream(srv, "a", 8000)
    pids = [row["pid"] for row in ps(srv).values()]
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    wait_for("the listener to close", lambda: refused(srv))  # no new requests
    rest = stream.rest()
    assert finish_reason(rest) == "length" and rest.rstrip().endswith("data: [DONE]")
    assert srv.proc.wait(timeout=30) == 0
    assert not any(alive(pid) for pid in pids)


def test_shutdown_timeout_bounds_the_wait_for_streams(start: Callable[..., Server]):
    srv = start(MODEL_RUNNER_SHUTDOWN_TIMEOUT="3s")
    stream = long_stream(srv, "a", 30000)  # ~10 s of generation
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=30) == 0
    # Cut short at the timeout, not let run to its end, and the client is told why in the
    # stream's own format.
    rest = stream.rest()
    assert "data: [DONE]" not in rest
    last = json.loads(rest.strip().splitlines()[-1].removeprefix("data: "))
    assert "shutting down" in last["error"]["message"]


def test_concurrent_first_requests_share_one_load(start: Callable[..., Server]):
    srv = start()
    threads = [in_background(lambda: chat(srv, "a")) for _ in range(4)]
    for thread, _ in threads:
        thread.join(60)
    assert [result for _, result in threads] == [[200]] * 4
    assert srv.log().count("runner ready") == 1


def test_no_orphan_runner_after_the_service_is_killed(start: Callable[..., Server]):
    srv = start()
    assert chat(srv, "a") == 200
    status, _, _ = call(srv, "POST", "/v1/embeddings", {"model": "b", "input": "x"})
    assert status == 200
    pids = [row["pid"] for row in ps(srv).values()]
    assert len(pids) == 2
    assert srv.proc is not None
    sockets = list(Path(tempfile.gettempdir()).glob(f"model-runner-{srv.proc.pid}-*"))
    assert len(sockets) == 1  # the runners' socket folder, named for its service
    srv.stop(signal.SIGKILL)
    wait_for("the runners to exit", lambda: not any(alive(pid) for pid in pids), timeout=10)
    assert sockets[0].exists()  # a killed service cannot clean up after itself...
    srv.start()
    assert chat(srv, "a") == 200
    assert not sockets[0].exists()  # ...the next one does


def test_a_model_that_fails_to_load_twice_is_refused_at_once(
    start: Callable[..., Server], tmp_path: Path
):
    # The header is whole (the estimate passes) but the last tensor's data is cut short:
    # the runner starts, llama.cpp refuses the file, the runner exits.
    gguf = write_tiny_gguf(tmp_path / "cut.gguf", seed=7)
    data = gguf.read_bytes()
    gguf.write_bytes(data[: len(data) - 64])
    srv = start()
    srv.cli("package", "--gguf", str(gguf), "--load", "cut")
    for _ in range(2):
        status, body, _ = call(srv, "POST", "/v1/completions", {"model": "cut", "prompt": "x"})
        assert status == 500
        text = body["error"]["message"]
        assert "the runner exited with code 1 while loading the model: failed to load" in text
    status, body, headers = call(srv, "POST", "/v1/completions", {"model": "cut", "prompt": "x"})
    assert status == 500 and "failed to load 2 times in the last 60 s" in body["error"]["message"]
    assert 0 < int(headers["Retry-After"]) <= 60
    assert srv.log().count("runner says") >= 2  # its own words reached the log, twice
    assert chat(srv, "a") == 200  # other models are not affected
