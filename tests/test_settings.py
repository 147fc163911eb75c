"""Settings come from the environment; a bad value stops start-up with one line naming it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import Settings, SettingsError
from tests.conftest import REPO


def test_defaults():
    s = Settings.from_env({})
    assert (s.port, s.addr, s.sock, s.log_level, s.log_format) == (
        12434,
        "127.0.0.1",
        None,
        "info",
        "console",
    )
    assert s.models_path == Path.home() / ".docker" / "models"


def test_values_from_env(tmp_path: Path):
    s = Settings.from_env(
        {
            "MODEL_RUNNER_PORT": "8080",
            "MODEL_RUNNER_ADDR": "0.0.0.0",
            "MODEL_RUNNER_SOCK": str(tmp_path / "s.sock"),
            "MODELS_PATH": str(tmp_path / "m"),
            "LOG_LEVEL": "DEBUG",
            "LOG_FORMAT": "json",
        }
    )
    assert (s.port, s.addr, s.sock, s.models_path, s.log_level, s.log_format) == (
        8080,
        "0.0.0.0",
        tmp_path / "s.sock",
        tmp_path / "m",
        "debug",
        "json",
    )


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("MODEL_RUNNER_PORT", "http"),
        ("MODEL_RUNNER_PORT", "70000"),
        ("MODEL_RUNNER_PORT", "0"),
        ("LOG_LEVEL", "chatty"),
        ("LOG_FORMAT", "xml"),
        ("MODELS_PATH", "/etc/hostname"),
    ],
)
def test_bad_value_names_the_variable(var: str, value: str):
    with pytest.raises(SettingsError, match=var):
        Settings.from_env({var: value})


def serve_once(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_service_refuses_to_start_with_one_line(tmp_path: Path):
    result = serve_once({"MODEL_RUNNER_PORT": "nope", "MODELS_PATH": str(tmp_path)})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "MODEL_RUNNER_PORT" in lines[0] and "nope" in lines[0]


def test_service_refuses_a_models_path_that_is_not_a_store(tmp_path: Path):
    (tmp_path / "precious.txt").write_text("not a model store")
    result = serve_once({"MODEL_RUNNER_PORT": "1", "MODELS_PATH": str(tmp_path)})
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "does not hold a model store" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "not a model store"


def test_port_in_use_is_one_line(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve_once({"MODEL_RUNNER_PORT": str(port), "MODELS_PATH": str(tmp_path / "m")})
    assert result.returncode == 1
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr
