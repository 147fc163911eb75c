"""Ollama's API, end to end: Ollama's own Python client against the service, runners on the tiny
generated GGUF (its own ChatML template, and Qwen 2.5's, which renders tools itself).

The tiny model is random: answers are compared with what the OpenAI routes answer for the same
greedy request, and JSON only where a grammar forces it.
"""

from __future__ import annotations

import http.client
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import ollama
import pytest

from app.protocols import ollama as protocol
from app.store import ModelStore
from tests.conftest import Server, new_server
from tests.registry import LocalRegistry
from tests.test_distribution import push_tiny
from tests.test_scheduler import wait_for
from tests.tool_models import TEMPLATES, WEATHER, serving

GREEDY: dict[str, Any] = {"temperature": 0, "num_predict": 8}
SAY = [{"role": "user", "content": "Say something"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serving(
        tmp_path_factory.mktemp("ollama"), {"tiny": None, "qwen": TEMPLATES / "qwen2.5.jinja"}
    )


@pytest.fixture(scope="module")
def client(llm: Server) -> ollama.Client:
    return ollama.Client(host=llm.url)


def openai(llm: Server, route: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = llm.tcp.request("POST", f"/engines/v1/{route}", json.dumps(body).encode())
    assert reply.status == 200, reply.text
    return json.loads(reply.body)


def status_of(call: Any) -> tuple[int, str]:
    with pytest.raises(ollama.ResponseError) as caught:
        call()
    return caught.value.status_code, str(caught.value.error)


# -- listings --------------------------------------------------------------------------------
def test_version(client: ollama.Client, llm: Server):
    reply = llm.tcp.request("GET", "/api/version")
    assert reply.status == 200 and json.loads(reply.body) == {"version": "0.1.0"}


def test_list_shows_every_tag_with_its_size_and_digest(client: ollama.Client, llm: Server):
    store = ModelStore(llm.models_path)
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {"docker.io/ai/tiny:latest", "docker.io/ai/qwen:latest"}
    for name, row in listed.items():
        entry = store.resolve(name)
        assert row.digest == entry.hex
        assert row.size == sum(b.size for b in store.manifest(entry).blobs) > 0
        assert row.details.format == "gguf" and row.details.family == "llama"
        assert row.details.quantization_level and row.details.parameter_size
        assert row.modified_at is not None and row.modified_at.year > 2000


def test_show(client: ollama.Client):
    plain = client.show("tiny")
    assert plain.details.family == "llama"
    assert plain.modelinfo["general.architecture"] == "llama"
    assert isinstance(plain.modelinfo["llama.context_length"], int)
    assert "completion" in plain.capabilities and "tools" not in plain.capabilities
    assert "FROM docker.io/ai/tiny:latest" in plain.modelfile
    qwen = client.show("qwen")
    assert "completion" in qwen.capabilities and "tools" in qwen.capabilities
    assert "tools" in qwen.template  # the template it renders with


def test_unknown_model_is_404_in_ollamas_words(client: ollama.Client):
    for call in (
        lambda: client.show("missing"),
        lambda: client.chat(model="missing", messages=SAY),
        lambda: client.generate(model="missing", prompt="x"),
        lambda: client.embed(model="missing", input="x"),
        lambda: client.delete("missing"),
        lambda: client.copy("missing", "other"),
    ):
        status, error = status_of(call)
        assert status == 404 and error == 'model "missing" not found, try pulling it first'


# -- chat and generate ---------------------------------------------------------------------
def test_chat_answers_as_the_openai_route_does(client: ollama.Client, llm: Server):
    expected = openai(
        llm,
        "chat/completions",
        {"model": "tiny", "messages": SAY, "temperature": 0, "max_tokens": 8},
    )
    whole = client.chat(model="tiny", messages=SAY, options=GREEDY, stream=False)
    assert whole.message.role == "assistant"
    assert whole.message.content == expected["choices"][0]["message"]["content"]
    assert whole.model == "docker.io/ai/tiny:latest"
    assert whole.done and whole.done_reason == "length"
    assert whole.eval_count == 8
    assert whole.prompt_eval_count == expected["usage"]["prompt_tokens"]
    # The timings add up: waiting and loading, reading the prompt, writing the answer.
    assert whole.eval_duration > 0 and whole.prompt_eval_duration > 0
    parts = whole.load_duration + whole.prompt_eval_duration + whole.eval_duration
    assert whole.total_duration == parts


def test_chat_streams_json_lines_by_default(client: ollama.Client, llm: Server):
    whole = client.chat(model="tiny", messages=SAY, options=GREEDY, stream=False)
    parts = list(client.chat(model="tiny", messages=SAY, options=GREEDY, stream=True))
    assert len(parts) > 2 and all(not p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    last = parts[-1]
    assert last.done and last.done_reason == "length" and last.eval_count == 8
    # Without "stream", Ollama streams: one JSON object a line.
    body = json.dumps({"model": "tiny", "messages": SAY, "options": GREEDY}).encode()
    lines = list(llm.tcp.lines("POST", "/api/chat", body))
    assert len(lines) == len(parts)
    assert json.loads(lines[-1])["done"] is True


def test_generate_templates_the_prompt_unless_raw(client: ollama.Client, llm: Server):
    prompt = "Once upon a time"
    raw = client.generate(model="tiny", prompt=prompt, raw=True, options=GREEDY)
    completion = openai(
        llm, "completions", {"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": 8}
    )
    assert raw.response == completion["choices"][0]["text"]
    assert raw.prompt_eval_count == completion["usage"]["prompt_tokens"]
    chat = openai(
        llm,
        "chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": 8,
        },
    )
    templated = client.generate(model="tiny", prompt=prompt, options=GREEDY)
    assert templated.response == chat["choices"][0]["message"]["content"]
    streamed = list(client.generate(model="tiny", prompt=prompt, options=GREEDY, stream=True))
    assert "".join(p.response for p in streamed) == templated.response
    with_system = client.generate(model="tiny", prompt=prompt, system="Be brief.", options=GREEDY)
    assert with_system.prompt_eval_count > templated.prompt_eval_count


def test_options_reach_the_runner(client: ollama.Client):
    stopped = client.generate(
        model="tiny", prompt="Once", raw=True, options={**GREEDY, "num_predict": 40}
    )
    stop = stopped.response[10:14]
    assert stop.strip()
    cut = client.generate(
        model="tiny", prompt="Once", raw=True, options={**GREEDY, "num_predict": 40, "stop": [stop]}
    )
    assert cut.response == stopped.response[: stopped.response.index(stop)]
    assert cut.done_reason == "stop"
    seeded = [
        client.generate(
            model="tiny", prompt="Once", raw=True, options={"seed": 7, "temperature": 1.5}
        ).response
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_format_schema_gives_matching_json(client: ollama.Client):
    reply = client.chat(
        model="tiny", messages=SAY, format=WEATHER, options={"temperature": 0, "num_predict": 300}
    )
    jsonschema.validate(json.loads(reply.message.content), WEATHER)
    # Any JSON object: the random model may write one string for ever; it starts as one.
    as_json = client.generate(
        model="tiny", prompt="x", format="json", options={"temperature": 0, "num_predict": 8}
    )
    assert as_json.response.lstrip().startswith("{")


def test_tool_turns_render(client: ollama.Client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
    answered = [
        *asked,
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_name": "get_weather", "content": "18 degrees and sunny"},
    ]
    first = client.chat(model="qwen", messages=asked, tools=tools, options=GREEDY)
    second = client.chat(model="qwen", messages=answered, tools=tools, options=GREEDY)
    bare = client.chat(model="qwen", messages=asked, options=GREEDY)
    # The tools, then the call and its result, are in the prompt the model read.
    assert first.prompt_eval_count > bare.prompt_eval_count
    assert second.prompt_eval_count > first.prompt_eval_count


def test_bad_requests_are_400_with_a_reason(client: ollama.Client, llm: Server):
    cases = {
        "options.temperature": lambda: client.chat(
            model="tiny", messages=SAY, options={"temperature": "hot"}
        ),
        "top_p": lambda: client.chat(model="tiny", messages=SAY, options={"top_p": 7}),
        "images": lambda: client.chat(
            model="tiny", messages=[{"role": "user", "content": "x", "images": [b"\x89PNG"]}]
        ),
        "thinking": lambda: client.chat(model="tiny", messages=SAY, think=True),
        "keep_alive": lambda: client.chat(model="tiny", messages=SAY, keep_alive="soon"),
    }
    for word, call in cases.items():
        status, error = status_of(call)
        assert status == 400 and word in error, (word, error)
    # What the client itself would refuse to send.
    for body, word in (
        (b"{not json", "JSON"),
        (b'{"model": "tiny", "prompt": "x", "format": "yaml"}', "format"),
        (b'{"model": "tiny", "prompt": "x", "stream": "yes"}', "stream"),
    ):
        reply = llm.tcp.request("POST", "/api/generate", body)
        assert reply.status == 400 and word in json.loads(reply.body)["error"]


def test_a_client_that_leaves_stops_its_answer(llm: Server):
    cancelled = len([ln for ln in llm.log().splitlines() if "reason=cancelled" in ln])
    conn = http.client.HTTPConnection("127.0.0.1", llm.port, timeout=30)
    body = {"model": "tiny", "messages": SAY, "options": {"num_predict": 2000}}
    conn.request("POST", "/api/chat", json.dumps(body))
    reply = conn.getresponse()
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/x-ndjson"
    assert json.loads(reply.readline())["done"] is False
    conn.close()
    llm.wait_logged("reason=cancelled", cancelled + 1)
    assert "Traceback" not in llm.log()


def test_shutdown_ends_a_stream_with_an_error_line(tmp_path: Path, tiny_gguf: Path):
    srv = new_server(tmp_path, MODEL_RUNNER_SHUTDOWN_TIMEOUT="0.5s")
    srv.start()
    try:
        srv.cli("package", "--gguf", str(tiny_gguf), "--store", "tiny")
        assert srv.proc is not None
        parts = ollama.Client(host=srv.url).chat(
            model="tiny", messages=SAY, options={"num_predict": 20_000}, stream=True
        )
        with pytest.raises(ollama.ResponseError) as caught:
            for n, _ in enumerate(parts):
                if n == 5:  # once the answer is under way
                    srv.proc.send_signal(signal.SIGTERM)
        assert "shutting down" in str(caught.value.error)
        assert srv.proc.wait(timeout=20) == 0
        assert "Traceback" not in srv.log()
    finally:
        srv.discard()


# -- embeddings ------------------------------------------------------------------------------
def test_embed_matches_the_openai_route(client: ollama.Client, llm: Server):
    texts = ["hello there", "general kenobi"]
    embedded = client.embed(model="tiny", input=texts)
    expected = openai(llm, "embeddings", {"model": "tiny", "input": texts})
    assert embedded.embeddings == [d["embedding"] for d in expected["data"]]
    assert embedded.prompt_eval_count == expected["usage"]["prompt_tokens"]
    legacy = client.embeddings(model="tiny", prompt=texts[0])
    assert list(legacy.embedding) == embedded.embeddings[0]
    assert client.embed(model="tiny", input=[]).embeddings == []


# -- runners ---------------------------------------------------------------------------------
def pids(llm: Server) -> list[int]:
    return [row["pid"] for row in json.loads(llm.tcp.request("GET", "/engines/ps").body)]


def expires_in(client: ollama.Client) -> float:
    (row,) = client.ps().models
    return row.expires_at.timestamp() - time.time()


def test_no_prompt_loads_and_keep_alive_zero_unloads(client: ollama.Client, llm: Server):
    for model in ("tiny", "qwen"):  # whatever earlier tests left
        client.generate(model=model, keep_alive=0)
    assert client.ps().models == []
    loaded = client.generate(model="tiny", keep_alive="10m")
    assert loaded.done and loaded.done_reason == "load"
    (row,) = client.ps().models
    assert row.model == "docker.io/ai/tiny:latest" and row.size > 0 and row.size_vram == 0
    assert row.context_length > 0 and row.details.family == "llama"
    assert 8 * 60 < expires_in(client) <= 10 * 60  # keep_alive counted from the last use
    forever = client.chat(model="tiny", messages=[], keep_alive=-1)
    assert forever.done_reason == "load"
    (row,) = client.ps().models
    assert row.expires_at.year == 1  # never (Go's zero time, as DMR writes it)
    unloaded = client.chat(model="tiny", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []


def test_keep_alive_holds_for_its_request_only(client: ollama.Client, llm: Server):
    client.chat(model="tiny", messages=SAY, options=GREEDY)
    runner = pids(llm)
    assert 4 * 60 < expires_in(client) <= 5 * 60  # the default, MODEL_RUNNER_KEEP_ALIVE
    client.chat(model="tiny", messages=SAY, options=GREEDY, keep_alive="1h")
    assert 59 * 60 < expires_in(client) <= 60 * 60
    client.chat(model="tiny", messages=SAY, options=GREEDY)  # none: the model's own again
    assert 4 * 60 < expires_in(client) <= 5 * 60
    client.chat(model="tiny", messages=SAY, options=GREEDY, keep_alive="100000000h")
    (row,) = client.ps().models  # beyond any calendar: never, not an error
    assert row.expires_at.year == 1
    assert pids(llm) == runner  # none of it restarted the runner
    client.generate(model="tiny", prompt="x", options=GREEDY, keep_alive=0)
    wait_for("the runner to go once its request ended", lambda: client.ps().models == [])


def test_copy_and_delete(client: ollama.Client):
    assert client.copy("tiny", "team/tiny:v2").status == "success"
    names = {m.model for m in client.list().models}
    assert "docker.io/team/tiny:v2" in names
    again = client.chat(model="team/tiny:v2", messages=SAY, options=GREEDY)
    assert again.model == "docker.io/ai/tiny:latest"  # one model, its one name
    assert client.delete("team/tiny:v2").status == "success"
    assert "docker.io/team/tiny:v2" not in {m.model for m in client.list().models}
    status, _ = status_of(lambda: client.delete("team/tiny:v2"))
    assert status == 404
    status, error = status_of(lambda: client.copy("tiny", ""))
    assert status == 400 and "destination" in error


def test_pull_and_push_stream_ollamas_progress(
    server: Server, registry: LocalRegistry, tiny_gguf: Path
):
    ref = push_tiny(server, tiny_gguf, f"{registry.host}/org/tiny:v1")
    client = ollama.Client(host=server.url)
    lines = list(client.pull(ref, stream=True))
    statuses = [line.status for line in lines]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    layers = [line for line in lines if line.digest]
    assert layers and all(line.status == f"pulling {line.digest[7:19]}" for line in layers)
    finals: dict[str, Any] = {line.digest: line for line in layers}
    assert all(line.completed == line.total > 0 for line in finals.values())
    assert ref in {m.model for m in client.list().models}
    assert client.pull(ref, stream=False).status == "success"  # already there
    status, error = status_of(lambda: client.pull(f"{registry.host}/org/nothing:v1"))
    assert status == 404 and error

    target = f"{registry.host}/team/copy:v2"
    client.copy(ref, target)
    pushed = list(client.push(target, stream=True))
    statuses = [line.status for line in pushed]
    assert statuses[0] == "retrieving manifest" and statuses[-2:] == ["pushing manifest", "success"]
    assert any(line.digest and line.status == f"pushing {line.digest[7:19]}" for line in pushed)
    client.delete(target)
    assert client.pull(target, stream=False).status == "success"  # it reached the registry
    status, error = status_of(lambda: client.push(f"{registry.host}/team/none:v1"))
    assert status == 404 and "not found" in error


# -- translation -----------------------------------------------------------------------------
def test_a_runners_tool_call_becomes_ollamas():
    asked = protocol.parse_chat({"model": "m", "messages": SAY, "tools": []})
    answer = protocol.Answer(asked)
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    chunks = [
        {"model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]},
        {"model": "m", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"model": "m", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 9}},
    ]
    streamed = [line for chunk in chunks for line in answer.feed(chunk)]
    (line,) = streamed
    expected = {
        "id": "call_1",
        "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}},
    }
    assert line["message"]["tool_calls"] == [expected] and line["done"] is False
    whole = answer.whole()
    assert whole["message"]["tool_calls"] == [expected]
    assert (whole["done_reason"], whole["prompt_eval_count"], whole["eval_count"]) == ("stop", 5, 9)
    ollama.ChatResponse(**whole)  # the client reads it


def test_an_earlier_tool_call_and_its_result_become_openais():
    asked = protocol.parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                    ],
                },
                {"role": "tool", "tool_name": "get_weather", "content": "sunny"},
            ],
        }
    )
    assert asked.body is not None
    _, assistant, result = asked.body["messages"]
    (call,) = assistant["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert result == {
        "role": "tool",
        "content": "sunny",
        "name": "get_weather",
        "tool_call_id": call["id"],
    }


def test_tool_results_answer_the_oldest_open_call_of_their_tool():
    call = {"function": {"name": "w", "arguments": {}}}
    asked = protocol.parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather in Paris and London, then the time?"},
                {"role": "assistant", "tool_calls": [call, call]},
                {"role": "tool", "tool_name": "w", "content": "Paris: sunny"},
                {"role": "tool", "tool_name": "w", "content": "London: rain"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "t"}}]},
                {"role": "tool", "tool_name": "t", "content": "noon"},
            ],
        }
    )
    assert asked.body is not None
    turns = asked.body["messages"]
    made = [c["id"] for turn in turns for c in turn.get("tool_calls", [])]
    assert len(set(made)) == 3
    answered = [turn["tool_call_id"] for turn in turns if turn["role"] == "tool"]
    assert answered == made


def test_odd_field_types_are_400_not_500():
    for message in (
        {"role": "tool", "content": "x", "tool_name": {"a": 1}},
        {"role": "tool", "content": "x", "tool_call_id": ["x"]},
        {"role": "assistant", "tool_calls": [{"id": {"x": 1}, "function": {"name": "w"}}]},
        {"role": "user", "content": ["x"]},
    ):
        with pytest.raises(protocol.InvalidRequest):
            protocol.parse_chat({"model": "m", "messages": [message]})
    # null is "not set", as Ollama (Go) reads it.
    assert protocol.parse_chat({"model": "m", "messages": SAY, "stream": None}).stream


def test_model_info_keeps_what_json_cannot_hold_as_text():
    info = protocol.model_info({"a": "12", "b": "1.5e3", "c": "nan", "d": "inf", "e": "1_0"})
    assert info == {"a": 12, "b": 1500.0, "c": "nan", "d": "inf", "e": "1_0"}
    json.dumps(info, allow_nan=False)
