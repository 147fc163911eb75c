"""Resumable blob downloads: ``blobs/sha256/<hex>.incomplete``, as DMR names them.

The partial file survives an interrupted download (client gone, service killed, network cut);
the next download hashes what is there and asks the registry for the rest with ``Range``. The
blob becomes visible (renamed to ``<hex>``) only once its full content hashes to its digest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from pathlib import Path
from typing import BinaryIO

from app.store.atomic import fsync_dir

SUFFIX = ".incomplete"
# DMR drops partial downloads nobody resumed within a week.
STALE_AFTER_S = 7 * 24 * 3600
_READ = 4 * 1024 * 1024


class PartialBlobError(Exception):
    pass


class BlobInUse(PartialBlobError):
    """Another process is downloading the same blob into this store."""


class PartialBlob:
    def __init__(self, final: Path, digest: str, size: int) -> None:
        self.final = final
        self.path = final.with_name(final.name + SUFFIX)
        self.digest = digest
        self.expected_size = size
        self._sha = hashlib.sha256()
        self._file: BinaryIO = open(self.path, "a+b")  # noqa: SIM115 (closed by commit/close)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise BlobInUse(f"blob {digest} is being downloaded by another process") from None
        self.size = self._hash_existing()

    def _hash_existing(self) -> int:
        self._file.seek(0)
        size = 0
        while chunk := self._file.read(_READ):
            self._sha.update(chunk)
            size += len(chunk)
        whole = size == self.expected_size
        if size > self.expected_size or (whole and self._hex() != self.digest):
            self.restart()  # nothing more to fetch could make these bytes right
            return 0
        return size

    def _hex(self) -> str:
        return "sha256:" + self._sha.hexdigest()

    def restart(self) -> None:
        """Throw away what is there (the server ignored Range, or the bytes are too many)."""
        self._file.truncate(0)
        self._file.seek(0)
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self.size += len(data)

    def flush_to_disk(self) -> None:
        """Write back what is written so far; safe to run beside write() in another thread."""
        os.fdatasync(self._file.fileno())

    def write_all(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def commit(self) -> None:
        """Verify and publish the blob; a mismatch deletes the partial so no retry reuses it."""
        actual = self._hex()
        if actual != self.digest or self.size != self.expected_size:
            self._file.close()
            self.path.unlink(missing_ok=True)
            raise PartialBlobError(
                f"blob digest mismatch: expected {self.digest} ({self.expected_size} bytes), "
                f"got {actual} ({self.size} bytes)"
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        os.replace(self.path, self.final)
        fsync_dir(self.final.parent)
        self._file.close()

    def close(self) -> None:
        """Stop here and keep the bytes for a later resume."""
        if self._file.closed:
            return
        with contextlib.suppress(OSError):
            self._file.flush()
        with contextlib.suppress(OSError):  # a full disk can fail the close's flush too
            self._file.close()

    def discard(self) -> None:
        """Stop here and drop the bytes (the disk is full: keeping them would keep it full)."""
        self.close()
        self.path.unlink(missing_ok=True)


def demote(final: Path) -> None:
    """Turn a published blob back into a partial download: a failed pull's finished layers wait
    for the next pull as ``.incomplete`` files (which it commits without fetching again)."""
    with contextlib.suppress(OSError):  # a partial is there already, or no hard links here
        os.link(final, final.with_name(final.name + SUFFIX))
    final.unlink(missing_ok=True)


def remove_stale(directory: Path, now: float | None = None) -> None:
    now = time.time() if now is None else now
    for path in directory.glob("*" + SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime > STALE_AFTER_S:
                path.unlink()
