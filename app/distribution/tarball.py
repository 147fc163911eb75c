"""DMR's model tarball (``docker model load``, ``export``): blobs plus ``manifest.json``.

The writer streams: it never holds a blob in memory, so multi-gigabyte models export and upload
in constant memory.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1024 * 1024
MANIFEST_NAME = "manifest.json"
BLOBS_DIR = "blobs/sha256"


@dataclass(frozen=True)
class TarEntry:
    name: str
    size: int
    open: Callable[[], BinaryIO]


def blob_entry(digest: str, path: Path, size: int) -> TarEntry:
    return TarEntry(f"{BLOBS_DIR}/{digest.removeprefix('sha256:')}", size, lambda: open(path, "rb"))


def iter_tar(entries: list[TarEntry], manifest: bytes) -> Iterator[bytes]:
    """Yield the tar stream in chunks of at most CHUNK bytes: directories, blobs, manifest."""
    mtime = int(time.time())
    for name in ("blobs", BLOBS_DIR):
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, mtime
        yield info.tobuf(tarfile.USTAR_FORMAT)
    for entry in entries:
        yield _header(entry.name, entry.size, mtime)
        written = 0
        with entry.open() as f:
            while chunk := f.read(min(CHUNK, entry.size - written)):
                written += len(chunk)
                yield chunk
        if written != entry.size:
            raise OSError(f"{entry.name} changed size while being archived")
        yield _padding(entry.size)
    yield _header(MANIFEST_NAME, len(manifest), mtime)
    yield manifest + _padding(len(manifest))
    yield b"\0" * (tarfile.BLOCKSIZE * 2)


def _header(name: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, mtime
    return info.tobuf(tarfile.PAX_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)
