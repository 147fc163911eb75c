"""The one JSON body parser, for the service's routes and the runner's.

Every way a body can fail to be JSON a client can send raises ``InvalidJSON``, which each API
answers as a 400 in its own shape: bytes that are not UTF-8, syntax errors, nesting deep enough
to exhaust the parser's recursion (``[`` x 100000), integers over Python's 4,300-digit limit.
"""

from __future__ import annotations

import json
import re
from typing import Any

# Parsing or writing 10 MiB of JSON takes an event loop ~100 ms, stalling every stream on it;
# below this size JSON work is faster on the loop than a hop to a thread and back.
ON_LOOP_BYTES = 64 * 1024


class InvalidJSON(ValueError):
    """The body is not JSON, or not the kind of JSON value the route needs."""


def parse(raw: bytes) -> Any:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise InvalidJSON(f"the request body is not valid JSON: {_reason(exc)}") from None
    # JSON may escape half a UTF-16 pair ("\ud800"), which no UTF-8 text can hold: as Go's
    # decoder (DMR's) does, it becomes U+FFFD. Only bodies that escape one pay for the walk.
    if _SURROGATE_ESCAPE.search(raw):
        value = _replace_lone_surrogates(value)
    return value


def parse_object(raw: bytes) -> dict[str, Any]:
    value = parse(raw)
    if not isinstance(value, dict):
        raise InvalidJSON("the request body must be a JSON object")
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _replace_lone_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_replace_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_lone_surrogates(k): _replace_lone_surrogates(v) for k, v in value.items()}
    return value


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = str(exc)
    if "integer string conversion" in text:
        return "a number has more than 4300 digits"
    return text.split("\n", 1)[0]
