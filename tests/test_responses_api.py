"""OpenAI's Responses API: the official SDK against the service, runners on the tiny generated
GGUF; and the store and the stream translator on their own.

The tiny model is random: the tests check shapes, token counts and grammar-forced tool calls,
never what it writes.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from app.protocols.responses import Turn, parse_request
from app.protocols.responses_stream import ResponseStream
from app.service.responses import ResponseStore
from tests.conftest import Server, new_server
from tests.tool_models import MAX_CALL, WEATHER, serving

MODEL = "tiny"
TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather forecast for a city",
        "parameters": WEATHER,
        "strict": True,
    }
]
PREFIXES = [
    "/responses",
    "/v1/responses",
    "/engines/responses",
    "/engines/v1/responses",
    "/engines/llama.cpp/v1/responses",
    "/exp/vDD4.40/v1/responses",
]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serving(tmp_path_factory.mktemp("responses"), {MODEL: None})


@pytest.fixture(scope="module")
def client(llm: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llm.url}/v1", api_key="unused", max_retries=0)


def check_shape(response: Any) -> None:
    assert response.object == "response"
    assert response.id.startswith("resp_") and len(response.id) == len("resp_") + 24
    assert response.model == "docker.io/ai/tiny:latest" and response.error is None
    assert response.status in ("completed", "incomplete")
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert response.output


def test_string_input(client: openai.OpenAI):
    response = client.responses.create(model=MODEL, input="Hello there", max_output_tokens=8)
    check_shape(response)
    assert response.usage.output_tokens <= 8
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.status == response.status
    assert [part.type for part in message.content] == ["output_text"]
    assert message.content[0].annotations == []
    assert response.output_text == message.content[0].text
    # What the SDK reads back from the request.
    assert response.max_output_tokens == 8 and response.store is True
    assert response.truncation == "disabled" and response.tools == []
    assert response.tool_choice == "auto" and response.parallel_tool_calls is True
    assert response.text.format.type == "text" and response.instructions is None


def test_message_items_and_instructions(client: openai.OpenAI):
    items: list[Any] = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello! How can I help?"}],
        },
        {"role": "user", "content": "Tell me about the sea."},
    ]
    plain = client.responses.create(model=MODEL, input=items, max_output_tokens=4)
    instructed = client.responses.create(
        model=MODEL, input=items, instructions="You are a pirate.", max_output_tokens=4
    )
    check_shape(plain)
    check_shape(instructed)
    assert instructed.instructions == "You are a pirate."
    assert instructed.usage.input_tokens > plain.usage.input_tokens + 3


def test_streamed(client: openai.OpenAI):
    events = list(
        client.responses.create(model=MODEL, input="Hi", max_output_tokens=16, stream=True)
    )
    types = [e.type for e in events]
    final = events[-1].response
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    deltas = types[4 : types.index("response.output_text.done")]
    assert set(deltas) == {"response.output_text.delta"}
    assert types[4 + len(deltas) :] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete" if final.status == "incomplete" else "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    check_shape(final)
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == events[types.index("response.output_text.done")].text
    item_id = final.output[0].id
    assert all(e.item_id == item_id for e in events if e.type == "response.output_text.delta")
    # Kept, as a whole answer is.
    assert client.responses.retrieve(final.id).output_text == text


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI):
    first = client.responses.create(
        model=MODEL, input="Tell me a story", instructions="Be kind.", max_output_tokens=8
    )
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, input="And then?", max_output_tokens=8
    )
    check_shape(second)
    assert second.previous_response_id == first.id
    # The first's input and answer are in the prompt (its instructions are not carried over).
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 8
    third = list(
        client.responses.create(
            model=MODEL,
            previous_response_id=second.id,
            input="The end.",
            max_output_tokens=4,
            stream=True,
        )
    )[-1].response
    assert third.usage.input_tokens > second.usage.input_tokens


def test_store_false_is_not_kept(client: openai.OpenAI):
    response = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=2)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, previous_response_id=response.id, input="More")
    assert caught.value.body["param"] == "previous_response_id"
    assert caught.value.body["message"] == f"Previous response with id '{response.id}' not found."


def test_get_input_items_and_delete(client: openai.OpenAI):
    items: list[Any] = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    response = client.responses.create(model=MODEL, input=items, max_output_tokens=2)
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()

    listed = client.responses.input_items.list(response.id)
    assert [item.role for item in listed.data] == ["user", "assistant", "user"]  # newest first
    assert [item.content[0].text for item in listed.data] == ["three", "two", "one"]
    assert listed.first_id == listed.data[0].id and listed.last_id == listed.data[-1].id
    assert listed.has_more is False
    ascending = client.responses.input_items.list(response.id, order="asc")
    assert [item.id for item in ascending.data] == [item.id for item in reversed(listed.data)]
    # Page by page (the SDK follows `after` while `has_more`).
    paged = list(client.responses.input_items.list(response.id, limit=1, order="asc"))
    assert [item.id for item in paged] == [item.id for item in ascending.data]

    deleted = client.responses.delete(response.id)
    assert deleted is None  # the SDK returns nothing; the raw body is checked below
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)


def test_delete_body(llm: Server, client: openai.OpenAI):
    response = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1)
    reply = llm.tcp.request("DELETE", f"/engines/v1/responses/{response.id}")
    assert reply.status == 200
    assert json.loads(reply.body) == {
        "id": response.id,
        "object": "response.deleted",
        "deleted": True,
    }


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"truncation": "auto"}, "truncation"),
        ({"background": True}, "background"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"prompt": {"id": "pmpt_123"}}, "prompt"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"safety_identifier": "user-1"}, "safety_identifier"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": TOOLS}, "tool_choice"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        ({"input": None}, "input"),
        ({"model": ""}, "model"),
        # The runner's refusal, in the Responses API's terms.
        (
            {
                "text": {
                    "format": {"type": "json_schema", "name": "x", "schema": {"maxLength": 10**6}}
                }
            },
            "text.format",
        ),
    ],
)
def test_refused_parameters_are_400_naming_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str
):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/responses", body=body, cast_to=object)
    error = caught.value.body
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_unknown_model_is_not_found(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="no-such-model", input="Hi")
    assert caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model"


def test_errors_are_openai_json(llm: Server):
    cases = [
        ("POST", "/v1/responses", b"{not json"),
        ("POST", "/v1/responses", b"[]"),
        ("GET", "/responses/resp_nope", None),
        ("GET", "/engines/responses/resp_nope/input_items", None),
        ("DELETE", "/engines/v1/responses/resp_nope", None),
        ("GET", "/engines/vllm/v1/responses/resp_nope", None),
        ("POST", "/engines/vllm/v1/responses", b'{"model": "tiny", "input": "Hi"}'),
    ]
    for method, path, body in cases:
        reply = llm.tcp.request(method, path, body)
        assert reply.status in (400, 404), (path, reply.text)
        assert reply.headers["Content-Type"].startswith("application/json"), path
        error = json.loads(reply.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, path
        assert error["type"] == "invalid_request_error"
    assert "Traceback" not in llm.log()


def test_every_prefix_serves(llm: Server):
    for prefix in PREFIXES:
        body = {"model": MODEL, "input": "Hi", "max_output_tokens": 1}
        reply = llm.tcp.request("POST", prefix, json.dumps(body).encode())
        assert reply.status == 200, (prefix, reply.text)
        response_id = json.loads(reply.body)["id"]
        stored = llm.tcp.request("GET", f"{prefix}/{response_id}")
        assert json.loads(stored.body)["id"] == response_id


def check_call(item: Any) -> None:
    assert item.type == "function_call" and item.name == "get_weather"
    assert item.id.startswith("fc_") and item.call_id.startswith("call_")
    assert item.status == "completed"
    jsonschema.validate(json.loads(item.arguments), WEATHER)


def test_required_tool_call_and_its_output(client: openai.OpenAI):
    question = "What is the weather in Paris?"
    response = client.responses.create(
        model=MODEL,
        input=question,
        tools=TOOLS,
        tool_choice="required",
        max_output_tokens=MAX_CALL,
    )
    assert response.status == "completed"
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and response.output == calls
    check_call(calls[0])
    assert response.tool_choice == "required" and response.tools[0].name == "get_weather"
    result = {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny."}

    chained = client.responses.create(
        model=MODEL,
        previous_response_id=response.id,
        input=[result],
        tools=TOOLS,
        max_output_tokens=4,
    )
    check_shape(chained)
    assert chained.usage.input_tokens > response.usage.input_tokens
    # Stateless, as SDK users send it: the answer's items back, then the result.
    stateless = client.responses.create(
        model=MODEL,
        input=[{"role": "user", "content": question}, *response.output, result],
        tools=TOOLS,
        store=False,
        max_output_tokens=4,
    )
    check_shape(stateless)
    assert stateless.usage.input_tokens == chained.usage.input_tokens


def test_named_tool_call_streamed(client: openai.OpenAI):
    events = list(
        client.responses.create(
            model=MODEL,
            input="Weather in Oslo?",
            tools=TOOLS,
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=MAX_CALL,
            stream=True,
        )
    )
    types = [e.type for e in events]
    assert types[2] == "response.output_item.added" and events[2].item.type == "function_call"
    assert types[-4:] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1].response
    [call] = final.output
    check_call(call)
    assert events[-3].arguments == call.arguments == events[-4].delta
    assert events[-2].item.id == call.id


def test_client_leaving_a_stream_stops_its_runner_request(llm: Server, client: openai.OpenAI):
    with client.responses.create(
        model=MODEL, input="Talk for ever", max_output_tokens=20_000, stream=True
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                break
    # The runner's line and the front's access line arrive in either order.
    llm.wait_logged("reason=cancelled")
    llm.wait_logged("status=499")
    log = llm.log()
    assert "Traceback" not in log and "stream cut short" not in log
    check_shape(client.responses.create(model=MODEL, input="Hi", max_output_tokens=2))


def test_shutdown_ends_a_stream_with_response_failed(tmp_path: Path, tiny_gguf: Path):
    srv = new_server(tmp_path, MODEL_RUNNER_SHUTDOWN_TIMEOUT="0.5s")
    srv.start()
    try:
        srv.cli("package", "--gguf", str(tiny_gguf), "--store", MODEL)
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        assert srv.proc is not None
        events = []
        stream = client.responses.create(
            model=MODEL, input="Talk for ever", max_output_tokens=20_000, stream=True
        )
        for event in stream:
            events.append(event)
            if event.type == "response.output_text.delta" and len(events) == 5:
                srv.proc.send_signal(signal.SIGTERM)  # once the answer is under way
        assert [e.type for e in events[-2:]] == ["error", "response.failed"]
        assert "shutting down" in events[-2].message
        assert events[-1].response.status == "failed" and events[-1].response.output
        assert srv.proc.wait(timeout=20) == 0
        assert "Traceback" not in srv.log()
    finally:
        srv.discard()


# The store and the stream translator alone ------------------------------------------------


def turn(**fields: Any) -> Turn:
    return Turn(parse_request({"model": MODEL, "input": "Hi", **fields}))


def answer(text: str, finish: str = "stop") -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    usage = {"prompt_tokens": 5, "completion_tokens": 2}
    return {"choices": [{"message": message, "finish_reason": finish}], "usage": usage}


def test_store_expires_and_drops_the_oldest():
    now = [0.0]
    store = ResponseStore(ttl_s=10, max_count=3, clock=lambda: now[0])
    saved = []
    for _ in range(4):
        t = turn()
        saved.append(t.id)
        store.save(t, t.from_chat(answer("ok")))
        now[0] += 1
    assert store.get(saved[0]) is None and len(store) == 3  # over the count: the oldest went
    now[0] = 11.5  # the second was saved at 1 s: expired; the third (2 s) not yet
    assert store.get(saved[1]) is None and store.get(saved[2]) is not None
    now[0] = 100
    assert len(store) == 0


def test_store_is_bounded_in_text():
    store = ResponseStore(max_chars=10_000)
    kept = []
    for _ in range(5):
        t = turn(input="x" * 3000)
        store.save(t, t.from_chat(answer("ok")))
        kept.append(t.id)
    assert [store.get(i) is not None for i in kept] == [False, False, True, True, True]


def test_chained_conversation():
    store = ResponseStore()
    first = turn(instructions="Be terse.")
    store.save(first, first.from_chat(answer("Hello")))
    second = Turn(
        parse_request({"model": MODEL, "input": "More", "previous_response_id": first.id}),
        list(store.get(first.id).conversation),  # type: ignore[union-attr]
    )
    assert second.chat_request()["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "More"},
    ]


def test_stream_of_text_then_calls_in_pieces():
    stream = ResponseStream(turn(tools=TOOLS))
    chunks: list[dict[str, Any]] = [
        {"choices": [{"delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"delta": {"content": "Let me look."}}]},
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "id": "call_a", "function": {"name": "get_weather"}}
                        ]
                    }
                }
            ]
        },
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]},
        {
            "choices": [
                {
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 1,
                                "id": "call_b",
                                "function": {"name": "get_weather", "arguments": "{}"},
                            }
                        ]
                    }
                }
            ]
        },
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
    ]
    events = stream.start()
    for chunk in chunks:
        events += stream.feed(chunk)
    events += stream.finish()
    added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
    assert added == ["message", "function_call", "function_call"]
    final = events[-1]
    assert final["type"] == "response.completed"
    output = final["response"]["output"]
    assert output[0]["content"][0]["text"] == "Let me look."
    assert [(o["call_id"], o["arguments"]) for o in output[1:]] == [
        ("call_a", "{}"),
        ("call_b", "{}"),
    ]
    assert final["response"]["usage"]["total_tokens"] == 13
    # Each item closes before the next opens.
    kinds = [e["type"] for e in events if e["type"].startswith("response.output_item")]
    assert kinds == ["response.output_item.added", "response.output_item.done"] * 3


def test_stream_error_chunk_fails_the_response():
    stream = ResponseStream(turn())
    events = stream.start() + stream.feed({"choices": [{"delta": {"content": "Hi"}}]})
    events += stream.feed({"error": {"code": 500, "message": "decode failed"}})
    assert stream.failed
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2]["message"] == "decode failed"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "decode failed"
