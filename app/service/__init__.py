"""Service objects: what the HTTP handlers and the CLI ask for, built on the store and the engine.

The rule for blocking I/O: a service never blocks the event loop. Every service method that
touches the disk is ``async`` and moves that work off the loop itself (``in_thread``), so a
caller just awaits it and never has to know which calls block.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

_P = ParamSpec("_P")
_R = TypeVar("_R")


def in_thread(fn: Callable[_P, _R]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Turn a blocking function into a coroutine function that runs it in a worker thread."""

    @functools.wraps(fn)
    async def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        return await asyncio.to_thread(fn, *args, **kwargs)

    return run
