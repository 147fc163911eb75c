"""Bad input gets DMR's plain-text answer with the right status: never a traceback, never a 500."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Server, openai_error

TEXT = "text/plain; charset=utf-8"


def assert_plain(reply, status: int, body: str) -> None:
    assert reply.status == status, reply.text
    assert reply.headers["Content-Type"] == TEXT
    assert reply.headers["X-Content-Type-Options"] == "nosniff"
    assert reply.body.decode() == body + "\n"


@pytest.mark.parametrize(
    "path",
    [
        "/models/../../etc/passwd",
        "/models/%2e%2e/%2e%2e/etc/passwd",
        "/models/ai%2f..%2f..%2fsecret",
        "/models/ai/..",
        "/models/model%00name",
        "/models/bad name",
        "/models/ai/x:bad:tag",
    ],
)
def test_hostile_names_are_rejected(server: Server, path: str):
    reply = server.tcp.request("GET", path.replace(" ", "%20"))
    assert reply.status == 400, (path, reply.status, reply.text)
    assert reply.headers["Content-Type"] == TEXT
    assert reply.text.startswith("Invalid model reference")
    reply = server.tcp.request("DELETE", path.replace(" ", "%20"))
    assert reply.status == 400, (path, reply.status, reply.text)
    # Nothing outside the store was looked at or touched; the store still answers.
    assert server.tcp.request("GET", "/models").status == 200


def test_traversal_in_tag_target_is_rejected(server: Server, tiny_gguf: Path):
    server.cli("package", "--gguf", str(tiny_gguf), "--load", "tiny")
    reply = server.tcp.request("POST", "/models/tiny/tag?repo=../../etc&tag=x")
    assert reply.status == 400
    assert reply.text.startswith("Invalid model reference")


def test_unknown_model_is_404_text(server: Server):
    assert_plain(server.tcp.request("GET", "/models/ai/nothere"), 404, "model not found")
    assert_plain(
        server.tcp.request("DELETE", "/models/ai/nothere"),
        404,
        "error while deleting model: model not found",
    )


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/nope", "404 page not found"),
        ("/exp/vDD4.40/nope", "404 page not found"),
        ("/engines/nope", "not found"),
        ("/modelsx", "404 page not found"),
    ],
)
def test_unknown_routes_are_404(server: Server, path: str, body: str):
    assert_plain(server.tcp.request("GET", path), 404, body)


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/models"), ("PATCH", "/models/ai/x"), ("POST", "/"), ("GET", "/models/load")],
)
def test_wrong_methods_are_405_with_allow(server: Server, method: str, path: str):
    reply = server.tcp.request(method, path)
    if (method, path) == ("GET", "/models/load"):
        # GET /models/{name} matches: "load" is just a model name that is not there.
        assert reply.status == 404
        return
    assert_plain(reply, 405, "Method Not Allowed")
    assert reply.headers["Allow"]


def test_pull_body_errors(server: Server):
    assert_plain(
        server.tcp.request("POST", "/models/create", b"{not json"), 400, "invalid request body"
    )
    assert_plain(
        server.tcp.request("POST", "/models/create", b"{}"), 400, "Invalid model reference"
    )
    reply = server.tcp.request("POST", "/models/create", json.dumps({"from": "Bad..Ref"}).encode())
    assert_plain(reply, 400, "Invalid model reference")


@pytest.mark.parametrize(
    "body",
    [b"[" * 100_000, b'{"a":' * 100_000, b'{"from": ' + b"1" * 5000 + b"}"],
    ids=["deep-array", "deep-object", "huge-int"],
)
def test_bodies_json_cannot_parse_are_400(server: Server, body: bytes):
    for path in ("/models/create", "/models/x/push"):
        assert_plain(server.tcp.request("POST", path, body), 400, "invalid request body")
    for path in ("/engines/unload", "/engines/_configure"):
        assert_plain(server.tcp.request("POST", path, body), 400, "invalid request")
    reply = server.tcp.request("POST", "/v1/chat/completions", body)
    assert reply.status == 400 and openai_error(reply)["message"] == "invalid request"


def test_body_over_the_cap_is_400(server: Server):
    big = b'{"from": "' + b"a" * (11 * 1024 * 1024) + b'"}'
    assert_plain(server.tcp.request("POST", "/models/create", big), 400, "request too large")
    assert server.tcp.request("GET", "/").status == 200


def test_head_is_answered_like_get(server: Server):
    reply = server.tcp.request("HEAD", "/models")
    assert reply.status == 200 and reply.body == b""
    assert server.tcp.request("HEAD", "/models/ai/nothere").status == 404


def test_double_slashes_are_cleaned_and_served_in_place(server: Server):
    # DMR cleans such paths and routes them; no redirect a client would have to follow.
    assert server.tcp.request("GET", "//models").status == 200
    reply = server.tcp.request("POST", "//models//create", b'{"from": "Bad..Ref"}')
    assert (reply.status, reply.text) == (400, "Invalid model reference")
    assert_plain(server.tcp.request("GET", "/models//etc/passwd"), 404, "model not found")
