"""Start one runner in several ways, from the service's own to a plain shell's, and say which
of them load the model.

On the GPU machine every runner the service started died with SIGSEGV at load, while the same
model loaded from a plain script (issue 12). This separates the ways the service starts a runner
from a shell's, one at a time, so a run on a GPU names what matters:

    python bench/runner_variants.py MODEL.gguf [--gpu-layers -1] [--parallel 64] [--threads 8]

Prints one line per variant (loaded, or how it died and its last words) and exits 1 when the
service's own way fails. Runs on a CPU machine too (every variant should load).
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common import stop  # noqa: E402

from app.scheduler.process import describe_exit, last_words, runner_env  # noqa: E402

LOAD_TIMEOUT_S = 180


@dataclass(frozen=True)
class Variant:
    name: str
    lifeline: bool = True  # --exit-with-stdin, stdin a pipe the check holds
    service_env: bool = True  # runner_env(): what the service adds (GOMP_SPINCOUNT, ...)
    captured_output: bool = True  # stdout and stderr to a pipe, as the service reads them
    unset: tuple[str, ...] = field(default=())
    extra_args: tuple[str, ...] = ()  # after the check's own: argparse keeps the last value


VARIANTS = [
    Variant("as the service starts it"),
    Variant("without the lifeline (stdin /dev/null)", lifeline=False),
    Variant("without GOMP_SPINCOUNT", unset=("GOMP_SPINCOUNT",)),
    Variant("output not captured (inherited, as from a shell)", captured_output=False),
    Variant(
        "--gpu-layers 999 (the runner asks llama.cpp nothing first)",
        extra_args=("--gpu-layers", "999"),
    ),
    Variant(
        "as from a shell (none of the above)",
        lifeline=False,
        service_env=False,
        captured_output=False,
    ),
]


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("runner", timeout=2)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(2)
        self.sock.connect(self._path)


def healthy(sock: Path) -> bool:
    if not sock.exists():
        return False
    conn = _UnixHTTP(str(sock))
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def try_variant(variant: Variant, model: Path, runner_args: list[str], work: Path) -> str:
    sock = work / f"{len(list(work.iterdir()))}.sock"
    args = [sys.executable, "-m", "app.runner", "--model", str(model), "--name", "check"]
    args += ["--socket", str(sock), *runner_args]
    if variant.lifeline:
        args.append("--exit-with-stdin")
    args += variant.extra_args
    env = runner_env() if variant.service_env else dict(os.environ)
    for name in variant.unset:
        env.pop(name, None)
    log = work / f"{sock.stem}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE if variant.lifeline else subprocess.DEVNULL,
            stdout=out if variant.captured_output else None,
            stderr=subprocess.STDOUT if variant.captured_output else None,
        )
        started = time.monotonic()
        try:
            while time.monotonic() - started < LOAD_TIMEOUT_S:
                if proc.poll() is not None:
                    said = last_words(log.read_text(errors="replace"))
                    return f"FAILED: it {describe_exit(proc.returncode)}{said}"
                if healthy(sock):
                    return f"loaded in {time.monotonic() - started:.1f} s"
                time.sleep(0.1)
            return f"FAILED: not serving after {LOAD_TIMEOUT_S} s"
        finally:
            stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--mode", default="completion", choices=["completion", "embedding"])
    ap.add_argument("--gpu-layers", default="-1")
    ap.add_argument("--parallel", default="4")
    ap.add_argument("--threads", default="2")
    ap.add_argument("--ctx-size", default="1024")
    opts = ap.parse_args()
    runner_args = ["--mode", opts.mode, "--gpu-layers", opts.gpu_layers]
    runner_args += ["--parallel", opts.parallel, "--threads", opts.threads]
    runner_args += ["--ctx-size", opts.ctx_size]
    results = {}
    with tempfile.TemporaryDirectory(prefix="runner-variants-") as tmp:
        for variant in VARIANTS:
            results[variant.name] = try_variant(variant, opts.model, runner_args, Path(tmp))
            print(f"{variant.name:60} {results[variant.name]}", flush=True)
    return 1 if results[VARIANTS[0].name].startswith("FAILED") else 0


if __name__ == "__main__":
    sys.exit(main())
