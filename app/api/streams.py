"""Bridges between aiohttp's async streams and the plain functions that run in worker threads."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
from collections.abc import Iterator

from aiohttp import ClientPayloadError, StreamReader, web

IDLE_TIMEOUT_S = 60


class ClientGone(EOFError):
    """The client closed the connection before its body was complete: a truncated body."""


class BlockingBodyReader(io.RawIOBase):
    """A request body as a blocking file, for code running in a worker thread (not the loop)."""

    def __init__(self, content: StreamReader, loop: asyncio.AbstractEventLoop) -> None:
        self._content = content
        self._loop = loop

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        read = asyncio.run_coroutine_threadsafe(self._content.read(len(buffer)), self._loop)
        try:
            # An upload may be long, but not silent: a stalled client lets go of its connection.
            data = read.result(timeout=IDLE_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            read.cancel()
            raise ClientGone(f"request body stalled: no data for {IDLE_TIMEOUT_S} s") from None
        except (ConnectionError, ClientPayloadError) as exc:
            raise ClientGone(f"request body cut short: {exc}") from None
        buffer[: len(data)] = data
        return len(data)


async def write_chunks(response: web.StreamResponse, chunks: Iterator[bytes]) -> None:
    """Send a lazily produced body; each chunk is produced in a worker thread (disk reads)."""
    sentinel = b""
    while True:
        chunk = await asyncio.to_thread(next, chunks, sentinel)
        if chunk is sentinel:
            break
        await response.write(chunk)
