"""Browser origins (spec 1.4): pages from elsewhere cannot drive the API; localhost's can."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Server


def test_foreign_origin_is_refused(server: Server):
    reply = server.tcp.request("GET", "/models", headers={"Origin": "http://evil.example"})
    assert (reply.status, reply.text) == (403, "Origin not allowed")
    body = json.dumps({"from": "ai/x"}).encode()
    reply = server.tcp.request(
        "POST",
        "/models/create",
        body,
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
    )
    assert reply.status == 403
    # DMR leaves "/" and "/version" unguarded.
    assert server.tcp.request("GET", "/", headers={"Origin": "http://evil.example"}).status == 200


@pytest.mark.parametrize(
    "origin",
    ["http://localhost", "https://127.0.0.1", "http://localhost:3000", "http://0.0.0.0:8080"],
)
def test_local_origins_are_allowed(server: Server, origin: str):
    reply = server.tcp.request("GET", "/models", headers={"Origin": origin})
    assert reply.status == 200
    assert reply.headers["Access-Control-Allow-Origin"] == origin
    preflight = server.tcp.request("OPTIONS", "/models/create", headers={"Origin": origin})
    assert preflight.status == 204
    assert preflight.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE"
    assert preflight.headers["Access-Control-Allow-Credentials"] == "true"


def test_extra_origins_from_dmr_origins(server: Server, tiny_gguf: Path):
    server.stop()
    server.extra_env["DMR_ORIGINS"] = "https://app.example.com, http://tools.example:*"
    server.start()
    for origin in ("https://app.example.com", "http://tools.example:9000"):
        reply = server.tcp.request("GET", "/v1/models", headers={"Origin": origin})
        assert reply.status == 200 and reply.headers["Access-Control-Allow-Origin"] == origin
    assert (
        server.tcp.request("GET", "/v1/models", headers={"Origin": "https://x.example"}).status
        == 403
    )
    # Streamed answers carry the header too.
    reply = server.tcp.request(
        "POST",
        "/models/create",
        b'{"from": "127.0.0.1:1/none:v1"}',
        {"Origin": "https://app.example.com"},
    )
    assert reply.headers.get("Access-Control-Allow-Origin") == "https://app.example.com"


HOSTILE = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
# Every route family, spelled as the router cleans it ("//", "/./", "..") or not at all.
GUARDED_SPELLINGS = [
    ("POST", "//models/create"),
    ("POST", "/models//create"),
    ("POST", "/./models/create"),
    ("POST", "/v1/../models/create"),
    ("POST", "/version//../models/create"),
    ("POST", "//models/tiny/tag?repo=evil/x&tag=v1"),
    ("POST", "//models/tiny/push"),
    ("POST", "//models/load"),
    ("DELETE", "//models/tiny"),
    ("DELETE", "//models/purge"),
    ("GET", "/exp/vDD4.40//models"),
    ("POST", "//v1/chat/completions"),
    ("POST", "/engines/llama.cpp//v1/completions"),
    ("POST", "//engines/unload"),
    ("POST", "//engines/_configure"),
    ("GET", "//engines/ps"),
    ("GET", "//v1/models"),
    ("POST", "//anthropic/v1/messages"),
    ("POST", "/v1//messages/count_tokens"),
    ("POST", "//v1/responses"),
    ("GET", "/engines/v1//responses/resp_x"),
    ("DELETE", "//responses/resp_x"),
    ("POST", "/no/such/route"),
]


def test_every_spelling_of_a_guarded_route_is_refused(server: Server, tiny_gguf: Path):
    server.cli("package", "--gguf", str(tiny_gguf), "--load", "tiny")
    body = json.dumps({"from": "127.0.0.1:1/evil:v1", "model": "tiny", "all": True}).encode()
    for method, path in GUARDED_SPELLINGS:
        reply = server.tcp.request(method, path, body, HOSTILE)
        assert (reply.status, reply.text) == (403, "Origin not allowed"), (method, path)
    # Nothing happened: the model is still there, under its own name only, and nothing loaded.
    models = json.loads(server.tcp.request("GET", "/models").body)
    assert [m["tags"] for m in models] == [["docker.io/ai/tiny:latest"]]
    assert json.loads(server.tcp.request("GET", "/engines/ps").body) == []


def test_public_answers_stay_public_but_only_for_reading(server: Server):
    for path in ("/", "/version", "/healthz", "//healthz", "/exp/vDD4.40/version"):
        assert server.tcp.request("GET", path, headers=HOSTILE).status == 200, path
    assert server.tcp.request("POST", "/version", b"", HOSTILE).status == 403
