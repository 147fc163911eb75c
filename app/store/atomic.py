"""Crash-safe file writes: a reader sees the old file or the whole new one, never a torn one."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

TEMP_PREFIX = ".tmp-"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    with AtomicFile(path) as f:
        f.write(data)
        f.commit()


class AtomicFile:
    """A temp file beside ``path`` that replaces it on ``commit()``; dropped if never committed.

    It hashes what is written, so a blob can be checked against its digest before it is visible.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._committed = False
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
        # Held while the file is being written: a store opening in another process can tell
        # a live temp file from one a crash left behind (see remove_abandoned).
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._tmp = Path(tmp)
        self._file: BinaryIO = os.fdopen(fd, "wb")

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self._file.close()
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.sha256.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()

    def commit(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        self._committed = True


def remove_abandoned(directory: Path) -> None:
    """Delete temp files nobody is writing any more (their writer crashed or was killed)."""
    for tmp in directory.glob(TEMP_PREFIX + "*"):
        if tmp.is_dir():
            continue
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer holds it
        finally:
            os.close(fd)
        tmp.unlink(missing_ok=True)
