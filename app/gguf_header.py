"""The one GGUF reader of the service: a file's metadata and tensor list, never its weights.

``gguf.GGUFReader`` builds numpy views of every field and tensor: about 8 s for a model with a
262k-token vocabulary on a small CPU, paid on every load. Admission and packaging only need the
header. Every length in it is checked against the file's size before it is used, so a corrupt or
hostile file is a clear error, never a huge allocation or an endless loop.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
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
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses tensors with more

# llama.cpp's ``llama_ftype`` (``general.file_type``), less the MOSTLY_/ALL_ prefixes, and
# ``ggml_type`` (a tensor's type); tests check them against the gguf package's enums.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0", 1024: "GUESSED",
}  # fmt: skip
TENSOR_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0", 42: "Q2_0",
}  # fmt: skip


class HeaderError(ValueError):
    pass


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int  # from the start of the file's data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def type_name(self) -> str:
        # A type newer than this table is still a tensor to count, just one without a name.
        return TENSOR_TYPES.get(self.type, f"TYPE_{self.type}")


@dataclass(frozen=True)
class Header:
    metadata: dict[str, Any]
    tensors: tuple[Tensor, ...]
    data_size: int  # bytes from the (aligned) start of the tensor data to the end of the file

    def tensor_bytes(self) -> dict[str, int]:
        """Each tensor's size in the file, whatever its type: the distance to the next one."""
        ordered = sorted(self.tensors, key=lambda t: t.offset)
        ends = [t.offset for t in ordered[1:]] + [self.data_size] if ordered else []
        return {t.name: max(0, end - t.offset) for t, end in zip(ordered, ends, strict=True)}


def read_metadata(path: Path, wanted: set[str]) -> dict[str, Any]:
    """The values of the ``wanted`` keys: numbers and strings as such, arrays of numbers as
    lists, arrays of strings (a vocabulary) as their number of items."""
    with open(path, "rb") as f:
        header = _Header(f)
        _, kv_count = header.preamble()
        return header.wanted(kv_count, wanted)


def read_header(path: Path, max_array_items: int) -> Header:
    """Every metadata key and every tensor's description.

    Arrays of up to ``max_array_items`` strings or numbers are lists; longer arrays (a
    vocabulary, merges) and arrays of arrays are left out.
    """
    with open(path, "rb") as f:
        header = _Header(f)
        tensor_count, kv_count = header.preamble()
        metadata = header.everything(kv_count, max_array_items)
        tensors = tuple(header.tensor() for _ in range(tensor_count))
        data_start = header.check_data(
            tensors, metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        )
        return Header(metadata, tensors, header.end - data_start)


class _Header:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.end = os.fstat(f.fileno()).st_size

    def preamble(self) -> tuple[int, int]:
        """The tensor count and key count, after checking that this is a GGUF we can read."""
        if self.read(4) != _MAGIC:
            raise HeaderError("not a GGUF file (bad magic)")
        version = self.unpack("<I")
        if version in (2 << 24, 3 << 24):
            raise HeaderError("big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise HeaderError(f"unsupported GGUF version {version}")
        return self.unpack("<Q"), self.unpack("<Q")

    def wanted(self, kv_count: int, wanted: set[str]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for _ in range(kv_count):
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

    def everything(self, kv_count: int, max_array_items: int) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for _ in range(kv_count):
            key = self.string()
            kind = self.unpack("<I")
            if kind != _ARRAY:
                found[key] = self.value(kind)
                continue
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if count <= max_array_items and item_kind != _ARRAY:
                found[key] = [self.value(item_kind) for _ in range(count)]
            else:
                self.skip_array(item_kind, count)
        return found

    def tensor(self) -> Tensor:
        name = self.string()
        n_dims = self.unpack("<I")
        if n_dims > _MAX_DIMS:
            raise HeaderError(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(self.unpack("<Q") for _ in range(n_dims))
        return Tensor(name, shape, type=self.unpack("<I"), offset=self.unpack("<Q"))

    def check_data(self, tensors: tuple[Tensor, ...], alignment: Any) -> int:
        """Where the tensor data starts. A file cut short (an interrupted copy) loses its last
        tensors: refuse it now rather than when a runner loads it."""
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            raise HeaderError(f"invalid general.alignment {alignment!r}")
        data_start = -(-self.f.tell() // alignment) * alignment
        for t in tensors:
            if t.n_elements and data_start + t.offset >= self.end:
                raise HeaderError(f"tensor {t.name!r} lies past the end of the file (truncated?)")
        return data_start

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
