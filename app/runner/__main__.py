"""``python -m app.runner``: load one model and serve it on a Unix socket until told to stop.

Started by the front, one per (model, mode). Anything that goes wrong at load time is printed
to stderr, which the front shows the client; the exit code is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from app.runner import lifeline

if TYPE_CHECKING:
    from app.runner.serving import Runtime


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m app.runner")
    ap.add_argument("--model", type=Path, required=True, help="GGUF (the first shard if split)")
    ap.add_argument("--name", required=True, help="model name echoed in responses")
    ap.add_argument("--mode", choices=["completion", "embedding"], default="completion")
    ap.add_argument("--socket", type=Path, required=True)
    ap.add_argument("--ctx-size", type=int, default=4096)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument(
        "--gpu-layers", type=int, default=-1, help="-1: all when llama.cpp can offload, else 0"
    )
    ap.add_argument("--chat-template", type=Path, help="Jinja template overriding the GGUF's")
    ap.add_argument(
        "--exit-with-stdin",
        action="store_true",
        help="stop when stdin reaches end-of-file (the front holds its other end)",
    )
    args = ap.parse_args()
    # A crash in llama.cpp or a GPU driver then leaves a Python stack in the front's log.
    faulthandler.enable()
    if args.exit_with_stdin:
        lifeline.watch()

    # Imported here so that argument errors come back fast, before llama.cpp loads.
    import prometheus_client

    from app.engine.embed import Embedder
    from app.engine.engine import Engine
    from app.engine.llama import LlamaError, Model
    from app.runner.chat import ChatTemplate, TemplateError
    from app.runner.render import Renderer
    from app.runner.routes import create_app
    from app.runner.serving import Runtime
    from app.runner.tools import template_knows_tools

    try:
        model = Model(args.model, gpu_layers=_gpu_layers(args.gpu_layers))
        ctx = (
            min(args.ctx_size, model.info.n_ctx_train) if model.info.n_ctx_train else args.ctx_size
        )
        runtime = Runtime(model=model, name=args.name, ctx_size=ctx)
        if args.mode == "embedding":
            runtime.embedder = Embedder(model, ctx, args.threads)
        else:
            source = (
                args.chat_template.read_text() if args.chat_template else model.info.chat_template
            )
            bos, eos = model.info.bos_text, model.info.eos_text
            # Compiled here only to fail the load with its error; the renderer's workers render.
            template = ChatTemplate(source, bos, eos)
            runtime.renderer = Renderer(template.source, bos, eos)
            runtime.template_tools = template_knows_tools(template.source)
            runtime.engine = Engine(model, ctx, args.parallel, args.threads)
            runtime.metrics.watch_engine(runtime.engine)
    except (LlamaError, TemplateError, OSError) as exc:
        print(f"failed to load model: {exc}", file=sys.stderr)
        return 1
    prometheus_client.disable_created_metrics()  # as the front does (app/api/server.py)
    asyncio.run(_serve(create_app(runtime), args.socket, runtime))
    return 0


def _gpu_layers(asked: int) -> int:
    if asked >= 0:
        return asked
    import llama_cpp

    from app.engine.llama import init_backend

    # The backend (and its quiet logger) first, as in every start that loaded on the GPU:
    # asking about offload first initialises CUDA before llama.cpp's own set-up, the order in
    # which the service's runners crashed at load on an H200 (issue 12).
    init_backend()
    return 999 if llama_cpp.llama_supports_gpu_offload() else 0


async def _serve(app: web.Application, socket: Path, runtime: Runtime) -> None:
    # The front drains requests before it stops a runner; whatever is left here is cut.
    web_runner = web.AppRunner(
        app, handle_signals=False, handler_cancellation=True, shutdown_timeout=1
    )
    await web_runner.setup()
    if runtime.renderer is not None:
        await runtime.renderer.start()
    socket.unlink(missing_ok=True)
    await web.UnixSite(web_runner, str(socket)).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await web_runner.cleanup()
    if runtime.renderer is not None:
        await runtime.renderer.close()
    if runtime.engine is not None:  # while the loop runs: the engine's last events land safely
        await asyncio.to_thread(runtime.engine.close)


if __name__ == "__main__":
    sys.exit(main())
