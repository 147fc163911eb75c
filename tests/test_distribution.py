"""Pull and push against a real registry (CNCF distribution on loopback): progress, cache,
resume with Range, verification, auth, errors, and shared downloads."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.netutil import free_port
from tests.registry import LocalRegistry, Proxy

JSON = {"Accept": "application/json"}


def pull(server: Server, ref: str, **headers: str) -> tuple[int, list[Any], str]:
    """POST /models/create; returns status, parsed JSON lines, and any non-JSON trailer."""
    reply = server.tcp.request(
        "POST", "/models/create", json.dumps({"from": ref}).encode(), {**JSON, **headers}
    )
    lines, trailer = [], ""
    for line in reply.body.decode().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            trailer += line
    return reply.status, lines, trailer if reply.status == 200 else reply.text


def pull_lines(server: Server, ref: str) -> Iterator[dict[str, Any]]:
    """A pull's progress lines as they come, up to the plain trailer after an error line."""
    body = json.dumps({"from": ref}).encode()
    for line in server.tcp.lines("POST", "/models/create", body, JSON):
        try:
            yield json.loads(line)
        except ValueError:
            return


def push_tiny(server: Server, gguf: Path, ref: str, *extra: str) -> str:
    """Package the tiny model straight into the registry (no service involved)."""
    server.cli("package", "--gguf", str(gguf), *extra, "--push", ref)
    return ref


def docker_login(server: Server, tmp_path: Path, host: str, user: str, password: str) -> None:
    """Credentials in Docker's config.json, as `docker login` writes them; restart to use them."""
    docker_dir = tmp_path / "docker"
    docker_dir.mkdir(exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    (docker_dir / "config.json").write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    server.stop()
    server.extra_env["DOCKER_CONFIG"] = str(docker_dir)
    server.start()


def oras_push(target: str, layer: tuple[Path, str], config: tuple[Path, str]) -> None:
    """Push with oras-py: another client's idea of a model artifact, to check interop."""
    import oras.client

    oras.client.OrasClient(hostname=target.split("/")[0], insecure=True).push(
        target=target,
        files=[f"{layer[0]}:{layer[1]}"],
        manifest_config=f"{config[0]}:{config[1]}",
        disable_path_validation=True,
    )


def models(server: Server) -> list[dict[str, Any]]:
    return json.loads(server.tcp.request("GET", "/models").body)


def visible_blobs(server: Server) -> list[str]:
    return sorted(p.name for p in (server.models_path / "blobs" / "sha256").iterdir())


def test_push_then_pull_round_trip(server: Server, registry: LocalRegistry, tiny_gguf: Path):
    ref = f"{registry.host}/org/tiny:v1"
    server.cli("package", "--gguf", str(tiny_gguf), "--load", ref)
    [local] = models(server)
    reply = server.tcp.request("POST", f"/models/{ref}/push", b"", JSON)
    assert reply.status == 200
    lines = [json.loads(x) for x in reply.body.decode().splitlines()]
    assert lines[-1] == {
        "type": "success",
        "message": "Model pushed successfully",
        "total": 0,
        "layer": {"size": 0, "current": 0},
        "mode": "push",
    }
    assert all(x["mode"] == "push" for x in lines)
    assert any(x["type"] == "progress" and x["message"].startswith("Uploaded: ") for x in lines)

    server.tcp.request("DELETE", f"/models/{ref}")
    assert models(server) == []
    status, lines, _ = pull(server, ref)
    assert status == 200
    progress = [x for x in lines if x["type"] == "progress"]
    gguf_size = tiny_gguf.stat().st_size
    assert progress and all(x["total"] == gguf_size and x["mode"] == "pull" for x in progress)
    last = progress[-1]
    assert last["layer"]["current"] == last["layer"]["size"] == gguf_size
    assert last["layer"]["id"].startswith("sha256:")
    assert last["message"] == f"Downloaded: {gguf_size / 1024 / 1024:.2f} MB"
    assert lines[-1]["type"] == "success" and lines[-1]["message"] == "Model pulled successfully"
    [pulled] = models(server)
    assert pulled["id"] == local["id"] and pulled["tags"] == [ref]
    bundled = server.models_path / "bundles/sha256" / pulled["id"][7:] / "model/model.gguf"
    assert bundled.read_bytes() == tiny_gguf.read_bytes()  # ready for a runner

    # A second pull finds the digest in the store and only re-applies the tag.
    server.tcp.request("POST", f"/models/{ref}/tag?repo={registry.host}/org/tiny&tag=other")
    server.tcp.request("DELETE", f"/models/{ref}")
    status, lines, _ = pull(server, ref)
    assert status == 200
    assert [x["type"] for x in lines] == ["success"]
    assert lines[0]["message"].startswith("Using cached model: ") and "KiB" in lines[0]["message"]
    assert ref in models(server)[0]["tags"]


def test_text_mode_is_html_escaped(server: Server, registry: LocalRegistry, tiny_gguf: Path):
    ref = push_tiny(server, tiny_gguf, f"{registry.host}/org/tiny:v1")
    reply = server.tcp.request("POST", "/models/create", json.dumps({"from": ref}).encode())
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert (
        '"' not in reply.body.decode() and "&#34;type&#34;:&#34;success&#34;" in reply.body.decode()
    )
    reply = server.tcp.request("POST", "/models/create", json.dumps({"from": ref}).encode(), JSON)
    assert reply.headers["Content-Type"] == "application/json"
    assert json.loads(reply.body.decode().splitlines()[-1])["type"] == "success"


def test_pull_errors_before_streaming(server: Server, registry: LocalRegistry):
    status, _, text = pull(server, f"{registry.host}/org/nothing:v1")
    assert (status, text) == (404, "Model not found")
    status, _, text = pull(server, "Not A Ref")
    assert (status, text) == (400, "Invalid model reference")


def test_unsupported_config_type_is_422(
    server: Server, registry: LocalRegistry, tiny_gguf: Path, tmp_path: Path
):
    cfg = tmp_path / "config.json"
    cfg.write_text("{}")
    oras_push(
        f"{registry.host}/org/odd:v1",
        (tiny_gguf, "application/vnd.docker.ai.gguf.v3"),
        (cfg, "application/vnd.example.model.config+json"),
    )
    status, _, text = pull(server, f"{registry.host}/org/odd:v1")
    assert status == 422
    assert text.startswith(
        'config type "application/vnd.example.model.config+json" is not supported'
    )
    assert models(server) == []


@pytest.mark.parametrize(
    ("config_type", "weights_type"),
    [
        ("application/vnd.docker.ai.model.config.v0.1+json", "application/vnd.docker.ai.gguf.v3"),
        ("application/vnd.docker.ai.model.config.v0.2+json", "application/vnd.docker.ai.gguf.v3"),
        ("application/vnd.cncf.model.config.v1+json", "application/vnd.cncf.model.weight.v1.gguf"),
    ],
)
def test_artifacts_pushed_by_oras_pull(
    server: Server,
    registry: LocalRegistry,
    tiny_gguf: Path,
    tmp_path: Path,
    config_type: str,
    weights_type: str,
):
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "config": {"format": "gguf", "architecture": "llama"},
                "descriptor": {"created": "2025-03-24T12:29:41Z"},
            }
        )
    )
    oras_push(f"{registry.host}/org/byoras:v1", (tiny_gguf, weights_type), (cfg, config_type))
    status, lines, _ = pull(server, f"{registry.host}/org/byoras:v1")
    assert status == 200 and lines[-1]["type"] == "success"
    [model] = models(server)
    assert model["created"] == 1742819381  # 2025-03-24T12:29:41Z
    assert model["config"]["architecture"] == "llama"
    bundled = server.models_path / "bundles/sha256" / model["id"][7:] / "model/model.gguf"
    assert bundled.read_bytes() == tiny_gguf.read_bytes()


def test_corrupt_blob_leaves_nothing(server: Server, registry: LocalRegistry, tiny_gguf: Path):
    ref = push_tiny(server, tiny_gguf, f"{registry.host}/org/tiny:v1")
    data = tiny_gguf.read_bytes()
    blob = registry.blob_file("sha256:" + hashlib.sha256(data).hexdigest())
    corrupt = bytearray(blob.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    blob.write_bytes(bytes(corrupt))
    status, lines, trailer = pull(server, ref)
    assert status == 200  # the failure comes after the stream started, as in DMR
    assert lines[-1]["type"] == "error" and "digest mismatch" in lines[-1]["message"]
    assert trailer.startswith("error while pulling model: ")
    assert models(server) == []
    assert all(
        not name.startswith(hashlib.sha256(data).hexdigest()) for name in visible_blobs(server)
    )


def test_basic_auth_registry(server: Server, tmp_path: Path, tiny_gguf: Path):
    reg = LocalRegistry(tmp_path / "authreg", credentials=("alice", "s3cret")).start()
    try:
        ref = f"{reg.host}/org/private:v1"
        status, _, text = pull(server, ref)
        assert (status, text) == (401, "Unauthorized")
        server.cli("package", "--gguf", str(tiny_gguf), "--load", ref)
        reply = server.tcp.request("POST", f"/models/{ref}/push", b"", JSON)
        assert (reply.status, reply.text) == (401, "Unauthorized")

        docker_login(server, tmp_path, reg.host, "alice", "s3cret")
        reply = server.tcp.request("POST", f"/models/{ref}/push", b"", JSON)
        assert reply.status == 200 and b"Model pushed successfully" in reply.body
        server.tcp.request("DELETE", f"/models/{ref}")
        status, lines, _ = pull(server, ref)
        assert status == 200 and lines[-1]["message"] == "Model pulled successfully"
    finally:
        reg.stop()


def test_registry_down_fails_fast(server: Server):
    status, _, text = pull(server, f"127.0.0.1:{free_port()}/org/m:v1")
    assert status == 500 and "unreachable" in text
    # A host that accepts connections and never answers (a firewall, a hung registry).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        status, _, text = pull(server, f"127.0.0.1:{silent.getsockname()[1]}/org/m:v1")
    assert status == 500 and "timed out" in text


def big_model(
    server: Server, registry: LocalRegistry, gguf: Path, tmp_path: Path, mib: int = 24
) -> tuple[str, str]:
    """A model with a large layer (a random 'license' file), pushed; returns ref and its digest."""
    blob = tmp_path / "big.bin"
    blob.write_bytes(os.urandom(mib * 1024 * 1024))
    ref = push_tiny(server, gguf, f"{registry.host}/org/big:v1", "--license", str(blob))
    return ref, "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()


def test_killed_pull_resumes_with_range(
    server: Server, registry: LocalRegistry, tiny_gguf: Path, tmp_path: Path
):
    _, digest = big_model(server, registry, tiny_gguf, tmp_path)
    size = 24 * 1024 * 1024
    partial = server.models_path / "blobs" / "sha256" / (digest[7:] + ".incomplete")
    with Proxy(registry.port, rate=6 * 1024 * 1024) as proxy:
        slow_ref = f"127.0.0.1:{proxy.port}/org/big:v1"
        body = json.dumps({"from": slow_ref}).encode()
        for line in server.tcp.lines("POST", "/models/create", body, JSON):
            msg = json.loads(line)
            if msg["layer"].get("id") == digest and msg["layer"]["current"] >= 6 * 1024 * 1024:
                break
        server.stop(signal.SIGKILL)
    kept = partial.stat().st_size
    assert kept >= 6 * 1024 * 1024

    server.port = free_port()
    server.start()
    status, lines, _ = pull(server, f"{registry.host}/org/big:v1")
    assert status == 200 and lines[-1]["message"] == "Model pulled successfully"
    first = next(x for x in lines if x["type"] == "progress" and x["layer"]["id"] == digest)
    assert first["layer"]["current"] >= kept  # progress starts where the partial ended
    resumed = registry.blob_gets(digest)[-1]
    assert resumed["http.response.status"] == 206
    assert resumed["http.response.written"] == size - kept  # fewer bytes the second time
    assert not partial.exists()
    assert len(models(server)) == 1


def test_network_cut_then_resume(
    server: Server, registry: LocalRegistry, tiny_gguf: Path, tmp_path: Path
):
    _, digest = big_model(server, registry, tiny_gguf, tmp_path)
    with Proxy(registry.port, rate=6 * 1024 * 1024) as proxy:
        last: dict[str, Any] = {}
        for last in pull_lines(server, f"127.0.0.1:{proxy.port}/org/big:v1"):
            if last["layer"].get("id") == digest and last["layer"]["current"] >= 4 * 1024 * 1024:
                proxy.cut()
        assert last["type"] == "error", last
    assert models(server) == []
    status, lines, _ = pull(server, f"{registry.host}/org/big:v1")
    assert status == 200 and lines[-1]["type"] == "success"
    assert registry.blob_gets(digest)[-1]["http.response.status"] == 206


def test_concurrent_pulls_share_one_download(
    server: Server, registry: LocalRegistry, tiny_gguf: Path, tmp_path: Path
):
    _, digest = big_model(server, registry, tiny_gguf, tmp_path, mib=12)
    with Proxy(registry.port, rate=6 * 1024 * 1024) as proxy:
        ref = f"127.0.0.1:{proxy.port}/org/big:v1"
        results: dict[str, list[Any]] = {}

        def second() -> None:
            results["second"] = pull(server, ref)[1]

        thread = threading.Thread(target=second)
        body = json.dumps({"from": ref}).encode()
        first = []
        for line in server.tcp.lines("POST", "/models/create", body, JSON):
            first.append(json.loads(line))
            if (
                not thread.is_alive()
                and first[-1]["layer"].get("current", 0) > 0
                and "started" not in results
            ):
                results["started"] = []
                thread.start()
        thread.join(60)
    assert first[-1]["message"] == "Model pulled successfully"
    assert results["second"][-1]["type"] == "success"
    assert len(registry.blob_gets(digest)) == 1
    assert len(models(server)) == 1


def test_cli_pull_and_push(server: Server, registry: LocalRegistry, tiny_gguf: Path):
    ref = f"{registry.host}/org/cli:v1"
    server.cli("package", "--gguf", str(tiny_gguf), "--load", ref)
    out = server.cli("push", ref)
    assert out.stdout.strip() == "Model pushed successfully"
    assert "done" in out.stderr
    server.cli("rm", ref)
    out = server.cli("pull", ref)
    assert out.stdout.strip() == "Model pulled successfully"
    assert len(models(server)) == 1
    failed = server.cli("pull", f"{registry.host}/org/absent:v1", check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines() == ["model-runner pull: Model not found"]


def test_package_push_without_a_service(server: Server, registry: LocalRegistry, tiny_gguf: Path):
    server.stop()
    out = server.cli(
        "package", "--gguf", str(tiny_gguf), "--push", f"{registry.host}/org/direct:v1"
    )
    assert out.stdout.strip() == "Model pushed successfully"
    server.start()
    status, lines, _ = pull(server, f"{registry.host}/org/direct:v1")
    assert status == 200 and lines[-1]["message"] == "Model pulled successfully"


def test_docker_hub_style_bearer_tokens_and_cdn_redirects(
    server: Server, registry: LocalRegistry, tiny_gguf: Path, tmp_path: Path
):
    from tests.hub import HubFront

    with HubFront(registry.port, "bob", "hunter2") as hub:
        ref = f"{hub.host}/org/tiny:v1"
        server.cli("package", "--gguf", str(tiny_gguf), "--load", ref)
        # Anonymous tokens cannot push.
        reply = server.tcp.request("POST", f"/models/{ref}/push", b"", JSON)
        assert (reply.status, reply.text) == (401, "Unauthorized")

        docker_login(server, tmp_path, hub.host, "bob", "hunter2")
        reply = server.tcp.request("POST", f"/models/{ref}/push", b"", JSON)
        assert reply.status == 200 and b"Model pushed successfully" in reply.body

        # Pull with an anonymous token; blobs come from the CDN, which saw no Authorization.
        server.stop()
        del server.extra_env["DOCKER_CONFIG"]
        server.start()
        server.tcp.request("DELETE", f"/models/{ref}")
        status, lines, _ = pull(server, ref)
        assert status == 200 and lines[-1]["message"] == "Model pulled successfully"
        assert hub.issued_anonymous >= 1 and hub.cdn_requests >= 2  # config + GGUF

        # A token the client brings ("bearer-token") is used as is; a bad one is refused.
        server.tcp.request("DELETE", f"/models/{ref}")
        body = json.dumps({"from": ref, "bearer-token": "not-a-valid-token"}).encode()
        reply = server.tcp.request("POST", "/models/create", body, JSON)
        assert (reply.status, reply.text) == (401, "Unauthorized")
        scope = "repository:org/tiny:pull"
        with urllib.request.urlopen(f"http://{hub.host}/token?service=hub.test&scope={scope}") as r:
            token = json.loads(r.read())["token"]
        body = json.dumps({"from": ref, "bearer-token": token}).encode()
        reply = server.tcp.request("POST", "/models/create", body, JSON)
        assert reply.status == 200 and b"Model pulled successfully" in reply.body


def test_at_most_two_pulls_download_at_once(
    server: Server, registry: LocalRegistry, tiny_gguf: Path, tmp_path: Path
):
    refs = []
    for i in range(3):
        blob = tmp_path / f"big{i}.bin"
        blob.write_bytes(os.urandom(6 * 1024 * 1024))
        refs.append(
            push_tiny(server, tiny_gguf, f"{registry.host}/org/m{i}:v1", "--license", str(blob))
        )
    with Proxy(registry.port, rate=4 * 1024 * 1024) as proxy:
        pulled = [r.replace(registry.host, f"127.0.0.1:{proxy.port}") for r in refs]

        def run(ref: str) -> None:
            body = json.dumps({"from": ref}).encode()
            for _ in server.tcp.lines("POST", "/models/create", body, JSON):
                pass

        threads = [threading.Thread(target=run, args=(ref,)) for ref in pulled]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(models(server)) == 3
    # The service's own log orders its steps: the last pull to start downloading did so only
    # once one of the others was done.
    steps = [
        "start" if "downloading model" in ln else "done"
        for ln in server.log().splitlines()
        if any(f"model={ref}" in ln for ref in pulled)
        and ("downloading model" in ln or "model pulled" in ln)
    ]
    starts = [i for i, step in enumerate(steps) if step == "start"]
    assert len(starts) == 3 and steps.count("done") == 3
    assert starts[2] > steps.index("done")


def test_client_gone_then_pull_again_resumes(
    server: Server, registry: LocalRegistry, tiny_gguf: Path, tmp_path: Path
):
    import http.client

    _, digest = big_model(server, registry, tiny_gguf, tmp_path, mib=16)
    with Proxy(registry.port, rate=4 * 1024 * 1024) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = json.dumps({"from": f"127.0.0.1:{proxy.port}/org/big:v1"})
        conn.request("POST", "/models/create", body, JSON)
        resp = conn.getresponse()
        while True:
            msg = json.loads(resp.readline())
            if msg["layer"].get("id") == digest and msg["layer"]["current"] >= 2 * 1024 * 1024:
                break
        conn.close()  # the client goes away mid-download
        # Pull again at once, while the abandoned download may still be letting go.
        status, lines, _ = pull(server, f"127.0.0.1:{proxy.port}/org/big:v1")
    assert status == 200 and lines[-1]["message"] == "Model pulled successfully", lines[-1]
    gets = registry.blob_gets(digest)
    assert gets[-1]["http.response.status"] in (200, 206)
    assert len(models(server)) == 1
    assert "Traceback" not in server.log()
