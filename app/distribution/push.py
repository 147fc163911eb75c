"""Push a model to an OCI registry (spec 3.7): blobs the registry lacks, then the manifest.

Blobs go up with the registry's chunked upload protocol (PATCH per chunk, PUT to close), read
from disk as they are sent, so a multi-gigabyte model never sits in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import BinaryIO

from app.distribution import progress
from app.distribution.pull import all_or_nothing
from app.distribution.registry import Registry
from app.oci.blobs import BlobSource

CHUNK = 32 * 1024 * 1024
_PIECE = 1024 * 1024


async def push(
    registry: Registry, manifest_raw: bytes, blobs: list[BlobSource], total: int
) -> AsyncIterator[progress.Message]:
    """Upload what is missing, then the manifest; yields DMR progress lines (mode "push")."""
    queue: asyncio.Queue[progress.Message] = asyncio.Queue()
    uploads = []
    for blob in blobs:
        d = blob.descriptor
        reporter = progress.LayerReporter(queue.put_nowait, "push", total, d.digest, d.size)
        uploads.append(_upload_if_missing(registry, blob, reporter))
    async with contextlib.aclosing(progress.relay(queue, all_or_nothing(uploads))) as lines:
        async for line in lines:
            yield line
    await registry.put_manifest(manifest_raw)
    yield progress.message("success", "Model pushed successfully", mode="push")


async def _upload_if_missing(
    registry: Registry, blob: BlobSource, report: Callable[[int], None]
) -> None:
    d = blob.descriptor
    if await registry.blob_exists(d.digest):
        return
    location = await registry.start_upload()
    f = await asyncio.to_thread(blob.open)
    try:
        offset = 0
        report(0)
        while offset < d.size:  # an empty blob needs no PATCH, only the closing PUT
            n = min(CHUNK, d.size - offset)
            location = await registry.upload_chunk(
                location, offset, functools.partial(_read_pieces, f, n, offset, report), n
            )
            offset += n
    finally:
        await asyncio.to_thread(f.close)
    await registry.finish_upload(location, d.digest)


async def _read_pieces(
    f: BinaryIO, n: int, offset: int, report: Callable[[int], None]
) -> AsyncIterator[bytes]:
    await asyncio.to_thread(f.seek, offset)  # a retry after re-auth starts the chunk again
    sent = 0
    while sent < n:
        piece = await asyncio.to_thread(f.read, min(_PIECE, n - sent))
        if not piece:
            raise OSError("blob file is shorter than its descriptor says")
        sent += len(piece)
        yield piece
        report(offset + sent)
