"""``python -m app.runner.probe``: what this llama.cpp build can use, as one JSON line.

The front does not link llama.cpp (a crash there must not take the service down), so it asks
a short-lived child process instead. A GPU build on a machine without a GPU reports CPU: the
answer is the devices ggml finds, not the build's flags.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

_DEVICE_TYPES = {0: "CPU", 1: "GPU", 2: "ACCEL", 3: "IGPU"}


def describe() -> dict[str, object]:
    try:
        import llama_cpp as L
    except (ImportError, OSError) as exc:  # OSError: a GPU build missing its driver libraries
        return {"installed": False, "error": str(exc)}
    L.llama_backend_init()
    devices = _devices(Path(L.__file__).parent / "lib")
    gpus = [d for d in devices if d["type"] in ("GPU", "IGPU")]
    named = ", ".join(
        f"{g['name']}: {g['description']}, {g['total'] / 2**30:.0f} GiB" for g in gpus
    )
    return {
        "installed": True,
        "version": L.__version__,
        "gpu_offload": bool(L.llama_supports_gpu_offload()) and bool(gpus),
        "device": f"GPU ({named})" if gpus else "CPU",
        "devices": devices,
    }


def _devices(lib_dir: Path) -> list[dict[str, object]]:
    """Each device ggml finds: name, type, description and memory (total and free bytes)."""
    candidates = [lib_dir / "libggml.so", lib_dir / "libggml.dylib"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        return []
    ggml = ctypes.CDLL(str(path))
    ggml.ggml_backend_load_all()  # builds with loadable backends (GGML_BACKEND_DL) need this
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_name.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_description.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_memory.restype = None
    size_p = ctypes.POINTER(ctypes.c_size_t)
    ggml.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
    found: list[dict[str, object]] = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(
            {
                "name": ggml.ggml_backend_dev_name(dev).decode("utf-8", "replace"),
                "type": _DEVICE_TYPES.get(ggml.ggml_backend_dev_type(dev), "OTHER"),
                "description": (ggml.ggml_backend_dev_description(dev) or b"").decode(
                    "utf-8", "replace"
                ),
                "total": total.value,
                "free": free.value,
            }
        )
    return found


if __name__ == "__main__":
    json.dump(describe(), sys.stdout)
    sys.stdout.write("\n")
