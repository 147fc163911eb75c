"""Reference normalization as DMR does it (spec 4.1): what users type maps to one stored tag."""

from __future__ import annotations

import pytest

from app.oci import reference


@pytest.mark.parametrize(
    ("typed", "canonical"),
    [
        ("smollm2", "docker.io/ai/smollm2:latest"),
        ("ai/smollm2", "docker.io/ai/smollm2:latest"),
        ("ai/smollm2:latest", "docker.io/ai/smollm2:latest"),
        ("docker.io/ai/smollm2:latest", "docker.io/ai/smollm2:latest"),
        ("index.docker.io/ai/smollm2", "docker.io/ai/smollm2:latest"),
        ("  smollm2  ", "docker.io/ai/smollm2:latest"),
        ("smollm2:", "docker.io/ai/smollm2:latest"),
        ("SmolLM2:360M-Q4_K_M", "docker.io/ai/smollm2:360M-Q4_K_M"),
        ("myorg/m", "docker.io/myorg/m:latest"),
        ("hf.co/Bartowski/X-GGUF:Q4_K_M", "huggingface.co/bartowski/x-gguf:Q4_K_M"),
        ("localhost:5000/m", "localhost:5000/m:latest"),
        ("localhost/m:v1", "localhost/m:v1"),
        ("registry.example.com:443/a/b/c:1.0", "registry.example.com:443/a/b/c:1.0"),
    ],
)
def test_normalization(typed: str, canonical: str):
    assert str(reference.parse(typed)) == canonical


def test_familiar_spelling_drops_the_default_registry():
    assert reference.parse("smollm2").familiar == "ai/smollm2:latest"
    assert reference.parse("localhost:5000/m").familiar == "localhost:5000/m:latest"


def test_digest_reference():
    ref = reference.parse("ai/x@sha256:" + "a" * 64)
    assert ref.digest == "sha256:" + "a" * 64
    assert str(ref) == "docker.io/ai/x@sha256:" + "a" * 64


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "../x",
        "a/../b",
        "a//b",
        "a b",
        "x\x00y",
        "UP/-bad",
        "a:b:c",
        "x@sha256:12",
        "ai/x:" + "t" * 200,
        "/abs/path",
        "a" * 300,
    ],
)
def test_invalid_references(bad: str):
    with pytest.raises(reference.InvalidReference):
        reference.parse(bad)


@pytest.mark.parametrize(
    ("text", "is_id"),
    [
        ("a" * 12, True),
        ("a" * 64, True),
        ("sha256:" + "a" * 64, True),
        ("A" * 12, False),
        ("a" * 13, False),
        ("smollm2", False),
    ],
)
def test_id_spellings(text: str, is_id: bool):
    assert reference.looks_like_id(text) is is_id
