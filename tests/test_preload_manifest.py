"""The preload manifest's parser: entries as written, and every mistake named with its file
and line (start-up itself is tested in tests/test_scheduler.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app import preload_manifest
from app.preload_manifest import ManifestError
from app.scheduler.runner_config import RunnerConfig
from tests.conftest import REPO


def test_shipped_example_manifest_is_valid():
    entries = preload_manifest.load(REPO / "examples" / "models.yaml", "docker.io")
    assert [(e.model, e.mode, e.preload, e.pin) for e in entries] == [
        ("ai/smollm2", "completion", True, True),
        ("ai/mxbai-embed-large", "embedding", False, False),
    ]
    assert entries[0].config.keep_alive == "-1" and entries[0].config.context_size == 4096


def test_entries_with_settings_and_relative_gguf(tmp_path: Path):
    (tmp_path / "emb.gguf").write_bytes(b"GGUF")
    manifest = tmp_path / "models.yaml"
    manifest.write_text(
        "models:\n"
        "  - ai/plain\n"
        "  - model: local/emb:v1\n"
        "    gguf: emb.gguf\n"
        "    mode: embedding\n"
        "    threads: 2\n"
    )
    plain, emb = preload_manifest.load(manifest, "docker.io")
    assert (plain.model, plain.config, plain.preload) == ("ai/plain", RunnerConfig(), False)
    assert emb.gguf == tmp_path / "emb.gguf" and emb.config.threads == 2


def test_empty_manifests_have_no_entries(tmp_path: Path):
    for text in ("", "models:\n", "models: []\n"):
        manifest = tmp_path / "models.yaml"
        manifest.write_text(text)
        assert preload_manifest.load(manifest, "docker.io") == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("models:\n  - model: ai/x\n    context_size: lots\n", ":3: models[0].context_size"),
        ("models:\n  - model: ai/x\n    colour: red\n", ":3: models[0]: unknown key 'colour'"),
        ("models:\n  - model: [unclosed\n", ":3: not valid YAML"),
        (
            "models:\n  - model: ai/x\n  - model: ai/x:latest\n",
            ":3: models[1]: ai/x:latest is listed twice",
        ),
        ("models:\n  - model: ai/x\n    gguf: missing.gguf\n", ":3: models[0].gguf:"),
        ("models:\n  - model: ai/x\n    context_size: !!int abc\n", ":3: models[0].context_size"),
        ("models:\n  - model: ai/x\n    model: ai/y\n", ":3: models[0]: model is given twice"),
        ("models:\n  - ? [a]\n    : 1\n", ":2: models[0]: keys must be plain names"),
        ("models:\n  - model: 'Not A Ref'\n", ":2: models[0].model:"),
        ("things: []\n", ":1: unknown key 'things'"),
    ],
)
def test_a_mistake_is_named_with_file_and_line(tmp_path: Path, text: str, problem: str):
    manifest = tmp_path / "models.yaml"
    manifest.write_text(text)
    with pytest.raises(ManifestError) as refused:
        preload_manifest.load(manifest, "docker.io")
    assert f"{manifest}{problem}" in str(refused.value)


def test_models_env_refuses_a_bad_reference():
    with pytest.raises(ManifestError, match="MODEL_RUNNER_MODELS: 'Not A Ref'"):
        preload_manifest.from_list(("ai/good", "Not A Ref"), "docker.io")
