"""``_configure`` bodies (spec 5.4) as the parser sees them: what is accepted, what is refused
and with which message."""

from __future__ import annotations

from typing import Any

import pytest

from app.scheduler.runner_config import AUTO, ConfigError, RunnerConfig, from_request, layered


def test_flags_and_fields_map_onto_the_runner():
    mode, config = from_request(
        {
            "model": "a",
            "context-size": 512,
            "keep_alive": "10m",
            "runtime-flags": ["--parallel", "2", "--threads=1", "-ngl", "0", "--jinja"],
        }
    )
    assert mode == "completion"
    assert config == RunnerConfig(
        context_size=512,
        parallel=2,
        threads=1,
        gpu_layers=0,
        keep_alive="10m",
        runtime_flags=("--parallel", "2", "--threads=1", "-ngl", "0", "--jinja"),
    )
    assert config.to_json()["keep_alive"] == "10m0s"


def test_raw_flags_embeddings_and_auto_context():
    mode, config = from_request({"raw-runtime-flags": "--embeddings -c -1"})
    assert (mode, config.context_size) == ("embedding", AUTO)
    assert config.to_json()["context-size"] == -1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"runtime-flags": ["--log-file", "x"]}, 'runtime flag "--log-file" is not supported'),
        ({"runtime-flags": ["--threads", "/etc"]}, "may not contain a path"),
        ({"runtime-flags": ["--threads"]}, 'runtime flag "--threads" needs a value'),
        ({"runtime-flags": ["-t", "two"]}, "needs a whole number, not 'two'"),
        ({"runtime-flags": "--threads 2"}, "runtime-flags must be a list of strings"),
        ({"raw-runtime-flags": "--threads '2"}, "raw-runtime-flags:"),
        ({"keep_alive": "soon"}, "keep_alive 'soon'"),
        ({"keep_alive": "inf"}, "expected a finite duration"),
        ({"context-size": "big"}, "context-size must be a whole number"),
        ({"context-size": 0}, "context-size must be at least 1"),
        ({"parallel": True}, "parallel must be a whole number"),
        ({"gpu-layers": -2}, "gpu-layers must be at least 0"),
        ({"mode": "image-generation"}, "mode 'image-generation' is not supported"),
        ({"speculative": {"draft_model": "x"}}, "speculative decoding is not supported"),
    ],
)
def test_refused_with_a_message_naming_the_field(body: dict[str, Any], message: str):
    with pytest.raises(ConfigError) as refused:
        from_request({"model": "a", **body})
    assert message in str(refused.value)


def test_configure_changes_only_what_it_names():
    base = RunnerConfig(context_size=1024, parallel=2)
    assert layered(base, RunnerConfig(keep_alive="1h")) == RunnerConfig(
        context_size=1024, parallel=2, keep_alive="1h"
    )
    assert layered(None, RunnerConfig(parallel=4)) == RunnerConfig(parallel=4)
