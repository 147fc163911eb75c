"""The GGUF header reader used for memory estimates agrees with the gguf package's reader."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from app.scheduler import gguf_header, memory
from tests.tiny_gguf import write_tiny_gguf


def test_metadata_matches_gguf_reader(tmp_path: Path):
    path = write_tiny_gguf(tmp_path / "t.gguf", ctx=4096)
    reader = gguf.GGUFReader(str(path))
    scalars = {
        key: field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.") and len(field.types) == 1
    }
    arrays = {
        key: len(field.data)
        for key, field in reader.fields.items()
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY
    }
    got = gguf_header.read_metadata(path, set(scalars) | set(arrays))
    for key, value in scalars.items():
        assert got[key] == pytest.approx(value) if isinstance(value, float) else got[key] == value
    for key, count in arrays.items():
        assert (got[key] if isinstance(got[key], int) else len(got[key])) == count


def test_per_layer_head_counts_take_the_widest(tmp_path: Path):
    path = tmp_path / "layers.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(3)
    writer.add_head_count(8)
    writer.add_head_count_kv([2, 4, 0])
    writer.add_embedding_length(64)
    writer.add_token_list(["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = gguf_header.read_metadata(path, {"llama.attention.head_count_kv"})
    assert meta == {"llama.attention.head_count_kv": [2, 4, 0]}
    est = memory.estimate([path], ctx_per_slot=100, slots=2)
    # 100 tokens x 2 slots x 3 layers x 4 heads (widest) x (8 + 8) dims x 2 bytes
    assert est.kv_cache == 100 * 2 * 3 * 4 * 16 * 2


HEAD = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)  # version 3, no tensors, one key


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GGML",
        b"GGUF\x07\x00\x00\x00",
        b"GGUF\x03\x00\x00\x00\x01",
        HEAD + struct.pack("<Q", 2**64 - 1),  # a key "longer" than the file
        HEAD + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**40),  # 2^40 strings
        b"GGUF" + struct.pack(">IQQ", 3, 0, 1),  # big-endian
    ],
)
def test_broken_headers_are_clear_errors(tmp_path: Path, data: bytes):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(memory.EstimateError, match="is not a usable GGUF"):
        memory.estimate([path], 512, 1)
