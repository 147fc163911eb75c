"""Just the metadata of a GGUF file, read straight from its header.

``gguf.GGUFReader`` builds numpy views of every field and tensor: about 8 s for a model with a
262k-token vocabulary on a small CPU, paid on every load. Admission only needs a few numbers.
"""

from __future__ import annotations

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


class HeaderError(ValueError):
    pass


def read_metadata(path: Path, wanted: set[str]) -> dict[str, Any]:
    """The values of the ``wanted`` keys: numbers and strings as such, arrays of numbers as
    lists, arrays of strings (a vocabulary) as their number of items."""
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise HeaderError("not a GGUF file (bad magic)")
        version = _unpack(f, "<I")
        if version not in (2, 3):
            raise HeaderError(f"unsupported GGUF version {version}")
        _unpack(f, "<Q")  # tensor count
        found: dict[str, Any] = {}
        for _ in range(_unpack(f, "<Q")):
            key = _string(f)
            kind = _unpack(f, "<I")
            if kind == _ARRAY:
                item_kind, count = _unpack(f, "<I"), _unpack(f, "<Q")
                if key in wanted and item_kind in _SCALARS:
                    found[key] = [_value(f, item_kind) for _ in range(count)]
                    continue
                if key in wanted:
                    found[key] = count
                _skip_array(f, item_kind, count)
            elif key in wanted:
                found[key] = _value(f, kind)
            else:
                _skip_value(f, kind)
            if len(found) == len(wanted):
                break
        return found


def _unpack(f: IO[bytes], fmt: str) -> Any:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise HeaderError("the header is truncated")
    return struct.unpack(fmt, raw)[0]


def _string(f: IO[bytes]) -> str:
    n = _unpack(f, "<Q")
    raw = f.read(n)
    if len(raw) != n:
        raise HeaderError("the header is truncated")
    return raw.decode("utf-8", "replace")


def _value(f: IO[bytes], kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    raise HeaderError(f"unknown GGUF value type {kind}")


def _skip_value(f: IO[bytes], kind: int) -> None:
    if kind == _STRING:
        f.seek(_unpack(f, "<Q"), 1)
    elif kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]), 1)
    elif kind == _ARRAY:
        _skip_array(f, _unpack(f, "<I"), _unpack(f, "<Q"))
    else:
        raise HeaderError(f"unknown GGUF value type {kind}")


def _skip_array(f: IO[bytes], kind: int, count: int) -> None:
    if kind in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[kind]) * count, 1)
        return
    for _ in range(count):
        _skip_value(f, kind)
