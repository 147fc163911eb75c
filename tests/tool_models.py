"""What the tool-calling suites share: a service serving the tiny random model under several
chat templates, the tool schemas they call, and room for a forced call."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tests.conftest import Server, new_server
from tests.tiny_gguf import write_tiny_gguf

TEMPLATES = Path(__file__).parent / "templates"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# Room for the longest call the schemas allow the random model (a 16-digit "days", 12
# characters of city escaped as \uXXXX): one cut short is not a call.
MAX_CALL = 300


def serving(root: Path, models: dict[str, Path | None], **env: str) -> Iterator[Server]:
    """A started service (``env`` added to its environment) with the tiny model stored under
    each name, with that chat template (None: the GGUF's own); stopped when the generator is
    closed (a fixture's teardown)."""
    srv = new_server(root, **env)
    srv.start()
    try:
        gguf = write_tiny_gguf(root / "tiny.gguf")
        for name, template in models.items():
            extra = ["--chat-template", str(template)] if template else []
            srv.cli("package", "--gguf", str(gguf), *extra, "--store", name)
        yield srv
    finally:  # also when the fixture closes the generator early (GeneratorExit)
        if srv.proc is not None and srv.proc.poll() is None:
            srv.stop()
        srv.sock.unlink(missing_ok=True)
