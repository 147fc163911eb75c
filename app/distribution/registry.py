"""A client for the OCI distribution API (what Docker Hub and CNCF distribution speak).

Why not oras-py for this: it is synchronous (requests), its retry decorator keeps a caller
waiting for minutes on a dead registry, and its pull neither streams progress nor verifies. Here
every request has a short deadline, blob bodies stream, and auth follows Docker's rules: anonymous
or credentialed bearer tokens from the ``WWW-Authenticate`` challenge, basic auth, or a token
the caller already has.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin

import aiohttp

from app import __version__
from app.distribution.auth import Credentials, parse_challenge
from app.oci.manifest import MANIFEST_MEDIA_TYPE, MAX_MANIFEST_BYTES
from app.oci.reference import DEFAULT_REGISTRY, Reference
from app.store.space import human

MANIFEST_ACCEPT = ", ".join(
    [
        MANIFEST_MEDIA_TYPE,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)
# Metadata requests must fail fast when a registry is down; blob bodies may stall briefly.
METADATA_TIMEOUT = aiohttp.ClientTimeout(total=8, sock_connect=5)
BLOB_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
_MAX_REDIRECTS = 5
# Every reply held in memory is read while it streams and cut at a cap: a hostile registry's
# endless manifest or error body must not be read whole first (1.5 GB took 3 GB of memory).
# Tokens are JWTs of a few KiB; only the start of an error body is ever shown.
MAX_TOKEN_BYTES = 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
_USER_AGENT = f"model-runner/{__version__}"


class RegistryError(Exception):
    """The registry refused or failed; the message is what a user should read."""


class Unauthorized(RegistryError):
    pass


class NotFound(RegistryError):
    pass


class Unreachable(RegistryError):
    pass


class TooLarge(RegistryError):
    """A registry reply is larger than any sane one; the registry is broken or hostile."""


@dataclass
class Registry:
    """One repository on one registry, with the auth state for it."""

    session: aiohttp.ClientSession
    ref: Reference
    insecure: bool = False
    credentials: Credentials | None = None
    bearer_token: str | None = None
    _auth: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.bearer_token:
            self._auth = f"Bearer {self.bearer_token}"

    @property
    def host(self) -> str:
        return (
            "registry-1.docker.io" if self.ref.registry == DEFAULT_REGISTRY else self.ref.registry
        )

    @property
    def base(self) -> str:
        scheme = "http" if self.insecure else "https"
        return f"{scheme}://{self.host}/v2/{self.ref.repository}"

    # -- requests ---------------------------------------------------------------------------
    async def _send(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
        timeout: aiohttp.ClientTimeout = METADATA_TIMEOUT,
        retry_auth: bool = True,
    ) -> aiohttp.ClientResponse:
        """One request with auth; a 401 is answered once with the challenge's credentials.

        Redirects are followed by hand so that the registry's Authorization header is never
        sent to the blob storage it redirects to (a CDN or S3 with its own signature).
        """
        hdrs = {"User-Agent": _USER_AGENT, **(headers or {})}
        if self._auth:
            hdrs["Authorization"] = self._auth
        # A streamed body is given as a factory, so it can be sent again after re-auth.
        payload = data() if callable(data) else data
        try:
            resp = await self.session.request(
                method, url, headers=hdrs, data=payload, timeout=timeout, allow_redirects=False
            )
            for _ in range(_MAX_REDIRECTS):
                if resp.status not in (301, 302, 303, 307, 308) or "Location" not in resp.headers:
                    break
                target = urljoin(url, resp.headers["Location"])
                resp.release()
                hdrs.pop("Authorization", None)
                resp = await self.session.request(
                    method, target, headers=hdrs, timeout=timeout, allow_redirects=False
                )
        except (aiohttp.ClientConnectionError, TimeoutError, aiohttp.InvalidURL) as exc:
            raise Unreachable(f"registry {self.host} is unreachable: {_describe(exc)}") from None
        replayable = data is None or isinstance(data, bytes) or callable(data)
        if resp.status == 401 and retry_auth and replayable:
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.release()
            if await self._authenticate(challenge):
                return await self._send(
                    method, url, headers=headers, data=data, timeout=timeout, retry_auth=False
                )
            raise Unauthorized("Unauthorized")
        if resp.status == 401:
            resp.release()
            raise Unauthorized("Unauthorized")
        return resp

    async def _authenticate(self, header: str) -> bool:
        """Set ``_auth`` from a challenge; False when there is nothing (new) to try."""
        challenge = parse_challenge(header)
        if challenge is None:
            return False
        if challenge.scheme == "basic":
            if self.credentials is None:
                return False
            self._auth = self.credentials.basic()
            return True
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            return False
        if self.bearer_token:
            return False  # the caller's token was refused; a fresh one would not be ours
        query = {k: v for k, v in challenge.params.items() if k in ("service", "scope")}
        url = challenge.params["realm"] + ("?" + urlencode(query) if query else "")
        hdrs = {"User-Agent": _USER_AGENT}
        if self.credentials is not None:
            hdrs["Authorization"] = self.credentials.basic()
        try:
            async with self.session.get(url, headers=hdrs, timeout=METADATA_TIMEOUT) as resp:
                if resp.status in (401, 403):
                    return False
                if resp.status != 200:
                    raise RegistryError(f"token server {url} answered {resp.status}")
                too_large = f"the token reply from {url} is larger than {human(MAX_TOKEN_BYTES)}"
                doc = json.loads(await read_capped(resp, MAX_TOKEN_BYTES, too_large))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise Unreachable(f"cannot get a registry token from {url}: {_describe(exc)}") from None
        token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            return False
        self._auth = f"Bearer {token}"
        return True

    async def _check(self, resp: aiohttp.ClientResponse, what: str) -> None:
        if resp.status < 300:
            return
        try:
            prefix = await read_capped(resp, MAX_ERROR_BYTES, None)
        except (aiohttp.ClientError, TimeoutError):
            prefix = b""  # the status says enough
        resp.release()
        body = prefix.decode(errors="replace")
        codes = _error_codes(body)
        if resp.status == 404 or codes & {"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN"}:
            raise NotFound(f"{what}: not found")
        if resp.status == 403 or "DENIED" in codes:
            raise Unauthorized("Unauthorized")
        raise RegistryError(f"{what}: registry answered {resp.status}: {body.strip()[:300]}")

    # -- pull -------------------------------------------------------------------------------
    async def manifest(self) -> tuple[bytes, str]:
        """The raw manifest named by the reference (tag or digest) and its media type."""
        target = self.ref.digest or self.ref.tag
        resp = await self._send(
            "GET", f"{self.base}/manifests/{target}", headers={"Accept": MANIFEST_ACCEPT}
        )
        await self._check(resp, f"manifest {self.ref}")
        async with resp:
            too_large = f"manifest of {self.ref} is larger than {human(MAX_MANIFEST_BYTES)}"
            raw = await read_capped(resp, MAX_MANIFEST_BYTES, too_large)
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
        return raw, media_type

    async def blob_bytes(self, digest: str, limit: int) -> bytes:
        resp = await self._send("GET", f"{self.base}/blobs/{digest}")
        await self._check(resp, f"blob {digest}")
        async with resp:
            return await read_capped(resp, limit, f"blob {digest} is larger than its manifest says")

    async def open_blob(self, digest: str, offset: int) -> aiohttp.ClientResponse:
        """A streaming response for a blob; 206 when the registry honoured ``offset``."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = await self._send(
            "GET", f"{self.base}/blobs/{digest}", headers=headers, timeout=BLOB_TIMEOUT
        )
        if resp.status == 416:  # our partial is as long as the blob: read it again whole
            resp.release()
            return await self.open_blob(digest, 0)
        await self._check(resp, f"blob {digest}")
        return resp

    # -- push -------------------------------------------------------------------------------
    async def blob_exists(self, digest: str) -> bool:
        resp = await self._send("HEAD", f"{self.base}/blobs/{digest}")
        resp.release()
        if resp.status == 404:
            return False
        await self._check(resp, f"blob {digest}")
        return True

    async def start_upload(self) -> str:
        resp = await self._send("POST", f"{self.base}/blobs/uploads/")
        await self._check(resp, f"upload to {self.ref.name}")
        resp.release()
        return urljoin(self.base + "/", resp.headers["Location"])

    async def check_push_access(self) -> None:
        """Fail before any progress is streamed if we may not push here."""
        location = await self.start_upload()
        resp = await self._send("DELETE", location)
        resp.release()

    async def upload_chunk(
        self, location: str, start: int, body: Callable[[], AsyncIterator[bytes]], size: int
    ) -> str:
        resp = await self._send(
            "PATCH",
            location,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{start}-{start + size - 1}",
                "Content-Length": str(size),
            },
            data=body,
            timeout=BLOB_TIMEOUT,
        )
        await self._check(resp, "blob upload")
        resp.release()
        return urljoin(location, resp.headers["Location"])

    async def finish_upload(self, location: str, digest: str) -> None:
        sep = "&" if "?" in location else "?"
        resp = await self._send(
            "PUT",
            f"{location}{sep}{urlencode({'digest': digest})}",
            headers={"Content-Length": "0"},
            data=b"",
        )
        await self._check(resp, f"blob {digest}")
        resp.release()

    async def put_manifest(self, raw: bytes, media_type: str = MANIFEST_MEDIA_TYPE) -> None:
        resp = await self._send(
            "PUT",
            f"{self.base}/manifests/{self.ref.tag}",
            headers={"Content-Type": media_type},
            data=raw,
        )
        await self._check(resp, f"manifest {self.ref}")
        resp.release()


async def read_capped(resp: aiohttp.ClientResponse, cap: int, too_large: str | None) -> bytes:
    """The body, read as it streams and never past ``cap`` bytes: beyond it, raise TooLarge with
    ``too_large``, or with None keep the first ``cap`` bytes. A ``Content-Length`` over the cap is
    refused before reading; one under it proves nothing (the stream is counted anyway)."""
    if too_large is not None and (resp.content_length or 0) > cap:
        raise TooLarge(too_large)
    data = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > cap:
            if too_large is not None:
                raise TooLarge(too_large)
            return bytes(data[:cap])
    return bytes(data)


def _error_codes(body: str) -> set[str]:
    try:
        doc = json.loads(body)
    except ValueError:
        return set()
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return set()
    return {e.get("code") for e in errors if isinstance(e, dict) and isinstance(e.get("code"), str)}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
