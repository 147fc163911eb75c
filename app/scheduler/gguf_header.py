"""Just the metadata of a GGUF file, read straight from its header.

``gguf.GGUFReader`` builds numpy views of every field and tensor: about 8 s for a model with a
262k-token vocabulary on a small CPU, paid on every load. Admission only needs a few numbers.
Every length in the header is checked against the file's size before it is used, so a corrupt
or hostile file is a clear error, never a huge allocation or an endless loop.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import IO, Any

_MAGIC = b"GGUF"
# GGUF value types: 0-7 and 10-12 are scalars, 8 a string, 9 an array.
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
# Wanted numeric arrays are per-layer values: more items than this is not a real model.
_MAX_WANTED_ITEMS = 1 << 16


class HeaderError(ValueError):
    pass


def read_metadata(path: Path, wanted: set[str]) -> dict[str, Any]:
    """The values of the ``wanted`` keys: numbers and strings as such, arrays of numbers as
    lists, arrays of strings (a vocabulary) as their number of items."""
    with open(path, "rb") as f:
        return _Header(f).metadata(wanted)


class _Header:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.end = os.fstat(f.fileno()).st_size

    def metadata(self, wanted: set[str]) -> dict[str, Any]:
        if self.read(4) != _MAGIC:
            raise HeaderError("not a GGUF file (bad magic)")
        version = self.unpack("<I")
        if version in (2 << 24, 3 << 24):
            raise HeaderError("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise HeaderError(f"unsupported GGUF version {version}")
        self.unpack("<Q")  # tensor count
        found: dict[str, Any] = {}
        for _ in range(self.unpack("<Q")):
            key = self.string()
            kind = self.unpack("<I")
            if kind == _ARRAY:
                item_kind, count = self.unpack("<I"), self.unpack("<Q")
                if key in wanted and item_kind in _SCALARS and count <= _MAX_WANTED_ITEMS:
                    fmt = _SCALARS[item_kind]
                    raw = self.read(struct.calcsize(fmt) * count)
                    found[key] = list(struct.unpack(f"<{count}{fmt[1:]}", raw))
                    continue
                if key in wanted:
                    found[key] = count
                self.skip_array(item_kind, count)
            elif key in wanted:
                found[key] = self.value(kind)
            else:
                self.skip_value(kind)
            if len(found) == len(wanted):
                break
        return found

    def check(self, n: int) -> None:
        if n > self.end - self.f.tell():
            raise HeaderError("the header is truncated or corrupt")

    def read(self, n: int) -> bytes:
        self.check(n)
        return self.f.read(n)

    def seek(self, n: int) -> None:
        self.check(n)
        self.f.seek(n, 1)

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.read(self.unpack("<Q")).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        raise HeaderError(f"unknown GGUF value type {kind}")

    def skip_value(self, kind: int) -> None:
        if kind == _STRING:
            self.seek(self.unpack("<Q"))
        elif kind in _SCALARS:
            self.seek(struct.calcsize(_SCALARS[kind]))
        elif kind == _ARRAY:
            self.skip_array(self.unpack("<I"), self.unpack("<Q"))
        else:
            raise HeaderError(f"unknown GGUF value type {kind}")

    def skip_array(self, kind: int, count: int) -> None:
        if kind in _SCALARS:
            self.seek(struct.calcsize(_SCALARS[kind]) * count)
            return
        self.check(count * 8)  # every string or nested array takes at least 8 bytes
        for _ in range(count):
            self.skip_value(kind)
