"""app/runner/tool_calls.py on canned model outputs: every format, whole and streamed in pieces
split anywhere, with the same content and calls each way. No server, no model."""

from __future__ import annotations

import json

import pytest

from app.runner.tool_calls import ToolCall, ToolCallParser, ToolCalls

NAMES = ("get_weather", "get_time")
PARIS = ToolCall("get_weather", '{"city":"Paris"}')
TOKYO = ToolCall("get_weather", '{"city":"Tokyo"}')
TIME = ToolCall("get_time", '{"tz":"UTC"}')

W_PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
W_TOKYO = '{"name": "get_weather", "arguments": {"city": "Tokyo"}}'
T_UTC = '{"name": "get_time", "arguments": {"tz": "UTC"}}'
P_PARIS = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
P_UTC = '{"name": "get_time", "parameters": {"tz": "UTC"}}'


def hermes(call: str) -> str:
    return f"<tool_call>\n{call}\n</tool_call>"


# (output, content, calls, what streams before finish)
CALLS: dict[str, tuple[str, str, list[ToolCall], str]] = {
    "hermes": (hermes(W_PARIS), "", [PARIS], ""),
    "hermes trailing newline": (hermes(W_PARIS) + "\n", "", [PARIS], ""),
    "hermes several": (
        hermes(W_PARIS) + "\n" + hermes(W_TOKYO) + "\n\n" + hermes(T_UTC),
        "",
        [PARIS, TOKYO, TIME],
        "",
    ),
    "hermes after content": (
        "Let me check both.\n" + hermes(W_PARIS) + "\n" + hermes(W_TOKYO),
        "Let me check both.\n",
        [PARIS, TOKYO],
        "Let me check both.\n",
    ),
    "qwen3 thinking": (
        "<think>\nThe user wants the weather.\n</think>\n\n" + hermes(W_PARIS),
        "<think>\nThe user wants the weather.\n</think>\n\n",
        [PARIS],
        "<think>\nThe user wants the weather.\n</think>\n\n",
    ),
    "hermes leading whitespace": ("\n\n" + hermes(W_PARIS), "", [PARIS], ""),
    "hermes no closing tag": ("<tool_call>\n" + W_PARIS + "\n", "", [PARIS], ""),
    "hermes last closing tag missing": (
        hermes(W_PARIS) + "\n<tool_call>\n" + T_UTC,
        "",
        [PARIS, TIME],
        "",
    ),
    "hermes stray text after": (
        hermes(W_PARIS) + "\nI will wait for the result.",
        "I will wait for the result.",
        [PARIS],
        "",
    ),
    "hermes stray text after content": (
        "Checking.\n" + hermes(W_PARIS) + "\nDone.",
        "Checking.\n\nDone.",
        [PARIS],
        "Checking.\n",
    ),
    "llama python_tag": ("<|python_tag|>" + P_PARIS, "", [PARIS], ""),
    "llama python_tag several": (
        "<|python_tag|>" + P_PARIS + "; " + P_UTC,
        "",
        [PARIS, TIME],
        "",
    ),
    "llama python_tag after content": (
        "Sure thing. <|python_tag|>" + P_PARIS + "\n" + P_UTC,
        "Sure thing. ",
        [PARIS, TIME],
        "Sure thing. ",
    ),
    "llama bare json": (P_PARIS, "", [PARIS], ""),
    "llama bare json arguments": (W_PARIS, "", [PARIS], ""),
    "llama bare json leading whitespace": ("\n \t" + P_PARIS + "\n", "", [PARIS], ""),
    "llama bare json several newline": (P_PARIS + "\n" + P_UTC, "", [PARIS, TIME], ""),
    "llama bare json several semicolon": (P_PARIS + ";" + P_UTC + ";", "", [PARIS, TIME], ""),
    "mistral list": (
        "[TOOL_CALLS][" + W_PARIS + ", " + T_UTC + "]",
        "",
        [PARIS, TIME],
        "",
    ),
    "mistral list after content": (
        "I'll look that up. [TOOL_CALLS] [" + W_PARIS + "]",
        "I'll look that up. ",
        [PARIS],
        "I'll look that up. ",
    ),
    "mistral args": ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "", [PARIS], ""),
    "mistral args several": (
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"tz": "UTC"}',
        "",
        [PARIS, TIME],
        "",
    ),
    "mistral args after content": (
        'One moment.\n[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}\n'
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Tokyo"}',
        "One moment.\n",
        [PARIS, TOKYO],
        "One moment.\n",
    ),
    "mistral call id": (
        '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}',
        "",
        [PARIS],
        "",
    ),
    "generic tool_calls": (
        '{"tool_calls": [' + W_PARIS + ", " + T_UTC + "]}",
        "",
        [PARIS, TIME],
        "",
    ),
    "generic single": (W_PARIS, "", [PARIS], ""),
    "generic array": ("[" + W_PARIS + ",\n" + W_TOKYO + "]", "", [PARIS, TOKYO], ""),
    "generic openai shape": (
        '{"tool_calls": [{"type": "function", "function": ' + W_PARIS + "}]}",
        "",
        [PARIS],
        "",
    ),
    "arguments as a string": (
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
        "",
        [PARIS],
        "",
    ),
    "hermes arguments as a string": (
        hermes('{"name": "get_time", "arguments": "{\\"tz\\":\\"UTC\\"}"}'),
        "",
        [TIME],
        "",
    ),
    "unicode arguments": (
        hermes('{"name": "get_weather", "arguments": {"city": "Z\\u00fcrich", "note": "雨"}}'),
        "",
        [ToolCall("get_weather", '{"city":"Zürich","note":"雨"}')],
        "",
    ),
    "nested arguments": (
        '<|python_tag|>{"name": "get_time", "parameters": {"a": {"b": [1, 2.5, null, true]}}}',
        "",
        [ToolCall("get_time", '{"a":{"b":[1,2.5,null,true]}}')],
        "",
    ),
    "one bad block among good": (
        hermes(W_PARIS) + "\n" + hermes('{"name": "nope", "arguments": {}}') + "\n" + hermes(T_UTC),
        hermes('{"name": "nope", "arguments": {}}') + "\n",
        [PARIS, TIME],
        "",
    ),
}

# Outputs that are all content: they come back exactly.
CONTENT = {
    "plain": "Hello world",
    "empty": "",
    "whitespace": "  \n\t ",
    "angle brackets": "a < b and b > c, <b>bold</b> and <tool> and <tool_cal",
    "partial marker at end": "Hello <tool",
    "brackets": "Use x[0] and [TOOL] or [TOOL_CALLS",
    "unknown name hermes": "Hi <tool_call>\n" + '{"name": "nope", "arguments": {}}\n</tool_call>',
    "unknown name bare": '{"name": "nope", "parameters": {"city": "Paris"}}',
    "unknown name mistral": '[TOOL_CALLS]nope[ARGS]{"city": "Paris"}',
    "unknown name in list": '{"tool_calls": [' + W_PARIS + ', {"name": "x", "arguments": {}}]}',
    "malformed hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>',
    "unfinished hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',
    "malformed python_tag": "<|python_tag|>print('hello')",
    "malformed mistral": "[TOOL_CALLS][{'name': 'get_weather'}]",
    "mistral args not object": "[TOOL_CALLS]get_weather[ARGS][1, 2]",
    "arguments not object": '{"name": "get_weather", "arguments": [1]}',
    "arguments missing": '{"name": "get_weather"}',
    "arguments string not object": '{"name": "get_weather", "arguments": "Paris"}',
    "arguments string not json": '{"name": "get_weather", "arguments": "{city: Paris}"}',
    "arguments NaN": '{"name": "get_weather", "arguments": {"x": NaN}}',
    "arguments lone surrogate": '{"name": "get_weather", "arguments": {"x": "\\ud800"}}',
    "name not a string": '{"name": 3, "arguments": {}}',
    "empty tool_calls": '{"tool_calls": []}',
    "empty array": "[]",
    "json answer": '\n  {"answer": 42, "city": "Paris", "name": "weather"}\n',
    "json array answer": "[1, 2, 3]",
    "bracket text": "[1] Smith, J. (2020). A paper.",
    "bare json after content": "Here it is: " + W_PARIS,
    "markdown json": "```json\n" + W_PARIS + "\n```",
    "deep nesting": "[" * 5000 + "]" * 5000,
    "deep nesting hermes": "<tool_call>" + "[" * 5000,
    "json then text": W_PARIS.replace("get_weather", "nope") + "\nmore",
}


def run_pieces(pieces: list[str], names=NAMES) -> tuple[str, str, list[ToolCall]]:
    """What streamed before finish, all the content, and the calls."""
    parser = ToolCallParser(names)
    streamed = "".join(parser.feed(piece) for piece in pieces)
    rest, calls = parser.finish()
    return streamed, streamed + rest, calls


def splits(text: str) -> list[list[str]]:
    """The text whole, split in two at every position, and one character at a time."""
    ways = [[text], list(text)]
    ways += [[text[:i], text[i:]] for i in range(len(text) + 1)]
    return ways


@pytest.mark.parametrize("name", list(CALLS))
def test_calls_whole_and_streamed(name: str) -> None:
    text, content, calls, streamed = CALLS[name]
    for pieces in splits(text):
        got_streamed, got_content, got_calls = run_pieces(pieces)
        assert (got_content, got_calls) == (content, calls), pieces
        # Never any part of a call shown early: at most the leading content.
        assert streamed.startswith(got_streamed), pieces
    # Fed whole, the leading content is shown at once.
    assert run_pieces([text])[0] == streamed


@pytest.mark.parametrize("name", list(CONTENT))
def test_content_comes_back_exactly(name: str) -> None:
    text = CONTENT[name]
    ways = splits(text) if len(text) < 500 else [[text], [text[:3000], text[3000:]]]
    for pieces in ways:
        _, content, calls = run_pieces(pieces)
        assert (content, calls) == (text, []), pieces


def test_no_tools_means_no_calls() -> None:
    for text, *_ in CALLS.values():
        assert run_pieces([text], names=())[1:] == (text, [])


def test_plain_text_streams_at_once() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("Hello world") == "Hello world"
    assert parser.feed(", and more.\n") == ", and more.\n"
    assert parser.finish() == ("", [])


def test_partial_marker_is_held_then_released() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("Hello <tool") == "Hello "
    assert parser.feed("s are fun") == "<tools are fun"
    assert parser.feed(" [TOOL_CALL") == " "
    assert parser.feed("S] is a token") == ""  # a marker: held until finish
    assert parser.finish() == ("[TOOL_CALLS] is a token", [])


def test_partial_marker_at_end_comes_back() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("Hello <|python") == "Hello "
    assert parser.finish() == ("<|python", [])


def test_marker_holds_everything_after_it() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("Checking. <tool_call>\n") == "Checking. "
    assert parser.feed(W_PARIS) == ""
    assert parser.feed("\n</tool_call>\nplain text after") == ""
    assert parser.finish() == ("\nplain text after", [PARIS])


def test_json_start_held_until_finish() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("  ") == ""
    assert parser.feed('{"answer": ') == ""
    assert parser.feed("42}") == ""
    assert parser.finish() == ('  {"answer": 42}', [])


def test_leading_whitespace_before_text_is_shown_with_it() -> None:
    parser = ToolCallParser(NAMES)
    assert parser.feed("\n\n") == ""
    assert parser.feed("Hi") == "\n\nHi"
    assert parser.finish() == ("", [])


def test_arguments_are_compact_json() -> None:
    text = hermes('{"name": "get_weather", "arguments": {"a" : 1 ,  "b":[ 1, 2 ]}}')
    _, _, calls = run_pieces([text])
    assert calls == [ToolCall("get_weather", '{"a":1,"b":[1,2]}')]
    assert json.loads(calls[0].arguments) == {"a": 1, "b": [1, 2]}


def test_finish_once() -> None:
    parser = ToolCallParser(NAMES)
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")
    with pytest.raises(RuntimeError):
        parser.finish()


def test_long_stream_is_linear() -> None:
    # 200,000 pieces of content and then a call: quadratic work would take minutes.
    parser = ToolCallParser(NAMES)
    shown = [parser.feed("word <") for _ in range(100_000)]
    shown += [parser.feed("\n") for _ in range(100_000)]
    shown.append(parser.feed(hermes(W_PARIS)))
    rest, calls = parser.finish()
    assert "".join(shown) + rest == "word <" * 100_000 + "\n" * 100_000
    assert calls == [PARIS]


def test_tool_calls_event() -> None:
    assert ToolCalls([PARIS]).calls == [PARIS]
