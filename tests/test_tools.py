"""Tool calling on chat completions, end to end: the official OpenAI SDK against the service,
runners on the tiny generated GGUF with the chat templates of each family as template layers.

The tiny model is random: it calls a tool only when a grammar makes it (``tool_choice``
"required" or a named function), so those are what the calls are checked on; the parsing of
what real models write is tested on canned outputs (tests/test_tool_calls.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.conftest import Server
from tests.tool_models import ASK, MAX_CALL, TEMPLATES, TIME, WEATHER, serving

GEMMA = Path(__file__).parent.parent / "app" / "assets" / "gemma3-chat-template.jinja"
# name -> chat template: none (the GGUF's ChatML, no tools), Gemma 3's (no tools), and three
# that render tools themselves.
FAMILIES = {
    "chatml": None,
    "gemma": GEMMA,
    "qwen": TEMPLATES / "qwen2.5.jinja",
    "llama": TEMPLATES / "llama3.1.jinja",
    "mistral": TEMPLATES / "mistral.jinja",
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather forecast for a city",
            "parameters": WEATHER,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a time zone",
            "parameters": TIME,
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serving(tmp_path_factory.mktemp("tools"), FAMILIES)


@pytest.fixture(scope="module")
def client(llm: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{llm.url}/engines/v1", api_key="unused")


def check_call(name: str, arguments: str) -> dict[str, object]:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


NAMED = {"type": "function", "function": {"name": "get_time"}}
# (tool_choice, the functions the call may name)
FORCED = [("required", set(SCHEMAS)), (NAMED, {"get_time"})]


@pytest.mark.parametrize("family", ["chatml", "qwen"])
@pytest.mark.parametrize("tool_choice, names", FORCED)
def test_a_forced_call_is_valid(client: openai.OpenAI, family: str, tool_choice, names):
    reply = client.chat.completions.create(
        model=family, messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=MAX_CALL
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1
    assert calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name in names
    check_call(calls[0].function.name, calls[0].function.arguments)


@pytest.mark.parametrize("tool_choice, names", FORCED)
def test_a_forced_call_is_valid_streamed(client: openai.OpenAI, tool_choice, names):
    stream = client.chat.completions.create(
        model="chatml",
        messages=ASK,
        tools=TOOLS,
        tool_choice=tool_choice,
        max_tokens=MAX_CALL,
        stream=True,
    )
    chunks = list(stream)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0]
    assert deltas[0].function.name in names and deltas[0].id.startswith("call_")
    check_call(deltas[0].function.name, deltas[0].function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_tools_reach_the_prompt(client: openai.OpenAI):
    for family in FAMILIES:
        plain = client.chat.completions.create(model=family, messages=ASK, max_tokens=1)
        with_tools = client.chat.completions.create(
            model=family, messages=ASK, tools=TOOLS, max_tokens=1
        )
        none = client.chat.completions.create(
            model=family, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=1
        )
        assert plain.usage and with_tools.usage and none.usage
        assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 50, family
        assert none.usage.prompt_tokens == plain.usage.prompt_tokens, family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_tool_round_trip_renders_in_each_template(client: openai.OpenAI, family: str):
    first = client.chat.completions.create(
        model=family, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=MAX_CALL
    )
    message = first.choices[0].message
    assert message.tool_calls
    call = message.tool_calls[0]
    result = "A sunny day, 24 degrees, light wind from the west " * 4
    conversation = [
        *ASK,
        message.model_dump(exclude_unset=False),  # as SDK users send it back: nulls and all
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    short = [*conversation[:-1], {**conversation[-1], "content": "sunny"}]
    answer = client.chat.completions.create(
        model=family, messages=conversation, tools=TOOLS, max_tokens=4
    )
    shorter = client.chat.completions.create(
        model=family, messages=short, tools=TOOLS, max_tokens=4
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage and shorter.usage
    # The tool's result is in the prompt: a longer result, a longer prompt.
    assert answer.usage.prompt_tokens > shorter.usage.prompt_tokens + 20


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"tool_choice": "bogus"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools"),
        ({"tools": "get_weather"}, "tools"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_bad_tools_are_400_naming_the_field(client: openai.OpenAI, extra: dict, field: str):
    body = {"model": "chatml", "messages": ASK, "tools": TOOLS, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**body)
    assert caught.value.status_code == 400
    assert caught.value.body and caught.value.body.get("param") == field, caught.value.body
