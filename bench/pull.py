"""Pull throughput: the service's pull (download + sha256 + fsync + commit) versus a plain
streaming download of the same blob with curl, from one loopback registry, in one run.

    .venv/bin/python bench/pull.py [--rounds 3] [--rate-mb 125]

Goal (issue 3): pull time at most 1.25x the plain download.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cli, gemma, service_env, start_service

from app.client import ServiceClient
from tests.netutil import free_port
from tests.registry import LocalRegistry, Proxy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--rate-mb",
        type=float,
        default=0,
        help="also measure through a proxy limited to this many MB/s (e.g. 125 = 1 Gbit/s)",
    )
    args = ap.parse_args()
    model = gemma()
    digest = "sha256:" + hashlib.sha256(model.read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        registry = LocalRegistry(work / "registry").start()
        env = service_env(work / "models", free_port())
        cli(env, "package", "--gguf", str(model), "--push", f"{registry.host}/ai/gemma3:bench")
        service, client = start_service(env)
        try:
            results = [("loopback", measure(client, registry.host, digest, args.rounds))]
            if args.rate_mb:
                with Proxy(registry.port, rate=args.rate_mb * 1e6) as proxy:
                    host = f"127.0.0.1:{proxy.port}"
                    label = f"{args.rate_mb:g} MB/s link"
                    results.append((label, measure(client, host, digest, args.rounds)))
        finally:
            service.terminate()
            service.wait()
            registry.stop()
    size_mb = model.stat().st_size / 1e6
    print(f"blob: {size_mb:.1f} MB, {args.rounds} rounds, medians")
    for label, (p, h, q) in results:
        print(f"[{label}]")
        print(f"  plain download (curl -o /dev/null):    {p:.3f} s  {size_mb / p:7.1f} MB/s")
        print(f"  verified download (curl | sha256sum):  {h:.3f} s  {size_mb / h:7.1f} MB/s")
        print(f"  model-runner pull (verified, fsynced): {q:.3f} s  {size_mb / q:7.1f} MB/s")
        print(f"  ratio pull/plain: {q / p:.2f}x (goal <= 1.25x); pull/verified: {q / h:.2f}x")


def measure(
    client: ServiceClient, host: str, digest: str, rounds: int
) -> tuple[float, float, float]:
    """Median seconds for: curl to /dev/null, curl piped to sha256sum, and a service pull."""
    ref = f"{host}/ai/gemma3:bench"
    blob_url = f"http://{host}/v2/ai/gemma3/blobs/{digest}"
    plain, hashed, pulls = [], [], []
    for _ in range(rounds):
        t = time.perf_counter()
        subprocess.run(["curl", "-sf", "-o", "/dev/null", blob_url], check=True)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = subprocess.run(
            f"curl -sf {blob_url} | sha256sum",
            shell=True,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        hashed.append(time.perf_counter() - t)
        assert out.split()[0] == digest[7:]
        t = time.perf_counter()
        reply = client.request(
            "POST",
            "/models/create",
            json.dumps({"from": ref}).encode(),
            {"Accept": "application/json"},
        )
        pulls.append(time.perf_counter() - t)
        last = json.loads(reply.body.decode().splitlines()[-1])
        assert last["message"] == "Model pulled successfully", last
        client.request("DELETE", f"/models/{ref}")
    return statistics.median(plain), statistics.median(hashed), statistics.median(pulls)


if __name__ == "__main__":
    main()
