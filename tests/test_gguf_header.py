"""The GGUF header reader (memory estimates, packaging) agrees with the gguf package's reader."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import pytest

from app import gguf_header
from app.packaging.gguf_config import GGUFError, extract_config
from app.scheduler import memory
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


def test_tensors_match_gguf_reader(tmp_path: Path):
    path = write_tiny_gguf(tmp_path / "t.gguf")
    reader = gguf.GGUFReader(str(path))
    header = gguf_header.read_header(path, max_array_items=50)
    assert [(t.name, t.n_elements, t.type_name) for t in header.tensors] == [
        (t.name, int(t.n_elements), t.tensor_type.name) for t in reader.tensors
    ]
    assert header.metadata["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert "tokenizer.ggml.tokens" not in header.metadata  # longer than 50 items


def test_type_names_match_the_gguf_package():
    for t in gguf.GGMLQuantizationType:
        assert gguf_header.TENSOR_TYPES[t.value] == t.name
    for f in gguf.LlamaFileType:
        assert gguf_header.FILE_TYPES[f.value] == f.name.removeprefix("MOSTLY_").removeprefix(
            "ALL_"
        )


def test_package_config_strings_like_dmr(tmp_path: Path):
    path = write_tiny_gguf(tmp_path / "t.gguf", ctx=4096)
    config = extract_config([path])
    meta = config["gguf"]
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == "4096"
    assert meta["llama.rope.freq_base"] == "10000.000000"
    assert meta["tokenizer.ggml.add_bos_token"] == "true"
    assert "tokenizer.ggml.tokens" not in meta
    assert config["context_size"] == 4096
    assert config["quantization"] == "F32"


def test_a_truncated_model_is_refused_when_packaged(tmp_path: Path):
    path = write_tiny_gguf(tmp_path / "t.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        extract_config([cut])


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
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        extract_config([path])
