"""How much memory a runner will take, on the host and on each GPU, estimated from its GGUF
before it starts; and how many of its layers go to the GPUs.

The estimate is deliberately an upper bound (llama.cpp's sliding-window caches and lazy
allocations often take less): admission must not let the machine swap, OOM-kill, or run a GPU
out of memory.

Placement follows llama.cpp's: ``n_gpu_layers`` offloads the last n repeating layers with their
KV cache; one more offloads the output layer (the token embeddings themselves stay on the host;
a model with tied embeddings gets a copy of them on the GPU as its output). Several GPUs share
the offloaded part in proportion to their budgets, as llama.cpp splits by memory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app import gguf_header
from app.scheduler.devices import HOST, Device
from app.sizes import MIB

# Python, aiohttp, numpy and llama.cpp's own buffers in an idle runner (measured: ~65 MiB), and
# a chat runner's template workers (app/runner/render.py: up to 2, ~21 MiB each).
RUNNER_BASE_BYTES = 144 * MIB
# llama.cpp reserves a compute graph for one micro-batch; its logits dominate for big vocabs.
_UBATCH = 512
_KV_BYTES_PER_VALUE = 2  # f16 cache


@dataclass(frozen=True)
class Estimate:
    ctx_per_slot: int  # what the runner will really get: the request, capped by training
    weights: int
    kv_cache: int
    compute: int
    gpu_layers: int = 0  # layers on the GPUs: 0 none, n_layer + 1 all with the output
    by_device: tuple[tuple[str, int], ...] = ()  # (device, bytes); () : all on the host

    @property
    def total(self) -> int:
        return sum(self.devices().values())

    def devices(self) -> dict[str, int]:
        if not self.by_device:
            return {HOST: RUNNER_BASE_BYTES + self.weights + self.kv_cache + self.compute}
        return dict(self.by_device)

    def on(self, device: str) -> int:
        return self.devices().get(device, 0)


class EstimateError(Exception):
    pass


@dataclass(frozen=True)
class _Shape:
    """What placement needs to know of a model, read from its GGUF header."""

    file_bytes: int
    layers: tuple[int, ...]  # bytes of each repeating layer's tensors
    output: int  # bytes the output layer puts on a GPU
    n_vocab: int
    n_embd: int
    n_ctx_train: int
    kv_per_token_layer: int  # bytes of K and V for one token in one layer

    @property
    def n_layer(self) -> int:
        return len(self.layers)


_BLOCK = re.compile(r"^blk\.(\d+)\.")


def estimate(
    shards: Sequence[Path],
    ctx_per_slot: int,
    slots: int,
    gpus: Sequence[Device] = (),
    gpu_layers: int | None = None,
    budgets: Mapping[str, int] | None = None,
) -> Estimate:
    """Memory for a runner with ``slots`` sequences of ``ctx_per_slot`` tokens each.

    With GPUs, ``gpu_layers`` None offloads as many layers as fit in the GPUs' ``budgets``
    (all, when the model fits), the rest staying on the host; a number is taken as given.
    """
    shape = _shape(shards)
    ctx = min(ctx_per_slot, shape.n_ctx_train) if shape.n_ctx_train else ctx_per_slot
    kv_layer = ctx * slots * shape.kv_per_token_layer
    compute = _UBATCH * (shape.n_vocab + 4 * shape.n_embd) * 2
    common = {
        "ctx_per_slot": ctx,
        "weights": shape.file_bytes,
        "kv_cache": kv_layer * shape.n_layer,
        "compute": compute,
    }
    if not gpus:
        return Estimate(**common)
    budgets = budgets or {}
    most = shape.n_layer + 1
    if gpu_layers is not None:
        return Estimate(
            **common, **_place(shape, min(gpu_layers, most), kv_layer, compute, gpus, budgets)
        )
    for n in range(most, -1, -1):
        placed = _place(shape, n, kv_layer, compute, gpus, budgets)
        if all(b <= budgets.get(d, b) for d, b in placed["by_device"] if d != HOST):
            return Estimate(**common, **placed)
    raise AssertionError("zero layers on the GPUs always fit")


def _place(
    shape: _Shape,
    n: int,
    kv_layer: int,
    compute: int,
    gpus: Sequence[Device],
    budgets: Mapping[str, int],
) -> dict[str, object]:
    offloaded = shape.layers[shape.n_layer - min(n, shape.n_layer) :]
    on_gpu = sum(offloaded) + kv_layer * len(offloaded)
    if n > shape.n_layer:
        on_gpu += shape.output
    if n:
        on_gpu += compute
    host = (
        RUNNER_BASE_BYTES
        + shape.file_bytes
        - sum(offloaded)
        - (shape.output if n > shape.n_layer else 0)
    )
    host += kv_layer * (shape.n_layer - len(offloaded)) + (0 if n else compute)
    shares = [budgets.get(g.name, g.total) for g in gpus]
    whole = sum(shares) or 1
    by_device = [(HOST, max(host, RUNNER_BASE_BYTES))]
    by_device += [
        (g.name, -(-on_gpu * share // whole)) for g, share in zip(gpus, shares, strict=True)
    ]
    return {"gpu_layers": n, "by_device": tuple(by_device)}


def _shape(shards: Sequence[Path]) -> _Shape:
    try:
        arch = gguf_header.read_metadata(shards[0], {"general.architecture"})[
            "general.architecture"
        ]
        keys = {
            f"{arch}.{k}"
            for k in (
                "block_count",
                "attention.head_count",
                "embedding_length",
                "attention.head_count_kv",
                "attention.key_length",
                "attention.value_length",
                "context_length",
            )
        }
        meta = gguf_header.read_metadata(shards[0], keys | {"tokenizer.ggml.tokens"})
        n_layer = int(meta[f"{arch}.block_count"])
        n_head = _widest(meta[f"{arch}.attention.head_count"])
        n_embd = int(meta[f"{arch}.embedding_length"])
        # Some architectures give head_count_kv per layer: the widest layer bounds them all.
        n_head_kv = _widest(meta.get(f"{arch}.attention.head_count_kv", n_head))
        head_dim = n_embd // max(n_head, 1)
        k_len = int(meta.get(f"{arch}.attention.key_length", head_dim))
        v_len = int(meta.get(f"{arch}.attention.value_length", head_dim))
        n_vocab = int(meta["tokenizer.ggml.tokens"])
        n_ctx_train = int(meta.get(f"{arch}.context_length", 0))
        sizes: dict[str, int] = {}
        for shard in shards:
            sizes.update(gguf_header.read_header(shard, 0).tensor_bytes())
        file_bytes = sum(p.stat().st_size for p in shards)
    except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise EstimateError(
            f"failed to load model: {shards[0].name} is not a usable GGUF ({exc})"
        ) from exc
    layers = [0] * n_layer
    for name, size in sizes.items():
        match = _BLOCK.match(name)
        if match and int(match.group(1)) < n_layer:
            layers[int(match.group(1))] += size
    # Tied embeddings: the output layer is a copy of the token embeddings.
    output = sizes.get("output.weight", sizes.get("token_embd.weight", 0))
    output += sizes.get("output_norm.weight", 0)
    return _Shape(
        file_bytes=file_bytes,
        layers=tuple(layers),
        output=output,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_ctx_train=n_ctx_train,
        kv_per_token_layer=n_head_kv * (k_len + v_len) * _KV_BYTES_PER_VALUE,
    )


def _widest(value: int | list[int]) -> int:
    return max(value) if isinstance(value, list) else int(value)
