"""API keys (MODEL_RUNNER_API_KEY, MODEL_RUNNER_API_KEY_FILE): every route but the health
probes asks for one, each API refusing in its own shape, so its SDK reports an authentication
error; runners on the tiny generated GGUF."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anthropic
import ollama
import openai
import pytest
from structlog.testing import capture_logs

from app.api.auth import MESSAGE, warn_if_open
from app.client import Reply
from tests.conftest import REPO, Server, openai_error
from tests.tool_models import ASK, serving

KEYS = ("key-one", "key-two")
FILE_KEY = "key-from-the-file"
WRONG = "not-the-key"


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("api-keys")
    key_file = root / "keys.txt"
    key_file.write_text(f"# the CI's key\n\n  {FILE_KEY}  \n")
    env = {"MODEL_RUNNER_API_KEY": " , ".join(KEYS), "MODEL_RUNNER_API_KEY_FILE": str(key_file)}
    yield from serving(root, {"tiny": None}, **env)


def call(srv: Server, path: str, method: str = "GET", body: bytes | None = None, **headers: str):
    return srv.tcp.request(method, path, body, headers)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def refused(reply: Reply) -> Reply:
    assert reply.status == 401, reply.text
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    return reply


@pytest.mark.parametrize("path", ["/models", "//models", "/exp/vDD4.40/models", "/engines/ps"])
def test_dmr_routes_need_a_key(llm: Server, path: str):
    for headers in ({}, bearer(WRONG), {"x-api-key": WRONG}, {"Authorization": KEYS[0]}):
        reply = refused(call(llm, path, **headers))
        assert reply.headers["Content-Type"].startswith("text/plain") and reply.text == MESSAGE
    for key in (*KEYS, FILE_KEY):
        assert call(llm, path, **bearer(key)).status == 200
    assert call(llm, path, Authorization=f"bearer {KEYS[1]}").status == 200
    assert call(llm, path, **{"x-api-key": FILE_KEY}).status == 200


def test_unknown_paths_and_the_root_need_a_key_too(llm: Server):
    for path in ("/", "/version", "/no/such/route", "/engines/requests"):
        refused(call(llm, path))
    assert call(llm, "/no/such/route", **bearer(KEYS[0])).status == 404
    assert call(llm, "/", **bearer(KEYS[0])).text == "Docker Model Runner is running"


@pytest.mark.parametrize("path", ["/healthz", "//healthz", "/readyz", "/exp/vDD4.40/readyz"])
def test_health_probes_need_none(llm: Server, path: str):
    assert call(llm, path).status == 200


def test_a_browser_preflight_needs_none(llm: Server):
    origin = {"Origin": "http://localhost:3000"}
    preflight = call(llm, "/v1/chat/completions", "OPTIONS", **origin)
    assert preflight.status == 204
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    refused(call(llm, "/v1/models", **origin))
    assert call(llm, "/v1/models", **origin, **bearer(KEYS[0])).status == 200


def test_openai_routes_and_sdk(llm: Server):
    for path in ("/v1/models", "/engines/v1/models", "/engines/llama.cpp/v1/models/tiny"):
        error = openai_error(refused(call(llm, path, **bearer(WRONG))))
        assert (error["code"], error["message"]) == ("invalid_api_key", MESSAGE)
    base = f"{llm.url}/engines/llama.cpp/v1"
    wrong = openai.OpenAI(base_url=base, api_key=WRONG, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model="tiny", messages=ASK, max_tokens=1)
    assert caught.value.code == "invalid_api_key"
    right = openai.OpenAI(base_url=base, api_key=KEYS[1], max_retries=0)
    answer = right.chat.completions.create(model="tiny", messages=ASK, max_tokens=1)
    assert answer.usage is not None and answer.usage.completion_tokens == 1


def test_responses_api(llm: Server):
    error = openai_error(refused(call(llm, "/v1/responses", "POST", b"{}")))
    assert error["code"] == "invalid_api_key"
    base = f"{llm.url}/v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key=WRONG, max_retries=0).responses.create(
            model="tiny", input="hi", max_output_tokens=1
        )
    right = openai.OpenAI(base_url=base, api_key=FILE_KEY, max_retries=0)
    assert right.responses.create(model="tiny", input="hi", max_output_tokens=1).status


def test_anthropic_routes_and_sdk(llm: Server):
    for path in ("/v1/messages", "/anthropic/v1/messages", "/engines/v1/messages/count_tokens"):
        reply = refused(call(llm, path, "POST", b"{}", **{"x-api-key": WRONG}))
        assert json.loads(reply.body) == {
            "type": "error",
            "error": {"type": "authentication_error", "message": MESSAGE},
        }
    for base in (llm.url, llm.url + "/anthropic"):
        wrong = anthropic.Anthropic(base_url=base, api_key=WRONG, max_retries=0)
        with pytest.raises(anthropic.AuthenticationError):
            wrong.messages.create(model="tiny", max_tokens=1, messages=ASK)
        # The SDK's api_key travels as x-api-key, its auth_token as a bearer token.
        for right in (
            anthropic.Anthropic(base_url=base, api_key=KEYS[0], max_retries=0),
            anthropic.Anthropic(base_url=base, auth_token=KEYS[1], max_retries=0),
        ):
            assert right.messages.create(model="tiny", max_tokens=1, messages=ASK).content


def test_ollama_routes_and_client(llm: Server):
    reply = refused(call(llm, "/api/tags"))
    assert reply.headers["Content-Type"].startswith("application/json")
    assert json.loads(reply.body) == {"error": MESSAGE}
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=llm.url, headers=bearer(WRONG)).list()
    assert caught.value.status_code == 401 and MESSAGE in caught.value.error
    listed = ollama.Client(host=llm.url, headers=bearer(FILE_KEY)).list()
    assert len(listed.models) == 1


def test_the_cli_sends_the_key(llm: Server):
    assert "tiny" in llm.cli("ls").stdout  # the service's own keys, from the same environment
    env = {**llm.env, "MODEL_RUNNER_API_KEY": WRONG}
    del env["MODEL_RUNNER_API_KEY_FILE"]
    wrong = subprocess.run(
        [sys.executable, "-m", "app", "ls"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert wrong.returncode == 1 and MESSAGE in wrong.stderr


def test_no_key_is_ever_logged(llm: Server):
    call(llm, "/models", **bearer(WRONG))
    call(llm, "/models", **bearer(KEYS[0]))
    log = llm.log()
    assert "status=401" in log  # the refusals are logged, the keys never
    for key in (*KEYS, FILE_KEY, WRONG):
        assert key not in log


def test_runners_do_not_inherit_the_keys(llm: Server):
    chat = {"model": "tiny", "messages": ASK, "max_tokens": 1}
    assert (
        call(
            llm, "/v1/chat/completions", "POST", json.dumps(chat).encode(), **bearer(KEYS[0])
        ).status
        == 200
    )
    rows = json.loads(call(llm, "/engines/ps", **bearer(KEYS[0])).body)
    pids = [row["pid"] for row in rows if "pid" in row]
    assert pids
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert b"MODEL_RUNNER_API_KEY" not in environ
        assert all(key.encode() not in environ for key in (*KEYS, FILE_KEY))


@pytest.mark.parametrize(
    ("addr", "keys", "warned"),
    [
        ("0.0.0.0", (), True),
        ("::", (), True),
        ("10.1.2.3", (), True),
        ("0.0.0.0", ("k",), False),
        ("127.0.0.1", (), False),
        ("::1", (), False),
        ("localhost", (), False),
    ],
)
def test_an_open_listener_without_a_key_is_warned_of(
    addr: str, keys: tuple[str, ...], warned: bool
):
    with capture_logs() as logs:
        warn_if_open(addr, keys)
    assert [entry["log_level"] for entry in logs] == (["warning"] if warned else [])
    if warned:
        assert "MODEL_RUNNER_API_KEY" in logs[0]["event"]
