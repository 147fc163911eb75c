"""Runs in a second container on the service's network: the DMR docs' requests, checked."""

from __future__ import annotations

import json
import sys
import urllib.request

BASE = "http://model-runner.docker.internal"


def call(url: str, body: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        return resp.status, resp.read()


def main() -> int:
    model = sys.argv[1]
    # Port 80, as in the DMR docs' Compose example.
    status, raw = call(
        f"{BASE}/engines/llama.cpp/v1/chat/completions",
        {"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8},
    )
    answer = json.loads(raw)
    assert status == 200 and answer["choices"][0]["message"]["content"], answer
    assert answer["usage"]["completion_tokens"] > 0, answer
    # The DMR port.
    status, raw = call(f"{BASE}:12434/models")
    tags = [tag for m in json.loads(raw) for tag in m["tags"]]
    assert status == 200 and any(model in tag for tag in tags), tags
    print(f"chat answered {answer['usage']['completion_tokens']} tokens; models: {tags}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
