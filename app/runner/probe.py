"""``python -m app.runner.probe``: what this llama.cpp build can use, as one JSON line.

The front does not link llama.cpp (a crash there must not take the service down), so it asks
a short-lived child process instead.
"""

from __future__ import annotations

import json
import sys


def describe() -> dict[str, object]:
    try:
        import llama_cpp as L
    except ImportError as exc:
        return {"installed": False, "error": str(exc)}
    L.llama_backend_init()
    info = L.llama_print_system_info().decode("utf-8", "replace")
    # "CPU : AVX2 = 1 | ... CUDA : ARCHS = 890 | ..." : each backend's name opens a section.
    backends = [part.split(":")[0].strip() for part in info.split("|") if " : " in part]
    gpu = bool(L.llama_supports_gpu_offload())
    accelerators = [b for b in backends if b != "CPU"]
    return {
        "installed": True,
        "version": L.__version__,
        "gpu_offload": gpu,
        "device": f"GPU ({', '.join(accelerators) or 'offload'})" if gpu else "CPU",
        "backends": backends,
    }


if __name__ == "__main__":
    json.dump(describe(), sys.stdout)
    sys.stdout.write("\n")
