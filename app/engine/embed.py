"""Embeddings: one pooled, L2-normalized vector per input, from a context in embedding mode."""

from __future__ import annotations

import threading

import llama_cpp as L
import numpy as np

from app.engine.llama import Batch, LlamaError, Model

# GGUFs that name no pooling get mean pooling, which suits sentence embeddings.
_MEAN = 1


class Embedder:
    def __init__(self, model: Model, ctx_size: int, threads: int, batch_size: int = 2048) -> None:
        self.model = model
        self.ctx_size = min(ctx_size, batch_size)
        params = L.llama_context_default_params()
        params.n_ctx = self.ctx_size
        params.n_batch = self.ctx_size
        params.n_ubatch = self.ctx_size
        params.n_seq_max = 1
        params.n_threads = threads
        params.n_threads_batch = threads
        params.embeddings = True
        params.pooling_type = model.info.pooling if model.info.pooling > 0 else _MEAN
        self.ctx = L.llama_init_from_model(model.ptr, params)
        if not self.ctx:
            raise LlamaError("llama.cpp could not create an embedding context")
        self.memory = L.llama_get_memory(self.ctx)
        self.batch = Batch(self.ctx_size)
        self._lock = threading.Lock()  # one context: one input at a time

    def embed(self, tokens: list[int]) -> list[float]:
        if not tokens:
            raise LlamaError("cannot embed an empty input")
        if len(tokens) > self.ctx_size:
            raise LlamaError(
                f"input is {len(tokens)} tokens, more than the context size {self.ctx_size}"
            )
        with self._lock:
            L.llama_memory_clear(self.memory, True)
            n = len(tokens)
            self.batch.fill(tokens, list(range(n)), [0] * n, list(range(n)))
            rc = L.llama_decode(self.ctx, self.batch.ptr)
            if rc != 0:
                raise LlamaError(f"llama_decode returned {rc}")
            ptr = L.llama_get_embeddings_seq(self.ctx, 0)
            if not ptr:
                raise LlamaError("the model produced no pooled embedding")
            vec = np.ctypeslib.as_array(ptr, shape=(self.model.info.n_embd,)).astype(np.float64)
        norm = float(np.linalg.norm(vec))
        return (vec / norm if norm > 0 else vec).tolist()

    def close(self) -> None:
        L.llama_free(self.ctx)
