"""Anthropic's Messages API, end to end: the official Anthropic SDK against the service, runners
on the tiny generated GGUF (ChatML, and Qwen 2.5's template, which renders tools itself).

The tiny model is random and practically never ends a turn by itself: answers are checked for
their shape, calls only where a grammar forces them (``tool_choice`` any or a named tool), and
stop sequences on a greedy answer that is first generated without them.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import anthropic
import jsonschema
import pytest
from anthropic.types import Message

from app.protocols import anthropic as protocol
from tests.conftest import Server
from tests.tool_models import ASK, MAX_CALL, TEMPLATES, TIME, WEATHER, serving

TOOLS = [
    {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER},
    {
        "name": "get_time",
        "description": "The local time in a time zone",
        "input_schema": TIME,
    },
]
SCHEMAS = {t["name"]: t["input_schema"] for t in TOOLS}
GREEDY = {"temperature": 0}  # the SDK no longer has sampling arguments: sent as extra_body


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models = {"tiny": None, "qwen": TEMPLATES / "qwen2.5.jinja"}
    yield from serving(tmp_path_factory.mktemp("anthropic"), models)


@pytest.fixture(scope="module")
def client(llm: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=llm.url, api_key="unused", max_retries=0)


# DMR documents both: the host itself (then /v1/messages) and its /anthropic prefix.
@pytest.fixture(scope="module", params=["", "/anthropic"])
def any_client(llm: Server, request: pytest.FixtureRequest) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=llm.url + request.param, api_key="x", max_retries=0)


def text_of(message: Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def check_tool_use(message: Message) -> None:
    assert message.stop_reason == "tool_use"
    calls = [b for b in message.content if b.type == "tool_use"]
    assert len(calls) == 1, message.content
    assert calls[0].id.startswith("toolu_") and len(calls[0].id) == len("toolu_") + 24
    jsonschema.validate(calls[0].input, SCHEMAS[calls[0].name])


def test_a_message(any_client: anthropic.Anthropic):
    reply = any_client.messages.create(
        model="tiny", max_tokens=8, system="Answer briefly.", messages=ASK
    )
    assert isinstance(reply, Message)
    assert reply.id.startswith("msg_") and len(reply.id) == len("msg_") + 24
    assert (reply.type, reply.role, reply.model) == (
        "message",
        "assistant",
        "docker.io/ai/tiny:latest",
    )
    assert reply.stop_reason == "max_tokens" and reply.stop_sequence is None
    assert [b.type for b in reply.content] == ["text"] and text_of(reply)
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens == 8


def test_system_blocks_reach_the_prompt(client: anthropic.Anthropic):
    plain = client.messages.create(model="tiny", max_tokens=1, messages=ASK)
    system = [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Be kind."}]
    told = client.messages.create(model="tiny", max_tokens=1, system=system, messages=ASK)
    assert told.usage.input_tokens > plain.usage.input_tokens + 5


def test_a_streamed_message(any_client: anthropic.Anthropic):
    with any_client.messages.stream(model="tiny", max_tokens=12, messages=ASK) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert final.id.startswith("msg_") and final.stop_reason == "max_tokens"
    assert "".join(texts) == text_of(final) and texts
    # message_start knows no input tokens yet; message_delta brings them.
    assert final.usage.input_tokens > 0 and final.usage.output_tokens == 12


def test_the_stream_events_come_in_anthropic_order(client: anthropic.Anthropic):
    events = list(client.messages.create(model="tiny", max_tokens=6, messages=ASK, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds[1:-2] == ["content_block_start"] + ["content_block_delta"] * (len(kinds) - 5) + [
        "content_block_stop"
    ]
    assert events[0].message.content == [] and events[0].message.stop_reason is None
    assert events[1].index == 0 and events[1].content_block.type == "text"
    assert all(e.delta.type == "text_delta" for e in events[2:-3])
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 6


def greedy_text(client: anthropic.Anthropic, **extra: object) -> Message:
    return client.messages.create(
        model="tiny", max_tokens=24, messages=ASK, extra_body=GREEDY, **extra
    )


def test_a_stop_sequence_ends_the_answer_and_is_named(client: anthropic.Anthropic):
    full = text_of(greedy_text(client))
    stop = next(full[i : i + 3] for i in range(4, len(full)) if full[i : i + 3].strip())
    cut = full[: full.find(stop)]
    reply = greedy_text(client, stop_sequences=["never said", stop])
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", stop)
    assert text_of(reply) == cut
    with client.messages.stream(
        model="tiny", max_tokens=24, messages=ASK, stop_sequences=[stop], extra_body=GREEDY
    ) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, text_of(final)) == ("stop_sequence", stop, cut)


def test_a_stop_sequence_not_met_is_no_stop(client: anthropic.Anthropic):
    reply = client.messages.create(
        model="tiny", max_tokens=8, messages=ASK, stop_sequences=["\u2603 snowman \u2603"]
    )
    assert (reply.stop_reason, reply.stop_sequence) == ("max_tokens", None)


def test_max_tokens_is_required(client: anthropic.Anthropic):
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.post("/v1/messages", body={"model": "tiny", "messages": ASK}, cast_to=Message)
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("max_tokens")


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"seed": 4}, "seed"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
        ({"tools": TOOLS, "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content.0.type",
        ),
        ({"messages": [{"role": "system", "content": "hi"}]}, "messages.0.role"),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    client: anthropic.Anthropic, extra: dict, field: str
):
    body = {"model": "tiny", "max_tokens": 4, "messages": ASK, **extra}
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.post("/v1/messages", body=body, cast_to=Message)
    error = caught.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(field + ":"), error


def test_runner_refusals_pass_through(client: anthropic.Anthropic):
    # Two tools of one name: the runner's check, its message as it said it.
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="tiny", max_tokens=4, messages=ASK, tools=TOOLS + TOOLS)
    assert caught.value.body["error"]["message"] == "'tools' names a function twice"  # type: ignore[index]


def test_unknown_model_is_not_found(client: anthropic.Anthropic):
    for stream in (False, True):
        with pytest.raises(anthropic.NotFoundError) as caught:
            client.messages.create(model="nope", max_tokens=4, messages=ASK, stream=stream)
        error = caught.value.body["error"]  # type: ignore[index]
        assert error == {"type": "not_found_error", "message": "model: nope not found"}


def raw_post(llm: Server, path: str, body: bytes) -> tuple[int, str, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", llm.port, timeout=30)
    conn.request("POST", path, body, {"anthropic-version": "2023-06-01", "x-api-key": "k"})
    reply = conn.getresponse()
    return reply.status, reply.getheader("Content-Type") or "", json.loads(reply.read())


def test_errors_are_anthropic_json_on_every_route(llm: Server):
    good = json.dumps({"model": "tiny", "max_tokens": 1, "messages": ASK}).encode()
    for path in ("/anthropic/v1/messages", "/engines/v1/messages/count_tokens"):
        status, kind, body = raw_post(llm, path, b"{not json")
        assert status == 400 and kind.startswith("application/json")
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    status, _, body = raw_post(llm, "/engines/vllm/v1/messages", good)
    assert (status, body["error"]["type"]) == (404, "not_found_error")
    status, _, body = raw_post(llm, "/engines/llama.cpp/v1/messages", good)
    assert status == 200 and body["type"] == "message"
    status, _, body = raw_post(llm, "/exp/vDD4.40/v1/messages/count_tokens", good)
    assert status == 200 and body["input_tokens"] > 0


@pytest.mark.parametrize("model", ["tiny", "qwen"])
def test_a_forced_tool_call(client: anthropic.Anthropic, model: str):
    reply = client.messages.create(
        model=model,
        max_tokens=MAX_CALL,
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "any"},
    )
    check_tool_use(reply)


def test_a_named_tool_call_streamed(client: anthropic.Anthropic):
    request = {
        "model": "tiny",
        "max_tokens": MAX_CALL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    events = list(client.messages.create(**request, stream=True))
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["tool_use"]
    assert starts[0].content_block.name == "get_weather"
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert deltas and all(d.type == "input_json_delta" for d in deltas)
    jsonschema.validate(json.loads("".join(d.partial_json for d in deltas)), WEATHER)
    with client.messages.stream(**request) as stream:
        final = stream.get_final_message()
    check_tool_use(final)


@pytest.mark.parametrize("model", ["tiny", "qwen"])
def test_a_tool_round_trip(client: anthropic.Anthropic, model: str):
    call = client.messages.create(
        model=model, max_tokens=MAX_CALL, messages=ASK, tools=TOOLS, tool_choice={"type": "any"}
    )
    use = next(b for b in call.content if b.type == "tool_use")

    def answer(result: object, is_error: bool = False) -> Message:
        conversation = [
            *ASK,
            {"role": "assistant", "content": call.content},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": use.id,
                        "content": result,
                        "is_error": is_error,
                    },
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ]
        return client.messages.create(model=model, max_tokens=4, messages=conversation, tools=TOOLS)

    long = answer([{"type": "text", "text": "A sunny day, 24 degrees, light wind " * 4}])
    short = answer("sunny", is_error=True)
    assert long.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # The tool's result is in the prompt: a longer result, a longer prompt.
    assert long.usage.input_tokens > short.usage.input_tokens + 20


def test_count_tokens_grows_with_the_prompt(any_client: anthropic.Anthropic):
    def count(**request: object) -> int:
        return any_client.messages.count_tokens(model="tiny", **request).input_tokens  # type: ignore[arg-type]

    short = count(messages=ASK)
    longer = count(messages=[{"role": "user", "content": "What is the weather in Paris? " * 5}])
    with_system = count(messages=ASK, system="You answer questions about the weather.")
    with_tools = count(messages=ASK, tools=TOOLS)
    assert 0 < short < longer and short < with_system and short < with_tools
    # The count is what a message's usage reports for the same prompt.
    reply = any_client.messages.create(model="tiny", max_tokens=1, messages=ASK)
    assert reply.usage.input_tokens == short


def test_a_client_that_leaves_stops_its_answer(llm: Server):
    cancelled = len([ln for ln in llm.log().splitlines() if "reason=cancelled" in ln])
    conn = http.client.HTTPConnection("127.0.0.1", llm.port, timeout=30)
    body = {"model": "tiny", "max_tokens": 2000, "messages": ASK, "stream": True}
    conn.request("POST", "/v1/messages", json.dumps(body))
    reply = conn.getresponse()
    assert reply.status == 200
    assert reply.readline() == b"event: message_start\n"
    conn.close()
    llm.wait_logged("reason=cancelled", cancelled + 1)
    assert "Traceback" not in llm.log()


# The translation itself, without a service: what a runner could send that the tiny model does
# not make it send.


def translated(**body: object) -> protocol.MessagesRequest:
    return protocol.parse_request({"model": "m", "max_tokens": 5, "messages": ASK, **body})


def test_tool_turns_translate_to_chat_messages():
    chat = translated(
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "user", "content": [{"type": "text", "text": "in Paris"}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "P"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "quick!"},
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sun"},
                ],
            },
        ]
    ).chat
    assert chat["messages"] == [
        {"role": "user", "content": "weather?\n\nin Paris"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "w", "arguments": '{"c": "P"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sun"},
        {"role": "user", "content": "quick!"},
    ]


def test_tool_choices_translate():
    tools = [{"name": "w", "input_schema": {"type": "object"}}]
    choices = {
        "auto": "auto",
        "any": "required",
        "none": "none",
    }
    for kind, expected in choices.items():
        assert translated(tools=tools, tool_choice={"type": kind}).chat["tool_choice"] == expected
    named = translated(
        tools=tools, tool_choice={"type": "tool", "name": "w", "disable_parallel_tool_use": True}
    ).chat
    assert named["tool_choice"] == {"type": "function", "function": {"name": "w"}}
    assert named["parallel_tool_calls"] is False


def test_a_runner_error_mid_stream_is_an_error_event():
    stream = protocol.StreamTranslator(translated(stream=True))
    assert [name for name, _ in stream.start()] == ["message_start", "ping"]
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    assert [name for name, _ in stream.feed(chunk)] == [
        "content_block_start",
        "content_block_delta",
    ]
    events = stream.feed({"error": {"code": 500, "message": "boom", "type": "server_error"}})
    assert events == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})
    ]
    assert stream.failed


def test_text_then_calls_make_one_block_each():
    stream = protocol.StreamTranslator(translated(stream=True))
    calls = [
        {"index": i, "id": f"call_{i}", "function": {"name": f"f{i}", "arguments": "{}"}}
        for i in range(2)
    ]
    chunks = [
        {"choices": [{"delta": {"content": "a"}}]},
        {"choices": [{"delta": {"content": "b"}}]},
        {"choices": [{"delta": {"tool_calls": calls}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}},
    ]
    events = [e for chunk in chunks for e in stream.feed(chunk)] + stream.finish()
    summary = [(name, data.get("index")) for name, data in events]
    assert summary == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[-2][1]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2][1]["usage"] == {"input_tokens": 7, "output_tokens": 3}
