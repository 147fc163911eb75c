"""Settings come from the environment; a bad value stops start-up with one line naming it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app import sizes
from app.durations import DurationError, format_keep_alive, parse_keep_alive
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
        ("MODEL_RUNNER_KEEP_ALIVE", "soon"),
        ("MODEL_RUNNER_MEMORY_LIMIT", "lots"),
        ("MODEL_RUNNER_MEMORY_LIMIT", "0"),
        ("MODEL_RUNNER_MEMORY_LIMIT", "150%"),
        ("MODEL_RUNNER_MAX_QUEUE", "-1"),
        ("MODEL_RUNNER_GPU_LAYERS", "most"),
        ("MODEL_RUNNER_SHUTDOWN_TIMEOUT", "-1"),
        ("MODEL_RUNNER_MANIFEST", "/no/such/models.yaml"),
        ("MODEL_RUNNER_MANIFEST", "/tmp"),
        ("MODEL_RUNNER_MEMORY_LIMIT", "x%"),
        ("MODEL_RUNNER_GPU_MEMORY_LIMIT", "most"),
        ("MODEL_RUNNER_GPU_MEMORY_LIMIT", "0%"),
        ("MODEL_RUNNER_GPU_MEMORY_LIMIT", "120%"),
        ("MODEL_RUNNER_PARALLEL", "0"),
        ("MODEL_RUNNER_REQUEST_TIMEOUT", "soon"),
    ],
)
def test_bad_value_names_the_variable(var: str, value: str):
    with pytest.raises(SettingsError, match=var):
        Settings.from_env({var: value})


def test_scheduler_settings():
    s = Settings.from_env({})
    assert (s.keep_alive, s.max_queue, s.gpu_layers, s.shutdown_timeout) == (300, 64, None, 6)
    assert 0 < s.memory_limit < sizes.machine_memory()
    s = Settings.from_env(
        {
            "MODEL_RUNNER_KEEP_ALIVE": "-1",
            "MODEL_RUNNER_MEMORY_LIMIT": "1.5GiB",
            "MODEL_RUNNER_MAX_QUEUE": "0",
            "MODEL_RUNNER_GPU_LAYERS": "20",
            "MODEL_RUNNER_SHUTDOWN_TIMEOUT": "1m",
            "MODEL_RUNNER_MODELS": "ai/a, ai/b ,",
        }
    )
    assert (s.keep_alive, s.memory_limit, s.max_queue, s.gpu_layers, s.shutdown_timeout) == (
        None,
        int(1.5 * 1024**3),
        0,
        20,
        60,
    )
    assert s.preload_models == ("ai/a", "ai/b")
    # Unset, slots, threads and the GPU budget are decided per device (app/scheduler/launch.py).
    defaults = Settings.from_env({})
    assert (defaults.parallel, defaults.threads, defaults.gpu_memory_limit) == (None, None, "90%")
    for text in ("75%", "20g"):
        assert Settings.from_env({"MODEL_RUNNER_GPU_MEMORY_LIMIT": text}).gpu_memory_limit == text
    # Binary units, as Docker's --memory.
    for text in ("8g", "8G", "8GB", "8GiB", str(8 * 1024**3)):
        assert Settings.from_env({"MODEL_RUNNER_MEMORY_LIMIT": text}).memory_limit == 8 * 1024**3
    assert Settings.from_env({"MODEL_RUNNER_MEMORY_LIMIT": "50%"}).memory_limit == (
        sizes.machine_memory() // 2
    )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5m", 300),
        ("1h30m", 5400),
        ("1.5s", 1.5),
        ("250ms", 0.25),
        ("300", 300),
        (300, 300),
        ("0", 0),
        (0, 0),
        ("-1", None),
        (-1, None),
        ("-5m", None),
    ],
)
def test_keep_alive_follows_ollama(text: object, seconds: float | None):
    assert parse_keep_alive(text) == seconds


@pytest.mark.parametrize("text", ["", "5 minutes", "m", "5d", "1h 30m", True, None])
def test_keep_alive_rejects_garbage(text: object):
    with pytest.raises(DurationError):
        parse_keep_alive(text)


@pytest.mark.parametrize(
    ("seconds", "text"), [(300, "5m0s"), (3600, "1h0m0s"), (1, "1s"), (0, "0s"), (None, "-1")]
)
def test_keep_alive_is_shown_as_go_prints_it(seconds: float | None, text: str):
    assert format_keep_alive(seconds) == text


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


def test_api_keys_from_the_variable_and_the_file(tmp_path: Path):
    assert Settings.from_env({}).api_keys == ()
    env = {"MODEL_RUNNER_API_KEY": " one, two ,,one"}
    assert Settings.from_env(env).api_keys == ("one", "two")
    keys = tmp_path / "keys"
    keys.write_text("# for the CI\n\n  three  \n# four\nfive\n")
    env["MODEL_RUNNER_API_KEY_FILE"] = str(keys)
    settings = Settings.from_env(env)
    assert settings.api_keys == ("one", "two", "three", "five")
    assert "three" not in repr(settings)  # a logged Settings shows no key


@pytest.mark.parametrize(
    ("var", "value", "file_text"),
    [
        ("MODEL_RUNNER_API_KEY", ", ,", None),
        ("MODEL_RUNNER_API_KEY", "secret key", None),
        ("MODEL_RUNNER_API_KEY_FILE", "keys", "# only a comment\n\n"),
        ("MODEL_RUNNER_API_KEY_FILE", "keys", "secret\u00e9key\n"),
        ("MODEL_RUNNER_API_KEY_FILE", "missing", None),
        ("MODEL_RUNNER_API_KEY_FILE", ".", None),
    ],
)
def test_unusable_api_keys_stop_start_up(
    tmp_path: Path, var: str, value: str, file_text: str | None
):
    if var.endswith("_FILE"):
        if file_text is not None:
            (tmp_path / value).write_text(file_text)
        value = str(tmp_path / value)
    with pytest.raises(SettingsError, match=var) as caught:
        Settings.from_env({var: value})
    assert "secret" not in str(caught.value)  # the message names the variable, not the key
