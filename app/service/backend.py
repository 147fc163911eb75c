"""The one inference backend, llama.cpp: its name in DMR's routes, and what it can use here
(``/engines/status``), asked of a child process so that a broken build cannot take the
service down."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from app import errors
from app.logging import get_logger
from app.runner import SOURCE_ROOT
from app.scheduler.devices import Device

log = get_logger("backend")
BACKEND = "llama.cpp"
# A GPU driver that hangs must not hold every load back for good.
PROBE_TIMEOUT_S = 120


def check_backend(name: str | None) -> None:
    """DMR's answer for a route naming a backend other than ours (None: not named)."""
    if name is not None and name != BACKEND:
        raise errors.NotFound("backend not found")


class BackendProbe:
    def __init__(self, gpu_layers: int | None) -> None:
        self.gpu_layers = gpu_layers
        self.found: dict[str, Any] = {}  # what the probe found; empty until it answers
        self._done = asyncio.Event()

    async def gpus(self) -> tuple[Device, ...]:
        """The GPUs llama.cpp can offload to (none on a CPU build), once the probe has run:
        the scheduler fits runners into their memory."""
        await self._done.wait()
        if not self.found.get("gpu_offload"):
            return ()
        return tuple(
            Device(d["name"], d.get("description", ""), int(d["total"]), int(d["free"]))
            for d in self.found.get("devices", [])
            if d.get("type") in ("GPU", "IGPU") and d.get("total")
        )

    async def run(self) -> None:
        """Ask a child process what llama.cpp can use, and say it in the log."""
        try:
            await self._probe()
        finally:
            self._done.set()  # a failed probe still answers: no GPUs

    async def _probe(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app.runner.probe",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=SOURCE_ROOT,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            out, err = b"", f"no answer within {PROBE_TIMEOUT_S} s".encode()
        try:
            self.found = json.loads(out)
        except ValueError:
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            self.found = {"installed": True, "error": f"the llama.cpp probe failed: {tail[0]}"}
        found = self.found
        if not found.get("installed"):
            log.warning("llama.cpp is not installed", error=found.get("error"))
        elif "error" in found:
            log.error("backend unusable", error=found["error"])
        else:
            gpu = self.gpu_layers
            log.info(
                "backend",
                llama_cpp_python=found["version"],
                device=found["device"],
                gpu_layers="all" if gpu is None and found["gpu_offload"] else gpu or 0,
                note=None
                if found["gpu_offload"]
                else "no GPU found (or this llama.cpp build has no GPU offload); "
                "inference runs on the CPU",
            )

    def status(self) -> dict[str, str]:
        b = self.found
        if not b:
            return {BACKEND: "Installing: checking llama.cpp"}
        if not b.get("installed"):
            return {BACKEND: f"Not Installed: llama-cpp-python is missing ({b.get('error')})"}
        if "error" in b:
            return {BACKEND: f"Error: {b['error']}"}
        return {BACKEND: f"Running: llama.cpp (llama-cpp-python {b['version']}) on {b['device']}"}
