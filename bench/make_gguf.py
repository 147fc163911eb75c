"""Random-weight llama GGUF models at real models' sizes, for bench/gpu_check.sh.

The vocabulary, chat template and pooling of ``tests/tiny_gguf.py``, padded with dummy tokens to a
real vocabulary's size (their text starts with U+E000, so no ASCII input merges into them), F16
matrices drawn on all cores, an optional head size and KV head count. The end-of-generation and
byte tokens get a fixed negative logit bias (hidden dimension 0 is a constant in every
embedding, and the output matrix routes it to those tokens alone), so every generation runs to
max_tokens, greedy or sampled.

    python bench/make_gguf.py [--dir DIR] SHAPE...    writes DIR/SHAPE.gguf; SHAPES below

The output matrix is not tied to the embeddings (the bias needs its own column 0), so the files
hold more parameters than the models they are shaped like: 436M for gemma3-270m, 1.5B for
llama-1b.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.tiny_gguf import CHATML_TEMPLATE, POOLING, _vocab

# layers, hidden, heads, KV heads, head size, FFN, vocabulary, trained context
SHAPES = {
    "gemma3-270m": (18, 640, 4, 1, 256, 2048, 262_144, 32_768),  # Gemma 3 270M's sizes
    "llama-1b": (16, 2048, 32, 8, 64, 8192, 128_256, 131_072),  # Llama 3.2 1B's sizes
    "tiny": (2, 128, 2, 1, 128, 256, 32_000, 8192),  # --cpu: head size 128 != hidden / heads
    "tiny-gqa": (2, 256, 4, 2, 64, 512, 8000, 8192),
}
CHUNK = 1 << 22  # random values per task
BIAS = -10.0  # the logit bias of end-of-generation and byte tokens


def padded_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    tokens, scores, types = _vocab()
    pad = range(max(0, size - len(tokens)))
    tokens += [f"\ue000{i}" for i in pad]
    scores += [-1.0e6 - i for i in pad]
    types += [int(gguf.TokenType.NORMAL)] * len(pad)
    return tokens, scores, types


class Normals:
    """Standard normals times a scale, as F16, drawn in chunks on a thread pool (numpy releases
    the GIL); each chunk has its own seeded generator, so a file is the same on any core count."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.drawn = 0
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)

    def __call__(self, rows: int, cols: int, scale: float = 0.02) -> np.ndarray:
        out = np.empty(rows * cols, dtype=np.float16)
        starts = range(0, out.size, CHUNK)
        first = self.drawn
        self.drawn += len(starts)

        def fill(k: int) -> None:
            rng = np.random.Generator(np.random.SFC64([self.seed, first + k]))
            start = starts[k]
            chunk = out[start : start + CHUNK]
            chunk[:] = rng.standard_normal(chunk.size, dtype=np.float32) * np.float32(scale)

        list(self.pool.map(fill, range(len(starts))))
        return out.reshape(rows, cols)


def write(shape: str, out: Path, seed: int = 0) -> str:
    layers, hidden, heads, kv_heads, head_dim, ffn, vocab, ctx = SHAPES[shape]
    tokens, scores, types = padded_vocab(vocab)
    normals = Normals(seed)
    w = gguf.GGUFWriter(str(out), "llama")
    metadata = {
        "name": f"random-{shape}",
        "context_length": ctx,
        "embedding_length": hidden,
        "block_count": layers,
        "feed_forward_length": ffn,
        "head_count": heads,
        "head_count_kv": kv_heads,
        "key_length": head_dim,
        "value_length": head_dim,
        "rope_dimension_count": head_dim,
        "rope_freq_base": 10000.0,
        "layer_norm_rms_eps": 1e-5,
        "vocab_size": len(tokens),
        "file_type": gguf.LlamaFileType.MOSTLY_F16,
        "pooling_type": gguf.PoolingType(POOLING["mean"]),
        "tokenizer_model": "llama",
        "token_list": tokens,
        "token_scores": scores,
        "token_types": types,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unk_token_id": 0,
        "add_bos_token": True,
        "add_eos_token": False,
        "chat_template": CHATML_TEMPLATE,
    }
    for key, value in metadata.items():
        getattr(w, f"add_{key}")(value)

    embeddings = normals(len(tokens), hidden, 1.0)
    output = normals(len(tokens), hidden, 1.0)
    embeddings[:, 0] = 4.0
    output[:, 0] = 0.0
    biased = [tokens.index("</s>"), tokens.index("<|im_end|>")]
    biased += [i for i, kind in enumerate(types) if kind == int(gguf.TokenType.BYTE)]
    output[biased, :] = 0.0
    output[biased, 0] = BIAS
    ones = np.ones(hidden, dtype=np.float32)
    w.add_tensor("token_embd.weight", embeddings)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.attn_q.weight", normals(heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", normals(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", normals(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", normals(hidden, heads * head_dim))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_gate.weight", normals(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", normals(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", normals(hidden, ffn))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", output)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    params = 2 * len(tokens) * hidden + layers * hidden * (
        2 * (heads + kv_heads) * head_dim + 3 * ffn
    )
    return (
        f"{shape}: {layers} layers, hidden {hidden}, {heads} heads x {head_dim}, {kv_heads} KV "
        f"heads, FFN {ffn}, vocabulary {len(tokens)}, {params / 1e6:.0f}M parameters F16"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shapes", nargs="*", metavar="SHAPE", help=", ".join(SHAPES))
    ap.add_argument("--dir", type=Path, default=Path("."), help="writes DIR/SHAPE.gguf")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if set(a.shapes) - set(SHAPES):
        ap.error(f"unknown shapes: {sorted(set(a.shapes) - set(SHAPES))}")
    for shape in a.shapes:
        t0 = time.monotonic()
        out = a.dir / f"{shape}.gguf"
        tmp = out.with_suffix(".partial")
        line = write(shape, tmp, a.seed)
        tmp.replace(out)
        line += f", {out.stat().st_size / 2**20:.0f} MiB"
        out.with_suffix(".txt").write_text(line + "\n")  # what bench/gpu_check.py says it is
        print(f"wrote {out} ({line}) in {time.monotonic() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
