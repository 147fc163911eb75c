"""The engine's own time per step against the number of active sequences, in process, on the
tiny random model (bench/make_gguf.py's ``tiny``: 2 layers, 32,000 tokens) where a decode costs
little, so what Python does per step and per sequence shows.

For 1, 8, 32 and 64 sequences generating 128 tokens each, greedy and sampled (temperature 0.8,
top-k 40, top-p 0.95): microseconds per step outside ``llama_decode`` (the goal: under 1,000 at
64), inside it, and tokens per second.

    .venv/bin/python bench/engine_steps.py [--threads 2] [--tokens 128] [--model GGUF]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# As the service's runners have it (app/scheduler/process.py: runner_env), set before llama.cpp's
# OpenMP library loads: its threads then leave the cores to the sampling threads between decodes.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from common import tiny_model

from app.engine.engine import Engine, Request, Token
from app.engine.llama import Model
from app.engine.sampling import SamplingParams

SEQUENCES = (1, 8, 32, 64)
GOAL_US = 1000


def run(engine: Engine, model: Model, n: int, tokens: int, sampling: SamplingParams) -> str:
    done = threading.Semaphore(0)

    def sink(event: object) -> None:
        if not isinstance(event, Token):
            done.release()

    requests = [
        Request(
            prompt=model.tokenize(f"sequence {i} says", True),
            max_tokens=tokens,
            sampling=sampling,
            sink=sink,
        )
        for i in range(n)
    ]
    stats = engine.stats
    steps, step_s, decode_s = stats.steps, stats.step_s, stats.decode_s
    start = time.perf_counter()
    for request in requests:
        engine.submit(request)
    for _ in requests:
        done.acquire()
    wall = time.perf_counter() - start
    steps = stats.steps - steps
    own = (stats.step_s - step_s - (stats.decode_s - decode_s)) / steps * 1e6
    decode = (stats.decode_s - decode_s) / steps * 1e6
    return f"{own:>9.0f} {decode:>9.0f} {n * tokens / wall:>8.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--model", type=Path, help="another GGUF than the tiny model")
    args = ap.parse_args()
    # The engine logs a line per request to stderr, for the service's log: not wanted here.
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
    model = Model(args.model or tiny_model())
    engine = Engine(
        model, ctx_size=256 + args.tokens, parallel=max(SEQUENCES), threads=args.threads
    )
    greedy = SamplingParams(temperature=0)
    sampled = SamplingParams(temperature=0.8, seed=1)
    run(engine, model, 8, 8, greedy)  # warm-up
    name = args.model.name if args.model else "tiny model"
    print(f"engine per step, {name}, {args.threads} threads, {args.tokens} tokens a sequence")
    print(f"{'':>14} {'greedy':^28} {'sampled':^28}")
    header = f"{'µs own':>9} {'µs decode':>9} {'tok/s':>8}"
    print(f"{'sequences':>14} {header} {header}")
    for n in SEQUENCES:
        g = run(engine, model, n, args.tokens, greedy)
        s = run(engine, model, n, args.tokens, sampled)
        print(f"{n:>14} {g} {s}")
    print(f"goal: own time under {GOAL_US} µs a step at 64 sequences")
    engine.close()


if __name__ == "__main__":
    main()
