"""Tool calls out of a model's generated text, for OpenAI's `tool_calls`.

Local models have no tool-call channel: they write calls as text, each family in its own way
(Hermes/Qwen `<tool_call>` blocks, Llama's `<|python_tag|>` or bare JSON, Mistral's
`[TOOL_CALLS]`, or the generic JSON the server asks of templates that know nothing of tools).
ToolCallParser recognises all of them, on a whole answer or on a stream of pieces: while
streaming it lets through only text that cannot be part of a call, holds the rest, and decides
at the end. Anything that looked like a call but is not a valid one comes back as content, so
nothing the model wrote is lost, and a JSON answer that is not a call comes back exactly.

Work stays linear in the text: streaming only looks at each piece and a marker's length of what
came before; the held text is parsed once, at finish.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

HERMES = "<tool_call>"
HERMES_END = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL = "[TOOL_CALLS]"
MARKERS = (HERMES, PYTHON_TAG, MISTRAL)
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS))
_LONGEST_MARKER = max(len(m) for m in MARKERS)

_WS = " \t\r\n"
# Llama 3 separates several calls with ";" as well as newlines.
_SEPARATORS = _WS + ";"
# Mistral's newer form, `[TOOL_CALLS]name[ARGS]{...}`; some versions put `[CALL_ID]id` between.
_MISTRAL_NAMED = re.compile(r"\s*([^\s\[\]{}]+)\s*(?:\[CALL_ID\]\s*[^\s\[\]]*\s*)?\[ARGS\]")


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON: arguments holding them could not be sent on as JSON.
    raise ValueError(f"not JSON: {name}")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object as compact text, e.g. '{"city":"Paris"}'


@dataclass(frozen=True)
class ToolCalls:
    """The calls of one answer, as an event among the engine's (they come out just before the
    end, once finish has decided them)."""

    calls: list[ToolCall]


def _skip(s: str, i: int, chars: str = _WS) -> int:
    while i < len(s) and s[i] in chars:
        i += 1
    return i


def _decode(s: str, i: int) -> tuple[Any, int] | None:
    # A failure costs the json module a count of the lines before i (for its message): fast C,
    # felt only past tens of thousands of rejected calls (40,000 in 540 kB: 1.8 s).
    try:
        return _DECODER.raw_decode(s, i)
    # RecursionError: deeply nested brackets, which a model can write as easily as anything.
    except (ValueError, RecursionError):
        return None


def _partial_marker_len(s: str) -> int:
    """Length of the longest end of s that a marker starts with (s holds no whole marker)."""
    for k in range(min(len(s), _LONGEST_MARKER - 1), 0, -1):
        end = s[-k:]
        if any(m.startswith(end) for m in MARKERS):
            return k
    return 0


class ToolCallParser:
    """One generation's text to content and tool calls; feed pieces, then finish once."""

    def __init__(self, tool_names: Collection[str]) -> None:
        self._names = frozenset(tool_names)
        # Whitespace before the first other character: it belongs to a call if one follows.
        self._lead: list[str] = []
        self._started = False
        # Text neither shown nor held: a possible marker's start, and leading whitespace.
        self._pending = ""
        self._held: list[str] | None = None
        self._json_start = False
        self._shown = False  # whether non-whitespace content has been returned
        self._finished = False

    def feed(self, text: str) -> str:
        """Content text that is safe to show now: never any part of a tool call, never a prefix
        of a marker that might start one."""
        if self._finished:
            raise RuntimeError("ToolCallParser.feed after finish")
        if self._held is not None:
            self._held.append(text)
            return ""
        if not self._started:
            if not text.strip(_WS):
                self._lead.append(text)
                return ""
            self._started = True
            pending = "".join(self._lead) + text
            self._lead = []
            if pending.lstrip(_WS)[0] in "{[":
                self._held = [pending]
                self._json_start = True
                return ""
        else:
            pending = self._pending + text
        self._pending = ""

        found = _MARKER_RE.search(pending)
        if found is not None:
            before = pending[: found.start()]
            if not self._shown and not before.strip(_WS):
                self._held = [pending]
                return ""
            self._held = [pending[found.start() :]]
            self._shown = True
            return before

        cut = len(pending) - _partial_marker_len(pending)
        out = pending[:cut]
        if not self._shown and not out.strip(_WS):
            # Only whitespace so far: dropped if a call follows, so not shown yet.
            self._pending = pending
            return ""
        self._pending = pending[cut:]
        self._shown = True
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of generation: the rest of the content text and the calls found. Text that
        looked like the start of a call but is not a valid call comes back as content: nothing
        the model wrote is lost."""
        if self._finished:
            raise RuntimeError("ToolCallParser.finish called twice")
        self._finished = True
        if self._held is None:
            return "".join(self._lead) + self._pending, []
        held = "".join(self._held)
        calls, content = self._parse(held)
        if not calls:
            return held, []
        if not self._shown:
            content = content.lstrip(_WS)
        return content, calls

    def _parse(self, s: str) -> tuple[list[ToolCall], str]:
        """The calls in held text, and the text between and after them that is not a call."""
        markers = [m.start() for m in _MARKER_RE.finditer(s)]
        calls: list[ToolCall] = []
        segments: list[str] = []
        # Bare JSON is a call at the start of the output, and after a call (Llama's lists).
        bare_ok = self._json_start
        after_call = False
        i = 0
        while True:
            j = _skip(s, i, _SEPARATORS if after_call else _WS)
            if j >= len(s):
                segments.append(s[i:])
                break
            got = self._item(s, j, bare_ok)
            if got is not None:
                found, end = got
                calls.extend(found)
                segments.append(s[i:j])
                i = end
                bare_ok = after_call = True
                continue
            # Not a call: content up to the next marker, which may start one.
            k = bisect.bisect_right(markers, j)
            nxt = markers[k] if k < len(markers) else len(s)
            segments.append(s[i:nxt])
            i = nxt
            bare_ok = after_call = False
        # Separators around calls were only that; any other text is the model's content.
        return calls, "".join(seg for seg in segments if seg.strip(_SEPARATORS))

    def _item(self, s: str, j: int, bare_ok: bool) -> tuple[list[ToolCall], int] | None:
        """The call or calls that start at s[j], and where they end; None if none does."""
        if s.startswith(HERMES, j):
            got = self._json_calls(s, _skip(s, j + len(HERMES)))
            if got is None:
                return None
            found, end = got
            # The closing tag may be missing, at the end of the output most of all.
            close = _skip(s, end)
            if s.startswith(HERMES_END, close):
                end = close + len(HERMES_END)
            return found, end
        if s.startswith(PYTHON_TAG, j):
            return self._json_calls(s, _skip(s, j + len(PYTHON_TAG)))
        if s.startswith(MISTRAL, j):
            start = j + len(MISTRAL)
            named = _MISTRAL_NAMED.match(s, start)
            if named is None:
                return self._json_calls(s, _skip(s, start))
            decoded = _decode(s, _skip(s, named.end()))
            if decoded is None:
                return None
            call = self._call(named.group(1), decoded[0])
            return None if call is None else ([call], decoded[1])
        if bare_ok and s[j] in "{[":
            return self._json_calls(s, j)
        return None

    def _json_calls(self, s: str, i: int) -> tuple[list[ToolCall], int] | None:
        """One call object, a list of them, or {"tool_calls": [...]}; all valid or none."""
        decoded = _decode(s, i)
        if decoded is None:
            return None
        value, end = decoded
        if isinstance(value, dict) and "tool_calls" in value and "name" not in value:
            value = value["tool_calls"]
        items = value if isinstance(value, list) else [value]
        if not items:
            return None
        calls: list[ToolCall] = []
        for item in items:
            call = self._call_object(item)
            if call is None:
                return None
            calls.append(call)
        return calls, end

    def _call_object(self, item: Any) -> ToolCall | None:
        if not isinstance(item, dict):
            return None
        # Models that imitate OpenAI's own format: {"type": "function", "function": {...}}.
        if "name" not in item and isinstance(item.get("function"), dict):
            item = item["function"]
        if "arguments" in item:
            arguments = item["arguments"]
        elif "parameters" in item:  # Llama 3's word
            arguments = item["parameters"]
        else:
            return None
        return self._call(item.get("name"), arguments)

    def _call(self, name: Any, arguments: Any) -> ToolCall | None:
        if not isinstance(name, str) or name not in self._names:
            return None
        if isinstance(arguments, str):
            # OpenAI's own wire format holds arguments as a string; some models copy it.
            try:
                arguments = _DECODER.decode(arguments)
            except (ValueError, RecursionError):
                return None
        if not isinstance(arguments, dict):
            return None
        try:
            text = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
            # A lone surrogate ("\ud800" in the JSON) would fail later, writing the response.
            text.encode()
        except (ValueError, RecursionError):
            return None
        return ToolCall(name, text)
