"""Inference end to end: the official OpenAI SDK against the service, runners on a tiny
generated GGUF (F32, deterministic), continuous batching, cancellation, crashes."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import signal
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.conftest import Server, new_server, openai_error
from tests.tiny_gguf import _vocab, write_tiny_gguf


def start_server(root: Path, gguf: Path, **env: str) -> Server:
    srv = new_server(root, **env)
    srv.start()
    srv.cli("package", "--gguf", str(gguf), "--load", "tiny")
    return srv


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("llm")
    srv = start_server(root, write_tiny_gguf(root / "tiny.gguf"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(llm: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llm.url}/engines/llama.cpp/v1", api_key="unused")


def greedy(client: openai.OpenAI, prompt: str, n: int = 24, **kw: object) -> str:
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, **kw)
    return out.choices[0].text


def test_sdk_chat_stream_completions_embeddings_models(client: openai.OpenAI):
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 5 and chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 5

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content  # same greedy answer, streamed
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5

    comp = client.completions.create(model="tiny", prompt="the model", max_tokens=4)
    assert comp.object == "text_completion" and comp.usage.completion_tokens == 4

    emb = client.embeddings.create(model="tiny", input=["hello world", "the test"])
    assert [d.index for d in emb.data] == [0, 1]
    vec = emb.data[0].embedding
    assert len(vec) == 64 and abs(sum(x * x for x in vec) - 1.0) < 1e-5  # L2-normalized
    assert emb.usage.prompt_tokens > 0
    b64 = client.embeddings.create(model="tiny", input="hello world", encoding_format="base64")
    raw = base64.b64decode(b64.data[0].embedding)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vec, abs=1e-6)

    listed = [m.id for m in client.models.list().data]
    assert listed == ["docker.io/ai/tiny:latest"]


def test_sse_is_openai_byte_format(llm: Server):
    body = json.dumps(
        {"model": "tiny", "prompt": "hello", "max_tokens": 2, "stream": True}
    ).encode()
    reply = llm.tcp.request("POST", "/v1/completions", body)
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    events = reply.body.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: {")
        assert json.loads(event[6:])["object"] == "text_completion"


def test_parameters_change_the_output(client: openai.OpenAI):
    base = greedy(client, "hello world")
    assert greedy(client, "hello world") == base  # temperature 0 is deterministic

    def sampled(seed: int) -> str:
        out = client.completions.create(
            model="tiny",
            prompt="hello world",
            max_tokens=24,
            temperature=1.5,
            top_p=1.0,
            seed=seed,
            extra_body={"top_k": 0, "min_p": 0.0},
        )
        return out.choices[0].text

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)

    # stop: the text ends right before the stop string, also when it spans tokens
    stop = base[5:9]
    cut = client.completions.create(
        model="tiny", prompt="hello world", max_tokens=24, temperature=0, stop=[stop, "zzzz"]
    )
    assert cut.choices[0].text == base[: base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    # logit_bias: forbidding the first greedy token changes the first token
    first = greedy(client, "hello world", 1)
    tokens, _, _ = _vocab()
    ids = [i for i, piece in enumerate(tokens) if piece.replace("\u2581", " ") == first]
    assert ids
    biased = greedy(client, "hello world", 1, logit_bias={str(i): -100 for i in ids})
    assert biased and biased != first
    # ...and a strong positive bias makes a token the greedy choice
    word = tokens.index("\u2581model")
    forced = greedy(client, "hello world", 3, logit_bias={str(word): 100})
    assert forced == " model model model"

    # penalties make the greedy text repeat itself less
    long = greedy(client, "hello world", 120)
    penalized = greedy(client, "hello world", 120, frequency_penalty=2.0, presence_penalty=2.0)
    assert penalized != long
    repeat = greedy(client, "hello world", 120, extra_body={"repeat_penalty": 1.5})
    assert repeat != long


def test_json_schema_output_parses_and_validates(client: openai.OpenAI):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "give me a number"}],
        max_tokens=64,
        temperature=0.7,
        seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    doc = json.loads(out.choices[0].message.content)
    assert set(doc) == {"answer"} and isinstance(doc["answer"], int)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"n": 2}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"stop": 5}, "stop"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"messages": "hi"}, "messages"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(llm: Server, body: dict, field: str):
    full = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}
    reply = llm.tcp.request("POST", "/v1/chat/completions", json.dumps(full).encode())
    assert reply.status == 400, reply.text
    error = json.loads(reply.body)["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"


def test_prompt_longer_than_the_context_is_400_with_numbers(llm: Server):
    body = {"model": "tiny", "prompt": "hello " * 3000, "max_tokens": 1}
    reply = llm.tcp.request("POST", "/v1/completions", json.dumps(body).encode())
    assert reply.status == 400
    message = json.loads(reply.body)["error"]["message"]
    size = re.search(r"the prompt is (\d+) tokens", message)
    assert size and int(size.group(1)) > 3000 and "context size of 2048 tokens" in message


def test_front_errors_are_openai_json(llm: Server, client: openai.OpenAI):
    cases = [
        ("/v1/chat/completions", b"{nope", 400, "invalid request"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "model is required"),
        ("/engines/vllm/v1/chat/completions", b'{"model": "tiny"}', 404, "backend not found"),
        (
            "/v1/chat/completions",
            b'{"model": "ai/absent"}',
            404,
            "error while getting model: get model '\"ai/absent\"': model not found",
        ),
    ]
    for path, body, status, text in cases:
        reply = llm.tcp.request("POST", path, body)
        assert (reply.status, openai_error(reply)["message"]) == (status, text), path
    big = b'{"model": "tiny", "prompt": "' + b"x" * (11 * 1024 * 1024) + b'"}'
    reply = llm.tcp.request("POST", "/v1/completions", big)
    assert (reply.status, openai_error(reply)["code"]) == (413, "request_too_large")
    # The SDKs show the reason, not only the status.
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="ai/absent", messages=[{"role": "user", "content": "x"}]
        )
    assert "model not found" in str(caught.value) and caught.value.code == "model_not_found"
    # DMR's own routes keep DMR's plain text.
    reply = llm.tcp.request("GET", "/models/ai/absent")
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_eight_concurrent_streams_finish_with_exact_usage(client: openai.OpenAI):
    def stream(i: int) -> tuple[str, int]:
        chunks = list(
            client.completions.create(
                model="tiny",
                prompt=f"hello {i}",
                max_tokens=40,
                temperature=0.9,
                seed=i,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[
            -1
        ].usage.completion_tokens

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(stream, range(8)))
    assert all(used == 40 and text for text, used in results)


def test_batched_output_equals_sequential_output(client: openai.OpenAI):
    prompts = [
        "hello world",
        "the model is",
        "what is the test",
        "I have a",
        "yes no ok",
        "The What",
        "it was one",
        "how are you",
    ]
    sequential = [greedy(client, p, 32) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(lambda p: greedy(client, p, 32), prompts))
    assert batched == sequential


def test_greedy_and_sampled_requests_batched_match_sequential(client: openai.OpenAI):
    # Plain greedy sequences take their argmax from the step's logits rows; sampled ones go
    # through llama.cpp's chains, on several threads. Mixed in one batch, each must still read
    # its own row, and a seeded chain give what it gives alone.
    prompts = ["hello world", "the model is", "what is the test", "I have a"]

    def sampled(i: int) -> str:
        out = client.completions.create(
            model="tiny", prompt=f"yes no {i}", max_tokens=32, temperature=0.9, seed=i
        )
        return out.choices[0].text

    sequential = [greedy(client, p, 32) for p in prompts]
    sequential_sampled = [sampled(i) for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        batched_sampled = [pool.submit(sampled, i) for i in range(4)]
        batched = list(pool.map(lambda p: greedy(client, p, 32), prompts))
        assert [f.result() for f in batched_sampled] == sequential_sampled
    assert batched == sequential


def test_a_repeated_prompt_reuses_the_cache_and_answers_the_same(client: openai.OpenAI):
    prompt = "the model is what the test is " * 4
    first = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
    assert again.choices[0].text == first.choices[0].text
    assert first.usage is not None and again.usage is not None
    details = again.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens == again.usage.prompt_tokens - 1


def test_artifact_chat_template_is_used(llm: Server, tmp_path: Path):
    gguf = write_tiny_gguf(tmp_path / "t.gguf", seed=5)
    template = tmp_path / "t.jinja"
    template.write_text("{{ raise_exception('the artifact template was used') }}")
    llm.cli("package", "--gguf", str(gguf), "--chat-template", str(template), "--load", "templated")
    body = {"model": "templated", "messages": [{"role": "user", "content": "hi"}]}
    reply = llm.tcp.request("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert reply.status == 400
    assert json.loads(reply.body)["error"]["message"] == "the artifact template was used"


def test_client_gone_frees_the_slot(tmp_path: Path):
    gguf = write_tiny_gguf(tmp_path / "t.gguf")
    srv = start_server(tmp_path, gguf, MODEL_RUNNER_PARALLEL="1")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2000, "stream": True})
        conn.request("POST", "/v1/completions", body)
        resp = conn.getresponse()
        resp.readline()  # the first chunk: generation is under way
        conn.close()
        # With one slot, this request can only run once the abandoned one has stopped.
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        assert greedy(client, "the test", 4)
        done = srv.wait_logged("reason=cancelled")
        generated = int(done[0].split("completion_tokens=")[1].split()[0].strip("'\""))
        assert generated < 2000
        assert "Traceback" not in srv.log()  # a client leaving is no error of the service
    finally:
        srv.stop()


def test_a_request_cancelled_while_it_waits_for_a_slot_is_logged(tmp_path: Path):
    srv = start_server(tmp_path, write_tiny_gguf(tmp_path / "t.gguf"), MODEL_RUNNER_PARALLEL="1")
    try:
        waiting = "a prompt of its own length, which waits for the one slot"
        asked = {"model": "tiny", "prompt": waiting, "max_tokens": 1}
        reply = srv.tcp.checked("POST", "/v1/completions", json.dumps(asked).encode())
        prompt_tokens = json.loads(reply.body)["usage"]["prompt_tokens"]
        streams = []
        for prompt in ("hello", waiting):  # the first takes the slot, the second waits
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 20_000, "stream": True}
            conn.request("POST", "/v1/completions", json.dumps(body))
            assert conn.getresponse().status == 200
            streams.append(conn)
        streams[1].close()
        srv.wait_logged(f"reason=cancelled prompt_tokens={prompt_tokens} ")
        streams[0].close()
    finally:
        srv.stop()


def test_killed_runner_fails_its_request_and_restarts(tmp_path: Path):
    gguf = write_tiny_gguf(tmp_path / "t.gguf")
    srv = start_server(tmp_path, gguf)
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        assert greedy(client, "warm up", 2)
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2000, "stream": True})
        conn.request("POST", "/v1/completions", body)
        resp = conn.getresponse()
        resp.readline()
        pid = next(
            int(ln.split("pid=")[1].split()[0])
            for ln in srv.log().splitlines()
            if "runner ready" in ln
        )
        os.kill(pid, signal.SIGKILL)
        rest = resp.read().decode(errors="replace")
        assert '"error"' in rest and "[DONE]" not in rest
        assert "the model runner failed: it was killed by SIGKILL" in rest
        conn.close()
        assert greedy(client, "after the crash", 3)  # a new runner serves the next request
    finally:
        srv.stop()


def test_corrupt_gguf_is_a_clear_500_and_the_service_lives_on(tmp_path: Path):
    import hashlib
    import io
    import tarfile

    srv = start_server(tmp_path, write_tiny_gguf(tmp_path / "ok.gguf"))
    try:
        junk = b"GGUF" + os.urandom(4096)
        config = json.dumps({"config": {"format": "gguf"}}).encode()

        def desc(data: bytes, media: str) -> dict[str, object]:
            return {
                "mediaType": media,
                "size": len(data),
                "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
            }

        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "config": desc(config, "application/vnd.docker.ai.model.config.v0.1+json"),
                "layers": [desc(junk, "application/vnd.docker.ai.gguf.v3")],
            }
        ).encode()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in [
                (f"blobs/sha256/{hashlib.sha256(junk).hexdigest()}", junk),
                (f"blobs/sha256/{hashlib.sha256(config).hexdigest()}", config),
                ("manifest.json", manifest),
            ]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        assert srv.tcp.request("POST", "/models/load", buf.getvalue()).status == 200
        model_id = "sha256:" + hashlib.sha256(manifest).hexdigest()
        body = json.dumps({"model": model_id, "prompt": "hi"}).encode()
        reply = srv.tcp.request("POST", "/v1/completions", body)
        assert reply.status == 500
        # Caught before a runner starts: the GGUF's header does not parse.
        message = openai_error(reply)["message"]
        assert message.startswith("unable to load runner: failed to load model")
        assert "is not a usable GGUF" in message
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        assert greedy(client, "still alive", 2)
    finally:
        srv.stop()


def test_logprobs_chat_completions_and_stream(client: openai.OpenAI):
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 6
    assert "".join(e.token for e in content) == chat.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0])  # greedy picks the most likely token
        assert bytes(entry.bytes).decode() == entry.token

    text = client.completions.create(
        model="tiny", prompt="the model", max_tokens=5, temperature=0, logprobs=2
    )
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == text.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) == 2 for top in lp.top_logprobs)

    streamed = [
        e
        for chunk in client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6,
            temperature=0,
            logprobs=True,
            stream=True,
        )
        if chunk.choices and chunk.choices[0].logprobs
        for e in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    # The second request may reuse the first one's cached prompt and compute its logits in a
    # batch of another shape: float32 sums in another order differ by ~1e-4 (seen: 7.7e-5).
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-3)


def test_json_object_output_parses(client: openai.OpenAI):
    out = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "json please"}],
        max_tokens=300,
        temperature=0,
        extra_body={"top_k": 1},
        response_format={"type": "json_object"},
        logit_bias={str(_vocab()[0].index("}")): 15},  # let the random model close its object
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_embedding_inputs_and_dimensions(llm: Server):
    def embed(body: dict) -> tuple[int, dict]:
        reply = llm.tcp.request(
            "POST", "/v1/embeddings", json.dumps({"model": "tiny", **body}).encode()
        )
        return reply.status, json.loads(reply.body)

    status, by_text = embed({"input": "hello world"})
    assert status == 200
    tokens, _, _ = _vocab()
    ids = [1, tokens.index("\u2581hello"), tokens.index("\u2581world")]
    status, by_ids = embed({"input": ids})
    assert status == 200
    assert by_ids["data"][0]["embedding"] == pytest.approx(
        by_text["data"][0]["embedding"], abs=1e-5
    )
    status, error = embed({"input": "x", "dimensions": 32})
    assert status == 400 and error["error"]["param"] == "dimensions"
    status, error = embed({"input": 42})
    assert status == 400 and error["error"]["param"] == "input"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/completions", {"prompt": [1, 99999]}, "prompt"),
        ("/v1/completions", {"prompt": [-1]}, "prompt"),
        ("/v1/embeddings", {"input": [[1, 99999]]}, "input"),
        ("/v1/completions", {"prompt": "x", "repeat_penalty": 0}, "repeat_penalty"),
        (
            "/v1/completions",
            {
                "prompt": "x",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "string", "pattern": "^a{0,30000}$"}},
                },
            },
            "response_format",
        ),
    ],
)
def test_hostile_inputs_are_400_and_the_runner_survives(
    llm: Server, client: openai.OpenAI, path: str, body: dict, field: str
):
    reply = llm.tcp.request("POST", path, json.dumps({"model": "tiny", **body}).encode())
    assert reply.status == 400, reply.text
    assert json.loads(reply.body)["error"]["param"] == field
    assert greedy(client, "still here", 2)


def test_grammar_with_every_allowed_token_banned_does_not_crash(llm: Server, client: openai.OpenAI):
    tokens, _, _ = _vocab()
    banned = {str(i): -100 for i, t in enumerate(tokens) if "{" in t}
    body = {
        "model": "tiny",
        "prompt": "json",
        "max_tokens": 8,
        "response_format": {"type": "json_object"},
        "logit_bias": banned,
    }
    reply = llm.tcp.request("POST", "/v1/completions", json.dumps(body).encode())
    assert reply.status == 200, reply.text
    assert greedy(client, "still here", 2)


def test_deeply_nested_json_is_400(llm: Server):
    body = b"[" * 50000 + b"]" * 50000
    reply = llm.tcp.request("POST", "/v1/completions", body)
    assert reply.status == 400 and openai_error(reply)["message"] == "invalid request"


def test_preload_only_loads_without_generating(tmp_path: Path):
    srv = start_server(tmp_path, write_tiny_gguf(tmp_path / "t.gguf"))
    try:
        body = json.dumps({"model": "tiny", "messages": []}).encode()
        reply = srv.tcp.request(
            "POST", "/engines/v1/chat/completions", body, {"X-Preload-Only": "true"}
        )
        assert (reply.status, reply.body) == (200, b"")
        assert "runner ready" in srv.log()
        assert "request done" not in srv.log()
    finally:
        srv.stop()


def test_half_a_surrogate_pair_is_replaced_not_a_500(llm: Server):
    # Valid JSON that no UTF-8 text can hold: replaced by U+FFFD, as Go's decoder does in DMR.
    body = (
        b'{"model": "tiny", "max_tokens": 2, '
        b'"messages": [{"role": "user", "content": "a\\ud800b"}]}'
    )
    reply = llm.tcp.request("POST", "/v1/chat/completions", body)
    assert reply.status == 200, reply.text
    body = b'{"model": "tiny", "max_tokens": 2, "prompt": "\\udc00", "stop": ["\\ud83d"]}'
    assert llm.tcp.request("POST", "/v1/completions", body).status == 200


def test_every_answer_carries_its_request_id_streamed_too(llm: Server, client: openai.OpenAI):
    stream = client.completions.create(model="tiny", prompt="hi", max_tokens=2, stream=True)
    assert len(stream.response.headers["x-request-id"]) == 16
    list(stream)
    conn = http.client.HTTPConnection("127.0.0.1", llm.port, timeout=30)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"X-Request-Id": "mine-42"})
    reply = conn.getresponse()
    assert reply.getheader("X-Request-Id") == "mine-42"
    reply.read()
    conn.close()
