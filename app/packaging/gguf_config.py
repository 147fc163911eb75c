"""The ``config`` object of a DMR artifact, read from a GGUF file's header (spec 3.2 and 8.2)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import gguf

# DMR leaves long arrays (vocabularies, merges) out of the metadata map.
_MAX_ARRAY = 50
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFError(ValueError):
    """The file is not a GGUF model this tool can read."""


def discover_shards(first: Path) -> list[Path]:
    """All shards of a split GGUF given its first shard, in order; ``[first]`` if not split."""
    m = _SHARD.match(first.name)
    if not m:
        return [first]
    if int(m["index"]) != 1:
        raise GGUFError(f"{first}: point --gguf at the first shard (-00001-of-{m['count']})")
    count = int(m["count"])
    shards = [
        first.with_name(f"{m['stem']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)
    ]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise GGUFError(f"missing GGUF shards: {', '.join(missing)}")
    return shards


def extract_config(shards: list[Path], context_size: int | None = None) -> dict[str, Any]:
    """Build the artifact's ``config`` object: format, quantization, parameters, sizes, KVs."""
    readers = [_reader(p) for p in shards]
    meta = _metadata(readers[0])
    arch = meta.get("general.architecture", "")
    tensors = [t for r in readers for t in r.tensors]
    n_params = sum(int(t.n_elements) for t in tensors)
    config: dict[str, Any] = {
        "format": "gguf",
        "quantization": _quantization(readers[0], tensors),
        "parameters": _scaled(n_params, 1000, ["", "K", "M", "B", "T"]),
        "architecture": arch,
        "size": _scaled(
            sum(p.stat().st_size for p in shards), 1024, ["B", "KiB", "MiB", "GiB", "TiB"]
        ),
        "gguf": meta,
    }
    if context_size is None:
        trained = meta.get(f"{arch}.context_length", "")
        context_size = int(trained) if trained.isdigit() else None
    if context_size:
        config["context_size"] = context_size
    return config


def _reader(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except Exception as exc:  # the gguf package raises bare ValueErrors and struct errors
        raise GGUFError(f"{path}: not a readable GGUF file ({exc})") from None


def _metadata(reader: gguf.GGUFReader) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            if len(field.data) > _MAX_ARRAY:
                continue
            out[key] = ", ".join(_stringify(v) for v in field.contents())
        else:
            out[key] = _stringify(field.contents())
    return out


def _stringify(value: Any) -> str:
    # Go's %v and %f, which DMR uses for this map.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:f}"
    return str(value)


def _quantization(reader: gguf.GGUFReader, tensors: list[Any]) -> str:
    field = reader.fields.get("general.file_type")
    if field is not None:
        try:
            name = gguf.LlamaFileType(int(field.contents())).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    if not tensors:
        return ""
    return Counter(t.tensor_type.name for t in tensors).most_common(1)[0][0]


def _scaled(value: float, base: int, units: list[str]) -> str:
    i = 0
    while value >= base and i < len(units) - 1:
        value /= base
        i += 1
    return f"{value:.2f}{units[i]}"
