"""How much memory a runner will take, estimated from its GGUF before it starts.

The estimate is deliberately an upper bound (llama.cpp's sliding-window caches and lazy
allocations often take less): admission must not let the machine swap or OOM-kill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app import gguf_header
from app.sizes import MIB

# Python, aiohttp, numpy and llama.cpp's own buffers in an idle runner (measured: ~65 MiB).
RUNNER_BASE_BYTES = 96 * MIB
# llama.cpp reserves a compute graph for one micro-batch; its logits dominate for big vocabs.
_UBATCH = 512
_KV_BYTES_PER_VALUE = 2  # f16 cache


@dataclass(frozen=True)
class Estimate:
    ctx_per_slot: int  # what the runner will really get: the request, capped by training
    weights: int
    kv_cache: int
    compute: int

    @property
    def total(self) -> int:
        return RUNNER_BASE_BYTES + self.weights + self.kv_cache + self.compute


class EstimateError(Exception):
    pass


def estimate(shards: Sequence[Path], ctx_per_slot: int, slots: int) -> Estimate:
    """Memory for a runner with ``slots`` sequences of ``ctx_per_slot`` tokens each."""
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
        weights = sum(p.stat().st_size for p in shards)
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
    except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise EstimateError(
            f"failed to load model: {shards[0].name} is not a usable GGUF ({exc})"
        ) from exc
    ctx = min(ctx_per_slot, n_ctx_train) if n_ctx_train else ctx_per_slot
    kv = ctx * slots * n_layer * n_head_kv * (k_len + v_len) * _KV_BYTES_PER_VALUE
    compute = _UBATCH * (n_vocab + 4 * n_embd) * 2
    return Estimate(ctx_per_slot=ctx, weights=weights, kv_cache=kv, compute=compute)


def _widest(value: int | list[int]) -> int:
    return max(value) if isinstance(value, list) else int(value)
