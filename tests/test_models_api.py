"""The DMR model management API, end to end: package, list, every name spelling, tag, export,
re-import, delete and purge, over TCP, over the Unix socket and through ``/exp/vDD4.40``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from app.client import Reply
from tests.conftest import Server, openai_error

Call = Callable[..., Reply]


@pytest.fixture(params=["tcp", "unix", "unix+desktop-prefix"])
def call(request: pytest.FixtureRequest, server: Server) -> Call:
    client = server.unix if request.param.startswith("unix") else server.tcp
    prefix = "/exp/vDD4.40" if request.param.endswith("prefix") else ""

    def do(method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
        return client.request(method, prefix + path, body, headers)

    return do


def load_tiny(server: Server, gguf: Path, tag: str = "myorg/tiny:F32") -> str:
    out = server.cli("package", "--gguf", str(gguf), "--load", tag).stdout
    assert "Model tagged successfully" in out
    return json.loads(server.tcp.request("GET", f"/models/{tag}").body)["id"]


def test_package_load_lists_model_with_dmr_shape(server: Server, tiny_gguf: Path, call: Call):
    model_id = load_tiny(server, tiny_gguf)
    reply = call("GET", "/models")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.body.endswith(b"\n")
    [model] = json.loads(reply.body)
    assert model["id"] == model_id and model_id.startswith("sha256:") and len(model_id) == 71
    assert model["tags"] == ["docker.io/myorg/tiny:F32"]
    assert isinstance(model["created"], int) and model["created"] > 1_700_000_000
    config = model["config"]
    assert config["format"] == "gguf"
    assert config["quantization"] == "F32"
    assert config["architecture"] == "llama"
    assert config["parameters"].endswith("K")
    assert config["size"].endswith("KiB")
    assert config["context_size"] == 2048
    assert config["gguf"]["general.architecture"] == "llama"
    assert config["gguf"]["llama.context_length"] == "2048"
    assert "tokenizer.ggml.tokens" not in config["gguf"]  # long arrays are left out, as DMR does


def test_every_spelling_of_a_name_finds_the_model(server: Server, tiny_gguf: Path, call: Call):
    model_id = load_tiny(server, tiny_gguf, "smollm2")
    hex_id = model_id.removeprefix("sha256:")
    spellings = [
        "smollm2",
        "ai/smollm2",
        "ai/smollm2:latest",
        "docker.io/ai/smollm2:latest",
        "index.docker.io/ai/smollm2",
        "SmolLM2",
        model_id,
        hex_id,
        hex_id[:12],
        f"ai/smollm2@{model_id}",
    ]
    for name in spellings:
        reply = call("GET", f"/models/{name}")
        assert reply.status == 200, (name, reply.text)
        assert json.loads(reply.body)["id"] == model_id, name
        openai = call("GET", f"/engines/llama.cpp/v1/models/{name}")
        assert openai.status == 200, (name, openai.text)
    assert call("GET", "/models/ai/smollm2:other").status == 404


def test_partial_name_fallback_only_on_models_route(server: Server, tiny_gguf: Path, call: Call):
    load_tiny(server, tiny_gguf, "localhost:5000/org/tiny-gguf:Q8")
    assert call("GET", "/models/tiny-gguf").status == 200
    reply = call("GET", "/engines/v1/models/tiny-gguf")
    assert reply.status == 404
    error = openai_error(reply)
    missing = "error while getting model: get model '\"tiny-gguf\"': model not found"
    assert error["message"] == missing
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_openai_model_list(server: Server, tiny_gguf: Path, call: Call):
    assert json.loads(call("GET", "/v1/models").body) == {"object": "list", "data": []}
    load_tiny(server, tiny_gguf)
    for path in ("/engines/llama.cpp/v1/models", "/engines/v1/models", "/v1/models"):
        body = json.loads(call("GET", path).body)
        [model] = body["data"]
        assert model["id"] == "docker.io/myorg/tiny:F32"
        assert model["object"] == "model" and model["owned_by"] == "docker"
        assert model["dmr"]["context_window"] == 2048
        assert model["dmr"]["quantization"] == "F32"


def test_tag_then_delete_untags_before_deleting(server: Server, tiny_gguf: Path, call: Call):
    model_id = load_tiny(server, tiny_gguf)
    reply = call("POST", "/models/myorg/tiny:F32/tag?repo=other/name&tag=v1")
    assert reply.status == 201
    assert json.loads(reply.body) == {
        "message": 'Model tagged successfully with "other/name:v1"',
        "target": "other/name:v1",
    }
    assert json.loads(call("GET", "/models/other/name:v1").body)["id"] == model_id

    # By ID with two tags: refused unless forced.
    reply = call("DELETE", f"/models/{model_id}")
    assert reply.status == 409
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert "(must be forced) due to multiple tag references" in reply.text

    # By tag: only the tag goes while another remains.
    reply = call("DELETE", "/models/other/name:v1")
    assert reply.status == 200
    assert json.loads(reply.body) == [{"Untagged": "docker.io/other/name:v1"}]
    assert call("GET", "/models/other/name:v1").status == 404

    # The last tag deletes the model and its blobs.
    reply = call("DELETE", "/models/myorg/tiny:F32")
    assert json.loads(reply.body) == [
        {"Untagged": "docker.io/myorg/tiny:F32"},
        {"Deleted": model_id},
    ]
    assert json.loads(call("GET", "/models").body) == []
    assert list((server.models_path / "blobs" / "sha256").iterdir()) == []
    reply = call("DELETE", "/models/myorg/tiny:F32")
    assert (reply.status, reply.text) == (404, "error while deleting model: model not found")


def test_force_delete_by_id_removes_all_tags(server: Server, tiny_gguf: Path, call: Call):
    model_id = load_tiny(server, tiny_gguf)
    call("POST", f"/models/{model_id[7:19]}/tag?repo=second&tag=latest")
    reply = call("DELETE", f"/models/{model_id[7:19]}?force=true")
    assert reply.status == 200
    assert json.loads(reply.body) == [
        {"Untagged": "docker.io/myorg/tiny:F32"},
        {"Untagged": "docker.io/ai/second:latest"},
        {"Deleted": model_id},
    ]


def test_tag_moves_from_one_model_to_another(server: Server, tiny_gguf: Path, tmp_path: Path):
    from tests.tiny_gguf import write_tiny_gguf

    first = load_tiny(server, tiny_gguf, "first")
    second = load_tiny(server, write_tiny_gguf(tmp_path / "b.gguf", seed=1), "second")
    assert server.tcp.request("POST", "/models/second/tag?repo=ai/first&tag=latest").status == 201
    assert json.loads(server.tcp.request("GET", "/models/first").body)["id"] == second
    [old] = [m for m in json.loads(server.tcp.request("GET", "/models").body) if m["id"] == first]
    assert "tags" not in old  # untagged models carry no tags key, as in DMR


def test_tag_errors(server: Server, tiny_gguf: Path, call: Call):
    load_tiny(server, tiny_gguf)
    reply = call("POST", "/models/myorg/tiny:F32/tag?repo=x")
    assert (reply.status, reply.text) == (400, "missing repo or tag query parameter")
    assert call("POST", "/models/nothere/tag?repo=x&tag=y").status == 404
    reply = call("POST", "/models/myorg/tiny:F32/tag?repo=Bad..Name&tag=y")
    assert reply.status == 400 and reply.text.startswith("Invalid model reference")
    reply = call("POST", "/models/myorg/tiny:F32/frobnicate")
    assert (reply.status, reply.text) == (404, 'unknown action "frobnicate"')


def test_export_then_reimport_gives_the_same_model(server: Server, tiny_gguf: Path, call: Call):
    model_id = load_tiny(server, tiny_gguf)
    reply = call("GET", "/models/myorg/tiny:F32/export")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/x-tar"
    assert reply.headers["Content-Disposition"] == 'attachment; filename="myorg/tiny:F32.tar"'
    tarball = reply.body
    assert call("GET", "/models/nothere/export").status == 404

    call("DELETE", "/models/myorg/tiny:F32")
    assert json.loads(call("GET", "/models").body) == []
    reply = call("POST", "/models/load", tarball, **{"Content-Type": "application/x-tar"})
    assert reply.status == 200, reply.text
    assert json.loads(reply.body) == {
        "type": "success",
        "message": "Model loaded successfully",
        "total": 0,
        "layer": {"size": 0, "current": 0},
        "mode": "pull",
    }
    [model] = json.loads(call("GET", "/models").body)
    assert model["id"] == model_id
    assert "tags" not in model


def test_purge_empties_the_store(server: Server, tiny_gguf: Path, call: Call):
    load_tiny(server, tiny_gguf)
    reply = call("DELETE", "/models/purge")
    assert (reply.status, reply.body) == (200, b"")
    assert json.loads(call("GET", "/models").body) == []
    assert (server.models_path / "layout.json").is_file()
    # The store works again right after a purge.
    load_tiny(server, tiny_gguf)
    assert len(json.loads(call("GET", "/models").body)) == 1


def test_root_and_version(call: Call):
    reply = call("GET", "/")
    assert (reply.status, reply.body) == (200, b"Docker Model Runner is running")
    assert json.loads(call("GET", "/version").body) == {"version": "0.1.0"}


def test_concurrent_imports_and_tags_over_http(server: Server, tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    from app.oci.tarball import iter_tar
    from app.packaging import artifact
    from tests.tiny_gguf import write_tiny_gguf

    builds = [artifact.build(write_tiny_gguf(tmp_path / f"{i}.gguf", seed=i)) for i in range(6)]

    def load_and_tag(i: int) -> int:
        b = builds[i]
        client = server.unix if i % 2 else server.tcp
        body = b"".join(iter_tar(b.blob_sources(), b.manifest))
        assert client.request("POST", "/models/load", body).status == 200
        return client.request("POST", f"/models/{b.id}/tag?repo=m{i}&tag=latest").status

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(load_and_tag, range(6))) == [201] * 6
    listed = json.loads(server.tcp.request("GET", "/models").body)
    assert sorted(m["tags"][0] for m in listed) == [f"docker.io/ai/m{i}:latest" for i in range(6)]
