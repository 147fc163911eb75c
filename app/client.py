"""A small blocking HTTP client for the CLI: TCP (``http://host:port``) or ``unix:///path``."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

DEFAULT_HOST = "http://localhost:12434"


class ClientError(Exception):
    """The service could not be reached, or answered with an error; the message says which."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace").strip()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class ServiceClient:
    def __init__(
        self, host: str = DEFAULT_HOST, timeout: float | None = 300, api_key: str | None = None
    ) -> None:
        self.host = host
        self.timeout = timeout
        # Sent with every request: a service with MODEL_RUNNER_API_KEY set asks for it.
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        url = urlsplit(host if "://" in host else f"http://{host}")
        self._unix = url.path if url.scheme == "unix" else None
        if url.scheme not in ("http", "unix"):
            raise ClientError(f"MODEL_RUNNER_HOST={host!r}: use http://HOST:PORT or unix:///PATH")
        self._netloc = url.netloc
        self._base = url.path.rstrip("/") if url.scheme == "http" else ""

    def _connection(self) -> http.client.HTTPConnection:
        if self._unix is not None:
            return _UnixConnection(self._unix, self.timeout)
        return http.client.HTTPConnection(self._netloc, timeout=self.timeout)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        conn = self._connection()
        try:
            conn.request(
                method,
                self._base + path,
                body=body,
                headers={**self._auth, **(headers or {})},
                encode_chunked=body is not None and not isinstance(body, bytes),
            )
            resp = conn.getresponse()
            return Reply(resp.status, dict(resp.getheaders()), resp.read())
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"cannot reach the model runner at {self.host}: {exc}") from None
        finally:
            conn.close()

    def checked(self, method: str, path: str, *args: Any, **kwargs: Any) -> Reply:
        """Like request(), but an error status raises ClientError with the service's message."""
        reply = self.request(method, path, *args, **kwargs)
        if reply.status >= 400:
            raise ClientError(reply.text or f"HTTP {reply.status}")
        return reply

    def lines(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Iterator[bytes]:
        """A streamed response, line by line; an error status raises ClientError first."""
        conn = self._connection()
        try:
            conn.request(
                method, self._base + path, body=body, headers={**self._auth, **(headers or {})}
            )
            # A pull may wait its turn behind others with nothing to say for a long while.
            conn.sock.settimeout(None)
            resp = conn.getresponse()
            if resp.status >= 400:
                text = resp.read().decode("utf-8", "replace").strip()
                raise ClientError(text or f"HTTP {resp.status}")
            while line := resp.readline():
                yield line
        except (OSError, http.client.HTTPException) as exc:
            raise ClientError(f"cannot reach the model runner at {self.host}: {exc}") from None
        finally:
            conn.close()


def model_path(ref: str) -> str:
    """``/models/<ref>`` with the reference escaped but its slashes kept (DMR's catch-all)."""
    return "/models/" + quote(ref.strip(), safe="/:@")
