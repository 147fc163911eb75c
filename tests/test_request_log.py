"""``GET /engines/requests`` (spec 6.2): the service's record of recent inference requests,
against a real service and runners on the tiny generated GGUF; and the recorder on its own."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import anthropic
import ollama
import openai
import pytest

from app.protocols.openai_stream import StreamAssembler
from app.service.recorder import MAX_RECORDS, SUBSCRIBER_BACKLOG, Record, Recorder
from tests.conftest import Server, new_server
from tests.test_scheduler import wait_for
from tests.tool_models import ASK, serving

AGENT = "request-log-test/1.0"


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("request-log")
    served = serving(root, {"tiny": None})
    srv = next(served)
    # The same weights under another configuration: another model ID, records of its own.
    gguf = str(root / "tiny.gguf")
    srv.cli("package", "--gguf", gguf, "--context-size", "512", "--store", "other")
    yield srv
    served.close()


@pytest.fixture(scope="module")
def client(llm: Server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{llm.url}/engines/llama.cpp/v1",
        api_key="unused",
        max_retries=0,
        default_headers={"User-Agent": AGENT},
    )


def records(srv: Server, model: str = "tiny") -> dict[str, Any]:
    reply = srv.tcp.request("GET", f"/engines/requests?model={model}")
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
    (entry,) = json.loads(reply.body)
    assert entry["count"] == len(entry["records"])
    return entry


def model_id(srv: Server, model: str) -> str:
    return json.loads(srv.tcp.request("GET", f"/models/{model}").body)["id"]


def test_openai_calls_are_recorded_streams_reassembled(llm: Server, client: openai.OpenAI):
    ask = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
    whole = client.chat.completions.create(**ask, temperature=0)
    chunks = list(
        client.chat.completions.create(
            **ask, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    completion = client.completions.create(
        model="tiny", prompt="the model", max_tokens=4, temperature=0, stream=True
    )
    completed = "".join(c.choices[0].text for c in completion)
    client.embeddings.create(model="tiny", input="hello world")

    entry = records(llm)
    assert entry["model"] == model_id(llm, "tiny") and entry["config"] == {}
    chat, chat_stream, comp, emb = entry["records"][-4:]
    for record, route in zip(
        (chat, chat_stream, comp, emb),
        ("chat/completions", "chat/completions", "completions", "embeddings"),
        strict=True,
    ):
        assert record["url"] == f"/engines/llama.cpp/v1/{route}"
        assert (record["method"], record["status_code"], record["model"]) == ("POST", 200, "tiny")
        assert record["user_agent"] == AGENT and "origin" not in record and "error" not in record
        assert record["id"].startswith(entry["model"] + "_")
        assert json.loads(record["request"])["model"] == "tiny"

    assert json.loads(chat["request"])["messages"] == ask["messages"]
    answer = json.loads(chat["response"])
    assert (answer["id"], answer["choices"][0]["message"]["content"]) == (
        whole.id,
        whole.choices[0].message.content,
    )
    # The stream as one chat.completion: what it said, how it ended, its usage.
    answer = json.loads(chat_stream["response"])
    assert answer["object"] == "chat.completion" and answer["id"] == chunks[0].id
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": streamed}
    assert streamed == whole.choices[0].message.content
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 5
    answer = json.loads(comp["response"])
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["text"] == completed and completed
    assert answer["choices"][0]["finish_reason"] == "length"
    assert json.loads(emb["response"])["data"][0]["object"] == "embedding"


def test_translated_requests_name_their_origin(llm: Server):
    claude = anthropic.Anthropic(base_url=llm.url, api_key="unused", max_retries=0)
    message = claude.messages.create(model="tiny", max_tokens=3, messages=ASK)
    record = records(llm)["records"][-1]
    assert (record["origin"], record["status_code"]) == ("anthropic/messages", 200)
    # Recorded as the chat completion it became, at the route DMR's proxy would send it to.
    assert record["url"] == "/engines/v1/chat/completions"
    assert json.loads(record["request"])["messages"][-1]["content"] == ASK[0]["content"]
    answer = json.loads(record["response"])
    assert answer["choices"][0]["message"]["content"] == message.content[0].text

    responses = openai.OpenAI(base_url=f"{llm.url}/v1", api_key="unused", max_retries=0)
    responses.responses.create(model="tiny", input="hello", max_output_tokens=3)
    assert records(llm)["records"][-1]["origin"] == "openai/responses"

    llama = ollama.Client(host=llm.url)
    said = llama.chat(model="tiny", messages=ASK, options={"num_predict": 3}, stream=True)
    text = "".join(part.message.content for part in said)
    record = records(llm)["records"][-1]
    assert (record["origin"], record["url"]) == (
        "ollama/completion",
        "/engines/v1/chat/completions",
    )
    answer = json.loads(record["response"])
    assert answer["choices"][0]["message"]["content"] == text


def test_at_most_ten_records_a_model(llm: Server):
    prompts = [f"prompt number {i}" for i in range(MAX_RECORDS + 1)]
    for prompt in prompts:
        body = {"model": "other", "prompt": prompt, "max_tokens": 1}
        assert llm.tcp.request("POST", "/v1/completions", json.dumps(body).encode()).status == 200
    entry = records(llm, "other")
    assert entry["count"] == MAX_RECORDS
    assert [json.loads(r["request"])["prompt"] for r in entry["records"]] == prompts[1:]
    assert [r["url"] for r in entry["records"]] == ["/v1/completions"] * MAX_RECORDS


def test_model_filter_and_dropped_with_the_runner(llm: Server):
    body = {"model": "other", "prompt": "hi", "max_tokens": 1}
    llm.tcp.request("POST", "/v1/completions", json.dumps(body).encode())
    everything = json.loads(llm.tcp.request("GET", "/engines/requests").body)
    assert {e["model"] for e in everything} >= {model_id(llm, "tiny"), model_id(llm, "other")}
    # Any spelling of the model; its records only.
    (entry,) = json.loads(llm.tcp.request("GET", "/engines/requests?model=ai/other").body)
    assert entry["model"] == model_id(llm, "other")

    # A model it does not know has no records: an empty list, as DMR answers.
    for unknown in ("nothing-here", "Not A Reference"):
        missing = llm.tcp.request("GET", f"/engines/requests?model={quote(unknown)}")
        assert (missing.status, json.loads(missing.body)) == (200, [])

    reply = llm.tcp.request("POST", "/engines/unload", json.dumps({"models": ["other"]}).encode())
    assert json.loads(reply.body) == {"unloaded_runners": 1}
    assert json.loads(llm.tcp.request("GET", "/engines/requests?model=other").body) == []


def test_media_data_is_cut_short(llm: Server, client: openai.OpenAI):
    image = "data:image/png;base64," + "A" * 5000
    audio = "B" * 3000
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
    ]
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=1
    )
    recorded = json.loads(records(llm)["records"][-1]["request"])
    text, shown, heard = recorded["messages"][0]["content"]
    assert text == content[0]
    assert shown["image_url"]["url"] == (
        "data:image/png;base64," + "A" * 100 + "...[truncated 4900 chars]"
    )
    cut = "B" * 100 + "...[truncated 2900 chars]"
    assert heard["input_audio"] == {"data": cut, "format": "wav"}


def test_a_request_is_listed_while_it_is_answered(llm: Server, client: openai.OpenAI):
    ask = [{"role": "user", "content": "in flight"}]
    with client.chat.completions.create(
        model="tiny", messages=ask, max_tokens=20_000, stream=True
    ) as stream:
        next(iter(stream))
        record = records(llm)["records"][-1]
        # As DMR lists it: no status, no answer yet.
        assert json.loads(record["request"])["messages"] == ask
        assert record["status_code"] == 0 and "response" not in record and "error" not in record
    # The client left: the same record, answered as far as it went.
    wait_for("the answer to be recorded", lambda: records(llm)["records"][-1]["status_code"] == 200)
    answered = records(llm)["records"][-1]
    assert answered["id"] == record["id"]
    assert json.loads(answered["response"])["object"] == "chat.completion"


def test_a_refused_request_is_recorded_with_its_error(llm: Server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    reply = llm.tcp.request("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert reply.status == 400
    record = records(llm)["records"][-1]
    assert record["status_code"] == 400 and "response" not in record
    assert json.loads(record["error"]) == json.loads(reply.body)


async def _events(response: aiohttp.ClientResponse) -> Any:
    """The stream's events as (name, data), one at a time."""
    while block := await response.content.readuntil(b"\n\n"):
        name, data = block.decode().strip().split("\n")
        yield name.removeprefix("event: "), json.loads(data.removeprefix("data: "))


def test_following_the_records(llm: Server):
    async def follow() -> None:
        existing = records(llm)["records"]
        async with aiohttp.ClientSession(llm.url) as session:
            url = "/engines/requests?model=tiny&include_existing=true"
            async with session.get(url, headers={"Accept": "text/event-stream"}) as response:
                assert response.headers["Content-Type"] == "text/event-stream"
                events = _events(response)
                assert await anext(events) == ("connected", {"status": "connected"})
                for record in existing:
                    name, data = await anext(events)
                    assert name == "existing_request" and data[0]["records"] == [record]
                body = {"model": "tiny", "prompt": "followed", "max_tokens": 1}
                async with session.post("/v1/completions", json=body) as done:
                    assert done.status == 200
                name, data = await anext(events)
                (entry,) = data
                assert name == "new_request" and entry["count"] == 1
                assert entry["model"] == model_id(llm, "tiny")
                assert json.loads(entry["records"][0]["request"])["prompt"] == "followed"

    asyncio.run(follow())


def test_followers_end_cleanly_at_shutdown(tmp_path: Path):
    srv = new_server(tmp_path)
    srv.start()

    async def follow() -> bytes:
        headers = {"Accept": "text/event-stream"}
        async with (
            aiohttp.ClientSession(srv.url, headers=headers) as session,
            session.get("/engines/requests") as response,
        ):
            first = await response.content.readuntil(b"\n\n")
            await asyncio.to_thread(srv.stop)
            return first + await response.content.read()  # a clean end, not a cut transfer

    assert asyncio.run(follow()) == b'event: connected\ndata: {"status": "connected"}\n\n'
    # Ended when shutdown began, not cut when the drain's time ran out.
    assert "cutting requests still in flight" not in srv.log()
    srv.sock.unlink(missing_ok=True)


# -- the recorder and the stream assembler on their own --------------------------------------
def _record(n: int) -> Record:
    return Record(f"m_{n}", "m", "POST", "/v1/x", str(n), "", "", 0, 200, "", "")


def test_a_follower_that_falls_behind_is_let_go():
    async def run() -> None:
        recorder = Recorder()
        slow, other = recorder.subscribe(None), recorder.subscribe("elsewhere")
        for n in range(SUBSCRIBER_BACKLOG + 5):
            recorder.begin("m", {}, dataclasses.replace(_record(n), status_code=0))
            recorder.answer("m", {}, _record(n))
        got = [await slow.next() for _ in range(SUBSCRIBER_BACKLOG)]
        assert [e[0]["records"][0]["request"] for e in got] == [
            str(n) for n in range(SUBSCRIBER_BACKLOG)
        ]
        assert await slow.next() is None  # let go, not grown
        recorder.close()
        assert await other.next() is None  # another model's follower heard nothing, then ended
        kept = recorder.listing()[0]["records"]
        assert [r["status_code"] for r in kept] == [200] * MAX_RECORDS

    asyncio.run(run())


def test_the_assembler_caps_text_and_keeps_tool_calls():
    chunks = [
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"delta": {"content": "ab"}}]},
        {"id": "c", "choices": [{"delta": {"content": "cdef"}}]},
        {
            "id": "c",
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}
                        ]
                    },
                    "finish_reason": "tool_calls",
                }
            ],
        },
        {"id": "c", "choices": [], "usage": {"total_tokens": 3}},
    ]
    raw = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks)
    assembler = StreamAssembler(limit=4)
    for i in range(0, len(raw), 5):  # any chunking
        assembler.feed(raw[i : i + 5])
    assembler.feed(b"data: [DONE]\n\n")
    whole = assembler.result()
    assert whole is not None and whole["object"] == "chat.completion"
    (choice,) = whole["choices"]
    assert choice["message"]["content"] == "abcd...[truncated]"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert choice["finish_reason"] == "tool_calls" and whole["usage"] == {"total_tokens": 3}


def _chunks(*parts: bytes) -> Any:
    async def gen() -> Any:
        for part in parts:
            yield part

    return gen()


def test_a_request_cut_short_is_recorded_as_far_as_it_went():
    async def run() -> list[dict[str, Any]]:
        recorder = Recorder()
        follower = recorder.subscribe(None)
        doc = {"model": "m", "messages": [], "stream": True}
        body = json.dumps(doc).encode()
        # Cancelled before the runner answered: DMR's 408.
        with (
            pytest.raises(asyncio.CancelledError),
            recorder.recording("m", "m", "x", body, doc, {}),
        ):
            raise asyncio.CancelledError
        # The client left mid-stream: what it was sent is kept, as one answer.
        chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "hal"}}]}
        with (
            pytest.raises(ConnectionResetError),
            recorder.recording("m", "m", "x", body, doc, {}) as recording,
        ):
            async for _ in recording.watch(
                200, True, _chunks(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            ):
                raise ConnectionResetError
        # A large request with media: re-encoded off the loop, recorded once it is.
        image = {"type": "image_url", "image_url": {"url": "x" * 200_000}}
        doc = {"model": "m", "messages": [{"role": "user", "content": [image]}]}
        with recorder.recording("m", "m", "x", json.dumps(doc).encode(), doc, {}) as recording:
            async for _ in recording.watch(500, False, _chunks(b"oops")):
                pass
        events = [await follower.next() for _ in range(3)]
        return [event[0]["records"][0] for event in events if event]

    cancelled, left, large = asyncio.run(run())
    assert (cancelled["status_code"], "response" not in cancelled) == (408, True)
    assert "error" in json.loads(cancelled["error"])
    assert left["status_code"] == 200 and "error" not in left
    assert json.loads(left["response"])["choices"][0]["message"]["content"] == "hal"
    assert large["status_code"] == 500 and json.loads(large["error"]) == {"error": "oops"}
    url = json.loads(large["request"])["messages"][0]["content"][0]["image_url"]["url"]
    assert url == "x" * 100 + "...[truncated 199900 chars]"
