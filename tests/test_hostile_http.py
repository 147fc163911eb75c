"""Clients that hold connections without sending requests: they are let go of in time, and the
service keeps answering everyone else."""

from __future__ import annotations

import logging
import socket
import time

import pytest

from app.client import ClientError
from app.logging import RepeatFilter
from tests.conftest import Server


@pytest.fixture
def strict(server: Server) -> Server:
    server.stop()
    server.extra_env["MODEL_RUNNER_REQUEST_TIMEOUT"] = "2s"
    server.start()
    return server


def connect(srv: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_connection_that_never_finishes_its_headers_is_closed(strict: Server):
    sock = connect(strict)
    sock.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    assert read_until_closed(sock) == b""  # the service hung up; recv returned EOF
    assert strict.tcp.request("GET", "/models").status == 200


def test_a_body_that_never_arrives_is_408(strict: Server):
    sock = connect(strict)
    sock.sendall(
        b"POST /engines/unload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"all":'
    )
    reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"MODEL_RUNNER_REQUEST_TIMEOUT" in reply
    sock.close()


def test_hundreds_of_silent_connections_do_not_block_others(strict: Server):
    silent = [connect(strict) for _ in range(300)]
    assert strict.tcp.request("GET", "/engines/status").status == 200
    for sock in silent:
        assert read_until_closed(sock) == b""  # each one let go of by the service
        sock.close()
    assert "Traceback" not in strict.log()


def test_repeated_library_warnings_are_logged_once_with_a_count():
    records = []
    flood = RepeatFilter(window_s=10)
    for i in range(5):
        record = logging.LogRecord("asyncio", logging.ERROR, "", 0, "accept failed", (), None)
        record.created = 100.0 + i
        if flood.filter(record):
            records.append(record.getMessage())
    later = logging.LogRecord("asyncio", logging.ERROR, "", 0, "accept failed", (), None)
    later.created = 111.0
    assert flood.filter(later)
    assert records == ["accept failed"]
    assert later.getMessage() == "accept failed (and 4 more like it in the last 10 s)"


def test_connections_past_the_cap_are_closed_and_others_still_served(server: Server):
    server.stop()
    server.extra_env["MODEL_RUNNER_MAX_CONNECTIONS"] = "20"
    server.start()
    silent = [connect(server) for _ in range(20)]
    extra = connect(server)
    extra.sendall(b"GET /models HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        answer = read_until_closed(extra)
    except ConnectionResetError:
        answer = b""
    assert answer == b""  # refused: reset or closed, and no answer
    for sock in silent:
        sock.close()
    # Room again once the service has seen those connections close.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert server.tcp.request("GET", "/models").status == 200
            break
        except ClientError:
            assert time.monotonic() < deadline, "no room after the idle clients left"
    assert "too many connections" in server.log() and "Traceback" not in server.log()
