"""The CLI talks to a running service the way ``docker model`` does, and packages models."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Server
from tests.netutil import free_port
from tests.tiny_gguf import write_tiny_gguf


def test_ls_inspect_tag_rm(server: Server, tiny_gguf: Path):
    server.cli("package", "--gguf", str(tiny_gguf), "--load", "myorg/tiny:F32")
    out = server.cli("ls").stdout.splitlines()
    assert out[0].split()[:3] == ["MODEL", "NAME", "PARAMETERS"]
    assert out[1].split()[:4] == ["myorg/tiny:F32", "162.11K", "F32", "llama"]

    inspected = json.loads(server.cli("inspect", "myorg/tiny:F32").stdout)
    assert inspected["tags"] == ["docker.io/myorg/tiny:F32"]
    short = server.cli("ls", "-q").stdout.strip()
    assert short == inspected["id"][7:19]
    assert json.loads(server.cli("inspect", "--openai", short).stdout)["owned_by"] == "docker"

    assert "other:v2" in server.cli("tag", "myorg/tiny:F32", "other:v2").stdout
    assert json.loads(server.cli("ls", "--json").stdout)[0]["tags"] == [
        "docker.io/myorg/tiny:F32",
        "docker.io/ai/other:v2",
    ]
    refused = server.cli("rm", inspected["id"], check=False)
    assert refused.returncode == 1 and "must be forced" in refused.stderr
    assert server.cli("rm", "other:v2").stdout.strip() == "Untagged: docker.io/ai/other:v2"
    out = server.cli("rm", "myorg/tiny:F32").stdout.splitlines()
    assert out == ["Untagged: docker.io/myorg/tiny:F32", f"Deleted: {inspected['id']}"]
    assert server.cli("ls", "-q").stdout == ""


def test_package_with_license_template_and_context(server: Server, tiny_gguf: Path, tmp_path: Path):
    lic = tmp_path / "LICENSE"
    lic.write_text("Do what you like.\n")
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{{ messages }}")
    server.cli(
        "package",
        "--gguf",
        str(tiny_gguf),
        "--license",
        str(lic),
        "--chat-template",
        str(tpl),
        "--context-size",
        "512",
        "--load",
        "withextras",
    )
    model = json.loads(server.tcp.request("GET", "/models/withextras").body)
    assert model["config"]["context_size"] == 512
    tar = server.tcp.request("GET", "/models/withextras/export").body
    assert b"Do what you like." in tar and b"{{ messages }}" in tar
    manifest = json.loads(tar[tar.rindex(b'{"schemaVersion"') :].split(b"\0")[0])
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        "application/vnd.docker.ai.gguf.v3",
        "application/vnd.docker.ai.license",
        "application/vnd.docker.ai.chat.template.jinja",
    ]
    assert manifest["config"]["mediaType"] == "application/vnd.docker.ai.model.config.v0.1+json"
    assert manifest["layers"][0]["annotations"]["org.cncf.model.filepath"] == "tiny.gguf"


def test_package_store_writes_without_a_service(server: Server, tiny_gguf: Path):
    # --store writes into MODELS_PATH directly; the running service sees it at once.
    out = server.cli("package", "--gguf", str(tiny_gguf), "--store", "direct:v1").stdout
    assert "Stored sha256:" in out
    assert server.tcp.request("GET", "/models/direct:v1").status == 200
    again = server.cli("package", "--gguf", str(tiny_gguf), "--store", "--if-missing", "direct:v1")
    assert "already in the store" in again.stdout
    assert len(json.loads(server.tcp.request("GET", "/models").body)) == 1


def test_package_errors_are_one_line(server: Server, tmp_path: Path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    for args, needle in [
        (["--gguf", str(junk), "--load", "x"], "not a readable GGUF file"),
        (["--gguf", str(tmp_path / "missing.gguf"), "--load", "x"], "no such file"),
        (["--gguf", str(junk), "--load", "Bad..Ref"], "invalid"),
    ]:
        result = server.cli("package", *args, check=False)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert needle in result.stderr


def test_sharded_gguf_packages_every_shard_in_order(server: Server, tmp_path: Path):
    shards = [tmp_path / f"m-{i:05d}-of-00002.gguf" for i in (1, 2)]
    for i, shard in enumerate(shards):
        write_tiny_gguf(shard, seed=i)
    server.cli("package", "--gguf", str(shards[0]), "--load", "sharded")
    tar = server.tcp.request("GET", "/models/sharded/export").body
    manifest = json.loads(tar[tar.rindex(b'{"schemaVersion"') :].split(b"\0")[0])
    paths = [layer["annotations"]["org.cncf.model.filepath"] for layer in manifest["layers"]]
    assert paths == [s.name for s in shards]
    result = server.cli("package", "--gguf", str(shards[1]), "--load", "x", check=False)
    assert result.returncode == 1 and "first shard" in result.stderr


def test_unreachable_service_is_a_clear_error(server: Server):
    server.extra_env["MODEL_RUNNER_HOST"] = f"http://127.0.0.1:{free_port()}"
    result = server.cli("ls", check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("model-runner ls: cannot reach the model runner at")


def test_json_logs_have_one_line_per_request(server: Server):
    server.stop()
    server.extra_env["LOG_FORMAT"] = "json"
    server.log_path.write_text("")
    server.start()
    server.tcp.request("GET", "/models", headers={"X-Request-Id": "abc123"})
    records = [json.loads(line) for line in server.log().splitlines()]
    [line] = [r for r in records if r.get("event") == "request" and r["path"] == "/models"]
    assert line["method"] == "GET" and line["status"] == 200 and line["request_id"] == "abc123"
    assert isinstance(line["duration_ms"], float)
