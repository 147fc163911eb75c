"""Issue 13, the store and transfer items: hostile registries and uploads, full disks. Real service
processes, a real registry where one can behave, and a scripted one where it must misbehave; a
small disk is a real tmpfs (mounting one needs root, which CI has)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from app.packaging import artifact
from tests.conftest import REPO, Server
from tests.hub import AppThread
from tests.registry import LocalRegistry, Proxy
from tests.test_distribution import big_model, models, pull, pull_lines, push_tiny
from tests.test_import import blob_member, file_member, store_files, tar_of, tiny_tarball, upload

MIB = 1024 * 1024
FLOOD = 256 * MIB  # far beyond any cap; reading all of it is what the caps are there to stop
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HostileRegistry(AppThread):
    """A registry on loopback that answers as a test scripts it, counting the body bytes it sent."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[str, Handler] = {}
        self.requests: list[str] = []
        self.sent = 0

    def _routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._dispatch)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(request.path)
        handler = self.routes.get(request.path)
        return await handler(request) if handler else web.Response(status=404)

    def flood(
        self, status: int = 200, length: int | None = None, headers: dict[str, str] | None = None
    ) -> Handler:
        """FLOOD bytes of blanks (chunked unless ``length`` is claimed), a MiB at a time, then a
        byte every 0.1 s until the client hangs up."""

        async def handler(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(status=status, headers=headers)
            if length is not None:
                resp.content_length = length
            await resp.prepare(request)
            pieces = [b" " * MIB] * (FLOOD // MIB) if length is None else [b" " * MIB]
            try:
                for piece in pieces + [b" "] * 300:
                    await resp.write(piece)
                    self.sent += len(piece)
                    if len(piece) == 1:
                        await asyncio.sleep(0.1)
            except (ConnectionError, RuntimeError):
                pass  # the client stopped reading: what the test wants
            return resp

        return handler


def serve(
    body: bytes, content_type: str = "application/octet-stream", status: int = 200, **headers: str
) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=body, status=status, headers={"Content-Type": content_type, **headers}
        )

    return handler


def assert_clean_log(server: Server) -> None:
    log = server.log()
    assert "Traceback" not in log and "status=500" not in log, log[-3000:]


def visible(server: Server) -> list[str]:
    """Blobs a model could use: what is left once partial and temp files are set aside."""
    return [n for n in store_files(server) if not n.endswith(".incomplete") and n[0] != "."]


@pytest.fixture
def small_disk(server: Server) -> Iterator[Callable[[int], Server]]:
    """Restart the service on a tmpfs of the given MiB as MODELS_PATH."""
    mounted: list[Path] = []

    def mount(mib: int) -> Server:
        if os.geteuid() != 0:
            pytest.skip("a small disk is a tmpfs, and mounting one needs root")
        server.stop()
        shutil.rmtree(server.models_path)
        server.models_path.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(server.models_path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # root without the right to mount (a locked-down container)
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(server.models_path)
        server.start()
        return server

    yield mount
    if mounted and server.proc is not None and server.proc.poll() is None:
        server.stop(signal.SIGKILL)
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write until the disk says no: another program has filled it."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * MIB)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


# -- a: free space ----------------------------------------------------------------------------
def test_pull_of_more_than_the_disk_holds_is_refused_before_downloading(server: Server):
    config = json.dumps({"config": {"format": "gguf"}}).encode()
    layer = "sha256:" + "ab" * 32
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": "application/vnd.docker.ai.model.config.v0.1+json",
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": [
            {"mediaType": "application/vnd.docker.ai.gguf.v3", "digest": layer, "size": 100 << 40}
        ],
    }
    with HostileRegistry() as reg:
        reg.routes["/v2/org/m/manifests/v1"] = serve(json.dumps(manifest).encode(), MANIFEST_TYPE)
        reg.routes[f"/v2/org/m/blobs/{manifest['config']['digest']}"] = serve(config)
        status, lines, trailer = pull(server, f"{reg.host}/org/m:v1")
        assert f"/v2/org/m/blobs/{layer}" not in reg.requests
    assert status == 200 and lines[-1]["type"] == "error", lines
    message = lines[-1]["message"]
    assert message.startswith("Error: not enough disk space"), message
    assert "100.0 TiB" in message and "free" in message and "reserve" in message
    assert trailer.startswith("error while pulling model: not enough disk space")
    assert store_files(server) == []
    assert_clean_log(server)


def test_disk_filling_up_mid_pull_drops_the_partial(
    small_disk: Callable[[int], Server], registry: LocalRegistry, tiny_gguf: Path, tmp_path: Path
):
    server = small_disk(40)
    ref, digest = big_model(server, registry, tiny_gguf, tmp_path, mib=24)
    filler = server.models_path / "filler"
    with Proxy(registry.port, rate=6 * MIB) as proxy:
        last: dict[str, Any] = {}
        for last in pull_lines(server, f"127.0.0.1:{proxy.port}/org/big:v1"):
            moving = last["layer"].get("id") == digest and last["layer"]["current"] >= 4 * MIB
            if moving and not filler.exists():
                fill(filler)
    assert last["type"] == "error" and "disk" in last["message"], last
    assert visible(server) == [] and store_files(server) == []  # the partial went too
    assert shutil.disk_usage(server.models_path).free >= 4 * MIB  # the disk is not left full
    assert server.tcp.request("GET", "/models").status == 200
    filler.unlink()
    status, lines, _ = pull(server, ref)
    assert status == 200 and lines[-1]["message"] == "Model pulled successfully"
    assert_clean_log(server)


# -- b: /models/load keeps only what the manifest names -----------------------------------------
def test_blobs_the_manifest_does_not_name_are_not_kept(server: Server, tiny_gguf: Path):
    built, _ = tiny_tarball(tiny_gguf)
    extra = os.urandom(MIB)
    extra_hex = hashlib.sha256(extra).hexdigest()
    blobs = [blob_member(b) for b in built.blob_sources()]
    body = tar_of(
        *blobs,
        file_member(f"blobs/sha256/{extra_hex}", extra),
        file_member("manifest.json", built.manifest),
    )
    assert upload(server, body).status == 200
    assert extra_hex not in store_files(server)
    # An orphan an older build left behind (written long ago): the next delete collects it.
    orphan = os.urandom(1024)
    orphan_path = server.models_path / "blobs/sha256" / hashlib.sha256(orphan).hexdigest()
    orphan_path.write_bytes(orphan)
    os.utime(orphan_path, (time.time() - 7200, time.time() - 7200))
    reply = server.tcp.request("DELETE", f"/models/{built.id}")
    assert reply.status == 200, reply.text
    assert store_files(server) == []
    assert_clean_log(server)


def test_sparse_members_are_refused(server: Server, tiny_gguf: Path, tmp_path: Path):
    # A GNU sparse member: a few KiB of archive that expands to 64 MiB on disk.
    built = artifact.build(tiny_gguf)
    root = tmp_path / "tree"
    (root / "blobs/sha256").mkdir(parents=True)
    for blob in built.blob_sources():
        with blob.open() as f:
            (root / "blobs/sha256" / blob.descriptor.hex).write_bytes(f.read())
    expanded = bytes(64 * MIB - 4096) + os.urandom(4096)
    sparse = root / "blobs/sha256" / hashlib.sha256(expanded).hexdigest()
    with open(sparse, "wb") as f:
        f.truncate(64 * MIB - 4096)
        f.seek(64 * MIB - 4096)
        f.write(expanded[-4096:])
    (root / "manifest.json").write_bytes(built.manifest)
    tar = tmp_path / "sparse.tar"
    subprocess.run(
        ["tar", "--format=gnu", "--sparse", "-cf", str(tar), "-C", str(root), "blobs"],
        check=True,
    )
    subprocess.run(["tar", "-rf", str(tar), "-C", str(root), "manifest.json"], check=True)
    assert tar.stat().st_size < 2 * MIB
    reply = upload(server, tar.read_bytes())
    assert reply.status == 400, reply.text
    assert "sparse" in reply.text and f"blobs/sha256/{sparse.name}" in reply.text
    assert store_files(server) == [] and models(server) == []
    # Devices are no blobs either; the answer names the member.
    device = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
    device.type = tarfile.CHRTYPE
    reply = upload(server, tar_of((device, None)))
    assert reply.status == 400 and "blobs/sha256/" + "0" * 64 in reply.text
    assert_clean_log(server)


# -- c: every read from a registry is capped ------------------------------------------------------
@pytest.mark.parametrize("case", ["manifest", "manifest-length", "error-body", "token"])
def test_huge_registry_replies_are_cut_short(server: Server, case: str):
    with HostileRegistry() as reg:
        path = "/v2/org/m/manifests/v1"
        if case == "manifest":
            reg.routes[path] = reg.flood(headers={"Content-Type": MANIFEST_TYPE})
        elif case == "manifest-length":  # a Content-Length to refuse at once, never to trust
            reg.routes[path] = reg.flood(length=2 << 30, headers={"Content-Type": MANIFEST_TYPE})
        elif case == "error-body":
            reg.routes[path] = reg.flood(status=404)
        else:
            challenge = f'Bearer realm="http://{reg.host}/token",service="t",scope="x"'
            reg.routes[path] = serve(b"", status=401, **{"WWW-Authenticate": challenge})
            reg.routes["/token"] = reg.flood()
        status, _, text = pull(server, f"{reg.host}/org/m:v1")
        sent = reg.sent
    assert sent < 32 * MIB, f"the service read {sent} bytes"
    if case == "error-body":
        assert (status, text) == (404, "Model not found")
    else:
        assert status == 422 and "larger than" in text, (status, text)
    assert_clean_log(server)


# -- d: a failed pull leaves nothing but partial downloads --------------------------------------
def test_failed_pull_leaves_only_partial_layers(
    server: Server, registry: LocalRegistry, tiny_gguf: Path, tmp_path: Path
):
    template = tmp_path / "template.jinja"
    template.write_text("{{ messages }}")
    ref = push_tiny(
        server, tiny_gguf, f"{registry.host}/org/t:v1", "--chat-template", str(template)
    )
    gguf = registry.blob_file("sha256:" + hashlib.sha256(tiny_gguf.read_bytes()).hexdigest())
    good = gguf.read_bytes()
    gguf.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    status, lines, _ = pull(server, ref)
    assert status == 200 and lines[-1]["type"] == "error", lines
    assert visible(server) == []
    gguf.write_bytes(good)
    status, lines, _ = pull(server, ref)
    assert status == 200 and lines[-1]["message"] == "Model pulled successfully"
    assert [n for n in store_files(server) if n.endswith(".incomplete")] == []
    assert_clean_log(server)


# -- e: package --push leaves the store alone ---------------------------------------------------
def test_package_push_does_not_create_a_store(
    server: Server, registry: LocalRegistry, tiny_gguf: Path, tmp_path: Path
):
    env = {k: v for k, v in server.env.items() if k != "MODELS_PATH"}
    env["HOME"] = str(tmp_path / "home")
    target = f"{registry.host}/org/pushed:v1"
    result = subprocess.run(
        [sys.executable, "-m", "app", "package", "--gguf", str(tiny_gguf), "--push", target],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Model pushed successfully"
    assert not (tmp_path / "home").exists()


# -- f: the reserve is proportionate, and the refusal says why ----------------------------------
def test_small_import_fits_a_small_disk(small_disk: Callable[[int], Server], tiny_gguf: Path):
    server = small_disk(48)
    _, tarball = tiny_tarball(tiny_gguf)
    reply = upload(server, tarball)
    assert reply.status == 200, reply.text
    big = os.urandom(46 * MIB)
    reply = upload(
        server, tar_of(file_member(f"blobs/sha256/{hashlib.sha256(big).hexdigest()}", big))
    )
    assert reply.status == 507, reply.text
    assert "needs 46.0 MiB" in reply.text and "free" in reply.text and "reserve" in reply.text
    assert len(models(server)) == 1
    assert_clean_log(server)
