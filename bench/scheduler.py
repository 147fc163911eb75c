"""Scheduler figures on the default model: cold load, warm request, model swap under a memory
limit that holds one model, and reload after keep_alive. Prints a table; no pass/fail.

    python bench/scheduler.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import REPO, cli, gemma, service_env, start_service

from app.client import ServiceClient
from tests.netutil import free_port

TEMPLATE = REPO / "app" / "assets" / "gemma3-chat-template.jinja"


def one_token(client: ServiceClient, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    began = time.perf_counter()
    reply = client.request("POST", "/engines/v1/chat/completions", json.dumps(body).encode())
    assert reply.status == 200, reply.text
    return time.perf_counter() - began


def ps(client: ServiceClient) -> list[dict]:
    return json.loads(client.request("GET", "/engines/ps").body)


def unload_all(client: ServiceClient) -> None:
    client.request("POST", "/engines/unload", b'{"all": true}')


@contextlib.contextmanager
def service(models: Path, **extra: str) -> Iterator[ServiceClient]:
    proc, client = start_service(service_env(models, free_port(), **extra))
    try:
        yield client
    finally:
        proc.terminate()
        proc.wait()


def run(rounds: int) -> dict[str, list[float]]:
    gguf = gemma()
    results: dict[str, list[float]] = {}

    def timed(label: str, client: ServiceClient, model: str) -> None:
        results.setdefault(label, []).append(one_token(client, model))

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        env = service_env(models, free_port())
        # Two models with the same weights and different configs: two IDs, two runners.
        for name, ctx in (("bench/a", "4096"), ("bench/b", "2048")):
            cli(env, "package", "--gguf", str(gguf), "--chat-template", str(TEMPLATE),
                "--context-size", ctx, "--store", name)  # fmt: skip
        with service(models) as client:
            for _ in range(rounds):
                unload_all(client)
                timed("cold load + 1 token", client, "bench/a")
                timed("warm, 1 token", client, "bench/a")
            estimate = ps(client)[0]["memory_estimate"]
        # Room for one runner only: every request for the other model swaps.
        with service(models, MODEL_RUNNER_MEMORY_LIMIT=str(int(estimate * 1.3))) as client:
            one_token(client, "bench/a")
            for _ in range(rounds):
                for model in ("bench/b", "bench/a"):
                    timed("swap (stop one, load other) + 1 token", client, model)
            assert len(ps(client)) == 1
        with service(models, MODEL_RUNNER_KEEP_ALIVE="1s") as client:
            for _ in range(rounds):
                one_token(client, "bench/a")
                deadline = time.monotonic() + 30
                while ps(client) and time.monotonic() < deadline:
                    time.sleep(0.1)
                timed("reload after keep_alive + 1 token", client, "bench/a")
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results = run(args.rounds)
    print(f"{'gemma 270M Q4_K_M, 2 threads':<42}{'median s':>10}{'min s':>9}{'max s':>9}")
    for label, values in results.items():
        print(
            f"{label:<42}{statistics.median(values):>10.3f}{min(values):>9.3f}{max(values):>9.3f}"
        )


if __name__ == "__main__":
    main()
