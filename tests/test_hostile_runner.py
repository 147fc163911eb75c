"""Hostile requests and hostile chat templates against a runner (issue 13): none of them stalls
the other streams of its model, keeps its runner from stopping, or ends in a traceback.

Nothing here bounds wall-clock time: a stall is measured against the healthy stream's own pace
and the hostile request's own time, progress by counting events, and the waits only give up
after far longer than anything takes.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.client import ClientError, Reply, ServiceClient
from tests.conftest import Server
from tests.test_inference import start_server
from tests.tiny_gguf import write_tiny_gguf

SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
BROKEN = {
    "divide": "{{ 1/0 }}",
    "flood": '{% for i in range(100000) %}{{ "x" * 1000 }}{% endfor %}',
    # 100 MB, doubled three times: well past the renderer's 1 GiB of address space.
    "hog": '{% set s = "x" * 100000000 %}' + "{% set s = s ~ s %}" * 3 + "{{ s | length }}",
    "recurse": "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
}
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("hostile")
    srv = start_server(root, write_tiny_gguf(root / "tiny.gguf"))
    for name, template in {"spin": SPIN, **BROKEN}.items():
        package(srv, root, name, template)
    yield srv
    srv.stop()


def package(srv: Server, root: Path, name: str, template: str) -> None:
    path = root / f"{name}.jinja"
    path.write_text(template)
    gguf = str(root / "tiny.gguf")
    srv.cli("package", "--gguf", gguf, "--chat-template", str(path), "--load", name)


def post(srv: Server, route: str, body: dict[str, Any]) -> Reply:
    # Far longer than any of these requests takes once fixed; before, some never ended.
    return ServiceClient(srv.url, timeout=120).request("POST", route, json.dumps(body).encode())


def chat(srv: Server, model: str, **extra: Any) -> Reply:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return post(srv, "/v1/chat/completions", {**body, **extra})


def complete(srv: Server, model: str, max_tokens: int = 2) -> None:
    body = {"model": model, "prompt": "still here", "max_tokens": max_tokens}
    reply = post(srv, "/v1/completions", body)
    assert reply.status == 200, reply.text


def error_of(reply: Reply) -> dict[str, Any]:
    return json.loads(reply.body)["error"]


def wait_until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not done():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def runner_pid(srv: Server, model: str) -> int:
    """The pid of ``model``'s runner (a short name, which the log spells as its first tag)."""
    name = re.escape(f"docker.io/ai/{model}:latest")
    ready = re.findall(rf"runner ready .* model={name} pid=(\d+)", srv.log())
    assert ready, f"no runner for {model}"
    return int(ready[-1])


def runner_output(srv: Server, model: str) -> str:
    """All that the model's runner has printed so far (its lines in the service's log), once it
    is all there: the line for a request made now comes through the same pipe, after them."""
    mark = f"pid={runner_pid(srv, model)}"

    def lines() -> list[str]:
        return [ln for ln in srv.log().splitlines() if "runner says" in ln and mark in ln]

    before = sum("request done" in ln for ln in lines())
    complete(srv, model)
    wait_until(
        lambda: sum("request done" in ln for ln in lines()) > before, "the runner's last line"
    )
    return "\n".join(lines())


class Stream:
    """Completion streams on a model, each started as the last one ends, read on a thread that
    notes when each event arrives: one endless stream, as far as a test can tell (one stream
    ends within the context size, in under a second here)."""

    def __init__(self, srv: Server, model: str) -> None:
        self.times: list[float] = []
        self._srv, self._model = srv, model
        self._stopping = threading.Event()
        self._socket: socket.socket | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        body = {"model": self._model, "prompt": "hello", "max_tokens": 2000, "stream": True}
        while not self._stopping.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self._srv.port, timeout=120)
            try:
                conn.request("POST", "/v1/completions", json.dumps(body))
                self._socket = conn.sock
                for line in conn.getresponse():
                    if self._stopping.is_set():
                        break
                    if line.startswith(b"data: {"):
                        self.times.append(time.monotonic())
            except (OSError, http.client.HTTPException):
                return  # closed by the test, or the service is gone
            finally:
                conn.close()

    def wait_for(self, events: int) -> None:
        wait_until(lambda: len(self.times) >= events, f"{events} stream events")

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError, AttributeError):
            self._socket.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        self._reader.join()


def descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue  # gone meanwhile
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        children = [child for child, parent in parents.items() if parent == here]
        found += children
        todo += children
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def peak_rss(pid: int) -> int:
    found = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    assert found
    return int(found.group(1)) * 1024


def test_a_runaway_template_is_a_500_while_the_models_streams_flow(srv: Server):
    stream = Stream(srv, "spin")  # a completion: the template has no part in it
    stream.wait_for(10)
    before = len(stream.times)
    reply = chat(srv, "spin")
    during = len(stream.times) - before
    stream.close()
    assert reply.status == 500, reply.text
    error = error_of(reply)
    assert error["type"] == "server_error"
    assert error["message"] == "the chat template ran for more than 3 s of CPU time"
    # The render ran off the runner's event loop: the stream went on meanwhile.
    assert during >= 50
    assert "Traceback" not in runner_output(srv, "spin")


@pytest.mark.parametrize(
    ("model", "status", "message"),
    [
        ("divide", 500, "the chat template failed: ZeroDivisionError: division by zero"),
        ("flood", 400, "the chat template makes a prompt of more than 32 MiB from these messages"),
        ("hog", 500, "the chat template ran out of memory"),
        ("recurse", 500, "the chat template failed: RecursionError"),
    ],
)
def test_a_broken_template_is_an_openai_error_without_a_traceback(
    srv: Server, model: str, status: int, message: str
):
    reply = chat(srv, model)
    assert reply.status == status, reply.text
    error = error_of(reply)
    assert error["message"].startswith(message)
    if status == 400:
        assert (error["type"], error["param"]) == ("invalid_request_error", "messages")
    else:
        assert error["type"] == "server_error"
    assert "Traceback" not in runner_output(srv, model)  # the runner lives on, too


HUGE_CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": f"hello there {i}"} for i in range(40_000)],
}
HUGE_PROMPT = {"model": "tiny", "prompt": " ".join(f"hello there {i}" for i in range(100_000))}


def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/chat/completions", HUGE_CHAT, "messages"),  # 2 MB of chat: 589,000 tokens
        ("/v1/completions", HUGE_PROMPT, "prompt"),
        (
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": schema_format({"type": "string", "minLength": 100_000_000}),
            },
            "response_format",
        ),
    ],
    ids=["chat", "prompt", "schema"],
)
def test_a_huge_request_does_not_stall_the_models_streams(
    srv: Server, route: str, body: dict[str, Any], param: str
):
    complete(srv, "tiny")
    stream = Stream(srv, "tiny")
    stream.wait_for(60)
    sent = time.monotonic()
    reply = post(srv, route, body)
    answered = time.monotonic()
    stream.wait_for(len(stream.times) + 5)  # an event after the answer closes the last gap
    stream.close()
    times = stream.times
    steady = [t for t in times if t < sent][-41:]
    pace = (steady[-1] - steady[0]) / 40
    pause = max(b - a for a, b in itertools.pairwise(times) if b > sent and a < answered)
    # Before, the runner's event loop parsed, rendered and tokenized while the stream waited: it
    # paused for all of the request's time (14 s for the chat), thousands of times its own pace.
    # Now it pauses for a fraction of a long request (the front's parsing, a JSON decode that
    # holds the GIL), and for a few steps of a short one.
    assert pause < 0.6 * (answered - sent) or pause < 300 * pace, (pause, answered - sent, pace)
    assert reply.status == 400, reply.text
    assert error_of(reply)["param"] == param
    if param != "response_format":  # the tokenizer stopped as soon as the prompt could not fit
        assert "the prompt is at least" in error_of(reply)["message"]


LONG_STRING = {"type": "string", "maxLength": 10_000}


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "string", "minLength": 100_000_000}, "'minLength' must be from 0 to 10000"),
        # llama.cpp's grammar parser recursed once per nested repetition and crashed the runner.
        ({"type": "string", "maxLength": 20_000}, "'maxLength' must be from 0 to 10000"),
        (
            {"type": "object", "properties": {f"p{i}": LONG_STRING for i in range(1000)}},
            "the JSON schema's lengths and item counts add up to 10000000",
        ),
    ],
)
def test_a_schema_asking_for_a_huge_grammar_is_400_and_costs_no_memory(
    srv: Server, schema: dict[str, Any], message: str
):
    complete(srv, "tiny")
    pid = runner_pid(srv, "tiny")
    peak = peak_rss(pid)
    reply = chat(srv, "tiny", response_format=schema_format(schema))
    assert peak_rss(pid) - peak < 64 * MiB  # before: 1.5 GB for minLength 100000000
    assert reply.status == 400, reply.text
    assert error_of(reply)["param"] == "response_format"
    assert error_of(reply)["message"].startswith(message)
    complete(srv, "tiny")


def test_a_schema_within_the_limits_still_constrains_the_output(srv: Server):
    schema = {"type": "string", "minLength": 5000, "maxLength": 5000}  # 5,000 in a row is fine
    body = {"temperature": 0, "max_tokens": 20, "response_format": schema_format(schema)}
    reply = chat(srv, "tiny", **body)
    assert reply.status == 200, reply.text
    text = json.loads(reply.body)["choices"][0]["message"]["content"]
    assert text.startswith('"') and '"' not in text[1:]  # a string, unfinished at 20 tokens


def start_spinning(srv: Server) -> tuple[int, list[int]]:
    """Load the spin model, send it a chat, and return its runner's pid and its children's once
    the render is under way (they use CPU time)."""
    complete(srv, "spin")
    pid = runner_pid(srv, "spin")
    start = cpu_seconds([pid, *descendants(pid)])

    def send() -> None:
        # The runner, or the whole service, is stopped under it: that is the test.
        with contextlib.suppress(ClientError):
            chat(srv, "spin")

    threading.Thread(target=send, daemon=True).start()
    wait_until(lambda: cpu_seconds([pid, *descendants(pid)]) - start > 0.5, "the render under way")
    return pid, descendants(pid)


def test_sigterm_stops_a_runner_while_its_template_runs_away(tmp_path: Path):
    srv = start_server(tmp_path, write_tiny_gguf(tmp_path / "tiny.gguf"))
    try:
        package(srv, tmp_path, "spin", SPIN)
        pid, children = start_spinning(srv)
        os.kill(pid, signal.SIGTERM)
        # Before, the render held the runner's event loop: SIGTERM did nothing.
        wait_until(lambda: gone(pid), "the runner stopped")
        wait_until(lambda: all(gone(child) for child in children), "its renderer stopped")
        complete(srv, "spin")  # a new runner
    finally:
        srv.stop()


def test_a_runaway_render_ends_with_the_service_that_started_it(tmp_path: Path):
    srv = start_server(tmp_path, write_tiny_gguf(tmp_path / "tiny.gguf"))
    assert srv.proc is not None
    try:
        package(srv, tmp_path, "spin", SPIN)
        pid, children = start_spinning(srv)
        assert children  # the render runs in a process of its own
    finally:
        srv.proc.kill()
        srv.proc.wait()
        srv.sock.unlink(missing_ok=True)
    wait_until(lambda: gone(pid), "the runner stopped")
    wait_until(lambda: all(gone(child) for child in children), "its renderer stopped")
