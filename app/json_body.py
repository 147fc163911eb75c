"""The one JSON body parser, for the service's routes and the runner's.

Every way a body can fail to be JSON a client can send raises ``InvalidJSON``, which each API
answers as a 400 in its own shape: bytes that are not UTF-8, syntax errors, nesting deep enough
to exhaust the parser's recursion (``[`` x 100000), integers over Python's 4,300-digit limit.
"""

from __future__ import annotations

import json
from typing import Any


class InvalidJSON(ValueError):
    """The body is not JSON, or not the kind of JSON value the route needs."""


def parse(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise InvalidJSON(f"the request body is not valid JSON: {_reason(exc)}") from None


def parse_object(raw: bytes) -> dict[str, Any]:
    value = parse(raw)
    if not isinstance(value, dict):
        raise InvalidJSON("the request body must be a JSON object")
    return value


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    text = str(exc)
    if "integer string conversion" in text:
        return "a number has more than 4300 digits"
    return text.split("\n", 1)[0]
