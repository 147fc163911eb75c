"""Registry credentials and challenges, the way the Docker client handles them.

Credentials come from Docker's ``config.json``: inline ``auths`` entries (``auth`` is base64
``user:password``), or a credential helper (``credsStore``/``credHelpers``) run as
``docker-credential-<name> get``. Challenges come from ``WWW-Authenticate``.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_DOCKER_HUB_KEYS = (
    "https://index.docker.io/v1/",
    "index.docker.io",
    "docker.io",
    "registry-1.docker.io",
    "https://registry-1.docker.io",
)
_PARAM = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
_HELPER_TIMEOUT_S = 10


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {m[1].lower(): m[2] if m[2] is not None else m[3] for m in _PARAM.finditer(rest)}
    return Challenge(scheme=scheme.lower(), params=params)


def load_credentials(config_path: Path, registry: str) -> Credentials | None:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    keys = _DOCKER_HUB_KEYS if registry == "docker.io" else (registry, f"https://{registry}")
    helpers = config.get("credHelpers") or {}
    for key in keys:
        if isinstance(helpers, dict) and isinstance(helpers.get(key), str):
            return _from_helper(helpers[key], key)
    auths = config.get("auths") or {}
    for key in keys:
        entry = auths.get(key) if isinstance(auths, dict) else None
        if isinstance(entry, dict):
            creds = _from_entry(entry)
            if creds:
                return creds
    store = config.get("credsStore")
    if isinstance(store, str) and store:
        return _from_helper(store, keys[0])
    return None


def _from_entry(entry: dict[str, object]) -> Credentials | None:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, _, password = base64.b64decode(auth).decode().partition(":")
        except ValueError:
            return None
        return Credentials(user, password)
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(password, str):
        return Credentials(user, password)
    return None


def _from_helper(name: str, server: str) -> Credentials | None:
    try:
        result = subprocess.run(
            [f"docker-credential-{name}", "get"],
            input=server,
            capture_output=True,
            text=True,
            timeout=_HELPER_TIMEOUT_S,
            check=True,
        )
        doc = json.loads(result.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    user, secret = doc.get("Username"), doc.get("Secret")
    if isinstance(user, str) and isinstance(secret, str):
        return Credentials(user, secret)
    return None
