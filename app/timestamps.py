"""Times as Go writes them in JSON (DMR's and Ollama's answers): RFC 3339 in UTC, with a Z."""

from __future__ import annotations

import time
from datetime import UTC, datetime

# Go's zero time.Time: what DMR and Ollama write for "never" or "not yet".
ZERO_TIME = "0001-01-01T00:00:00Z"


def go_time(ts: float | None = None) -> str:
    """``ts`` (epoch seconds; now when None) as RFC 3339 in UTC, to the microsecond."""
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
