"""DMR's model tarball (``docker model load``, ``export``): blobs plus ``manifest.json``.

The writer streams: it never holds a blob in memory, so multi-gigabyte models export and upload
in constant memory.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator

from app.oci.blobs import BlobSource

CHUNK = 1024 * 1024
MANIFEST_NAME = "manifest.json"
BLOBS_DIR = "blobs/sha256"


def iter_tar(blobs: list[BlobSource], manifest: bytes) -> Iterator[bytes]:
    """Yield the tar stream in chunks of at most CHUNK bytes: directories, blobs, manifest."""
    mtime = int(time.time())
    for name in ("blobs", BLOBS_DIR):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
        yield info.tobuf(tarfile.USTAR_FORMAT)
    for blob in blobs:
        name, size = f"{BLOBS_DIR}/{blob.descriptor.hex}", blob.descriptor.size
        yield _header(name, size, mtime)
        written = 0
        with blob.open() as f:
            while chunk := f.read(min(CHUNK, size - written)):
                written += len(chunk)
                yield chunk
        if written != size:
            raise OSError(f"{name} changed size while being archived")
        yield _padding(size)
    yield _header(MANIFEST_NAME, len(manifest), mtime)
    yield manifest + _padding(len(manifest))
    yield b"\0" * (tarfile.BLOCKSIZE * 2)


def _header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, mtime
    return info.tobuf(tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)
