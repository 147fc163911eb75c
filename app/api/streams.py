"""Bridges between aiohttp's async streams and the plain functions that run in worker threads."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator

from aiohttp import ClientPayloadError, StreamReader, web


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
        read = self._content.read(len(buffer))
        try:
            data = asyncio.run_coroutine_threadsafe(read, self._loop).result()
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
