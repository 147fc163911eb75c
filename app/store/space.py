"""Free disk space: the one rule for how much a write may take, shared by pulls and imports.

The disk must never fill to the last byte: once it does, writing ``models.json`` (tagging),
a bundle's ``config.json`` (inference) or the log fails too. So a write is refused up front
unless it leaves a reserve, and a disk that fills up anyway mid-write gets its partial file back.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from app.store.store import StoreError

_MIB = 1024 * 1024
# The reserve scales with the write instead of being one fixed figure: a fixed 256 MiB refused
# a 670 KB import with 200 MB free. A quarter of the write covers estimates being off and other
# writers meanwhile; 16 MiB is ample for the small files written after it (index, manifest,
# config.json, logs); 256 MiB is plenty for any write; and a tenth of the disk keeps the rule
# usable on small volumes, where 16 MiB could be a large share.
_RESERVE_SHARE = 4
_RESERVE_MIN = 16 * _MIB
_RESERVE_MAX = 256 * _MIB
_RESERVE_DISK_SHARE = 10
_FULL = (errno.ENOSPC, errno.EDQUOT)


class InsufficientStorage(StoreError):
    """Not enough free disk space for a write; the message says what it needs and what is free."""


def reserve(needed: int, disk_size: int) -> int:
    """Bytes that must stay free after writing ``needed`` bytes to a disk of ``disk_size``."""
    return min(
        _RESERVE_MAX, disk_size // _RESERVE_DISK_SHARE, max(_RESERVE_MIN, needed // _RESERVE_SHARE)
    )


def check_free_space(directory: Path, needed: int, what: str, pending: int = 0) -> None:
    """Refuse writing ``needed`` bytes for ``what`` unless the reserve stays free afterwards.

    ``pending`` is what other writes under way are yet to add to the same disk.
    """
    usage = shutil.disk_usage(directory)
    free = max(0, usage.free - pending)
    kept = reserve(needed, usage.total)
    if needed + kept > free:
        raise InsufficientStorage(
            f"not enough disk space for {what}: it needs {human(needed)}, {human(free)} is free"
            f" and {human(kept)} is kept in reserve"
        )


def is_disk_full(exc: BaseException) -> bool:
    """Whether a write failed for want of space (or was refused for it)."""
    return isinstance(exc, InsufficientStorage) or (isinstance(exc, OSError) and exc.errno in _FULL)


def human(n: int) -> str:
    """Binary units with one decimal, as people read sizes (``670.0 KiB``, ``100.0 TiB``)."""
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
