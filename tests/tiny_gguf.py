"""Write tiny random-weight llama GGUF models for tests (no downloads, ~0.2 s, ~660 KB).

A SentencePiece-style vocabulary with byte fallback (any UTF-8 input tokenizes), a ChatML chat
template, mean pooling for embeddings, and deterministic weights per seed. ``eog_bias`` < 0 makes
the model practically never stop by itself (completions run to max_tokens); > 0 makes it stop at
once. ``byte_bias`` < 0 keeps byte tokens out of generated text, so output is plain ASCII.
"""

from __future__ import annotations

import string
from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = [
    "the",
    "a",
    "an",
    "and",
    "of",
    "to",
    "in",
    "is",
    "it",
    "you",
    "that",
    "he",
    "was",
    "for",
    "on",
    "are",
    "with",
    "as",
    "I",
    "his",
    "they",
    "be",
    "at",
    "one",
    "have",
    "this",
    "from",
    "hello",
    "world",
    "model",
    "test",
    "user",
    "assistant",
    "system",
    "what",
    "how",
    "why",
    "yes",
    "no",
    "ok",
    "Hello",
    "The",
    "What",
]
POOLING = {"none": 0, "mean": 1, "cls": 2, "last": 3}


def _vocab() -> tuple[list[str], list[float], list[int]]:
    kinds = gguf.TokenType
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    seen: set[str] = set()

    def add(tok: str, score: float, kind: int) -> None:
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
            scores.append(score)
            types.append(int(kind))

    add("<unk>", 0.0, kinds.UNKNOWN)
    for control in ("<s>", "</s>", "<|im_start|>", "<|im_end|>"):
        add(control, 0.0, kinds.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, kinds.BYTE)
    chars = ["\u2581"] + [c for c in string.printable if c not in " \t\n\r\x0b\x0c"]
    for i, c in enumerate(chars):
        add(c, -1000.0 - i, kinds.NORMAL)
        if c != "\u2581":
            add("\u2581" + c, -500.0 - i, kinds.NORMAL)
    for i, w in enumerate(WORDS):
        add("\u2581" + w, -10.0 - i, kinds.NORMAL)
        add(w, -100.0 - i, kinds.NORMAL)
    for w in WORDS:  # prefixes, so SPM's greedy bigram merges can reach whole words
        full = "\u2581" + w
        for end in range(2, len(full)):
            add(full[:end], -200.0 - end, kinds.NORMAL)
        for end in range(2, len(w)):
            add(w[:end], -300.0 - end, kinds.NORMAL)
    return tokens, scores, types


def write_tiny_gguf(
    out: Path,
    *,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    ffn: int = 128,
    ctx: int = 2048,
    pooling: str = "mean",
    eog_bias: float = -10.0,
    byte_bias: float = -10.0,
    name: str = "tiny-random-llama",
    chat_template: str | None = CHATML_TEMPLATE,
) -> Path:
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(name)
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_pooling_type(gguf.PoolingType(POOLING[pooling]))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def rand(tensor: str, *shape: int) -> None:
        w.add_tensor(tensor, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    def ones(tensor: str) -> None:
        w.add_tensor(tensor, np.ones((hidden,), dtype=np.float32))

    tok_embd = rng.standard_normal((n_vocab, hidden)).astype(np.float32)
    out_w = rng.standard_normal((n_vocab, hidden)).astype(np.float32)
    # Hidden dim 0 is a near-constant feature after the final norm; routing it to chosen logits
    # gives those tokens a fixed bias (end-of-generation tokens, byte tokens).
    eog_ids = [tokens.index("</s>"), tokens.index("<|im_end|>")]
    byte_ids = [i for i, t in enumerate(types) if t == int(gguf.TokenType.BYTE)]
    if eog_bias or byte_bias:
        tok_embd[:, 0] = 4.0
        out_w[:, 0] = 0.0
        for ids, bias in ((eog_ids, eog_bias), (byte_ids, byte_bias)):
            if bias:
                out_w[ids, :] = 0.0
                out_w[ids, 0] = bias
    w.add_tensor("token_embd.weight", tok_embd)
    for i in range(layers):
        ones(f"blk.{i}.attn_norm.weight")
        for proj in ("q", "k", "v", "output"):
            rand(f"blk.{i}.attn_{proj}.weight", hidden, hidden)
        ones(f"blk.{i}.ffn_norm.weight")
        rand(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_up.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_down.weight", hidden, ffn)
    ones("output_norm.weight")
    w.add_tensor("output.weight", out_w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
