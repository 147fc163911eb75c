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
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
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
        """A token's bytes as generated text shows it; cached, as every step asks per sequence."""
        if special:
            return self._piece(token, True)
        try:
            return self._pieces[token]
        except KeyError:
            piece = self._pieces[token] = self._piece(token, False)
            return piece

    def _piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(128)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", "replace") if token >= 0 else ""

    def is_eog(self, token: int) -> bool:
        try:
            return self._eog[token]
        except KeyError:
            eog = self._eog[token] = bool(L.llama_vocab_is_eog(self.vocab, token))
            return eog

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
    """A llama_batch of tokens, each tagged with one sequence id, over numpy arrays.

    The engine fills a whole step at once (``fill``): one slice assignment per field instead of
    six ctypes stores per token, which at 64 sequences and 512-token prefill chunks was most of
    what a step cost besides ``llama_decode``. The arrays are ours, so it is never freed through
    ``llama_batch_free``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._token = np.zeros(capacity, dtype=np.int32)
        self._pos = np.zeros(capacity, dtype=np.int32)
        self._n_seq_id = np.ones(capacity, dtype=np.int32)  # one sequence per token, always
        self._seq = np.zeros(capacity, dtype=np.int32)
        self._logits = np.zeros(capacity, dtype=np.int8)
        int32_p = ctypes.POINTER(ctypes.c_int32)
        base = self._seq.ctypes.data
        self._seq_ptrs = (int32_p * capacity)(
            *(ctypes.cast(base + 4 * i, int32_p) for i in range(capacity))
        )
        self.ptr = L.llama_batch(
            n_tokens=0,
            token=self._token.ctypes.data_as(int32_p),
            embd=None,
            pos=self._pos.ctypes.data_as(int32_p),
            n_seq_id=self._n_seq_id.ctypes.data_as(int32_p),
            seq_id=self._seq_ptrs,
            logits=self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )

    def fill(
        self, tokens: list[int], positions: list[int], seqs: list[int], outputs: list[int]
    ) -> None:
        """The batch becomes these tokens; ``outputs`` lists the indexes that get logits."""
        n = len(tokens)
        if n > self.capacity:
            raise LlamaError("batch overflow")
        self._token[:n] = tokens
        self._pos[:n] = positions
        self._seq[:n] = seqs
        self._logits[:n] = 0
        self._logits[outputs] = 1
        self.ptr.n_tokens = n


def logits_row(ctx: object, index: int, n_vocab: int) -> np.ndarray:
    ptr = L.llama_get_logits_ith(ctx, index)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,))


def logits_rows(ctx: object, rows: int, n_vocab: int) -> np.ndarray:
    """The last decode's logits, one row per output in batch order."""
    ptr = L.llama_get_logits(ctx)
    return np.ctypeslib.as_array(ptr, shape=(rows, n_vocab))
