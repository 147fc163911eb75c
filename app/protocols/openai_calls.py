"""OpenAI's tool calls as the APIs that carry arguments as objects read them (Anthropic's
``input``, Ollama's ``arguments``)."""

from __future__ import annotations

import json
from typing import Any


def arguments_object(arguments: Any) -> dict[str, Any]:
    """A call's ``arguments`` (JSON text, as OpenAI sends them) as an object; ``{}`` for
    anything else. The runner only reports calls whose arguments are a JSON object."""
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
