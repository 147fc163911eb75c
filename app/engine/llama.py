"""Thin, typed wrappers over llama-cpp-python's low-level (ctypes) API.

The high-level ``llama_cpp.Llama`` holds one sequence and is not thread-safe; continuous
batching needs the C API: one context, a batch that mixes sequences, samplers per sequence.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as L
import numpy as np

_init_lock = threading.Lock()
_initialized = False
_log_callback = None


class LlamaError(RuntimeError):
    pass


class TooManyTokens(LlamaError):
    def __init__(self, at_least: int) -> None:
        super().__init__(f"at least {at_least} tokens")
        self.at_least = at_least


# A text is first tokenized this far (in characters), then four times as far, and so on.
_PROBE_CHARS = 64 * 1024
# Tokens a cut can add: the end of the prefix, say half a word or of a special token, on its own.
_PROBE_SLACK = 16


def init_backend(quiet: bool = True) -> None:
    global _initialized, _log_callback
    with _init_lock:
        if _initialized:
            return
        L.llama_backend_init()
        if quiet:
            # llama.cpp logs every tensor at load; the runner reports its own errors instead.
            _log_callback = L.llama_log_callback(lambda level, text, user: None)
            L.llama_log_set(_log_callback, None)
        _initialized = True


@dataclass(frozen=True)
class ModelInfo:
    n_vocab: int
    n_embd: int
    n_ctx_train: int
    add_bos: bool
    bos_text: str
    eos_text: str
    chat_template: str | None
    pooling: int  # llama_pooling_type from the GGUF; -1 when unspecified


class Model:
    """A loaded GGUF. Read-only after load, so it may be shared by contexts."""

    def __init__(self, path: Path, gpu_layers: int = 0, extra_bufts: bool = False) -> None:
        init_backend()
        params = L.llama_model_default_params()
        params.n_gpu_layers = gpu_layers
        # Extra CPU buffer types repack weights for AMX and friends; ggml's AMX kernels crash
        # on CPUs (and VMs) where AMX is advertised but not usable, as on this project's CI.
        params.use_extra_bufts = extra_bufts
        self.ptr = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise LlamaError(f"llama.cpp could not load {path.name}")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        template = L.llama_model_chat_template(self.ptr, None)
        self.info = ModelInfo(
            n_vocab=L.llama_vocab_n_tokens(self.vocab),
            n_embd=L.llama_model_n_embd(self.ptr),
            n_ctx_train=L.llama_model_n_ctx_train(self.ptr),
            add_bos=bool(L.llama_vocab_get_add_bos(self.vocab)),
            bos_text=self.token_text(L.llama_vocab_bos(self.vocab)),
            eos_text=self.token_text(L.llama_vocab_eos(self.vocab)),
            chat_template=template.decode("utf-8", "replace") if template else None,
            pooling=self._meta_int("pooling_type"),
        )

    def _meta_int(self, suffix: str) -> int:
        arch = self.meta("general.architecture") or ""
        value = self.meta(f"{arch}.{suffix}")
        return int(value) if value and value.lstrip("-").isdigit() else -1

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # the buffer was too small: -n is the size needed
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def count_tokens(self, text: str, add_special: bool, parse_special: bool = True) -> int:
        data = text.encode("utf-8")
        buf = (L.llama_token * 1)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, 0, add_special, parse_special)
        return -n if n < 0 else n

    def tokenize_at_most(self, text: str, limit: int, add_special: bool) -> list[int]:
        """The text's tokens, unless it clearly has more than ``limit``: then ``TooManyTokens``,
        found from a prefix of the text. llama.cpp's tokenizer takes time that grows faster than
        the text, with special tokens in it (22 s for 1.8 MB of chat), and a prompt that cannot
        fit needs no more than a count that proves it."""
        size = _PROBE_CHARS
        while size < len(text):
            n = self.count_tokens(text[:size], add_special)
            if n - _PROBE_SLACK > limit:
                raise TooManyTokens(n - _PROBE_SLACK)
            size *= 4
        return self.tokenize(text, add_special, True)

    def piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(128)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def grammar_compiles(self, grammar: str) -> bool:
        sampler = L.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        L.llama_sampler_free(sampler)
        return True

    def close(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)
            self.ptr = None


class Batch:
    """A llama_batch of tokens, each tagged with one sequence id."""

    def __init__(self, capacity: int, n_seq_max: int) -> None:
        self.ptr = L.llama_batch_init(capacity, 0, n_seq_max)
        self.capacity = capacity

    @property
    def size(self) -> int:
        return int(self.ptr.n_tokens)

    def clear(self) -> None:
        self.ptr.n_tokens = 0

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        i = self.ptr.n_tokens
        if i >= self.capacity:
            raise LlamaError("batch overflow")
        self.ptr.token[i] = token
        self.ptr.pos[i] = pos
        self.ptr.n_seq_id[i] = 1
        self.ptr.seq_id[i][0] = seq_id
        self.ptr.logits[i] = 1 if logits else 0
        self.ptr.n_tokens = i + 1
        return i

    def close(self) -> None:
        L.llama_batch_free(self.ptr)


def logits_row(ctx: object, index: int, n_vocab: int) -> np.ndarray:
    ptr = L.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))
