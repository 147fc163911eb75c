"""``POST /models/load`` does not trust its upload: a truncated, corrupt or hostile tarball
gets a clear 4xx and leaves nothing half-stored; a service killed mid-import restarts clean."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import tarfile
import time
from pathlib import Path

import pytest

from app.oci.blobs import BlobSource
from app.oci.tarball import iter_tar
from app.packaging import artifact
from tests.conftest import Server
from tests.netutil import free_port
from tests.tiny_gguf import write_tiny_gguf

TAR = {"Content-Type": "application/x-tar"}


def tiny_tarball(gguf: Path) -> tuple[artifact.Artifact, bytes]:
    built = artifact.build(gguf)
    return built, b"".join(iter_tar(built.blob_sources(), built.manifest))


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def blob_member(blob: BlobSource) -> tuple[tarfile.TarInfo, bytes]:
    with blob.open() as f:
        return file_member(f"blobs/sha256/{blob.descriptor.hex}", f.read())


def store_files(server: Server) -> list[str]:
    return sorted(p.name for p in (server.models_path / "blobs" / "sha256").iterdir())


def upload(server: Server, body: bytes):
    return server.tcp.request("POST", "/models/load", body, TAR)


def assert_rejected(server: Server, body: bytes, status: int, text: str) -> None:
    before = store_files(server)
    reply = upload(server, body)
    assert reply.status == status, reply.text
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert text in reply.text, reply.text
    assert store_files(server) == before  # no blob, temp or partial file left behind
    assert server.tcp.request("GET", "/models").status == 200


def test_truncated_upload_stores_nothing(server: Server, tiny_gguf: Path):
    _, tarball = tiny_tarball(tiny_gguf)
    for cut in (100, 700, len(tarball) // 2, len(tarball) - 2048):
        assert_rejected(server, tarball[:cut], 400, "error while loading model:")
    assert json.loads(server.tcp.request("GET", "/models").body) == []


def test_corrupt_blob_is_refused(server: Server, tiny_gguf: Path):
    _built, tarball = tiny_tarball(tiny_gguf)
    data = bytearray(tarball)
    data[len(data) // 2] ^= 0xFF  # inside the GGUF blob
    assert_rejected(server, bytes(data), 400, "digest mismatch")


@pytest.mark.parametrize(
    "name",
    ["../evil", "/tmp/evil-abs", "blobs/sha256/../../../evil", "blobs/sha256/" + "0" * 63, "x"],
)
def test_unexpected_paths_are_refused(server: Server, tiny_gguf: Path, name: str):
    assert_rejected(server, tar_of(file_member(name, b"pwned")), 400, "unexpected archive entry")
    assert not (server.models_path.parent / "evil").exists()
    assert not Path("/tmp/evil-abs").exists()


def test_links_and_devices_are_refused(server: Server):
    digest = hashlib.sha256(b"").hexdigest()
    link = tarfile.TarInfo(f"blobs/sha256/{digest}")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    assert_rejected(server, tar_of((link, None)), 400, "unexpected archive entry")
    hard = tarfile.TarInfo("manifest.json")
    hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
    assert_rejected(server, tar_of((hard, None)), 400, "unexpected archive entry")
    fifo = tarfile.TarInfo("blobs/sha256/fifo")
    fifo.type = tarfile.FIFOTYPE
    assert_rejected(server, tar_of((fifo, None)), 400, "unexpected archive entry")


def test_manifest_problems(server: Server, tiny_gguf: Path):
    built, _ = tiny_tarball(tiny_gguf)
    blobs = [blob_member(b) for b in built.blob_sources()]
    assert_rejected(server, tar_of(*blobs), 400, "archive has no manifest.json")
    assert_rejected(
        server, tar_of(*blobs, file_member("manifest.json", b"{nope")), 400, "invalid manifest.json"
    )
    # A manifest naming a blob the archive does not carry.
    missing = tar_of(*blobs[1:], file_member("manifest.json", built.manifest))
    assert_rejected(server, missing, 400, "archive lacks blob")
    # A config media type DMR would not run gets 422, as a pull of it would.
    doc = json.loads(built.manifest)
    doc["config"]["mediaType"] = "application/vnd.example.other+json"
    odd = tar_of(*blobs, file_member("manifest.json", json.dumps(doc).encode()))
    assert_rejected(server, odd, 422, 'config type "application/vnd.example.other+json"')
    assert_rejected(server, b"this is not a tar archive at all" * 40, 400, "invalid or truncated")


def test_failed_import_keeps_blobs_of_stored_models(server: Server, tiny_gguf: Path):
    built, tarball = tiny_tarball(tiny_gguf)
    assert upload(server, tarball).status == 200
    before = store_files(server)
    # The same blobs again, but the manifest names one more that is not there.
    doc = json.loads(built.manifest)
    doc["layers"].append(
        {
            "mediaType": "application/vnd.docker.ai.license",
            "size": 1,
            "digest": "sha256:" + "1" * 64,
        }
    )
    blobs = [blob_member(b) for b in built.blob_sources()]
    reply = upload(server, tar_of(*blobs, file_member("manifest.json", json.dumps(doc).encode())))
    assert reply.status == 400
    assert store_files(server) == before
    assert server.tcp.request("GET", f"/models/{built.id}/export").status == 200


def test_sigkill_during_import_leaves_a_clean_store(
    server: Server, tiny_gguf: Path, tmp_path: Path
):
    import http.client

    _, tarball = tiny_tarball(tiny_gguf)
    assert upload(server, tarball).status == 200
    [whole] = json.loads(server.tcp.request("GET", "/models").body)

    # Start a second import of a large blob, and kill the service while the blob is being written.
    big = os.urandom(32 * 1024 * 1024)
    info = tarfile.TarInfo("blobs/sha256/" + hashlib.sha256(big).hexdigest())
    info.size = len(big)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/models/load")
    conn.putheader("Content-Type", "application/x-tar")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    head = info.tobuf() + big[: 8 * 1024 * 1024]
    conn.send(b"%x\r\n%s\r\n" % (len(head), head))
    blobs = server.models_path / "blobs" / "sha256"
    deadline = time.monotonic() + 20
    while not any(p.name.startswith(".tmp-") for p in blobs.iterdir()):
        assert time.monotonic() < deadline, "the import never started writing"
        time.sleep(0.01)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    conn.close()

    server.port = free_port()
    server.start()
    assert [p.name for p in blobs.iterdir() if p.name.startswith(".")] == []
    assert json.loads(server.tcp.request("GET", "/models").body) == [whole]
    assert server.tcp.request("GET", f"/models/{whole['id']}/export").status == 200
    assert "error" not in server.log().split("listening")[-1].lower()


def test_reimport_of_a_stored_model_is_idempotent(server: Server, tmp_path: Path):
    gguf = write_tiny_gguf(tmp_path / "m.gguf", seed=3)
    _, tarball = tiny_tarball(gguf)
    assert upload(server, tarball).status == 200
    files = store_files(server)
    assert upload(server, tarball).status == 200
    assert store_files(server) == files
    assert len(json.loads(server.tcp.request("GET", "/models").body)) == 1


def test_client_gone_mid_upload_leaves_nothing(server: Server):
    import http.client

    big = os.urandom(16 * 1024 * 1024)
    info = tarfile.TarInfo("blobs/sha256/" + hashlib.sha256(big).hexdigest())
    info.size = len(big)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/models/load")
    conn.putheader("Content-Length", str(len(big) + 4096))
    conn.endheaders()
    conn.send(info.tobuf() + big[: 4 * 1024 * 1024])
    blobs = server.models_path / "blobs" / "sha256"
    deadline = time.monotonic() + 20
    while not any(p.name.startswith(".tmp-") for p in blobs.iterdir()):
        assert time.monotonic() < deadline, "the import never started writing"
        time.sleep(0.01)
    conn.close()
    while any(blobs.iterdir()):
        assert time.monotonic() < deadline, f"left behind: {list(blobs.iterdir())}"
        time.sleep(0.01)
    assert json.loads(server.tcp.request("GET", "/models").body) == []
    assert "unhandled" not in server.log()


def test_huge_extended_tar_header_is_refused(server: Server):
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    pax.size = 8 * 1024 * 1024
    body = pax.tobuf(tarfile.USTAR_FORMAT) + b"0" * pax.size
    assert_rejected(server, body, 400, "extended tar header")


def test_compressed_upload_is_refused(server: Server, tiny_gguf: Path):
    import gzip

    _, tarball = tiny_tarball(tiny_gguf)
    reply = server.tcp.request(
        "POST", "/models/load", gzip.compress(tarball), {**TAR, "Content-Encoding": "gzip"}
    )
    assert reply.status == 400 and "compressed uploads" in reply.text
    assert json.loads(server.tcp.request("GET", "/models").body) == []


def test_config_that_is_not_a_json_object_is_refused(server: Server, tiny_gguf: Path):
    built, _ = tiny_tarball(tiny_gguf)
    bad_config = b"[1, 2, 3]"
    doc = json.loads(built.manifest)
    doc["config"]["digest"] = "sha256:" + hashlib.sha256(bad_config).hexdigest()
    doc["config"]["size"] = len(bad_config)
    layers = [blob_member(b) for b in built.blob_sources()[:-1]]
    config = file_member(f"blobs/sha256/{doc['config']['digest'][7:]}", bad_config)
    body = tar_of(*layers, config, file_member("manifest.json", json.dumps(doc).encode()))
    assert_rejected(server, body, 400, "not a JSON object")
    assert json.loads(server.tcp.request("GET", "/models").body) == []


def test_model_without_gguf_weights_imports_and_lists(server: Server, tmp_path: Path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    config = json.dumps({"config": {"format": "safetensors"}}).encode()
    layer = {
        "mediaType": "application/vnd.docker.ai.safetensors",
        "size": weights.stat().st_size,
        "digest": "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    cfg = {
        "mediaType": "application/vnd.docker.ai.model.config.v0.1+json",
        "size": len(config),
        "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
    }
    manifest = json.dumps({"schemaVersion": 2, "config": cfg, "layers": [layer]}).encode()
    body = tar_of(
        file_member(f"blobs/sha256/{layer['digest'][7:]}", weights.read_bytes()),
        file_member(f"blobs/sha256/{cfg['digest'][7:]}", config),
        file_member("manifest.json", manifest),
    )
    reply = upload(server, body)
    assert reply.status == 200, reply.text
    [model] = json.loads(server.tcp.request("GET", "/models").body)
    assert model["config"]["format"] == "safetensors"
    assert server.tcp.request("GET", f"/models/{model['id']}").status == 200


def test_export_of_a_model_with_a_missing_blob_fails_before_streaming(
    server: Server, tiny_gguf: Path
):
    built, tarball = tiny_tarball(tiny_gguf)
    assert upload(server, tarball).status == 200
    (server.models_path / "blobs" / "sha256" / built.layers[0].descriptor.hex).unlink()
    reply = server.tcp.request("GET", f"/models/{built.id}/export")
    assert reply.status == 500 and reply.text.startswith("error while exporting model:")


def test_sigterm_during_a_stalled_upload_exits_promptly(server: Server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/models/load")
    conn.putheader("Content-Length", str(10 * 1024 * 1024))
    conn.endheaders()
    conn.send(b"\0" * 1024)  # then nothing: a client that stalls
    start = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 15
    conn.close()
